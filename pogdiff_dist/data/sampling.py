"""Identity-balanced sampling of the training stream (``data.sampling``), per epoch.

What the tools people fine-tune Stable Diffusion with do for rare concepts (kohya-ss
``num_repeats``, SimpleTuner ``repeats``, OneTrainer's per-concept balancing): show the rare
identities more often. Here an epoch keeps its size (N rows) and gives identity ``c`` the
share

    uniform:   n_c / N            (every sample once: the stream as it is)
    balanced:  1 / C              (every identity equally often)
    power:     n_c ** alpha / sum_d n_d ** alpha   (alpha = 0 is balanced, 1 uniform)

so a sample of identity ``c`` is expected ``lambda_c = N * share_c / n_c`` times per epoch.

Repeat counts (kohya-ss ``<repeats>_<name>`` folders, :mod:`pogdiff_dist.data.layouts`;
the manifest's ``train_repeats``) describe the dataset the user means: identity ``c``'s
``n_c`` images each stand for ``r_c`` copies. The plan replaces ``n_c`` by ``r_c n_c`` above
(the epoch is ``N = sum_c r_c n_c`` rows, the shares are taken over ``r_c n_c``), so:
uniform shows every image of ``c`` exactly ``r_c`` times per epoch (kohya's meaning);
balanced still gives every identity the same share (it ignores counts, repeated or not);
power gives ``c`` a share proportional to ``(r_c n_c) ** alpha``. With every ``r_c = 1``
nothing changes. The prepared data is the same whatever the repeats; they act here only
(the loss's identity weights and psi_den count real images).
Each sample's count in epoch ``e`` is lambda rounded stochastically (floor, plus one with
probability frac(lambda)), drawn from a counter-based generator keyed by (seed, epoch,
sample index): a pure function of the sample, so it is the same on every rank that
receives the sample, whatever the split, the order or a restart. :func:`resample` applies
the counts to a stream of numpy column batches (repeats are spread by a seeded shuffle
buffer, then rebatched); nothing is materialised beyond that buffer.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

import numpy as np

from pogdiff_dist.data.shards import batched

META = "meta.json"


def identity_shares(counts: list[int] | np.ndarray, mode: str, alpha: float = 0.5) -> np.ndarray:
    """Each identity's share of an epoch's rows [C] (sums to 1; identities with no sample get 0)."""
    n = np.asarray(counts, dtype=np.float64)
    present = n > 0
    if mode == "uniform":
        w = n
    elif mode == "balanced":
        w = present.astype(np.float64)
    elif mode == "power":
        w = np.where(present, n ** alpha, 0.0)
    else:
        raise ValueError(f"data.sampling must be uniform, balanced or power, got {mode!r}")
    return w / w.sum()


def expected_repeats(counts: list[int] | np.ndarray, mode: str, alpha: float = 0.5,
                     repeats: list[int] | np.ndarray | None = None) -> np.ndarray:
    """lambda_c [C]: how many times each sample of identity c is expected per epoch, with
    ``repeats`` [C] (default 1) multiplying each identity's count (module docstring)."""
    n = np.asarray(counts, dtype=np.float64)
    r = np.ones_like(n) if repeats is None else np.asarray(repeats, dtype=np.float64)
    assert r.shape == n.shape and (r >= 1).all(), f"repeats {r} must be >= 1, one per identity {n}"
    shares = identity_shares(n * r, mode, alpha)
    if mode == "uniform":  # sum(r n) * (r_c n_c / sum(r n)) / n_c, exactly
        return np.where(n > 0, r, 0.0)
    return np.where(n > 0, (n * r).sum() * shares / np.maximum(n, 1), 0.0)


def _uniform(seed: int, epoch: int, index: np.ndarray) -> np.ndarray:
    """A counter-based uniform in [0, 1) per (seed, epoch, index): splitmix64 of the three."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(epoch) * np.uint64(0xBF58476D1CE4E5B9)
             + np.asarray(index, dtype=np.uint64) * np.uint64(0x94D049BB133111EB))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def epoch_counts(index: np.ndarray, identity: np.ndarray, lam: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """How many times each sample appears in ``epoch``: floor(lambda) + [u < frac(lambda)]."""
    rate = lam[np.asarray(identity, dtype=np.int64)]
    whole = np.floor(rate)
    return (whole + (_uniform(seed, epoch, index) < rate - whole)).astype(np.int64)


class SamplingPlan:
    """The per-epoch counts of a dataset under ``data.sampling`` (``lam`` per identity)."""

    def __init__(self, counts: list[int], mode: str, alpha: float, seed: int, repeats: list[int] | None = None):
        self.mode, self.seed = mode, seed
        self.repeated = repeats is not None and any(r != 1 for r in repeats)
        self.lam = expected_repeats(counts, mode, alpha, repeats)

    @property
    def active(self) -> bool:
        return self.mode != "uniform" or self.repeated

    @property
    def label(self) -> str:
        return f"data.sampling={self.mode}" + (" with folder repeats" if self.repeated else "")

    def counts(self, index: np.ndarray, identity: np.ndarray, epoch: int) -> np.ndarray:
        return epoch_counts(index, identity, self.lam, self.seed, epoch)


def rows_of(batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict]:
    """Numpy column batches -> row dicts."""
    for batch in batches:
        keys = list(batch)
        for r in range(len(batch[keys[0]])):
            yield {k: batch[k][r] for k in keys}


def expand(rows: Iterable[dict], plan: SamplingPlan, epoch: int, chunk: int = 256) -> Iterator[dict]:
    """Each row repeated per ``plan`` in ``epoch`` (rows without ``meta.json``, which failed to
    decode, pass once so they are reported)."""
    pending: list[dict] = []

    def flush():
        metas = [r.get(META) for r in pending]
        ok = [isinstance(m, dict) for m in metas]
        index = np.array([m["index"] if o else 0 for m, o in zip(metas, ok)])
        ident = np.array([m["identity_id"] if o else 0 for m, o in zip(metas, ok)])
        reps = np.where(ok, plan.counts(index, ident, epoch), 1)
        for row, k in zip(pending, reps):
            for _ in range(int(k)):
                yield row
        pending.clear()

    for row in rows:
        pending.append(row)
        if len(pending) >= chunk:
            yield from flush()
    yield from flush()


def shuffled(rows: Iterable[dict], buffer: int, seed: int) -> Iterator[dict]:
    """A seeded shuffle buffer of ``buffer`` rows (0 or 1: the order as it is). Deterministic
    given the input order, so a restart reproduces the epoch's sequence exactly."""
    if buffer <= 1:
        yield from rows
        return
    rng = random.Random(seed)
    pool: list[dict] = []
    for row in rows:
        pool.append(row)
        if len(pool) >= buffer:
            yield _pop(pool, rng)
    while pool:
        yield _pop(pool, rng)


def resample(batches: Iterable[dict[str, np.ndarray]], plan: SamplingPlan, epoch: int, batch_size: int,
             buffer: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Numpy column batches -> the same stream with each row repeated per ``plan``, spread by a
    shuffle buffer of ``buffer`` rows seeded with ``seed``, in batches of ``batch_size``."""
    return batched(shuffled(expand(rows_of(batches), plan, epoch), max(buffer, batch_size), seed), batch_size)


def _pop(pool: list, rng: random.Random):
    i = rng.randrange(len(pool))
    pool[i], pool[-1] = pool[-1], pool[i]
    return pool.pop()
