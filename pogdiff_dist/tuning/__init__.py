"""Hyperparameter sweeps with Ray Tune: the sweep spec, the trial, the driver."""
