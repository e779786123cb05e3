"""The Trainer in one plain process (world size 1, no Ray): tests and ``scripts/gpu_check.sh``.

Shards are read with ``webdataset`` instead of Ray Data's ``streaming_split``, and each
checkpoint folder the Trainer reports is moved into the run directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pogdiff_dist.config import Config
from pogdiff_dist.data.shards import iter_shard_batches
from pogdiff_dist.train.engine import init_single_process
from pogdiff_dist.train.stream import Reader
from pogdiff_dist.train.trainer import Trainer


class LocalCheckpoints:
    """``report`` for a plain process: the files of each reported folder are moved to
    ``root/checkpoint_<step>``, keeping the newest ``keep``; ``metrics`` lists every report.

    Moved, not copied: the reported folder is a temporary one the Trainer deletes after the
    call, and a checkpoint of SD v1.5 at ZeRO-2 bf16 with EMA is about 15.5 GB; on one
    filesystem a move is a rename, so the disk never holds it twice."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root, self.keep, self.metrics = Path(root), keep, []

    def __call__(self, metrics: dict, checkpoint_dir: Path) -> None:
        dest = self.root / f"checkpoint_{metrics['step']:06d}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for entry in Path(checkpoint_dir).iterdir():  # its contents: the Trainer removes the folder itself
            shutil.move(entry, dest / entry.name)
        self.metrics.append(metrics)
        for old in self.all()[:-self.keep]:
            shutil.rmtree(old)

    def all(self) -> list[Path]:
        return sorted(p for p in self.root.glob("checkpoint_*") if p.is_dir())

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None


def read_local(batch_size: int = 64) -> Reader:
    """``read(paths)`` for one plain process: the shards in the given order with ``webdataset``
    (the trainer's stream assigns, resamples and shuffles)."""
    return lambda paths: iter_shard_batches(paths, batch_size, 0)


def train_local(cfg: Config, prepared_dir: str | Path, run_dir: str | Path, device: torch.device | str = "cpu",
                resume: bool = False, tracker=None) -> tuple[Trainer, LocalCheckpoints]:
    """The Trainer in this process, world size 1, no Ray: shards read with ``webdataset``,
    checkpoints in ``run_dir/checkpoint_<step>`` (``resume`` continues from the newest)."""
    init_single_process(device)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = LocalCheckpoints(run_dir, keep=cfg.train.keep_checkpoints)
    trainer = Trainer(cfg, prepared_dir, device, rank=0, world=1, report=checkpoints, tracker=tracker,
                      run_dir=run_dir)
    if resume:
        latest = checkpoints.latest()
        if latest is None:
            raise ValueError(f"resume: no checkpoint_* folder in {run_dir}")
        trainer.load(latest)
    trainer.fit(read_local())
    return trainer, checkpoints
