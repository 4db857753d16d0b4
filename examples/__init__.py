"""Small runnable pipelines used by the README and `pipeline-cluster demo`."""
