"""Tracking: the only MLflow user. Runs (create, log, finish, tags) and the comparison of runs."""
