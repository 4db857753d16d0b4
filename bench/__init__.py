"""Benchmark harness of issue 6: pipeline_cluster against multiprocessing.Pool and a plain loop (`python -m bench`)."""
