"""The two-tower model, its losses and samplers, the nightly full retrain and offline evaluation."""
