"""pogdiff_dist: PoGDiff fine-tuning of diffusers UNets, distributed with Ray and DeepSpeed."""
