"""``train_loop_per_worker``: the Ray Train adapter around :class:`~pogdiff_dist.train.trainer.Trainer`,
and the only ray.train user inside the library.

It supplies what the Trainer does not know about: the worker's device
(``ray.train.torch.get_device()``), a reader that streams shards with Ray Data
(``read_webdataset``, order preserved: the Trainer decides which rows each rank gets),
``ray.train.report`` for checkpoints, and the latest checkpoint to resume from.
"""

from __future__ import annotations

from pathlib import Path

import ray.data
import ray.train
import ray.train.torch

from pogdiff_dist.config import from_dict
from pogdiff_dist.data.shards import decode_sample
from pogdiff_dist.runtime import quiet_output
from pogdiff_dist.train.trainer import Trainer

# Each worker streams its shards with Ray Data read tasks of READ_TASK_CPUS CPUs (Ray Data's own
# default, made explicit), at most READ_TASKS_PER_WORKER at once: one reading the shard being
# consumed, one reading ahead into the next, so a shard boundary does not stall the step. A
# read decodes .npy arrays out of a tar (latents and text states are precomputed), far below
# one core at the tens of samples/s a GPU step takes. The tasks run outside the worker group's
# placement group (Ray Data spreads them over free CPUs), so a cluster needs these CPUs free
# beside every worker, or the stream waits forever: pogdiff_dist/cluster_plan.py checks it.
READ_TASK_CPUS = 1.0
READ_TASKS_PER_WORKER = 2


def _report(metrics: dict, checkpoint_dir: Path) -> None:
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)))


def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(config["cfg"])
    quiet_output(cfg.ray.verbose)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tracker = config["tracking"].open(rank, cfg.tracking.system_metrics, cfg.tracking.system_metrics_interval_s)
    trainer = Trainer(cfg, config["prepared_dir"], ray.train.torch.get_device(), rank, world, report=_report,
                      tracker=tracker, run_dir=config["run_dir"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.load(d)
    # Each rank reads its own deterministic share of the epoch (pogdiff_dist.data.assignment)
    # with Ray Data, in the order given: streamed, never materialised on the worker.
    ray.data.DataContext.get_current().execution_options.preserve_order = True

    def read(paths: list[str]):
        # no more concurrent reads than shards: Ray Data warns when a limit can never be reached
        ds = ray.data.read_webdataset(paths, decoder=decode_sample, override_num_blocks=len(paths),
                                      num_cpus=READ_TASK_CPUS, concurrency=min(READ_TASKS_PER_WORKER, len(paths)))
        return ds.iter_batches(batch_size=cfg.optim.batch_size, batch_format="numpy", prefetch_batches=2)

    try:
        trainer.fit(read)
    finally:
        tracker.close()
