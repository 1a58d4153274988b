"""Experiments built on the trainer: the replication sweep of the paper's Table 1."""
