"""SSH bootstrap of remote nodes with paramiko, and the cluster config."""
