"""What one training step decides before its loss: on the host (:class:`StepPlan`) and on the
device (:class:`Draws`). See :mod:`pogdiff_dist.train.step`."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from pogdiff_dist.data.shards import Batch
from pogdiff_dist.devices import to_device

Stats = dict[str, "torch.Tensor | float"]


@dataclass
class StepPlan:
    """What a step decides on the host, before its batch reaches the device. Tensors are CPU
    tensors until :meth:`to_device`; ``host_stats`` are floats (and PoGDiff's per-sample psi)."""

    dropped: torch.Tensor  # [B] bool: caption replaced by the empty caption's states
    active: torch.Tensor  # [A] long: rows that run the second-condition pass (y' or CBDM's y_other)
    psi: torch.Tensor | None = None  # [B] float32 (PoGDiff): 0 where no y' pass runs
    nbr: torch.Tensor | None = None  # [B] long (PoGDiff): the neighbour drawn, j ~ Cat(w)
    other: torch.Tensor | None = None  # [B] long (CBDM): the row whose condition is y'
    nbr_tokens: np.ndarray | None = None  # [A, L] the active rows' neighbour caption token ids (host)
    nbr_len: np.ndarray | None = None  # [A]
    host_stats: dict | None = None

    @property
    def num_active(self) -> int:
        return len(self.active)

    def to_device(self, device) -> StepPlan:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("dropped", "active", "psi", "nbr", "other"):
            if moved[name] is not None:
                moved[name] = to_device(moved[name], device)
        return StepPlan(**moved)


@dataclass
class Draws:
    """What every method shares: the noisy input, the caption condition with dropped captions
    replaced by the empty caption's, the regression target and the weight of the denoising term.

    DDPM families: t integer [B], x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target eps or
    v = sqrt(abar) eps - sqrt(1 - abar) x0, weight min-SNR (ones when ``loss.snr_gamma`` is off).
    Flow families (SD3, Flux): t is s in (0, 1) [B] float, x_t = (1 - s) x0 + s eps, target the
    velocity eps - x0, weight ``loss.flow_weighting``'s w(s)."""

    batch: Batch
    plan: StepPlan
    t: torch.Tensor  # [B]
    eps: torch.Tensor  # [B, C, H, W]
    x_t: torch.Tensor  # [B, C, H, W]
    y: torch.Tensor  # [B, L, D] float32, after caption dropout
    dropped: torch.Tensor  # [B] bool
    target: torch.Tensor  # [B, C, H, W]
    snr_weight: torch.Tensor  # [B]
    pooled: torch.Tensor | None = None  # [B, P] float32, after caption dropout (SDXL, SD3, Flux)

    def __len__(self) -> int:
        return len(self.t)
