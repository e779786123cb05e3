"""The step statistics between two log lines: kept on the device, read once per window.

Each micro-batch leaves its loss and stats as detached device tensors and its row count as a
host int; each optimiser step leaves the device flag saying whether its update was skipped
(a non-finite loss on some rank). :meth:`MetricsWindow.read` is the only place any of them
reaches the host: one stack, one copy, at the log interval. The non-finite policy is applied
there too (counted, named, raised), a log window late by design.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pogdiff_dist.syncs import host_side


@dataclass
class _Micro:
    loss: torch.Tensor  # 0-d, device
    stats: dict  # name -> 0-d device tensor or float
    rows: int  # samples trained (host)
    index: np.ndarray  # their dataset indices (host), to name a bad batch


@dataclass
class _Step:
    step: int
    skipped: torch.Tensor | None  # 0-d device flag (1.0: the optimiser skipped this step's update)
    overflow: bool  # DeepSpeed's host verdict on the gradients
    micro: list[_Micro] = field(default_factory=list)


@dataclass
class WindowReading:
    means: dict[str, float]  # loss and every stat, averaged over every rank's finite micro-batches of the window
    samples: int  # samples trained in the window, all ranks
    seconds: float
    data_wait_s: float
    skipped_steps: list[int]  # optimiser steps whose update was not applied
    bad_here: dict[int, list[int]]  # step -> this rank's sample indices of micro-batches with a non-finite loss


class MetricsWindow:
    def __init__(self):
        self._steps: list[_Step] = []
        self._open: list[_Micro] = []  # micro-batches of the optimiser step in progress
        self.t0, self.data_wait = time.time(), 0.0

    def restart_clock(self) -> None:
        self.t0, self.data_wait = time.time(), 0.0

    def add_micro(self, loss: torch.Tensor, stats: dict, rows: int, index: np.ndarray) -> None:
        self._open.append(_Micro(loss.detach(), stats, rows, index))

    def close_step(self, step: int, skipped: torch.Tensor | None, overflow: bool) -> None:
        self._steps.append(_Step(step, skipped, overflow, self._open))
        self._open = []

    def __len__(self) -> int:
        return len(self._steps)

    def read(self, comm) -> WindowReading:
        """Everything since the last read, on the host (one device-to-host copy), and a new
        window. Every rank calls (the sample count is summed over ranks)."""
        steps, self._steps = self._steps, []
        micro = [m for s in steps for m in s.micro]
        keys = sorted({k for m in micro for k in m.stats})
        values = torch.zeros((0, 2 + len(keys)))
        skipped_flags: list[float] = []
        if micro:
            device = micro[0].loss.device
            rows = [torch.stack([m.loss.float(), *[_as_tensor(m.stats.get(k, math.nan), device) for k in keys]])
                    for m in micro]
            flags = [s.skipped.float() if s.skipped is not None else torch.zeros((), device=device) for s in steps]
            packed = torch.cat([torch.stack(rows).flatten(), torch.stack(flags)]).cpu()  # the window's one copy
            values = packed[:len(micro) * (1 + len(keys))].view(len(micro), 1 + len(keys))
            skipped_flags = packed[len(micro) * (1 + len(keys)):].tolist()
        return self._summarise(steps, micro, keys, values, skipped_flags, comm)

    @host_side
    def _summarise(self, steps, micro, keys, values, skipped_flags, comm) -> WindowReading:
        now = time.time()
        finite = torch.isfinite(values[:, 0]) if len(micro) else torch.zeros(0, dtype=torch.bool)
        # the means over every rank's finite micro-batches: a rank that only idled this window
        # (uneven shares under data.sampling) still logs the run's figures
        sums = {}
        for col, name in enumerate(["loss", *keys]):
            column = values[finite, col] if len(micro) else values[:, col]
            column = column[~torch.isnan(column)]
            if len(column):
                sums[name] = (float(column.double().sum()), len(column))
        parts = comm.all_gather((sums, sum(m.rows for m in micro)))
        totals: dict[str, list[float]] = {}
        for part, _ in parts:
            for name, (total, count) in part.items():
                acc = totals.setdefault(name, [0.0, 0])
                acc[0], acc[1] = acc[0] + total, acc[1] + count
        means = {name: total / count for name, (total, count) in sorted(totals.items())}
        bad_here: dict[int, list[int]] = {}
        at = 0
        for s in steps:
            for m in s.micro:
                if not bool(finite[at]):
                    bad_here.setdefault(s.step, []).extend(int(i) for i in m.index)
                at += 1
        skipped = [s.step for s, flag in zip(steps, skipped_flags) if flag or s.overflow]
        samples = int(sum(rows for _, rows in parts))
        reading = WindowReading(means, samples, now - self.t0, self.data_wait, skipped, bad_here)
        self.t0, self.data_wait = now, 0.0
        return reading


def _as_tensor(value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().to(device)
    return torch.tensor(float(value), device=device)
