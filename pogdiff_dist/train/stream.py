"""One rank's stream of an epoch: which rows, in which order, from where to resume.

``EpochStream(read, epoch, skip)`` composes the pure pieces: the rank's contiguous share of
the epoch's rows in a seeded shard order (:mod:`pogdiff_dist.data.assignment`), read by
``read(paths)`` (Ray Data's ``read_webdataset`` in a Ray Train worker, ``webdataset`` in one
plain process), each row repeated by ``data.sampling`` (:mod:`pogdiff_dist.data.sampling`),
a seeded shuffle buffer, the first ``skip`` rows dropped on a resume (exactly the rows the
rank had consumed before its checkpoint), then batches, collated. Every step is a pure
function of (seed, epoch, rank, world, the shards), so the stream is the same on every run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

from pogdiff_dist.data.assignment import epoch_order, keep_ranges, rank_ranges
from pogdiff_dist.data.sampling import SamplingPlan, expand, shuffled
from pogdiff_dist.data.shard_files import shard_row_counts
from pogdiff_dist.data.shards import Manifest, StreamedBatch, batched, collate_stream
from pogdiff_dist.storage import join

Reader = Callable[[list[str]], Iterable[dict]]  # shard paths, in order -> their numpy column batches


class EpochStream:
    def __init__(self, manifest: Manifest, prepared_dir: str | Path, rank: int, world: int, sampling: SamplingPlan,
                 seed: int, shuffle_buffer: int, batch_size: int, on_bad: str = "raise"):
        self.manifest, self.rank, self.world, self.sampling = manifest, rank, world, sampling
        self.seed, self.shuffle_buffer, self.batch_size, self.on_bad = seed, shuffle_buffer, batch_size, on_bad
        self.shard_dir = join(prepared_dir, "shards")  # a local folder or a URI
        self.shard_rows = shard_row_counts(manifest, prepared_dir)
        self.planned = 0  # rows the last epoch's stream held for this rank (skipped ones included)

    def ranges(self, epoch: int) -> list[tuple[str, int, int]]:
        """(shard name, first row, end row) of this rank in ``epoch``, in reading order."""
        order = epoch_order(len(self.manifest.shards), self.seed, epoch)
        return [(self.manifest.shards[s], lo, hi)
                for s, lo, hi in rank_ranges(self.shard_rows, order, self.world, self.rank)]

    def __call__(self, read: Reader, epoch: int, skip: int = 0) -> Iterator[StreamedBatch]:
        ranges = self.ranges(epoch)
        rows = keep_ranges(read([join(self.shard_dir, name) for name, _, _ in ranges]), ranges)
        if self.sampling.active:
            rows = expand(rows, self.sampling, epoch)
        rows = self._count(shuffled(rows, self.shuffle_buffer, seed=self.seed * 7919 + epoch * 31 + self.rank))
        batches = batched(islice(rows, skip, None), self.batch_size)
        return collate_stream(batches, self.manifest, self.on_bad)

    def _count(self, rows: Iterable[dict]) -> Iterator[dict]:
        self.planned = 0
        for row in rows:
            self.planned += 1
            yield row
