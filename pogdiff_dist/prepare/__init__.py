"""The prepare stage on Ray: records -> encoded Parquet (Ray Data actors) -> k-NN and text
density (Ray tasks) -> WebDataset shards. Resumable: every stage leaves a marker."""

from pogdiff_dist.prepare.pipeline import run_prepare

__all__ = ["run_prepare"]
