"""Training: the step (pure torch), the Trainer (no Ray), the DeepSpeed engine, the Ray
Train worker adapter and the driver."""
