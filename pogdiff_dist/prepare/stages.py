"""Prepare's resumable stages: each stage's fingerprint (exactly the config values it reads,
its upstream stages' fingerprints, and its own inputs) and the marker that says a stage is done."""

from __future__ import annotations

import hashlib
import json
import logging

from pogdiff_dist.config import Config
from pogdiff_dist.config.stages import UPSTREAM, stage_reads
from pogdiff_dist.data.records import DatasetRecords
from pogdiff_dist.data.shards import SHARD_FORMAT
from pogdiff_dist.storage import Store

log = logging.getLogger(__name__)


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_fingerprints(cfg: Config, records_fp: str, encoder_dirs: tuple) -> dict[str, str]:
    """Each prepare stage's fingerprint: exactly the config values it reads
    (:func:`pogdiff_dist.config.stages.stage_reads`), the fingerprints of the stages it reads
    from, and for encode the records and the resolved encoder folders; for shards the format."""
    reads = stage_reads(cfg)
    out: dict[str, str] = {}
    for stage in ("encode", "neighbours", "density", "shards"):
        own = {"encode": [records_fp, [str(d) for d in encoder_dirs]], "shards": [SHARD_FORMAT]}.get(stage, [])
        out[stage] = _hash(stage, reads[stage], [out[u] for u in UPSTREAM[stage]], *own)
    return out


def records_fingerprint(records: DatasetRecords) -> str:
    rows = [(r.key, str(r.image), r.caption, r.identity, r.split, r.image.stat().st_size, r.image.stat().st_mtime_ns)
            for r in records.records]
    return _hash(rows)


class Stage:
    """A resumable stage: ``done()`` if its marker holds the same fingerprint. The marker is
    written last, after the stage's outputs, in the same store (a local folder or a bucket)."""

    def __init__(self, out: Store, name: str, fingerprint: str):
        self.store, self.marker = out, ("stages", f"{name}.json")
        self.name, self.fingerprint = name, fingerprint

    def done(self) -> bool:
        if self.store.is_file(*self.marker) and self.info().get("fingerprint") == self.fingerprint:
            log.info("stage %s: up to date, skipped", self.name)
            print(f"[prepare] {self.name}: up to date (fingerprint {self.fingerprint}), skipped", flush=True)
            return True
        return False

    def info(self) -> dict:
        return json.loads(self.store.read_text(*self.marker))

    def finish(self, **info) -> None:
        self.store.write_text(json.dumps({"fingerprint": self.fingerprint, **info}), *self.marker)
