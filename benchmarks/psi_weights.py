"""Where does the PoG weight go? psi per identity group on a prepared dataset.

For every training sample, the expectation over its neighbour draw (j ~ Cat(w), Eq. 8) of
psi_img, psi = psi_img * psi_den (Eq. 9-12, the same ``psi_weights`` the trainer uses) and
[id_j == id_i], summarised for the few-shot and the majority identities, plus how
concentrated psi_den is (its mass on the top 1 / top 5 samples). This is the evidence behind
the README's "why" paragraph: a PoG term can only help the minority if psi reaches it.

    .venv/bin/python benchmarks/psi_weights.py benchmarks/results/reproduce-faces-it2i-cpu/prepared-M
    .venv/bin/python benchmarks/psi_weights.py <prepared dir> --set loss.den_temperature=50 loss.psi_cap=1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pogdiff_dist.config import load_config
from pogdiff_dist.data.neighbours import read_neighbours
from pogdiff_dist.data.shards import Manifest
from pogdiff_dist.losses import log_density_normaliser, neighbour_weights, psi_den, psi_weights


def psi_table(prepared: Path, overrides: list[str] | None = None) -> dict:
    loss = load_config(None, overrides or []).loss
    manifest = Manifest.load(prepared)
    idx, sims = read_neighbours(prepared)
    idx, sims = idx[:, : loss.k], sims[:, : loss.k]
    elbo = torch.from_numpy(np.load(prepared / "elbo.npy"))
    tab = pq.read_table(prepared / "encoded", columns=["index", "identity_id"]).to_pandas().sort_values("index")
    ident = tab["identity_id"].to_numpy()
    n, k = idx.shape

    w = neighbour_weights(torch.from_numpy(sims), k).numpy()  # [N, k] draw probabilities
    same = torch.from_numpy(ident[idx] == ident[:, None])
    psi_img = psi_weights(torch.from_numpy(sims).reshape(-1), same.reshape(-1), torch.zeros(n * k), 0.0,
                          a1=loss.a1, a2=loss.a2, a3=1.0, use_psi_den=False).reshape(n, k).numpy()
    log_norm = log_density_normaliser(elbo, loss.den_temperature)
    psi = psi_weights(torch.from_numpy(sims).reshape(-1), same.reshape(-1), elbo.repeat_interleave(k), log_norm,
                      a1=loss.a1, a2=loss.a2, a3=loss.a3, den_temperature=loss.den_temperature,
                      use_psi_img=loss.use_psi_img, use_psi_den=loss.use_psi_den,
                      psi_cap=loss.psi_cap).reshape(n, k).numpy()
    den = psi_den(elbo, log_norm, loss.a3, loss.den_temperature).numpy()

    few_names = set(manifest.minority())
    few = np.array([manifest.identities[i] in few_names for i in ident])
    share = np.sort(den)[::-1] / den.sum()
    groups = {}
    for label, mask in (("few-shot", few), ("majority", ~few)):
        groups[label] = {
            "samples": int(mask.sum()),
            "p_same_identity": float((w * same.numpy())[mask].sum(1).mean()),
            "e_psi_img": float((w * psi_img)[mask].sum(1).mean()),
            "mean_psi_den": float(den[mask].mean()),
            "e_psi": float((w * psi)[mask].sum(1).mean()),
        }
    return {"prepared": str(prepared), "loss": {o.split("=")[0]: o.split("=", 1)[1] for o in overrides or []},
            "k": k, "elbo_spread": float(elbo.max() - elbo.min()),
            "psi_den_mass_top1": float(share[0]), "psi_den_mass_top5": float(share[:5].sum()), "groups": groups}


def markdown(t: dict) -> str:
    lines = [(f"`{t['prepared']}` {' '.join(f'{k}={v}' for k, v in t['loss'].items()) or '(defaults)'}, k = {t['k']}: "
             f"ELBO spread {t['elbo_spread']:.1f} nats; psi_den mass on the top 1 / 5 samples "
             f"{t['psi_den_mass_top1']:.0%} / {t['psi_den_mass_top5']:.0%}"), "",
             "| | P(same identity) | E[psi_img] | mean psi_den | E[psi] |", "|---|---|---|---|---|"]
    for label, g in t["groups"].items():
        lines.append(f"| {label} samples ({g['samples']}) | {g['p_same_identity']:.2f} | {g['e_psi_img']:.2f} | "
                     f"{g['mean_psi_den']:.3f} | {g['e_psi']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prepared", type=Path, help="a prepared dataset directory (prepare.out_dir)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="loss.* overrides, e.g. loss.a2=4")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    t = psi_table(args.prepared, args.set)
    print(markdown(t))
    if args.json:
        args.json.write_text(json.dumps(t, indent=1))


if __name__ == "__main__":
    main()
