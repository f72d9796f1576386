"""Evaluation: per-domain loss on fixed batches, generation accuracy, constraint checks."""
