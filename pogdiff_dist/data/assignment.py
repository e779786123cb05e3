"""Which rows each rank trains on in an epoch: deterministic, seeded, exact on resume.

Each epoch the shards are put in a seeded order (``epoch_order``) and the rows, in that
order, are cut into ``world`` contiguous ranges that differ by at most one row
(``rank_ranges``): rank r reads only the shards its range touches, keeps the rows of its
range, and sees every row of it exactly once. Nothing depends on timing (Ray Data's
``streaming_split`` hands blocks to whichever rank asks first), so two runs of one seed
train each rank on the same rows in the same order, and a restart that knows how many rows
a rank had consumed can skip exactly those (:func:`pogdiff_dist.data.sampling.shuffled`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

URL = "__url__"


def epoch_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shards' order in ``epoch`` (a seeded permutation, the same on every rank)."""
    return [int(i) for i in np.random.default_rng([seed, epoch, 7]).permutation(num_shards)]


def rank_ranges(shard_rows: list[int], order: list[int], world: int, rank: int) -> list[tuple[int, int, int]]:
    """(shard, first row, end row) of ``rank``'s contiguous share of the epoch's rows, in order.

    The ``total`` rows split into ``world`` ranges of ``total // world`` rows, the first
    ``total % world`` ranges one row longer: no row is dropped and none is read twice."""
    total = sum(shard_rows)
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    out, pos = [], 0
    for s in order:
        n = shard_rows[s]
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            out.append((s, lo - pos, hi - pos))
        pos += n
    return out


def keep_ranges(batches: Iterable[dict[str, np.ndarray]], ranges: list[tuple[str, int, int]]) -> Iterator[dict]:
    """Rows of numpy column batches read from the range's shards in order: only those at
    positions ``[first, end)`` of their shard (``__url__`` ends with the shard name), as row dicts."""
    wanted = {name: (lo, hi) for name, lo, hi in ranges}
    seen: dict[str, int] = {}
    for batch in batches:
        keys = list(batch)
        for r, url in enumerate(batch[URL]):
            name = str(url).rsplit("/", 1)[-1]
            pos = seen.get(name, 0)
            seen[name] = pos + 1
            lo, hi = wanted.get(name, (0, 0))
            if lo <= pos < hi:
                yield {k: batch[k][r] for k in keys}
