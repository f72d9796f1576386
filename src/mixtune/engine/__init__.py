"""The training engine: one loop on accelerate, checkpoints, probing and look-ahead."""
