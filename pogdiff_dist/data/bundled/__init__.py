"""The bundled datasets (Digits-IT2I, Faces-IT2I) behind one interface.

Each is a :class:`Bundled`: ``build`` writes a preset as a user folder would look
(``metadata.csv`` + images, :mod:`pogdiff_dist.data.records` layout 1, stamped so a repeated
build is a no-op), ``names`` lists every identity name it can produce, and ``judge_spec``
describes the CNN that judges its images for the identity-accuracy metric
(:class:`pogdiff_dist.evaluation.judges.CNNJudge`). Prepare records which dataset a
manifest was built from, so the evaluation picks the judge from that, not from names.
"""

from __future__ import annotations

from collections.abc import Iterable

from pogdiff_dist.data.bundled import digits, faces
from pogdiff_dist.data.bundled.base import Bundled, JudgeSpec, build_params, write_build

__all__ = ["Bundled", "JudgeSpec", "build_params", "bundled", "dataset_of", "write_build"]


def bundled(name: str) -> Bundled:
    """The bundled dataset called ``name`` (``digits-it2i`` or ``faces-it2i``)."""
    table = {d.name: d for d in (digits.DATASET, faces.DATASET)}
    if name not in table:
        raise ValueError(f"no bundled dataset {name!r}; bundled: {sorted(table)}")
    return table[name]


def dataset_of(identities: Iterable[str]) -> str | None:
    """The bundled dataset whose names include every one of ``identities`` (for manifests
    that did not record their dataset), else None."""
    names = set(identities)
    for candidate in ("digits-it2i", "faces-it2i"):
        if names <= bundled(candidate).names():
            return candidate
    return None
