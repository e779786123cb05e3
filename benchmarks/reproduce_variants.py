"""Follow-up to the reproduction: two more PoGDiff variants on Faces-IT2I M, fine-tuned from
the same base model with the same budget, seeds and cached evaluation as reproduce.py.

  PoGDiff w/o psi_den a2=4   psi = psi_img only, cross-identity neighbours discounted to s^5
  PoGDiff T=50 cap 1         psi_den tempered (T = 50) and psi capped at 1

    .venv/bin/python benchmarks/reproduce_variants.py     # after reproduce.py --budget cpu (reuses its base model)
"""

import json

from reproduce import REPO, VARIANTS as STUDIED, Experiment, _aggregate, _fmt_row

VARIANTS = {
    "PoGDiff w/o psi_den a2=4": {"loss.method": "pogdiff", **STUDIED["stop, literal psi_den"],
                                 "loss.use_psi_den": False, "loss.a2": 4.0},
    "PoGDiff T=50 cap 1": {"loss.method": "pogdiff", **STUDIED["stop, psi_den T=50, cap 1"]},
}


def main() -> None:
    out_dir = REPO / "benchmarks" / "results" / "reproduce-faces-it2i-cpu"
    exp = Experiment("faces-it2i", "cpu", out_dir, [0, 1])
    base = exp.base_model()
    out = {}
    for label, overrides in VARIANTS.items():
        out[label] = _aggregate([exp.finetune("M", label, overrides, s, base) for s in exp.seeds])
        print(f"[variants] {label}: " + _fmt_row(out[label]), flush=True)
    (out_dir / "variants.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
