"""Evaluation outputs: metrics.json, the generated images, per-identity grids and a plot of
each metric against training-set frequency (MLflow logging: :meth:`pogdiff_dist.tracking.runs.TrackedRun.log_eval`).

Layout of ``out_dir``::

    metrics.json                      every number (summary, per identity, what was used)
    metrics_vs_frequency.png          each metric per identity vs #training images (log x)
    grids/<identity>.png              generated images (top) and training images (bottom)
    images/<identity>/<identity>-NNN.png   every generated image, lossless
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from pogdiff_dist.data.records import slugify

METRIC_LABELS = {"fid": "FID (lower is better)", "dino": "DINO score (cosine)", "grecall": "gRecall",
                 "accuracy": "identity accuracy"}


def _json_safe(x):
    """NaN -> None, numpy scalars -> Python: metrics.json stays strict JSON."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def save_images(out_dir: Path, generated: dict[str, np.ndarray]) -> Path:
    root = Path(out_dir) / "images"
    for name, images in generated.items():
        folder = root / slugify(name)
        folder.mkdir(parents=True, exist_ok=True)
        for j, im in enumerate(images):
            Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(folder / f"{slugify(name)}-{j:03d}.png")
    return root


def identity_grid(name: str, generated: np.ndarray, train: np.ndarray, row: dict) -> Image.Image:
    """Two rows: the generated images, then (up to as many) training images."""
    from pogdiff_dist.pipeline import image_grid

    cols = max(len(generated), 1)
    shown = train[:cols]
    blank = np.full((1, *generated.shape[1:]), 255, np.uint8)
    tiles = [generated, *([blank] * (cols - len(generated)))]
    tiles += [shown.astype(np.uint8)] if len(shown) else []
    tiles += [blank] * (cols - len(shown))
    acc = row.get("accuracy")
    acc_txt = "n/a" if acc is None or (isinstance(acc, float) and math.isnan(acc)) else f"{acc:.2f}"
    labels = [f"{name}\ngenerated\nacc {acc_txt}", f"training\n{row.get('train_count')} images"]
    return image_grid(np.concatenate(tiles), rows=2, labels=labels)


def plot_vs_frequency(evals: dict[str, dict], path: Path, title: str | None = None) -> Path | None:
    """One panel per metric: each identity's value against its training-set size (log x), one
    colour per evaluation (``evals``: label -> metrics.json contents), few-shot identities as
    squares, a line through each evaluation's mean at every size; with a single evaluation
    also its all / few-shot averages as horizontal lines. The evaluation's own plot and
    ``jobs/compare.py``'s plot of the best runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    evals = {label: e for label, e in evals.items() if e and e.get("per_identity")}
    if not evals:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    counts = sorted({max(r["train_count"], 1) for e in evals.values() for r in e["per_identity"].values()})
    for ax, metric in zip(axes.ravel(), METRIC_LABELS):
        for i, (label, e) in enumerate(evals.items()):
            nudge = 1 + 0.04 * (i - (len(evals) - 1) / 2)  # runs side by side, not on top of each other
            rows = [r for r in e["per_identity"].values() if r.get(metric) is not None]
            color = f"C{i % 10}"
            for few, marker, name in ((False, "o", "majority"), (True, "s", "few-shot")):
                pts = [(max(r["train_count"], 1) * nudge, r[metric]) for r in rows if bool(r.get("few_shot")) == few]
                if pts:
                    ax.scatter(*zip(*pts), color=color, marker=marker, alpha=0.7,
                               label=name if len(evals) == 1 else (label if not few else None))
            xs = sorted({max(r["train_count"], 1) for r in rows})
            means = [np.mean([r[metric] for r in rows if max(r["train_count"], 1) == x]) for x in xs]
            ax.plot([x * nudge for x in xs], means, color=color, linewidth=1.2)
            if len(evals) == 1:
                for key, style in (("all", "-"), ("few", "--")):
                    v = (e.get("summary") or {}).get(f"{metric}_{key}")
                    if v is not None:
                        ax.axhline(v, color="gray", linestyle=style, linewidth=1, label=f"mean ({key}) {v:.3g}")
        ax.set_xscale("log")
        ax.set_xticks(counts)  # label the training-set sizes present, plainly
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(counts[0] / 1.5, counts[-1] * 1.5)
        ax.set_xlabel("training images of the identity")
        if metric in ("grecall", "accuracy"):
            ax.set_ylim(-0.05, 1.05)  # fractions: a flat 0 should look like 0, not like the full range
        ax.set_title(METRIC_LABELS[metric])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    one = next(iter(evals.values()))
    fig.suptitle(title or f"per-identity metrics vs training frequency (encoder: {one.get('encoder')}; line = mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(out_dir: str | Path, results: dict, generated: dict[str, np.ndarray],
                  train_previews: dict[str, np.ndarray]) -> dict[str, Path]:
    """Write everything under ``out_dir``; returns the paths by kind. ``train_previews``: each
    identity's first training images, ``uint8 [k, H, W, C]`` (the grids show up to as many as
    were generated: :meth:`pogdiff_dist.evaluation.scoring.Scorer.previews`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = save_images(out, generated)
    grids = out / "grids"
    grids.mkdir(exist_ok=True)
    for name in results["identities"]:
        identity_grid(name, generated[name], train_previews.get(name, generated[name][:0]),
                      results["per_identity"][name]).save(grids / f"{slugify(name)}.png")
    plot = plot_vs_frequency({"this model": results}, out / "metrics_vs_frequency.png")
    paths = {"metrics": out / "metrics.json", "plot": plot, "grids": grids, "images": images}
    results = dict(results, outputs={k: str(v) for k, v in paths.items()})
    (out / "metrics.json").write_text(json.dumps(_json_safe(results), indent=1))
    return paths
