"""Evaluation outputs: metrics.json, the generated images, per-identity grids, a plot of
each metric against training-set frequency, the identity-bleed confusion matrix, and the
printed summary (MLflow logging: :meth:`pogdiff_dist.tracking.runs.TrackedRun.log_eval` of
:func:`mlflow_metrics` and the :data:`LOGGED` files).

Layout of ``out_dir``::

    metrics.json                      every number (summary, per identity, bleed, what was used)
    metrics_vs_frequency.png          each metric per identity vs #training images (log x)
    identity_confusion.png            prompted x judged identity, rows normalised, counts shown
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
from pogdiff_dist.evaluation.bleed import confusion, is_identity

LOGGED = ("metrics", "plot", "confusion")  # the outputs logged to MLflow under eval/ (with the grids folder)
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


def settings_text(results: dict, judge: bool = True, encoder: bool = False) -> str:
    """What an evaluation's figures were computed with, from its metrics.json: images per
    identity, DDIM steps, guidance, seed, and the judge (identity accuracy, bleed) and/or the
    image encoder (FID, DINO, gRecall)."""
    c = results["config"]
    parts = [f"{c['num_images']} images/identity", f"DDIM {c['steps']}", f"guidance {c['guidance_scale']:g}",
             f"seed {c['seed']}"]
    if judge:
        parts.append(f"judge {results['classifier']['classifier']}")
    if encoder:
        enc = results.get("encoder")
        parts.append(f"encoder {Path(enc).name if isinstance(enc, str) else enc}")
    return ", ".join(parts)


def _ordered(results: dict) -> list[str]:
    """Evaluated identities, most training images first (few-shot last), dataset order within."""
    per, names = results["per_identity"], list(results["per_identity"])
    return sorted(names, key=lambda n: (-per[n]["train_count"], names.index(n)))


def plot_confusion(results: dict, path: Path) -> Path | None:
    """The identity-bleed confusion matrix: one row per prompted identity (most training images
    first), one column per judged identity (the same order, then identities judged but not
    evaluated, then judge labels naming none); cell colour is the share of the row's images
    (diagonal green: judged right; elsewhere red: bleed), cell text the image count. Few-shot
    identities are orange and starred, with their training-image count beside every name; the
    right margin gives each row's accuracy. Sized to stay legible from a few to ~60 identities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = results.get("per_identity") or {}
    if not per or not all("predicted" in r for r in per.values()):
        return None
    rows = _ordered(results)
    conf = confusion({n: per[n]["predicted"] for n in rows}, rows)
    counts, shares = conf.counts, conf.shares()
    n, m = counts.shape
    few = {r for r in rows if per[r].get("few_shot")}

    def label(c: str) -> str:
        if c in per:
            return f"{'* ' if c in few else ''}{c} ({per[c]['train_count']})"
        return c if is_identity(c) else f"{c} (no identity)"

    labels_x, labels_y = [label(c) for c in conf.columns], [label(r) for r in rows]
    cell = min(0.55, max(0.24, 9.0 / max(n, m)))  # inches per cell
    font = 9 if max(n, m) <= 12 else 8 if max(n, m) <= 25 else 7 if max(n, m) <= 40 else 6.5
    margin = 0.068 * font / 7 * max(len(t) for t in labels_x + labels_y) + 0.4  # room for the longest name
    fig_w, fig_h = m * cell + margin + 3.2, n * cell + margin + 1.2
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes([(margin + 0.2) / fig_w, (margin + 0.3) / fig_h, m * cell / fig_w, n * cell / fig_h])
    diag = np.zeros_like(shares, dtype=bool)
    diag[np.arange(n), np.arange(n)] = True
    right = ax.imshow(np.ma.masked_where(~diag, shares), cmap="Greens", vmin=0, vmax=1, aspect="equal")
    bleed = ax.imshow(np.ma.masked_where(diag | (counts == 0), shares), cmap="Reds", vmin=0, vmax=1, aspect="equal")
    for i, j in zip(*np.nonzero(counts)):
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=font,
                color="white" if shares[i, j] > 0.55 else "black")
    ax.set_xticks(range(m), labels_x, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels_y, fontsize=font)
    for t, c in zip(ax.get_xticklabels(), conf.columns):
        t.set_color("darkorange" if c in few else "black" if c in per else "gray")
    for t, r in zip(ax.get_yticklabels(), rows):
        t.set_color("darkorange" if r in few else "black")
    ax.set_xticks(np.arange(m + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="0.85", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    if 0 < len(few) < n:  # majority | few-shot
        ax.axhline(n - len(few) - 0.5, color="darkorange", linewidth=1.2)
        ax.axvline(n - len(few) - 0.5, color="darkorange", linewidth=1.2)
    if m > n:  # evaluated | judged but not evaluated
        ax.axvline(n - 0.5, color="0.3", linewidth=1.2)
    ax.set_xlabel("judged identity (* few-shot, orange; (n) training images)", fontsize=font + 1)
    ax.set_ylabel("prompted identity", fontsize=font + 1)
    twin = ax.secondary_yaxis("right")
    twin.set_yticks(range(n), [f"{counts[i, i]}/{counts[i].sum()}  {shares[i, i]:.2f}" for i in range(n)],
                    fontsize=font)
    twin.set_ylabel("judged right", fontsize=font + 1)
    bar_x = (margin + 0.2 + m * cell + 1.5) / fig_w
    bar_h = min(n * cell, 4.0)
    for k, (im, name) in enumerate(((bleed, "bleed"), (right, "right"))):
        cax = fig.add_axes([bar_x + k * 0.7 / fig_w, (margin + 0.3 + n * cell - bar_h) / fig_h, 0.15 / fig_w,
                            bar_h / fig_h])
        bar = fig.colorbar(im, cax=cax)
        bar.ax.tick_params(labelsize=font)
        bar.ax.set_title(name, fontsize=font)
    fig.suptitle("Identity bleed: prompted x judged identity (colour: share of the row; numbers: images)\n"
                 + settings_text(results), fontsize=font + 2, y=1 - 0.15 / fig_h, va="top")
    fig.savefig(path, dpi=110 if max(n, m) <= 25 else 130, bbox_inches="tight", pad_inches=0.2)
    plt.close(fig)
    return path


def mlflow_metrics(results: dict) -> dict:
    """The numbers logged as ``eval/<key>``: the metric averages and the mean top-bleed shares."""
    bleed = results.get("bleed") or {}
    return {**results["summary"], **{f"bleed_{k}": bleed.get(k) for k in ("share_all", "share_majority", "share_few")}}


def _fmt(v) -> str:
    return "   n/a" if v is None else f"{v:6.3f}"


def summary_text(results: dict) -> str:
    """The printed summary: every average with the settings it was computed with, then the
    identity-bleed table (per identity: training images, judged right, largest bleed target and
    its share) and the pairs with the most bleed."""
    s, bleed, per = results["summary"], results.get("bleed") or {}, results["per_identity"]
    lines = []
    for m in METRIC_LABELS:
        lines.append(f"    {m:<9} all {_fmt(s[f'{m}_all'])}   majority {_fmt(s.get(f'{m}_majority'))}   "
                     f"few-shot {_fmt(s[f'{m}_few'])}   [{settings_text(results, judge=m == 'accuracy', encoder=m != 'accuracy')}]")
    if not bleed:
        return "\n".join(lines)
    lines.append(f"    {'bleed':<9} all {_fmt(bleed['share_all'])}   majority {_fmt(bleed['share_majority'])}   "
                 f"few-shot {_fmt(bleed['share_few'])}   [{settings_text(results)}]  (mean top-bleed share)")
    rows = _ordered(results)
    table = []
    for n in rows:
        r = per[n]
        total = sum(r["predicted"].values())
        name = ("* " if r.get("few_shot") else "") + n
        tied = f" (+{len(r['bleed_tied'])} tied)" if r.get("bleed_tied") else ""
        target = "-" if r["bleed_to"] is None else r["bleed_to"] + tied
        share = "" if r["bleed_to"] is None else f"{r['bleed_count']}/{total} {r['bleed_share']:.2f}"
        table.append((name, str(r["train_count"]), f"{r['predicted'].get(n, 0)}/{total} {r['accuracy']:.2f}", target,
                      share))
    head = ("identity", "train", "judged right", "top bleed target", "share")
    w = [max(len(row[k]) for row in [head, *table]) for k in range(5)]
    lines += ["", f"  identity bleed: who each prompt is judged to be  [{settings_text(results)}]"]
    for k, row in enumerate([head, *table]):
        lines.append(f"    {row[0]:<{w[0]}}  {row[1]:>{w[1]}}  {row[2]:>{w[2]}}   {row[3]:<{w[3]}}  {row[4]:>{w[4]}}".rstrip())
    lines.append("    (* few-shot; share: of the identity's generated images)")
    if bleed["pairs"]:
        lines.append("  most bleed (prompted -> judged):")
        pairs = [f"{p['prompted']} -> {p['judged']}" for p in bleed["pairs"]]
        for text, p in zip(pairs, bleed["pairs"]):
            real = (f"   (its real held-out images judged so: {p['judge_real'][0]}/{p['judge_real'][1]})"
                    if "judge_real" in p else "")
            lines.append(f"    {text:<{max(map(len, pairs))}}  {p['count']:>2}/{p['images']} {p['share']:.2f}{real}")
        lines.append("  judged most often for other prompts: "
                     + ", ".join(f"{a['judged']} ({a['count']} images from {a['prompts']} identities)"
                                 for a in bleed["absorbs"]))
    else:
        lines.append("  no bleed: no image was judged to be another identity")
    return "\n".join(lines)


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
    matrix = plot_confusion(results, out / "identity_confusion.png")
    paths = {"metrics": out / "metrics.json", "plot": plot, "confusion": matrix, "grids": grids, "images": images}
    results = dict(results, outputs={k: str(v) for k, v in paths.items()})
    (out / "metrics.json").write_text(json.dumps(_json_safe(results), indent=1))
    return paths
