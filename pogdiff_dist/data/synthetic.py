"""A prepared dataset in the project's shard format, made in one process without Ray.

For the places where Ray cannot run: the GPU acceptance script (``scripts/gpu_check.sh``:
the GPU test machine has no Ray) and the fast test tier. The latents are synthetic
(an identity's samples share a pattern, so image-space neighbours mean something), but
everything else is the real prepare path in miniature: captions tokenised and encoded by
the given text encoder, exact k-NN on the image embeddings (``build_knn``), the density
VAE fitted on the pooled caption embeddings (``fit_density_vae``), rows built by
``attach_neighbours`` and written as WebDataset shards with ``webdataset.TarWriter``,
then the manifest with sizes and checksums that ``verify_shards`` checks. Every model
and table lives on ``device``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from pogdiff_dist.data.density import DensityVAEConfig, compute_elbo, fit_density_vae
from pogdiff_dist.data.neighbours import build_knn
from pogdiff_dist.data.records import IDENTITY_PROMPT
from pogdiff_dist.data.shard_files import count_shard_rows, file_digest
from pogdiff_dist.data.shards import META_FIELD, Manifest, attach_neighbours
from pogdiff_dist.models import load_text_encoder

POSES = ("facing left", "facing right", "smiling", "in soft light", "in profile", "close up")


def synthetic_identities(counts: list[int]) -> list[str]:
    return [f"Person {chr(ord('A') + i % 26)}{i // 26 or ''}" for i in range(len(counts))]


def build_synthetic_prepared(out_dir: str | Path, counts: list[int], latent_shape: tuple[int, int, int],
                             text_encoder_dir: str | Path, tokenizer_dir: str | Path, max_length: int,
                             k_max: int = 5, samples_per_shard: int = 16, density: DensityVAEConfig | None = None,
                             device: torch.device | str = "cpu", seed: int = 0,
                             vae_dir: str | Path | None = None, names: list[str] | None = None,
                             dataset: str | None = None, knn_backend: str = "auto") -> Manifest:
    """Write ``out_dir/{shards/, elbo.npy, neighbours.npz, manifest.json}`` for identities with
    ``counts`` images each; returns the manifest. ``vae_dir``: the latents are a VAE's (the
    export then decodes with it). ``text_encoder_dir`` may be an SDXL / SD3 / Flux directory:
    its family's encoders make the caption states and the pooled vector (``y_pooled``). ``knn_backend``: as
    :func:`build_knn`'s ``backend``."""
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(names) if names is not None else synthetic_identities(counts)
    identity = np.repeat(np.arange(len(counts)), counts)
    n = len(identity)
    pattern = rng.normal(size=(len(counts), *latent_shape)).astype(np.float32)
    latents = (pattern[identity] + 0.5 * rng.normal(size=(n, *latent_shape))).astype(np.float32)
    captions = [f"{IDENTITY_PROMPT.format(name=names[i])[:-1]}, {POSES[j % len(POSES)]}."
                for j, i in enumerate(identity)]

    text = load_text_encoder(text_encoder_dir, tokenizer_dir, max_length).to(device)
    family = getattr(text, "family", None)
    tokens, lengths = text.tokenize(captions)
    hidden, pooled = [], []
    for s in range(0, n, 64):
        h, p = text.encode_ids(torch.from_numpy(tokens[s:s + 64]).to(text.device),
                               torch.from_numpy(lengths[s:s + 64]).to(text.device))
        hidden.append(h.float().cpu().numpy().astype(np.float16))
        pooled.append(p.float().cpu().numpy())
    hidden, pooled = np.concatenate(hidden), np.concatenate(pooled)
    y_pooled = pooled.astype(np.float16) if family is not None else None

    nbr_idx, nbr_sim = build_knn(latents.reshape(n, -1), k_max, device=str(device), backend=knn_backend)
    vae = fit_density_vae(pooled, density or DensityVAEConfig(epochs=20, seed=seed), device=device)
    elbo = compute_elbo(vae, pooled)
    np.save(out / "elbo.npy", elbo)
    np.savez(out / "neighbours.npz", idx=nbr_idx, sims=nbr_sim)

    fingerprint = hashlib.sha256(json.dumps([counts, list(latent_shape), str(text_encoder_dir), max_length, k_max,
                                             seed]).encode()).hexdigest()[:16]
    tables = {"nbr_idx": nbr_idx, "nbr_sim": nbr_sim, "tokens": tokens, "lengths": lengths, "identity": identity, "elbo": elbo,
                  "fingerprint": fingerprint}
    shards = _write_shards(out / "shards", latents, hidden, captions, tables, samples_per_shard, y_pooled)
    manifest = Manifest(
        fingerprint=fingerprint, num_samples=n, k_max=k_max, latent_shape=list(latent_shape),
        text_shape=list(hidden.shape[1:]), identities=names, train_counts=list(counts),
        shards=[p.name for p in shards], text_encoder_dir=str(text_encoder_dir), tokenizer_dir=str(tokenizer_dir),
        vae_dir=str(vae_dir) if vae_dir else None, dataset=dataset, shard_bytes={p.name: p.stat().st_size for p in shards},
        shard_sha256={p.name: file_digest(p) for p in shards},
        shard_rows={p.name: count_shard_rows(p) for p in shards}, family=family.name if family is not None else None,
        pooled_dim=0 if y_pooled is None else y_pooled.shape[1], max_length=max_length)
    manifest.save(out)
    return manifest


def _write_shards(shard_dir: Path, latents, hidden, captions, tables: dict, per_shard: int,
                  y_pooled: np.ndarray | None = None) -> list[Path]:
    import webdataset as wds

    paths = []
    for s in range(0, len(latents), per_shard):
        index = np.arange(s, min(s + per_shard, len(latents)))
        rows = attach_neighbours({"index": index, "key": np.array([f"{i:08d}" for i in index]),
                                  "latent": latents[index], "y": hidden[index],
                                  **({} if y_pooled is None else {"y_pooled": y_pooled[index]}),
                                  "caption": np.array(captions, dtype=object)[index]}, **tables)
        path = shard_dir / f"shard-{len(paths):06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for r in range(len(index)):
                sink.write({"__key__": str(rows["__key__"][r]), META_FIELD: rows[META_FIELD][r],
                            **{k: v[r] for k, v in rows.items() if k.endswith(".npy")}})
        paths.append(path)
    return paths
