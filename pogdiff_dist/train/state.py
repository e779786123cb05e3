"""A rank's training state and the rules every rank must agree on.

:class:`TrainState` is what a checkpoint holds besides the DeepSpeed partitions (one object,
one safetensors file per rank); :class:`EpochLedger` accounts for what each epoch trained on;
:class:`HostComm` carries the ranks' agreements on host facts (each has a batch, epoch counts)
without touching the device; :func:`nonfinite_policy` is the rule for skipped steps. The only
torch.distributed user of the training loop.
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
from pogdiff_dist.syncs import host_side


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
    generator: torch.Tensor | None = None  # the device generator's state (noise, timesteps), as CPU bytes
    host_generator: torch.Tensor | None = None  # the host generator's (dropout, neighbour draws, CBDM partners)
    open_index: torch.Tensor | None = None  # [rows trained] sample indices of the open epoch
    open_identity: torch.Tensor | None = None  # [rows trained] their identities

    TENSORS = ("generator", "host_generator", "open_index", "open_identity")

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
            self.indices.append(item.batch.index)
            self.identities.append(item.batch.identity)

    def close(self, epoch: int, num_samples: int, comm: HostComm, num_identities: int = 0) -> dict:
        """All ranks call at the end of a full pass; returns the global counts. With
        ``data.sampling`` a sample may be delivered several times by design: ``epoch_repeats``
        counts those extra rows, ``identity_rows`` the rows trained per identity."""
        mine = np.concatenate(self.indices) if self.indices else np.zeros(0, np.int64)
        times = comm.all_reduce(np.bincount(mine, minlength=num_samples).astype(np.int64))
        per_id = np.bincount(np.concatenate(self.identities), minlength=num_identities) if self.identities else (
            np.zeros(num_identities, np.int64))
        per_id = comm.all_reduce(per_id.astype(np.int64)).tolist()
        repeated = max(0, self.rows - self.planned) if self.planned is not None else 0
        rows, skipped, repeated = comm.all_reduce(np.array([self.rows, self.skipped, repeated], np.float64)).tolist()
        self.__init__()
        unique = float((times > 0).sum())
        return {"epoch": epoch, "epoch_rows": rows, "epoch_samples": rows - skipped, "epoch_skipped_bad": skipped,
                "epoch_unique_samples": unique, "epoch_seen_twice": float((times > 1).sum()),
                "epoch_repeats": rows - skipped - unique, "epoch_not_delivered": float(num_samples - unique - skipped),
                "epoch_repeated_after_resume": repeated, "identity_rows": per_id}


class HostComm:
    """Collectives over host values (numpy), which never touch the device: every rank's
    agreement that it has a batch, the epoch ledger's counts, the window's sample count, the
    end-of-run peaks. Under NCCL (which reduces CUDA tensors only) a gloo group of the same
    ranks carries them, so agreeing on a host fact never waits for the GPU."""

    def __init__(self):
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.group = None
        if self.world > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # every rank creates it, in the same order

    @host_side
    def all_reduce(self, values, op: str = "sum") -> np.ndarray:
        a = np.asarray(values)
        if self.world == 1:
            return a
        t = torch.from_numpy(np.ascontiguousarray(a))
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()), group=self.group)
        return t.numpy()

    @host_side
    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (a small picklable host value), in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def every(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank."""
        return bool(self.all_reduce(np.array([int(flag)], np.int64), op="min")[0])

    def any(self, flag: bool) -> bool:
        return bool(self.all_reduce(np.array([int(flag)], np.int64), op="max")[0])

    def any_every(self, a: bool, b: bool) -> tuple[bool, bool]:
        """(``a`` on some rank, ``b`` on every rank) in one collective."""
        r = self.all_reduce(np.array([int(a), 1 - int(b)], np.int64), op="max")
        return bool(r[0]), not bool(r[1])


def nonfinite_policy(state: TrainState, train_cfg, skipped_steps: list[int], window_steps: list[int],
                     bad_here: dict[int, list[int]]) -> None:
    """Count the window's skipped optimiser steps (a non-finite loss on some rank, or gradients
    DeepSpeed refused); raise when ``train.on_nonfinite=raise`` or after ``train.max_nonfinite``
    skips in a row. ``window_steps``: the window's optimiser steps in order; ``bad_here``: this
    rank's non-finite micro-batches by step (their sample indices), to name them."""
    skipped = set(skipped_steps)
    for step in window_steps:
        if step not in skipped:
            state.nonfinite_run = 0
            continue
        state.nonfinite += 1
        state.nonfinite_run += 1
        where = (f"non-finite loss at step {step} on this rank (samples {bad_here[step]})" if step in bad_here
                 else f"step {step} skipped: a non-finite loss on another rank or non-finite gradients")
        stop = train_cfg.on_nonfinite == "raise" or state.nonfinite_run >= train_cfg.max_nonfinite
        if not stop:
            print(f"[train] {where}; its update was not applied", flush=True)
            continue
        why = ("train.on_nonfinite=raise" if train_cfg.on_nonfinite == "raise"
               else f"{state.nonfinite_run} non-finite steps in a row (train.max_nonfinite)")
        raise FloatingPointError(f"{where}; stopping: {why}")
