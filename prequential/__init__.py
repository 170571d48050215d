"""The main job: the whole system replayed on a simulated clock, scored test-then-train (prequential)."""
