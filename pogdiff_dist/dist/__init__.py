"""Everything that touches Ray or DeepSpeed lives in this package."""
