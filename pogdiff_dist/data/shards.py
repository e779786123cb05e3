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
``meta.json``       dict                  index, identity_id, caption, elbo, fingerprint
``y_pooled.npy``    f16 [P]               (SDXL, SD3, Flux only) the pooled caption vector
                                          their denoiser also reads
==================  ===================  ==============================================

Arrays are plain ``.npy`` (never pickle); ``meta.json`` is JSON. Training reads shards
with :func:`decode_sample`, which decodes exactly these members and nothing else, and
checks them against the manifest (:func:`~pogdiff_dist.data.shard_files.verify_shards`) before the first step.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from pogdiff_dist.devices import to_device
from pogdiff_dist.storage import Store

ARRAY_FIELDS = ("latent.npy", "y.npy", "nbr_tokens.npy", "nbr_len.npy", "nbr_index.npy", "nbr_sim.npy", "nbr_same.npy")
OPTIONAL_FIELDS = ("y_pooled.npy",)  # present in every row of a dataset, or in none
META_FIELD = "meta.json"
META_KEYS = ("index", "identity_id", "caption", "elbo", "fingerprint")
MANIFEST = "manifest.json"
SHARD_FORMAT = 3  # bump when the fields or layout change: prepare re-writes shards of another format


@dataclass
class HostBatch:
    """A collated micro-batch in host memory (numpy): what the data pipeline, the epoch ledger
    and the step's host-side draws read. :meth:`to_device` is its one copy to the device."""

    x0: np.ndarray  # f32 [B, C, H, W] latents or pixels
    y: np.ndarray  # f16 [B, L, D] caption hidden states
    nbr_tokens: np.ndarray  # i64 [B, K, L] neighbours' caption token ids
    nbr_len: np.ndarray  # i64 [B, K]
    nbr_sim: np.ndarray  # f32 [B, K] cosine similarity, descending
    nbr_same: np.ndarray  # u8 [B, K] 1 where the neighbour has the same identity
    elbo: np.ndarray  # f64 [B] text-density ELBO of the sample's caption
    index: np.ndarray  # i64 [B] dataset index
    identity: np.ndarray  # i64 [B] identity id
    y_pooled: np.ndarray | None = None  # f16 [B, P] (SDXL, SD3, Flux)

    def __len__(self) -> int:
        return self.x0.shape[0]

    def to_device(self, device) -> Batch:
        return Batch(**{k: None if v is None else to_device(v, device) for k, v in vars(self).items()})

    @classmethod
    def from_batch(cls, batch: Batch) -> HostBatch:
        """The host arrays of a batch built as tensors (tests, benchmarks); identity 0 if absent."""
        arrays = {k: None if v is None else v.detach().cpu().numpy() for k, v in vars(batch).items()}
        if arrays["identity"] is None:
            arrays["identity"] = np.zeros(len(batch), np.int64)
        return cls(**arrays)


@dataclass
class Batch:
    """A micro-batch on the device: the tensors of the fields above."""

    x0: torch.Tensor  # [B, C, H, W] latents or pixels
    y: torch.Tensor  # [B, L, D] caption hidden states
    nbr_tokens: torch.Tensor  # [B, K, L] neighbours' caption token ids
    nbr_len: torch.Tensor  # [B, K]
    nbr_sim: torch.Tensor  # [B, K] cosine similarity, descending
    nbr_same: torch.Tensor  # [B, K] 1 where the neighbour has the same identity
    elbo: torch.Tensor  # [B] text-density ELBO of the sample's caption
    index: torch.Tensor  # [B] dataset index
    identity: torch.Tensor | None = None  # [B] identity id (DiffROP pairs samples of different identities)
    y_pooled: torch.Tensor | None = None  # [B, P] pooled caption vector (SDXL, SD3, Flux)

    def __len__(self) -> int:
        return self.x0.shape[0]


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
    shard_bytes: dict[str, int] = field(default_factory=dict)  # shard name -> size
    shard_sha256: dict[str, str] = field(default_factory=dict)  # shard name -> checksum
    dataset: str | None = None  # data.dataset it was prepared from: "<bundled>:<preset>" or a folder
    family: str | None = None  # the model family the latents and caption states are for (None: pixels / SD 1.x)
    pooled_dim: int = 0  # y_pooled's width (0: the shards hold none)
    max_length: int | None = None  # model.max_length the captions were encoded with
    shard_rows: dict[str, int] = field(default_factory=dict)  # shard name -> samples in it
    # repeat count per identity from "<repeats>_<name>" folders (data/layouts.py), used by
    # data.sampling (data/sampling.py); empty (a manifest without any) means 1 each
    train_repeats: list[int] = field(default_factory=list)

    def minority(self, threshold: int | None = None) -> list[str]:
        """Few-shot identities: at most ``threshold`` training images (default: below a
        fifth of the largest identity)."""
        t = threshold if threshold is not None else max(self.train_counts) / 5
        return [n for n, c in zip(self.identities, self.train_counts) if c <= t]

    def repeats(self) -> list[int]:
        return list(self.train_repeats) or [1] * len(self.identities)

    def majority(self) -> list[str]:
        few = set(self.minority())
        return [n for n in self.identities if n not in few]

    def save(self, prepared_dir: str | Path) -> None:
        Store(prepared_dir).write_text(json.dumps(asdict(self), indent=1), MANIFEST)

    @classmethod
    def load(cls, prepared_dir: str | Path) -> Manifest:
        """The manifest of a prepared folder, local or in object storage."""
        store = Store(prepared_dir)
        if not store.is_file(MANIFEST):
            raise ValueError(f"{store.uri(MANIFEST)} not found: run jobs/prepare.py with the same config first")
        return cls(**json.loads(store.read_text(MANIFEST)))


def attach_neighbours(batch: dict[str, np.ndarray], nbr_idx: np.ndarray, nbr_sim: np.ndarray,
                      tokens: np.ndarray, lengths: np.ndarray, identity: np.ndarray,
                      elbo: np.ndarray, fingerprint: str = "") -> dict[str, np.ndarray]:
    """Encoded rows -> shard rows from dataset-wide tables indexed by sample index:
    ``nbr_idx``/``nbr_sim`` [N, K], ``tokens`` [N, L], ``lengths``/``identity``/``elbo`` [N]
    (small datasets and synthetic ones; prepare joins the neighbours in Ray Data instead
    and calls :func:`shard_rows` with each batch's own rows)."""
    idx = batch["index"].astype(np.int64)
    nb = nbr_idx[idx]  # [B, K]
    return shard_rows({**batch, "identity_id": identity[idx]}, nbr_index=nb, nbr_sim=nbr_sim[idx],
                      nbr_tokens=tokens[nb], nbr_len=lengths[nb], nbr_identity=identity[nb], elbo=elbo[idx],
                      fingerprint=fingerprint)


def shard_rows(batch: dict[str, np.ndarray], nbr_index: np.ndarray, nbr_sim: np.ndarray, nbr_tokens: np.ndarray,
               nbr_len: np.ndarray, nbr_identity: np.ndarray, elbo: np.ndarray,
               fingerprint: str = "") -> dict[str, np.ndarray]:
    """Encoded rows (``index, key, caption, latent, y, identity_id`` [B]) and their
    neighbours' rows -> shard rows: ``nbr_index``/``nbr_sim``/``nbr_len``/``nbr_identity``
    [B, K] (similarity-descending), ``nbr_tokens`` [B, K, L], ``elbo`` [B]."""
    idx = batch["index"].astype(np.int64)
    identity = np.asarray(batch["identity_id"])
    out = {
        "__key__": np.asarray(batch["key"]).astype(str),
        "latent.npy": np.asarray(batch["latent"], dtype=np.float32),
        "y.npy": np.asarray(batch["y"], dtype=np.float16),
        **({"y_pooled.npy": np.asarray(batch["y_pooled"], dtype=np.float16)} if "y_pooled" in batch else {}),
        "nbr_tokens.npy": np.asarray(nbr_tokens).astype(np.int32),
        "nbr_len.npy": np.asarray(nbr_len).astype(np.int32),
        "nbr_index.npy": np.asarray(nbr_index).astype(np.int64),
        "nbr_sim.npy": np.asarray(nbr_sim).astype(np.float32),
        "nbr_same.npy": (np.asarray(nbr_identity) == identity[:, None]).astype(np.uint8),
    }
    out[META_FIELD] = np.array([
        {"index": int(i), "identity_id": int(ident), "caption": str(c), "elbo": float(e), "fingerprint": fingerprint}
        for i, ident, c, e in zip(idx, identity, batch["caption"], elbo)
    ], dtype=object)
    return out


def decode_sample(sample: dict) -> dict:
    """Ray Data WebDataset decoder for training shards.

    Decodes exactly the shard fields (``.npy`` with ``allow_pickle=False``, JSON) and
    never deserialises anything else. A malformed sample is not raised here (that would
    lose the file name inside a read task): its problems go into ``__error__`` and
    :func:`collate` raises or skips it by ``data.on_bad``.
    """
    out = {"__key__": str(sample.get("__key__")), "__url__": str(sample.get("__url__", "?"))}
    problems = []
    unknown = sorted(k for k in sample if not k.startswith("__")
                     and k not in (*ARRAY_FIELDS, *OPTIONAL_FIELDS, META_FIELD))
    if unknown:
        problems.append(f"unexpected member(s) {unknown}")
    for name in (*ARRAY_FIELDS, *OPTIONAL_FIELDS):
        raw = sample.get(name)
        if raw is None:
            if name not in OPTIONAL_FIELDS:
                problems.append(f"missing field {name}")
            continue
        try:
            out[name] = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any decode failure is reported with the field
            problems.append(f"field {name} is not a readable .npy ({type(e).__name__}: {e})")
    try:
        meta = json.loads(sample[META_FIELD]) if META_FIELD in sample else None
    except ValueError as e:
        problems.append(f"field {META_FIELD} is not valid JSON ({e})")
        meta = None
    if meta is None and META_FIELD not in sample:
        problems.append(f"missing field {META_FIELD}")
    elif meta is not None:
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            problems.append(f"{META_FIELD} lacks {missing}")
        else:
            out[META_FIELD] = meta
    if problems:  # keep the row's columns uniform; collate drops or raises on it
        out = {"__key__": out["__key__"], "__url__": out["__url__"]}
    out["__error__"] = "; ".join(problems)
    return out


def _row_problems(arrays: dict[str, np.ndarray], meta, fingerprint: str | None) -> list[str]:
    """Per-row value checks: non-finite numbers, a shard of another prepare run."""
    b = len(meta)
    problems = [[] for _ in range(b)]
    for name in ("latent.npy", "y.npy", "nbr_sim.npy"):
        bad = ~np.isfinite(arrays[name].reshape(b, -1).astype(np.float32)).all(1)
        for i in np.nonzero(bad)[0]:
            problems[i].append(f"field {name} holds NaN or Inf")
    for i, m in enumerate(meta):
        if not np.isfinite(m["elbo"]):
            problems[i].append(f"{META_FIELD} elbo is {m['elbo']}")
        if fingerprint is not None and m.get("fingerprint") != fingerprint:
            problems[i].append(f"written by another prepare run (fingerprint {m.get('fingerprint')!r}, "
                               f"manifest {fingerprint!r}): re-run prepare")
    return ["; ".join(p) for p in problems]


def collate(batch: dict[str, np.ndarray], on_bad: str = "raise", skipped: list[str] | None = None,
            fingerprint: str | None = None) -> HostBatch | None:
    """Streamed numpy batch (Ray Data column dict) -> a :class:`HostBatch`.

    A bad row (see :func:`decode_sample`, non-finite values, another ``fingerprint``)
    raises a ValueError naming shard, sample and field, or with ``on_bad="skip"`` is
    dropped and described in ``skipped``. Returns None when every row was dropped.
    """
    keys = [str(k) for k in batch.get("__key__", [])]
    urls = [str(u) for u in batch.get("__url__", ["?"] * len(keys))]
    errors = [str(e) for e in batch["__error__"]] if "__error__" in batch else [""] * len(keys)
    if not keys:  # read without decode_sample: whole-column checks only
        missing = [f for f in (*ARRAY_FIELDS, META_FIELD) if f not in batch]
        if missing:
            raise ValueError(f"shard batch lacks field(s) {missing}; got {sorted(batch)} "
                             f"(shards written by another version or config?)")
        errors = [""] * len(batch[META_FIELD])
        keys, urls = ["?"] * len(errors), ["?"] * len(errors)
    good = [i for i, e in enumerate(errors) if not e]
    arrays, meta = {}, []
    if good:
        arrays = {f: _stack(batch[f], good) for f in ARRAY_FIELDS}
        for f in OPTIONAL_FIELDS:  # a dataset's rows all have it or all lack it
            if f in batch and all(batch[f][i] is not None for i in good):
                arrays[f] = _stack(batch[f], good)
        meta = [batch[META_FIELD][i] for i in good]
        for i, why in zip(good, _row_problems(arrays, meta, fingerprint)):
            errors[i] = why
    bad = [i for i, e in enumerate(errors) if e]
    if bad:
        reports = [f"{urls[i]}: sample {keys[i]}: {errors[i]}" for i in bad]
        if on_bad != "skip":
            raise ValueError("bad training sample(s) (set data.on_bad=skip to skip and count them):\n  "
                             + "\n  ".join(reports))
        if skipped is not None:
            skipped.extend(reports)
        keep = [good.index(i) for i in good if not errors[i]]
        if not keep:
            return None
        arrays = {f: a[keep] for f, a in arrays.items()}
        meta = [meta[j] for j in keep]
    return HostBatch(
        x0=np.ascontiguousarray(arrays["latent.npy"], dtype=np.float32),
        y=np.ascontiguousarray(arrays["y.npy"]),
        nbr_tokens=np.ascontiguousarray(arrays["nbr_tokens.npy"], dtype=np.int64),
        nbr_len=np.ascontiguousarray(arrays["nbr_len.npy"], dtype=np.int64),
        nbr_sim=np.ascontiguousarray(arrays["nbr_sim.npy"], dtype=np.float32),
        nbr_same=np.ascontiguousarray(arrays["nbr_same.npy"]),
        elbo=np.array([m["elbo"] for m in meta], dtype=np.float64),
        index=np.array([m["index"] for m in meta], dtype=np.int64),
        identity=np.array([m["identity_id"] for m in meta], dtype=np.int64),
        y_pooled=np.ascontiguousarray(arrays["y_pooled.npy"]) if "y_pooled.npy" in arrays else None,
    )


class StreamedBatch(NamedTuple):
    """One streamed micro-batch as the trainer consumes it: the rows the stream delivered,
    the collated tensors (None when every row was skipped) and the skip reports."""

    rows: int
    batch: HostBatch | None
    skipped: list[str]


def collate_stream(batches: Iterable[dict[str, np.ndarray]], manifest: Manifest,
                   on_bad: str = "raise") -> Iterator[StreamedBatch]:
    """Numpy batches (Ray Data's ``iter_batches`` or :func:`iter_shard_batches`) -> StreamedBatch."""
    for numpy_batch in batches:
        skipped: list[str] = []
        batch = collate(numpy_batch, on_bad=on_bad, skipped=skipped, fingerprint=manifest.fingerprint)
        yield StreamedBatch(len(numpy_batch["__key__"]), batch, skipped)


def iter_shard_batches(shards: list[str], batch_size: int, shuffle_buffer: int = 0,
                       seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Training shards read with ``webdataset`` in one process (no Ray), decoded by
    :func:`decode_sample` and batched into the column dicts ``collate`` takes.
    ``shuffle_buffer`` > 1 shuffles within a buffer of that many samples, seeded."""
    import webdataset as wds

    ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False).map(decode_sample)
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=seed)
    yield from batched(ds, batch_size)


def batched(rows: Iterable[dict], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Row dicts -> column batches of ``batch_size`` (the last may be smaller)."""
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == batch_size:
            yield rows_to_columns(chunk)
            chunk = []
    if chunk:
        yield rows_to_columns(chunk)


def rows_to_columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Row dicts -> the column dict of object arrays ``collate`` takes (a key a row lacks is None)."""
    keys = sorted({k for r in rows for k in r})
    out = {}
    for k in keys:
        col = np.empty(len(rows), dtype=object)
        col[:] = [r.get(k) for r in rows]
        out[k] = col
    return out


def _stack(column: np.ndarray, rows: list[int]) -> np.ndarray:
    if column.dtype == object:
        return np.stack([column[i] for i in rows])
    return np.asarray(column)[rows]
