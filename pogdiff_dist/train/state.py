"""A rank's training state and the rules every rank must agree on.

:class:`TrainState` is what a checkpoint holds besides the DeepSpeed partitions (one object,
one safetensors file per rank); :class:`EpochLedger` accounts for what each epoch trained on;
:func:`agree_to_step` and :func:`nonfinite_policy` are the cross-rank rules of the loop. The
only torch.distributed user of the training loop.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from pogdiff_dist.data.shards import StreamedBatch


@dataclass
class TrainState:
    """Everything of a rank's progress that is not in the DeepSpeed checkpoint, saved as one object."""

    step: int = 0
    epoch: int = 0
    nonfinite: int = 0  # steps skipped for a non-finite loss, in all
    nonfinite_run: int = 0  # ... in a row
    epochs: list[dict] = field(default_factory=list)  # closed epochs' accounting (EpochLedger.close)
    last: dict = field(default_factory=dict)  # the last logged window's means
    # the open epoch, as this rank's ledger had it at the checkpoint: a resume skips exactly
    # ``open_rows`` rows of the epoch's (deterministic) stream and keeps counting from here
    open_rows: int = 0
    open_skipped: int = 0
    generator: torch.Tensor | None = None  # noise / timestep / neighbour generator state (CPU bytes)
    open_index: torch.Tensor | None = None  # [rows trained] sample indices of the open epoch
    open_identity: torch.Tensor | None = None  # [rows trained] their identities

    TENSORS = ("generator", "open_index", "open_identity")

    def save(self, path: Path) -> None:
        meta = {k: v for k, v in asdict(self).items() if k not in self.TENSORS}
        tensors = {k: getattr(self, k) for k in self.TENSORS if getattr(self, k) is not None}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"state": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path) -> TrainState:
        if not path.is_file():
            raise ValueError(f"checkpoint {path.parent} holds no {path.name}: written with another world size?")
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["state"])
            names = set(f.keys())
            return cls(**meta, **{k: f.get_tensor(k) for k in cls.TENSORS if k in names})


class EpochLedger:
    """What each epoch trained on, so nothing is lost silently.

    Per rank: rows received from the stream, rows skipped as bad (``data.on_bad=skip``),
    the sample index and identity of every trained row. A checkpoint saves the open epoch's
    ledger (:meth:`snapshot`) and a resume restores it (:meth:`restore`), so an epoch that
    a restart interrupted is accounted as one epoch. ``planned`` (set when the epoch's stream
    ends) is how many rows the stream held for this rank: delivered rows beyond it would be
    rows trained twice across the restart (``epoch_repeated_after_resume``).
    """

    def __init__(self):
        self.rows, self.skipped, self.planned = 0, 0, None
        self.indices: list[np.ndarray] = []
        self.identities: list[np.ndarray] = []

    def snapshot(self, state: TrainState) -> None:
        state.open_rows, state.open_skipped = self.rows, self.skipped
        cat = (lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int64)) if parts
               else torch.zeros(0, dtype=torch.int64))
        state.open_index, state.open_identity = cat(self.indices), cat(self.identities)

    @classmethod
    def restore(cls, state: TrainState) -> EpochLedger:
        ledger = cls()
        ledger.rows, ledger.skipped = state.open_rows, state.open_skipped
        for name, parts in (("open_index", ledger.indices), ("open_identity", ledger.identities)):
            t = getattr(state, name)
            if t is not None and t.numel():
                parts.append(t.numpy())
        return ledger

    def add(self, item: StreamedBatch) -> None:
        self.rows += item.rows
        self.skipped += len(item.skipped)
        if item.batch is not None:
            self.indices.append(item.batch.index.numpy())
            if item.batch.identity is not None:
                self.identities.append(item.batch.identity.numpy())

    def close(self, epoch: int, num_samples: int, device: torch.device, num_identities: int = 0) -> dict:
        """All ranks call at the end of a full pass; returns the global counts. With
        ``data.sampling`` a sample may be delivered several times by design: ``epoch_repeats``
        counts those extra rows, ``identity_rows`` the rows trained per identity."""
        mine = np.concatenate(self.indices) if self.indices else np.zeros(0, np.int64)
        times = torch.from_numpy(np.bincount(mine, minlength=num_samples).astype(np.int32))
        times = all_reduce(times, device)
        per_id = np.bincount(np.concatenate(self.identities), minlength=num_identities) if self.identities else (
            np.zeros(num_identities, np.int64))
        per_id = all_reduce(torch.from_numpy(per_id.astype(np.int64)), device).tolist()
        repeated = max(0, self.rows - self.planned) if self.planned is not None else 0
        rows, skipped, repeated = all_reduce(torch.tensor([self.rows, self.skipped, repeated],
                                                          dtype=torch.float64), device).tolist()
        self.__init__()
        unique = float((times > 0).sum())
        return {"epoch": epoch, "epoch_rows": rows, "epoch_samples": rows - skipped, "epoch_skipped_bad": skipped,
                "epoch_unique_samples": unique, "epoch_seen_twice": float((times > 1).sum()),
                "epoch_repeats": rows - skipped - unique, "epoch_not_delivered": float(num_samples - unique - skipped),
                "epoch_repeated_after_resume": repeated, "identity_rows": per_id}


def all_reduce(t: torch.Tensor, device: torch.device, op: str = "sum") -> torch.Tensor:
    """``t`` reduced over ranks (``sum``, ``max`` or ``min``), returned on the CPU. The
    collective runs on ``device``: NCCL needs CUDA tensors, gloo CPU ones."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    t = t.to(device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.cpu()


def agree_to_step(loss: torch.Tensor | None, device: torch.device) -> tuple[bool, bool, bool]:
    """(every rank has a batch, every rank's loss is finite, this rank's loss is finite).

    Every rank must agree to step, or the gradient all-reduce would hang: a rank with
    nothing left to train on, or a non-finite loss anywhere, makes every rank skip. One
    small all-reduce (and one host sync) per micro-batch.
    """
    here = torch.ones((), device=device) if loss is None else torch.isfinite(loss.detach()).float()
    flags = torch.stack([torch.ones((), device=device) * float(loss is not None), here])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    has_batch, finite = flags.tolist()
    return bool(has_batch), bool(finite), bool(here.item())


def nonfinite_policy(state: TrainState, train_cfg, finite_here: bool, where: str) -> None:
    """Count a skipped step; raise when ``train.on_nonfinite=raise`` or after
    ``train.max_nonfinite`` skips in a row. ``where`` describes this rank's bad loss."""
    state.nonfinite += 1
    state.nonfinite_run += 1
    stop = train_cfg.on_nonfinite == "raise" or state.nonfinite_run >= train_cfg.max_nonfinite
    if not stop:
        if not finite_here:
            print(f"[train] skipped step: {where}", flush=True)
        return
    why = ("train.on_nonfinite=raise" if train_cfg.on_nonfinite == "raise"
           else f"{state.nonfinite_run} non-finite steps in a row (train.max_nonfinite)")
    if finite_here:
        raise FloatingPointError(f"non-finite loss on another rank at step {state.step + 1}; stopping: {why}")
    raise FloatingPointError(f"{where}; stopping: {why}")
