"""Datasets, shards, neighbours and text density: pure data code (no ray, no deepspeed)."""
