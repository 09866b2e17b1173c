"""Train state, optimizer, train step and checkpointing."""
