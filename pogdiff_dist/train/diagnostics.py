"""What a run shows besides its metrics: the psi values it trained with and the identity
frequencies it trained on, as plots rank 0 writes into ``run_dir/plots`` (the driver logs
them to MLflow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pogdiff_dist.config import Config
from pogdiff_dist.data.records import IDENTITY_PROMPT
from pogdiff_dist.data.shards import Manifest
from pogdiff_dist.pipeline import image_grid
from pogdiff_dist.syncs import host_side

PLOTS_DIR = "plots"


class PsiRecord:
    """The per-sample psi of every PoGDiff step (drawn on the host by the step's plan), in a
    host ring of ``capacity`` values: the latest ``capacity`` samples when the run is longer."""

    def __init__(self, capacity: int = 1 << 18):
        self.values = np.zeros(capacity, np.float32)
        self.seen = 0

    @host_side
    def add(self, psi) -> None:
        psi = np.asarray(psi, np.float32).reshape(-1)[-len(self.values):]
        at = np.arange(self.seen, self.seen + len(psi)) % len(self.values)
        self.values[at] = psi
        self.seen += len(psi)

    def array(self) -> np.ndarray:
        return self.values[:min(self.seen, len(self.values))].copy()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_psi_histogram(psi: np.ndarray, out: Path, title: str) -> Path:
    """psi's distribution: the share of samples at exactly 0 (no PoG term) and a histogram of
    log10 psi for the rest (psi_den spans orders of magnitude when the ELBOs spread)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    positive = psi[(psi > 0) & np.isfinite(psi)]  # a non-finite psi (an overflowed run) has no bin
    if len(positive):
        ax.hist(np.log10(positive), bins=50, color="C0")
        ax.axvline(0.0, color="gray", linestyle="--", linewidth=1, label="psi = 1")
        ax.legend(fontsize=8)
    ax.set_xlabel("log10 psi (samples with psi > 0)")
    ax.set_ylabel("samples")
    zero = float((psi == 0).mean()) if len(psi) else float("nan")
    median = float(np.median(positive)) if len(positive) else float("nan")
    ax.set_title(f"{title}\n{len(psi)} samples, {zero:.0%} at psi = 0, median of the rest {median:.3g}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_identity_counts(identities: list[str], counts: list[int], few_shot: set[str], out: Path,
                         title: str) -> Path:
    """Training images per identity, largest first, few-shot identities in another colour (log y)."""
    plt = _pyplot()
    order = np.argsort(counts)[::-1]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(identities)), 3.5))
    colors = ["C3" if identities[i] in few_shot else "C0" for i in order]
    ax.bar(range(len(order)), [counts[i] for i in order], color=colors)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.8)  # bars start below 1 image, so a 2-image identity shows as a bar
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    for i, k in enumerate(order):
        ax.text(i, counts[k], str(counts[k]), ha="center", va="bottom", fontsize=7)
    if len(identities) <= 60:
        ax.set_xticks(range(len(order)), [identities[i] for i in order], rotation=90, fontsize=6)
    ax.set_ylabel("training images (log)")
    ax.set_title(f"{title}\n{len(identities)} identities, {len(few_shot)} few-shot (red), "
                 f"{sum(counts)} images", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_plots(out: Path, manifest: Manifest, psi: PsiRecord | None, loss_cfg, prepared: str) -> None:
    """``run_dir/plots``: the identity frequencies trained on and (PoGDiff) psi's distribution."""
    out.mkdir(exist_ok=True)
    plot_identity_counts(manifest.identities, manifest.train_counts, set(manifest.minority()),
                         out / "identity_counts.png", manifest.dataset or prepared)
    if psi is not None and psi.seen:
        plot_psi_histogram(psi.array(), out / "psi_histogram.png",
                           f"psi on rank 0 over the run's last samples (a1={loss_cfg.a1}, a2={loss_cfg.a2}, a3={loss_cfg.a3})")


def sample_grid(pipe, manifest: Manifest, cfg: Config, out: Path) -> Path:
    """Images from fixed prompts for the most frequent majority and the rarest minority identity."""
    names = [manifest.majority()[0]] if manifest.majority() else []
    if manifest.minority():
        names.append(manifest.minority()[-1])
    prompts = [IDENTITY_PROMPT.format(name=n) for n in names]
    images = pipe(prompts, num_inference_steps=cfg.train.sample_steps, guidance_scale=cfg.train.guidance_scale,
                  num_images_per_prompt=cfg.train.samples_per_prompt,
                  generator=torch.Generator().manual_seed(cfg.train.seed))
    counts = dict(zip(manifest.identities, manifest.train_counts))
    image_grid(images, rows=len(prompts), labels=[f"{n} ({counts[n]} imgs)" for n in names]).save(out)
    return out


def eta(done_steps: int, left_steps: int, elapsed_s: float) -> str:
    """Time left at the pace of the ``done_steps`` so far: ``4m05s``, ``2h10m``, ``?`` before any."""
    if done_steps <= 0:
        return "?"
    secs = int(left_steps * elapsed_s / done_steps)
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m" if secs >= 3600 else f"{secs // 60}m{secs % 60:02d}s"
