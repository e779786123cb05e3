"""The training shard format and the prepared-dataset manifest.

Each WebDataset sample (member names ``<key>.<field>``) carries everything a worker
needs for one PoGDiff step, so nothing dataset-wide is held in a worker's memory:

==================  ===================  ==============================================
field               dtype / shape         meaning
==================  ===================  ==============================================
``latent.npy``      f32 [C, H, W]         VAE latent (scaled) or pixels in [-1, 1]
``y.npy``           f16 [L, D]            caption hidden states (cross-attention context)
``nbr_tokens.npy``  i32 [K, L]            neighbours' caption token ids (y' is encoded on
                                          the worker from these: Eq. 8's y_j)
``nbr_len.npy``     i32 [K]               their token counts
``nbr_index.npy``   i64 [K]               their dataset indices, similarity-descending
``nbr_sim.npy``     f32 [K]               cosine similarity of image embeddings
``nbr_same.npy``    u8  [K]               1 where the neighbour has the same identity
``meta.json``       dict                  index, identity_id, caption, elbo
==================  ===================  ==============================================

Arrays are plain ``.npy`` (never pickle); ``meta.json`` is JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pogdiff_dist.step import Batch

ARRAY_FIELDS = ("latent.npy", "y.npy", "nbr_tokens.npy", "nbr_len.npy", "nbr_index.npy", "nbr_sim.npy", "nbr_same.npy")
META_FIELD = "meta.json"
MANIFEST = "manifest.json"


@dataclass
class Manifest:
    """What prepare produced; training validates its config against it."""

    fingerprint: str  # hash of the data/model/prepare config that produced the shards
    num_samples: int
    k_max: int
    latent_shape: list[int]
    text_shape: list[int]  # [L, D]
    identities: list[str]  # identity_id -> name
    train_counts: list[int]  # training images per identity
    shards: list[str]  # shard file names relative to the prepared dir
    text_encoder_dir: str
    tokenizer_dir: str
    vae_dir: str | None
    elbo_file: str = "elbo.npy"
    skipped: list[list[str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    heldout: list[dict] = field(default_factory=list)  # {"image", "identity"} for evaluation

    def minority(self, threshold: int | None = None) -> list[str]:
        """Few-shot identities: at most ``threshold`` training images (default: below a
        fifth of the largest identity)."""
        t = threshold if threshold is not None else max(self.train_counts) / 5
        return [n for n, c in zip(self.identities, self.train_counts) if c <= t]

    def majority(self) -> list[str]:
        few = set(self.minority())
        return [n for n in self.identities if n not in few]

    def save(self, prepared_dir: Path) -> None:
        (Path(prepared_dir) / MANIFEST).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, prepared_dir: str | Path) -> "Manifest":
        path = Path(prepared_dir) / MANIFEST
        if not path.is_file():
            raise ValueError(f"{path} not found: run jobs/prepare.py with the same config first")
        return cls(**json.loads(path.read_text()))


def attach_neighbours(batch: dict[str, np.ndarray], nbr_idx: np.ndarray, nbr_sim: np.ndarray,
                      tokens: np.ndarray, lengths: np.ndarray, identity: np.ndarray,
                      elbo: np.ndarray) -> dict[str, np.ndarray]:
    """Encoded rows -> shard rows: add neighbour references, y' token ids, ELBO.

    ``nbr_idx``/``nbr_sim`` [N, K], ``tokens`` [N, L], ``lengths``/``identity``/``elbo`` [N]
    are dataset-wide tables indexed by sample index (small: ints and floats only).
    """
    idx = batch["index"].astype(np.int64)
    nb = nbr_idx[idx]  # [B, K]
    out = {
        "__key__": np.asarray(batch["key"]).astype(str),
        "latent.npy": np.asarray(batch["latent"], dtype=np.float32),
        "y.npy": np.asarray(batch["y"], dtype=np.float16),
        "nbr_tokens.npy": tokens[nb].astype(np.int32),
        "nbr_len.npy": lengths[nb].astype(np.int32),
        "nbr_index.npy": nb.astype(np.int64),
        "nbr_sim.npy": nbr_sim[idx].astype(np.float32),
        "nbr_same.npy": (identity[nb] == identity[idx][:, None]).astype(np.uint8),
    }
    out[META_FIELD] = np.array([
        {"index": int(i), "identity_id": int(identity[i]), "caption": str(c), "elbo": float(elbo[i])}
        for i, c in zip(idx, batch["caption"])
    ], dtype=object)
    return out


def collate(batch: dict[str, np.ndarray]) -> Batch:
    """Streamed numpy batch (Ray Data column dict) -> tensors; names the missing field."""
    missing = [f for f in (*ARRAY_FIELDS, META_FIELD) if f not in batch]
    if missing:
        raise ValueError(f"shard batch lacks field(s) {missing}; got {sorted(batch)} "
                         f"(shards written by another version or config?)")
    meta = batch[META_FIELD]
    arrays = {f: np.stack(list(batch[f])) if batch[f].dtype == object else batch[f] for f in ARRAY_FIELDS}
    return Batch(
        x0=torch.tensor(arrays["latent.npy"], dtype=torch.float32),
        y=torch.as_tensor(arrays["y.npy"]),
        nbr_tokens=torch.as_tensor(arrays["nbr_tokens.npy"]).long(),
        nbr_len=torch.as_tensor(arrays["nbr_len.npy"]).long(),
        nbr_sim=torch.as_tensor(arrays["nbr_sim.npy"], dtype=torch.float32),
        nbr_same=torch.as_tensor(arrays["nbr_same.npy"]),
        elbo=torch.tensor([m["elbo"] for m in meta], dtype=torch.float64),
        index=torch.tensor([m["index"] for m in meta], dtype=torch.long),
        identity=torch.tensor([m["identity_id"] for m in meta], dtype=torch.long),
    )
