"""Logging from every process of the cluster to one place: records, their route, and the log server."""
