"""The one training loop, checkpoints, distributed set-up and logging, shared by every method."""
