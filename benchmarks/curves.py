"""Learning curves: does a recipe still win once vanilla has learned the majority?

The recipe tables (README "Which recipe") fine-tune for 150 steps, where vanilla's majority
accuracy is only 0.5-0.6: no method has learned the 30-image identities yet, so they measure
the budget. Here every (method, seed) run is trained ONCE, in segments, and its export is
evaluated at every budget on the way (150, 300, 600, 1200 steps by default): the checkpoint
of a budget is where the next segment resumes, exactly (same data position, generators and
optimiser state; the schedule is constant after warmup, so segments equal one long run).

Protocol: benchmarks/reproduce.py's (its CPU budget and prepared sets, shared with it:
`--out` defaults to benchmarks/results/reproduce-<dataset>-cpu), except that a run is the
library's Trainer in ONE process (pogdiff_dist/train/local.py: world size 1, micro-batch 16 =
the tables' 2 workers x 8, DeepSpeed ZeRO-2 fp32), so a segment does not pay a Ray cluster's
start, and the base model is trained the same way (900 vanilla steps on <dataset>:base, its
own run folder curves/base-s0: the reproduction's Ray-trained base is not reused). Only
prepare uses Ray (Ray Data), once per prepared set. Wall-clock seconds are each method's CPU
seconds per step with one torch thread (median over its segments: an idle core's wall time;
the machine is shared, so a segment's wall time mostly says how busy it was) times the steps.

    python benchmarks/curves.py --dataset faces-it2i --seeds 0 1 2            # train + evaluate, resumable
    python benchmarks/curves.py --dataset faces-it2i --report-only            # tables and plots from the caches
    python benchmarks/curves.py --dataset faces-it2i --eval-seeds 1234 4321 --methods vanilla   # evaluation noise

Writes <out>/curves/<run>/model-<steps>/ (export + eval-*.json), <out>/curves-<tag>.json,
<out>/curves-<tag>.md and <out>/curves-<tag>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from reproduce import Experiment, methods, swept_settings

SWEPT = REPO / "benchmarks" / "results" / "sweep-pogdiff-faces" / "best_config.yaml"
BUDGETS = (150, 300, 600, 1200)
RECIPE = "PoGDiff (swept) + balanced sampling"
METHODS = ("vanilla", "vanilla + balanced sampling", "vanilla + inverse weighting", "T2H", RECIPE)
# One process, the tables' global batch: see the module docstring.
LOCAL = {"train.num_workers": 1, "optim.batch_size": 16, "train.cpus_per_worker": 1.0,
         "train.validate_every": 0, "train.checkpoint_every": 10**6, "train.keep_checkpoints": 2,
         "tracking.log_model": False}
# Variants for "where does the recipe's majority cost come from" (rows beside METHODS).
REPEATS_KEY = "curves.repeats"  # not a config key: the few-shot identities' kohya-style repeat count


def extra_rows(swept: dict) -> dict[str, dict]:
    pog = {"loss.method": "pogdiff", **swept}
    return {
        "vanilla + repeats (few x15)": {"loss.method": "vanilla", "data.sampling": "uniform", REPEATS_KEY: 15},
        "vanilla + repeats (few x5)": {"loss.method": "vanilla", "data.sampling": "uniform", REPEATS_KEY: 5},
        "vanilla + power sampling (alpha 0.5)": {"loss.method": "vanilla", "data.sampling": "power",
                                                 "data.sampling_alpha": 0.5},
        "PoGDiff (swept) + repeats (few x15)": {**pog, "data.sampling": "uniform", REPEATS_KEY: 15},
        "PoGDiff (swept) + repeats (few x5)": {**pog, "data.sampling": "uniform", REPEATS_KEY: 5},
        "PoGDiff (swept) + power sampling (alpha 0.5)": {**pog, "data.sampling": "power", "data.sampling_alpha": 0.5},
        "PoGDiff (swept) + balanced, no caption dropout": {**pog, "data.sampling": "balanced",
                                                          "train.caption_dropout": 0.0},
        # psi_den = n_id^(-1/T) normalised: the swept T = 19.2 gives a majority sample 0.87x a few-shot
        # one's PoG weight; T = 1 gives it 1/15 of it
        "PoGDiff (swept, psi_den T=1) + balanced": {**pog, "data.sampling": "balanced", "loss.den_temperature": 1.0},
    }


def all_rows(swept: dict) -> dict[str, dict]:
    return {**methods({}, swept), **extra_rows(swept)}


def slug(label: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in label.lower())
    return "-".join(p for p in keep.split("-") if p)


def repeats_prepared(prepared: Path, few_repeats: int) -> Path:
    """A view of ``prepared`` whose manifest gives every few-shot identity ``few_repeats``
    repeats (what prepare writes for kohya-style ``<repeats>_<name>`` folders of the same images):
    the shards and every other file are symlinks, only manifest.json differs."""
    view = prepared.parent / f"{prepared.name}-repeats{few_repeats}"
    manifest = json.loads((prepared / "manifest.json").read_text())
    counts = manifest["train_counts"]
    few = max(counts) / 5
    manifest["train_repeats"] = [few_repeats if c <= few else 1 for c in counts]
    view.mkdir(exist_ok=True)
    for entry in prepared.iterdir():
        if entry.name != "manifest.json" and not (view / entry.name).exists():
            (view / entry.name).symlink_to(entry.resolve())
    (view / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return view


class Curve:
    """One (method, seed) run, trained in segments to each budget and evaluated at each."""

    def __init__(self, exp: Experiment, label: str, overrides: dict, seed: int, base: Path | None,
                 preset: str | None = None):
        self.exp, self.label, self.seed, self.preset = exp, label, seed, preset or exp.preset
        ov = dict(overrides)
        self.repeats = ov.pop(REPEATS_KEY, None)
        self.overrides = {**LOCAL, **ov, "train.seed": seed, **({"model.init_unet": str(base)} if base else {})}
        self.dir = exp.out / "curves" / f"{slug(label)}-s{seed}"

    def settings(self, steps: int) -> dict:
        s = self.exp.settings(self.preset, self.dir.name, {**self.overrides, "optim.max_steps": steps})
        s["train.storage_path"] = str(self.dir.parent)
        return s

    @property
    def prepared(self) -> Path:
        return Path(self.exp.settings(self.preset, "", self.overrides)["prepare.out_dir"])

    def _stamp(self) -> str:
        s = self.settings(0)
        s.pop("optim.max_steps")
        return json.dumps({**s, REPEATS_KEY: self.repeats}, sort_keys=True, default=str)

    def model(self, steps: int) -> Path:
        return self.dir / f"model-{steps}"

    def train_to(self, steps: int) -> Path:
        """The export at ``steps`` (trained from the latest earlier budget's checkpoint)."""
        import torch

        from pogdiff_dist.config import load_config
        from pogdiff_dist.train.local import train_local

        stamp = self.dir / "request.json"
        if stamp.is_file() and stamp.read_text() != self._stamp():
            print(f"[curves] {self.dir} was trained with other settings: training it again", flush=True)
            shutil.rmtree(self.dir)
        out = self.model(steps)
        if (out / "model_index.json").is_file():
            return out
        self.dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(self._stamp())
        ckpts = sorted(self.dir.glob("checkpoint_*"))
        start = int(ckpts[-1].name.split("_")[1]) if ckpts else 0
        if start > steps:
            raise RuntimeError(f"{self.dir}: the latest checkpoint ({start}) is past {steps}; budgets must be "
                               "trained in increasing order (delete the run folder to start again)")
        prepared = self.prepared if self.repeats is None else repeats_prepared(self.prepared, self.repeats)
        cfg = load_config(None, self.settings(steps))
        t0, c0 = time.time(), time.process_time()
        trainer, _ = train_local(cfg, prepared, self.dir, device="cpu", resume=bool(ckpts))
        seconds, cpu = time.time() - t0, time.process_time() - c0
        tmp = self.dir / f".model-{steps}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.dir / "model", tmp)
        shutil.copy(self.dir / "samples.png", tmp / "samples.png")
        tmp.rename(out)
        seg = self.segments()
        # CPU seconds (one torch thread) stand for an idle core's wall time: the machine is shared, so
        # the wall time of a segment says more about the other jobs than about the method
        seg[str(steps)] = {"from": start, "seconds": seconds, "seconds_per_step": seconds / max(steps - start, 1),
                           "cpu_seconds": cpu, "cpu_seconds_per_step": cpu / max(steps - start, 1),
                           "threads": torch.get_num_threads(),
                           "samples_per_s": trainer.state.last.get("mean_samples_per_s"),
                           "epochs": trainer.state.epoch, "final_loss": trainer.state.last.get("loss")}
        (self.dir / "segments.json").write_text(json.dumps(seg, indent=1))
        self.exp._log({"event": "curve segment", "run": self.dir.name, "steps": steps, **seg[str(steps)]})
        return out

    def segments(self) -> dict:
        p = self.dir / "segments.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def evaluate(self, steps: int, eval_seed: int, num_images: int) -> dict | None:
        """Fixed-seed evaluation of the export at ``steps`` (cached beside it); None if not trained."""
        from pogdiff_dist.config import EvalConfig
        from pogdiff_dist.evaluation.evaluate import evaluate_model

        model = self.model(steps)
        if not (model / "model_index.json").is_file():
            return None
        cached = eval_file(self, steps, eval_seed, num_images)
        if cached.is_file():
            return json.loads(cached.read_text())
        t0, c0 = time.time(), time.process_time()
        res = evaluate_model(model, self.prepared, EvalConfig(
            num_images=num_images, steps=self.exp.b["eval_steps"], seed=eval_seed,
            guidance_scale=self.exp.b.get("eval_guidance", 3.0)))
        row = {"summary": res["summary"],
               "per_identity": {n: {"accuracy": r.get("accuracy"), "train_count": r.get("train_count")}
                                for n, r in res["per_identity"].items()},
               "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0}
        cached.write_text(json.dumps(row, indent=1, default=float))
        return row


# ----------------------------------------------------------------------------- aggregation

KEYS = ("accuracy_majority", "accuracy_few", "accuracy_all", "fid_few", "dino_few")


def stats(values: list[float]) -> dict:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return {}
    return {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)), "max": float(np.max(v)),
            "n": len(v), "values": [float(x) for x in v]}


def model_summary(evals: list[dict]) -> dict:
    """One model's figures: the mean over its evaluations (eval seeds)."""
    return {k: float(np.mean([e["summary"][k] for e in evals])) for k in KEYS if k in evals[0]["summary"]}


def aggregate(curves: dict[str, list[Curve]], budgets: list[int], eval_seeds: list[int], num_images: int) -> dict:
    """{label: {"budgets": {steps: {key: stats over seeds}}, "seconds_per_step": ..., "per_seed": ...}}"""
    out = {}
    for label, runs in curves.items():
        rows, per_seed = {}, {}
        for b in budgets:
            models = []
            for c in runs:
                evals = [c.evaluate(b, s, num_images) for s in eval_seeds] if not REPORT_ONLY else \
                    [_cached_eval(c, b, s, num_images) for s in eval_seeds]
                if any(e is None for e in evals):
                    continue
                models.append((c.seed, model_summary(evals)))
            if models:
                rows[str(b)] = {k: stats([m[k] for _, m in models]) for k in KEYS}
                per_seed[str(b)] = {str(s): m for s, m in models}
        sps = [seg.get("cpu_seconds_per_step", seg["seconds_per_step"]) for c in runs for seg in c.segments().values()]
        out[label] = {"budgets": rows, "per_seed": per_seed,
                      "seconds_per_step": float(np.median(sps)) if sps else None,
                      "seconds_per_step_all": sps}
    return out


REPORT_ONLY = False


def eval_file(c: Curve, steps: int, seed: int, n: int) -> Path:
    """Where one evaluation of ``c``'s export at ``steps`` is cached; the guidance scale is in the
    name when it is not the tables' 3.0 (``--guidance``)."""
    g = c.exp.b.get("eval_guidance", 3.0)
    return c.model(steps) / (f"eval-n{n}-seed{seed}.json" if g == 3.0 else f"eval-n{n}-seed{seed}-g{g:g}.json")


def _cached_eval(c: Curve, steps: int, seed: int, n: int) -> dict | None:
    p = eval_file(c, steps, seed, n)
    return json.loads(p.read_text()) if p.is_file() else None


def eval_noise(curves: dict[str, list[Curve]], budgets: list[int], seeds: list[int], n: int) -> dict:
    """How far two evaluations of one model (different sampling seeds) fall apart, per metric."""
    diffs: dict[str, list[float]] = {k: [] for k in KEYS}
    for runs in curves.values():
        for c in runs:
            for b in budgets:
                evals = [_cached_eval(c, b, s, n) for s in seeds[:2]]
                if len(evals) == 2 and all(evals):
                    for k in KEYS:
                        diffs[k].append(abs(evals[0]["summary"][k] - evals[1]["summary"][k]))
    return {k: {"models": len(v), "mean_abs_diff": float(np.mean(v)), "max_abs_diff": float(np.max(v)),
                "p90_abs_diff": float(np.percentile(v, 90))} for k, v in diffs.items() if v}


def interp(row: dict, key: str, steps: float) -> float | None:
    """A curve's mean at ``steps`` by linear interpolation in log2(steps) between budgets."""
    pts = sorted((int(b), r[key]["mean"]) for b, r in row["budgets"].items() if key in r)
    if not pts or steps < pts[0][0] - 1e-9 or steps > pts[-1][0] + 1e-9:
        return None
    xs, ys = [math.log2(b) for b, _ in pts], [v for _, v in pts]
    return float(np.interp(math.log2(steps), xs, ys))


def answer(agg: dict, budgets: list[int], threshold: float = 0.8) -> dict:
    """The budget where vanilla first reaches ``threshold`` majority accuracy (or its plateau),
    and each method's few-shot ratio and majority difference to vanilla there."""
    van = agg["vanilla"]["budgets"]
    done = [int(b) for b in budgets if str(b) in van]
    reached = [b for b in done if van[str(b)]["accuracy_majority"]["mean"] >= threshold]
    if reached:
        chosen, why = reached[0], f"vanilla's majority accuracy first >= {threshold}"
    else:  # the plateau: the budget with the highest mean majority accuracy
        chosen = max(done, key=lambda b: van[str(b)]["accuracy_majority"]["mean"])
        why = f"vanilla never reached {threshold}: its best (plateau) budget"
    v = van[str(chosen)]
    sps_v = agg["vanilla"]["seconds_per_step"]
    rows = {}
    for label, row in agg.items():
        r = row["budgets"].get(str(chosen))
        if r is None:
            continue
        seeds = row["per_seed"][str(chosen)]
        per_seed_ratio = [seeds[s]["accuracy_few"] / max(agg["vanilla"]["per_seed"][str(chosen)][s]["accuracy_few"],
                                                        1e-9)
                          for s in seeds if s in agg["vanilla"]["per_seed"][str(chosen)]]
        eq = {"few_ratio": r["accuracy_few"]["mean"] / max(v["accuracy_few"]["mean"], 1e-9),
              "majority_diff": r["accuracy_majority"]["mean"] - v["accuracy_majority"]["mean"],
              "few": r["accuracy_few"], "majority": r["accuracy_majority"], "fid_few": r.get("fid_few"),
              "few_ratio_per_seed": per_seed_ratio}
        wall = None
        if sps_v and row["seconds_per_step"]:
            steps = chosen * sps_v / row["seconds_per_step"]
            few, maj = interp(row, "accuracy_few", steps), interp(row, "accuracy_majority", steps)
            if few is not None and maj is not None:
                wall = {"steps": steps, "few": few, "majority": maj,
                        "few_ratio": few / max(v["accuracy_few"]["mean"], 1e-9),
                        "majority_diff": maj - v["accuracy_majority"]["mean"]}
        rows[label] = {"equal_steps": eq, "equal_wall": wall, "seconds_per_step": row["seconds_per_step"]}
    return {"budget": chosen, "why": why, "threshold": threshold, "rows": rows}


# ----------------------------------------------------------------------------- outputs

def fmt(s: dict, spread: bool = True) -> str:
    if not s:
        return "n/a"
    return (f"{s['mean']:.3f} ± {s['std']:.3f} [{s['min']:.2f}, {s['max']:.2f}]" if spread
            else f"{s['mean']:.3f}")


def markdown(res: dict) -> str:
    agg, budgets = res["rows"], res["budgets"]
    lines = [f"# Learning curves: {res['dataset']}:{res['preset']}",
             "",
             (f"Fine-tuned from the CPU-budget base (benchmarks/reproduce.py), one process, batch 16, lr "
              f"{res['lr']}, constant after {res['warmup']} warmup steps; every budget is a checkpoint of the "
              f"same run. Training seeds {res['seeds']}; {res['num_images']} images per identity, "
              f"{res['eval_steps']} DDIM steps, guidance {res.get('eval_guidance', 3.0):g}, evaluation seed(s) {res['eval_seeds']} (a model's figure is "
              f"the mean over them). Cells: mean ± std over training seeds [min, max]."),
             ""]
    for key, title in (("accuracy_majority", "Majority identity accuracy (3 x 30 images)"),
                       ("accuracy_few", "Few-shot identity accuracy (7 x 2 images)"),
                       ("fid_few", "Few-shot FID (lower is better)")):
        lines += [f"## {title}", "", "| method | s/step | " + " | ".join(f"{b} steps" for b in budgets) + " |",
                  "|---|---|" + "---|" * len(budgets)]
        for label, row in agg.items():
            sps = row["seconds_per_step"]
            cells = [fmt(row["budgets"].get(str(b), {}).get(key, {})) for b in budgets]
            lines.append(f"| {label} | {sps:.2f} | " if sps else f"| {label} | n/a | ")
            lines[-1] += " | ".join(cells) + " |"
        lines.append("")
    if res.get("answer"):
        a = res["answer"]
        lines += [f"## At {a['budget']} steps ({a['why']})", "",
                  ("| method | few-shot | few / vanilla (mean; per seed) | majority | majority - vanilla | "
                   "at vanilla's wall time: steps, few / vanilla, majority - vanilla |"),
                  "|---|---|---|---|---|---|"]
        for label, r in a["rows"].items():
            e, w = r["equal_steps"], r["equal_wall"]
            ps = ", ".join(f"{x:.2f}" for x in e["few_ratio_per_seed"])
            wall = (f"{w['steps']:.0f}, {w['few_ratio']:.2f}x, {w['majority_diff']:+.3f}" if w else "n/a")
            lines.append(f"| {label} | {fmt(e['few'])} | {e['few_ratio']:.2f}x ({ps}) | {fmt(e['majority'])} | "
                         f"{e['majority_diff']:+.3f} | {wall} |")
        lines.append("")
    if res.get("eval_noise"):
        lines += ["## Evaluation noise (two sampling seeds, same model)", "",
                  "| metric | models | mean abs diff | 90th pct | max |", "|---|---|---|---|---|"]
        for k, v in res["eval_noise"].items():
            lines.append(f"| {k} | {v['models']} | {v['mean_abs_diff']:.3f} | {v['p90_abs_diff']:.3f} | "
                         f"{v['max_abs_diff']:.3f} |")
        lines.append("")
    lines += ["Reproduce: `" + res["command"] + "`", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = res["rows"]
    keys = (("accuracy_majority", "majority accuracy"), ("accuracy_few", "few-shot accuracy"),
            ("fid_few", "few-shot FID (lower better)"))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for label, row in agg.items():
        pts = sorted(int(b) for b in row["budgets"])
        if not pts:
            continue
        sps = row["seconds_per_step"] or float("nan")
        for j, (key, title) in enumerate(keys):
            m = np.array([row["budgets"][str(b)][key]["mean"] for b in pts])
            lo = np.array([row["budgets"][str(b)][key]["min"] for b in pts])
            hi = np.array([row["budgets"][str(b)][key]["max"] for b in pts])
            sd = np.array([row["budgets"][str(b)][key]["std"] for b in pts])
            for i, x in enumerate((np.array(pts, float), np.array(pts, float) * sps)):
                ax = axes[i, j]
                line = ax.errorbar(x, m, yerr=sd, marker="o", capsize=3, label=label, lw=1.6)
                ax.fill_between(x, lo, hi, alpha=0.12, color=line[0].get_color())
                ax.set_xscale("log", base=2)
                ax.set_title(title)
                ax.set_xlabel("fine-tuning steps" if i == 0 else "seconds on one idle core (CPU s/step x steps)")
                ax.grid(alpha=0.3)
    if res.get("answer"):
        for ax in axes[0, :2]:
            ax.axvline(res["answer"]["budget"], color="grey", ls=":", lw=1)
    axes[0, 0].axhline(0.8, color="grey", ls="--", lw=0.8)
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{res['dataset']}:{res['preset']}: mean over training seeds {res['seeds']} "
                 f"(bars: std, band: min-max), {res['num_images']} images/identity")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    global REPORT_ONLY
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="faces-it2i", choices=["faces-it2i", "digits-it2i"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), metavar="ROW")
    p.add_argument("--num-images", type=int, default=32, help="generated per identity per evaluation")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[1234])
    p.add_argument("--guidance", type=float, default=3.0, help="the evaluation's classifier-free guidance scale")
    p.add_argument("--threads", type=int, default=1, help="torch threads (two runs side by side on 2 cores: 1)")
    p.add_argument("--tag", default="main")
    p.add_argument("--order", choices=["seed", "method"], default="seed",
                   help="seed: every method's first seed first (a complete curve set early)")
    p.add_argument("--report-only", action="store_true", help="no training or evaluation: tables from the caches")
    p.add_argument("--prepare-only", action="store_true", help="only prepare the base and M sets (Ray Data), then stop")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    REPORT_ONLY = args.report_only

    import torch

    torch.set_num_threads(args.threads)
    out = args.out or REPO / "benchmarks" / "results" / f"reproduce-{args.dataset}-cpu"
    swept = swept_settings(SWEPT)
    rows = all_rows(swept)
    unknown = set(args.methods) - set(rows)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; rows: {sorted(rows)}")
    exp = Experiment(args.dataset, "cpu", out, args.seeds)
    exp.b["eval_guidance"] = args.guidance
    budgets = sorted(args.budgets)
    t0 = time.time()
    base_run = Curve(exp, "base", {"loss.method": "vanilla"}, 0, None, preset="base")
    base = base_run.model(exp.b["base_steps"])
    if not REPORT_ONLY:
        _ensure_prepared(exp)
        if args.prepare_only:
            return
        base_run.train_to(exp.b["base_steps"])
    curves = {label: [Curve(exp, label, rows[label], s, base) for s in args.seeds] for label in args.methods}
    if not REPORT_ONLY:
        order = ([(label, i) for i in range(len(args.seeds)) for label in args.methods] if args.order == "seed"
                 else [(label, i) for label in args.methods for i in range(len(args.seeds))])
        for label, i in order:
            c = curves[label][i]
            for b in budgets:
                c.train_to(b)
                for s in args.eval_seeds:
                    e = c.evaluate(b, s, args.num_images)
                    sm = e["summary"]
                    print(f"[curves] {label} seed {c.seed} @ {b} (eval seed {s}): majority "
                          f"{sm['accuracy_majority']:.3f} few {sm['accuracy_few']:.3f} fid_few {sm['fid_few']:.3f}",
                          flush=True)
    agg = aggregate(curves, budgets, args.eval_seeds, args.num_images)
    cmd = "python benchmarks/curves.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res = {"dataset": args.dataset, "preset": "M", "seeds": args.seeds, "budgets": budgets,
           "num_images": args.num_images, "eval_seeds": args.eval_seeds, "eval_steps": exp.b["eval_steps"],
           "eval_guidance": args.guidance,
           "lr": exp.b["lr"], "warmup": exp.b["warmup"], "local": LOCAL, "rows": agg, "command": cmd,
           "settings": {label: rows[label] for label in args.methods}}
    if "vanilla" in agg and agg["vanilla"]["budgets"]:
        res["answer"] = answer(agg, budgets)
    if len(args.eval_seeds) >= 2:
        res["eval_noise"] = eval_noise(curves, budgets, args.eval_seeds, args.num_images)
    res["wall_seconds"] = time.time() - t0
    stem = out / f"curves-{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(markdown(res))
    plot(res, stem.with_suffix(".png"))
    print(markdown(res))
    print(f"[curves] {(time.time() - t0) / 60:.1f} min; {stem}.md / .json / .png", flush=True)


def _ensure_prepared(exp: Experiment) -> None:
    """The base and M shards (reproduce.py's prepare, on one local Ray cluster, once)."""
    from pogdiff_dist.config import load_config

    cfgs = [load_config(None, exp.settings(preset, "prepare", {})) for preset in ("base", exp.preset)]
    todo = [c for c in cfgs if not (Path(c.prepare.out_dir) / "manifest.json").is_file()]
    if not todo:
        return
    import ray

    from pogdiff_dist.prepare.pipeline import run_prepare
    from pogdiff_dist.runtime import init_ray

    init_ray(todo[0].ray)
    try:
        for cfg in todo:
            run_prepare(cfg)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
