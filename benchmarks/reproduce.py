"""The reproduction experiment (issue 3): does PoGDiff help the minority identities?

Protocol, the paper's (its dataset criterion 2 needs a baseline that fails):

1. pretrain a base model with the vanilla loss on a balanced population of *other*
   identities with other names (``<dataset>:base``);
2. baseline check: fine-tune it with vanilla on the imbalanced set (``<dataset>:M``) whose
   names it never saw, and report minority vs majority identity accuracy first;
3. validation: compare the PoGDiff variants that matter (neighbor_grad full/stop, psi_den
   literal/tempered/capped, a2) on ``<dataset>:val`` (other identities again: nothing is
   chosen on the test identities' generated images) and pick one;
4. fine-tune every method (vanilla, CBDM, T2H, DiffROP, PoGDiff and its ablations) with an
   identical budget and several seeds, evaluate all of them, and write the table
   (rows = methods, columns = metric x all/few, mean +- std over seeds);
5. the same comparison trained from scratch on M, as a second reported setting.

    .venv/bin/python benchmarks/reproduce.py --dataset faces-it2i --budget cpu
    .venv/bin/python benchmarks/reproduce.py --dataset digits-it2i --budget cpu --seeds 0 1
    .venv/bin/python benchmarks/reproduce.py --dataset digits-it2i --preset S --protocols finetune  # table-S.md

Every finished run is cached under ``--out`` (model, its evaluation, and the settings it was
trained with in ``request.json``), so an interrupted experiment resumes where it stopped and a
run whose settings changed is trained again; the presets of a dataset share its base model and
validation runs. ``--budget gpu`` takes the bigger budget.
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

from pogdiff_dist.config import PAPER_POGDIFF, Config, load_config

# Identical budgets per method; "cpu" fits this 2-core machine, "gpu" is the real thing.
BUDGETS = {
    "cpu": {"resolution": 24, "unet": "tiny", "base_steps": 900, "finetune_steps": 150, "scratch_steps": 600, "batch_size": 8,
                "eval_images": 16, "eval_steps": 25, "lr": 5e-4, "warmup": 20, "variants": None,
                "scratch_methods": ["vanilla", "PoGDiff"]},
    "smoke": {"resolution": 16, "unet": "tiny", "base_steps": 4, "finetune_steps": 2, "scratch_steps": 2, "batch_size": 4,
                  "eval_images": 2, "eval_steps": 2, "lr": 5e-4, "warmup": 2,  # checks the flow end to end in minutes
                  "variants": ["stop, literal psi_den"], "scratch_methods": ["vanilla", "PoGDiff"]},
    "gpu": {"resolution": 32, "unet": "small", "base_steps": 12000, "finetune_steps": 1500, "scratch_steps": 6000, "batch_size": 16,
                "eval_images": 20, "eval_steps": 50, "lr": 2e-4, "warmup": 200, "variants": None, "scratch_methods": None},
}

# The tested methods, as config overrides on top of the chosen PoGDiff variant (from the
# validation study) and, when given, the PoGDiff settings a sweep chose (--pogdiff-config).
def methods(pogdiff: dict, swept: dict | None = None) -> dict[str, dict]:
    rows = {
        "vanilla": {"loss.method": "vanilla"},
        # what practitioners try first for rare concepts (kohya num_repeats, SimpleTuner repeats,
        # OneTrainer concept balancing), and the classic long-tail re-weighting
        "vanilla + balanced sampling": {"loss.method": "vanilla", "data.sampling": "balanced"},
        "vanilla + power sampling (alpha 0.5)": {"loss.method": "vanilla", "data.sampling": "power",
                                                 "data.sampling_alpha": 0.5},
        "vanilla + inverse weighting": {"loss.method": "vanilla", "loss.identity_weight": "inverse"},
        "CBDM": {"loss.method": "cbdm"},
        "T2H": {"loss.method": "t2h"},
        "DiffROP": {"loss.method": "diffrop"},
        "PoGDiff": {"loss.method": "pogdiff", **pogdiff},
        "PoGDiff w/o psi_img": {"loss.method": "pogdiff", **pogdiff, "loss.use_psi_img": False},
        "PoGDiff w/o psi_den": {"loss.method": "pogdiff", **pogdiff, "loss.use_psi_den": False},
    }
    if swept is not None:  # the sweep searched the sampling too: the two rows separate psi from sampling
        rows["PoGDiff (swept)"] = {"loss.method": "pogdiff", **swept, "data.sampling": "uniform"}
        rows["PoGDiff (swept) + balanced sampling"] = {"loss.method": "pogdiff", **swept, "data.sampling": "balanced"}
    return rows


def swept_settings(best_config: Path) -> dict:
    """The loss.* (and data.sampling*) settings of a sweep's best_config.yaml (jobs/tune.py)."""
    import yaml

    d = yaml.safe_load(Path(best_config).read_text())
    out = {f"loss.{k}": v for k, v in d["loss"].items() if k != "method"}
    out.update({f"data.{k}": v for k, v in d["data"].items() if k.startswith("sampling")})
    return out


# The validation study: the variants that matter in practice (issue 3): the gradient form,
# psi_den literal / tempered and capped / modelled on the identity prompt, and a2.
_ID = {"prepare.density_text": "identity"}
VARIANTS = {
    "full, literal psi_den": {"loss.neighbor_grad": "full"},
    "stop, literal psi_den": {"loss.neighbor_grad": "stop"},
    "stop, psi_den T=50, cap 1": {"loss.neighbor_grad": "stop", "loss.den_temperature": 50.0, "loss.psi_cap": 1.0},
    "stop, literal psi_den, a2=4": {"loss.neighbor_grad": "stop", "loss.a2": 4.0},
    "stop, identity psi_den": {"loss.neighbor_grad": "stop", **_ID},
    "stop, identity psi_den T=50, cap 1": {"loss.neighbor_grad": "stop", "loss.den_temperature": 50.0,
                                           "loss.psi_cap": 1.0, **_ID},
}
METRICS = ("accuracy", "grecall", "dino", "fid")
EVAL_VERSION = 3  # bump when the evaluation changes (v2: Faces-IT2I CNN judge; v3: 16 images): evaluations are redone
SELECT_ON, TIE_BREAK = "accuracy_few", "dino_few"


class Experiment:
    def __init__(self, dataset: str, budget: str, out: Path, seeds: list[int], preset: str = "M",
                 swept: dict | None = None, rows: list[str] | None = None, tag: str = ""):
        self.dataset, self.b, self.out, self.seeds, self.preset = dataset, BUDGETS[budget], out, seeds, preset
        self.swept, self.rows, self.tag = swept, rows, tag
        self.channels = 3 if dataset.startswith("faces") else 1
        self.log = out / "log.jsonl"

    def config(self, preset: str, name: str, overrides: dict) -> Config:
        return load_config(None, self.settings(preset, name, overrides))

    def settings(self, preset: str, name: str, overrides: dict) -> dict:
        """The explicit settings of a run: the paper's literal PoGDiff and uniform sampling
        (the tables' reference point; the code defaults are the recipe), then the preset's."""
        b = self.b
        # prepare options change the shards: each combination gets its own prepared directory
        prep = "".join(f"-{k.split('.')[1]}-{v}" for k, v in sorted(overrides.items()) if k.startswith("prepare."))
        base = {
            **PAPER_POGDIFF,
            "data.dataset": f"{self.dataset}:{preset}", "data.resolution": b["resolution"],
            "data.channels": self.channels, "data.heldout_per_identity": 10,
            "model.unet": b["unet"], "model.max_length": 32,
            "prepare.out_dir": str(self.out / f"prepared-{preset}{prep}"), "prepare.k_max": 20,
            "prepare.density_text": "caption",  # explicit: the baselines' T2H reads the caption density
            "optim.batch_size": b["batch_size"], "optim.lr": b["lr"], "optim.warmup_steps": b["warmup"],
            "train.name": name, "train.storage_path": str(self.out / "runs"),
            "train.checkpoint_every": 10_000, "train.log_every": 25, "train.sample_steps": 10,
            "train.samples_per_prompt": 2,
            "tracking.tracking_uri": f"sqlite:///{self.out / 'mlflow.db'}",
            "tracking.experiment": f"reproduce-{self.dataset}",
        }
        return {**base, **overrides}

    def train(self, preset: str, name: str, overrides: dict) -> Path:
        """Train (or reuse a finished run) and return its exported model directory."""
        from pogdiff_dist.train.driver import run_train

        model = self.out / "runs" / name / "model"
        request = json.dumps(self.settings(preset, name, overrides), sort_keys=True, default=str)
        stamp = model.parent / "request.json"  # what the cached run was trained with
        if (model / "model_index.json").is_file() and stamp.is_file() and stamp.read_text() == request:
            return model
        if model.parent.exists():  # interrupted, or trained with other settings: train it again
            print(f"[reproduce] {model.parent} is unfinished or was trained with other settings: "
                  "training it again", flush=True)
            shutil.rmtree(model.parent)
        t0 = time.time()
        outcome = run_train(self.config(preset, name, overrides))
        stamp.write_text(request)
        self._log({"event": "trained", "name": name, "seconds": time.time() - t0, **outcome.metrics})
        return outcome.model_dir

    def evaluate(self, preset: str, model: Path) -> dict:
        """Fixed-seed evaluation of every identity (cached next to the model)."""
        from pogdiff_dist.config import EvalConfig
        from pogdiff_dist.evaluation.evaluate import evaluate_model

        cached = model.parent / f"eval-v{EVAL_VERSION}.json"
        if cached.is_file():
            return json.loads(cached.read_text())
        t0 = time.time()
        res = evaluate_model(model, self.out / f"prepared-{preset}",
                             EvalConfig(num_images=self.b["eval_images"], steps=self.b["eval_steps"], seed=1234))
        row = {"summary": res["summary"], "per_identity": res["per_identity"],
               "judge_accuracy_on_real": res["classifier"].get("accuracy_on_real_heldout"),
               "seconds": time.time() - t0}
        cached.write_text(json.dumps(row, indent=1, default=float))
        return row

    def psi(self, preset: str, overrides: dict) -> dict:
        """Where a variant's PoG weight goes on a prepared split (benchmarks/psi_weights.py)."""
        from psi_weights import psi_table

        prepared = Path(self.settings(preset, "", overrides)["prepare.out_dir"])
        return psi_table(prepared, [f"{k}={v}" for k, v in overrides.items() if k.startswith("loss.")])

    def checkpoint(self, results: dict) -> None:
        """Write the table so far (a long experiment can be read while it runs)."""
        results_path, table_path = self.outputs()
        results_path.write_text(json.dumps(results, indent=1))
        table_path.write_text(markdown(results))

    def outputs(self) -> tuple[Path, Path]:
        """results.json / table.md for M; results-<preset>.json / table-<preset>.md otherwise
        (the presets of a dataset share its base model, validation runs and caches)."""
        tag = ("" if self.preset == "M" else f"-{self.preset}") + (f"-{self.tag}" if self.tag else "")
        return self.out / f"results{tag}.json", self.out / f"table{tag}.md"

    def _log(self, record: dict) -> None:
        with self.log.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    # -- the protocol -------------------------------------------------------------------
    def base_model(self) -> Path:
        steps = self.b["base_steps"]
        return self.train("base", "base", {"loss.method": "vanilla", "optim.max_steps": steps,
                                           "train.checkpoint_every": max(100, steps // 4)})

    def finetune(self, preset: str, label: str, overrides: dict, seed: int, init: Path | None) -> dict:
        steps = self.b["finetune_steps"] if init is not None else self.b["scratch_steps"]
        tag = "ft" if init is not None else "scratch"
        slug = label.lower().replace(" ", "-").replace("/", "").replace(",", "").replace("=", "")
        name = f"{tag}-{preset}-{slug}-s{seed}"
        extra = {"model.init_unet": str(init)} if init is not None else {}
        model = self.train(preset, name, {**overrides, **extra, "optim.max_steps": steps, "train.seed": seed})
        return self.evaluate(preset, model)

    def run(self, protocols: list[str], skip_validation: bool) -> dict:
        results: dict = {"dataset": self.dataset, "preset": self.preset, "budget": self.b, "seeds": self.seeds,
                         "settings": {}}
        base = self.base_model() if "finetune" in protocols else None

        chosen, validation = {}, {}  # {}: LossConfig's defaults (what jobs/train.py uses)
        if not skip_validation and base is not None:
            variants = {k: VARIANTS[k] for k in (self.b["variants"] or VARIANTS)}
            for label, ov in {"vanilla": {"loss.method": "vanilla"}, **variants}.items():
                runs = [self.finetune("val", label, {"loss.method": "pogdiff", **ov} if label != "vanilla" else ov,
                                      s, base) for s in self.seeds[:1]]
                validation[label] = _aggregate(runs)
            best = max(variants, key=lambda k: (_mean(validation[k], SELECT_ON),
                                                _mean(validation[k], TIE_BREAK)))
            chosen = dict(VARIANTS[best])
            results["validation"] = {"split": f"{self.dataset}:val", "select_on": SELECT_ON, "chosen": best,
                                     "rows": validation, "psi": {k: self.psi("val", ov) for k, ov in variants.items()}}
            print(f"[reproduce] validation chose PoGDiff variant {best!r}", flush=True)
            self.checkpoint(results)
        results["pogdiff_variant"] = chosen
        if self.swept is not None:
            results["pogdiff_swept"] = self.swept

        for protocol in protocols:
            init = base if protocol == "finetune" else None
            todo = {label: ov for label, ov in methods(chosen, self.swept).items()
                    if not (protocol == "scratch" and self.b["scratch_methods"]
                            and label not in self.b["scratch_methods"])
                    and (self.rows is None or label in self.rows)}
            runs: dict[str, list] = {label: [] for label in todo}
            for seed in self.seeds:  # seed-major: a complete table for the first seed comes first
                for label, ov in todo.items():
                    runs[label].append(self.finetune(self.preset, label, ov, seed, init))
                    print(f"[reproduce] {protocol} {label} seed {seed}: " + _fmt_row(_aggregate(runs[label][-1:])),
                          flush=True)
                results["settings"][protocol] = {k: _aggregate(v) for k, v in runs.items() if v}
                results["settings_seeds"] = {protocol: self.seeds[: self.seeds.index(seed) + 1]}
                self.checkpoint(results)
        return results


def _aggregate(runs: list[dict]) -> dict:
    out = {"n": len(runs)}
    for key in runs[0]["summary"]:
        vals = [r["summary"][key] for r in runs if r["summary"][key] is not None and not _isnan(r["summary"][key])]
        if vals:
            out[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "values": vals}
    out["judge_accuracy_on_real"] = runs[0].get("judge_accuracy_on_real")
    return out


def _isnan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _mean(row: dict, key: str) -> float:
    return row.get(key, {}).get("mean", -math.inf)


def _fmt_row(row: dict) -> str:
    return " ".join(f"{k}={row[k]['mean']:.3f}" for k in (f"{m}_{s}" for m in METRICS for s in ("few", "all")) if k in row)


def markdown(results: dict) -> str:
    lines = [f"# Reproduction: {results['dataset']} (budget {results['budget']})", ""]
    cols = [f"{m}_{s}" for m in METRICS for s in (("all", "majority", "few") if m == "accuracy" else ("all", "few"))]
    arrows = {"accuracy": "↑", "grecall": "↑", "dino": "↑", "fid": "↓"}
    header = "| method | " + " | ".join(f"{c.split('_')[0]} {arrows[c.split('_')[0]]} ({c.split('_')[1]})"
                                       for c in cols) + " |"
    sep = "|---" * (len(cols) + 1) + "|"

    def table(rows: dict) -> list[str]:
        out = [header, sep]
        for label, row in rows.items():
            cells = [f"{row[c]['mean']:.3f} ± {row[c]['std']:.3f}" if c in row else "n/a" for c in cols]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        return out

    if "validation" in results:
        v = results["validation"]
        lines += [(f"## Validation on {v['split']} (seed {results['seeds'][0]}; chosen by {v['select_on']}: "
                  f"**{v['chosen']}**)"), ""] + table(v["rows"]) + [""]
        if v.get("psi"):
            lines += [("Where each variant's PoG weight goes on the val split (expectation over the neighbour "
                      "draw; benchmarks/psi_weights.py):"), "",
                      ("| variant | E[psi] few-shot | E[psi] majority | P(same identity) few-shot | "
                      "psi_den mass on top 5 samples | accuracy few |"), "|---|---|---|---|---|---|"]
            for label, t in v["psi"].items():
                g = t["groups"]
                lines.append(f"| {label} | {g['few-shot']['e_psi']:.3f} | {g['majority']['e_psi']:.3f} | "
                             f"{g['few-shot']['p_same_identity']:.2f} | {t['psi_den_mass_top5']:.0%} | "
                             f"{_mean(v['rows'][label], SELECT_ON):.3f} |")
            lines.append("")
    for protocol, rows in results["settings"].items():
        title = ("Fine-tuning a base model pretrained on other identities (the paper's protocol)"
                 if protocol == "finetune" else "From scratch on the imbalanced set")
        seeds = results.get("settings_seeds", {}).get(protocol, results["seeds"])
        where = f"{results['dataset']}:{results.get('preset', 'M')}"
        lines += [f"## {title}: {where}, seeds {seeds}", ""] + table(rows) + [""]
        van = rows.get("vanilla", {})
        if "accuracy_few" in van and "accuracy_all" in van:
            lines.append(f"Baseline check: vanilla few-shot identity accuracy {van['accuracy_few']['mean']:.3f} "
                         f"vs all identities {van['accuracy_all']['mean']:.3f}.")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="faces-it2i", choices=["faces-it2i", "digits-it2i"])
    p.add_argument("--preset", default="M", choices=["S", "M", "L"], help="the imbalanced set the table is on")
    p.add_argument("--budget", default="cpu", choices=sorted(BUDGETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--stage", choices=["all", "base"], default="all", help="base: only train (or find) the base model")
    p.add_argument("--pogdiff-config", type=Path, default=None,
                   help="a sweep's best_config.yaml: adds the rows 'PoGDiff (swept)' (its loss settings, uniform "
                        "sampling) and '... + balanced sampling'")
    p.add_argument("--protocols", nargs="+", default=["finetune", "scratch"], choices=["finetune", "scratch"])
    p.add_argument("--skip-validation", action="store_true", help="use the default PoGDiff variant")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/reproduce-<dataset>-<budget>")
    p.add_argument("--methods", nargs="+", default=None, metavar="ROW",
                   help="only these table rows (e.g. vanilla 'vanilla + balanced sampling'); default: all")
    p.add_argument("--tag", default="", help="write results-<tag>.json / table-<tag>.md (runs stay shared and cached)")
    args = p.parse_args(argv)
    out = args.out or REPO / "benchmarks" / "results" / f"reproduce-{args.dataset}-{args.budget}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    swept = swept_settings(args.pogdiff_config) if args.pogdiff_config else None
    if args.methods:
        unknown = set(args.methods) - set(methods({}, swept))
        if unknown:
            p.error(f"--methods: unknown rows {sorted(unknown)}; the rows are {sorted(methods({}, swept))}"
                    + ("" if swept else " (the swept rows need --pogdiff-config)"))
    exp = Experiment(args.dataset, args.budget, out, args.seeds, args.preset, swept, args.methods, args.tag)
    if args.stage == "base":
        print(f"[reproduce] base model: {exp.base_model()}")
        return
    results = exp.run(args.protocols, args.skip_validation)
    results["wall_seconds"] = time.time() - t0
    exp.checkpoint(results)
    print(markdown(results))
    results_path, table_path = exp.outputs()
    print(f"[reproduce] {results['wall_seconds'] / 60:.1f} min; table: {table_path}; json: {results_path}")


if __name__ == "__main__":
    main()
