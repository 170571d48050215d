"""Replayable event sources: a synthetic world with known ground truth, and MovieLens-100K."""
