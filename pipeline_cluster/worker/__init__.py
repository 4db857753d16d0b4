"""A stage's worker process: the program that runs in it (`main`) and the node's handle on it (`process`)."""
