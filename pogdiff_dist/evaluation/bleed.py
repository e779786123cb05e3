"""Identity bleed: who a prompted identity turns into, from the judge's predictions alone.

Identity accuracy says how often "An image of {name}." is judged to be ``name``; when it is
not, the judge's label says whom the model drew instead. Trained on several people at once, a
model's few-shot identities tend to turn into its majority ones (one person's face leaking into
another's prompts): that is identity bleed, and it is read here off the predictions table that
metrics.json already holds (``per_identity.<name>.predicted``: judged label -> count).

- :func:`confusion`: prompted identity x judged label, counts (rows normalised on demand).
- :func:`top_bleed`: an identity's largest bleed target, the most frequent *wrong* judged
  identity, and its share of the identity's images.
- :func:`bleed_summary`: the mean top-bleed share over all / majority / few-shot identities,
  the (prompted, judged) pairs with the most bleed, and the identities most often judged for
  other prompts.

A judge label that names no identity of the dataset (the digit CNN's ``"<7>"``: a class no
identity has, see :meth:`pogdiff_dist.evaluation.judges.CNNJudge.predict`) is wrong for every
prompt but nobody's identity, so it is a column of the confusion matrix and never a bleed
target. Pure Python/numpy: tests/test_bleed.py checks every number by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TOP_PAIRS = 5  # the pairs with the most bleed kept in metrics.json and printed
TOP_ABSORBERS = 3


def is_identity(label: str) -> bool:
    """False for a judge label that names no identity (``"<class>"``)."""
    return not (label.startswith("<") and label.endswith(">"))


@dataclass(frozen=True)
class Confusion:
    """``counts[i, j]``: images prompted as ``rows[i]`` that the judge read as ``columns[j]``.
    ``columns`` starts with ``rows`` in the same order (the diagonal is the correct reads), then
    the other identities judged (of the dataset, not evaluated), then labels naming none."""

    rows: list[str]
    columns: list[str]
    counts: np.ndarray  # int64 [len(rows), len(columns)]

    def shares(self) -> np.ndarray:
        """Rows normalised: each row's counts over its images (a row without images: zeros)."""
        totals = self.counts.sum(1, keepdims=True)
        return np.divide(self.counts, totals, out=np.zeros(self.counts.shape), where=totals > 0)

    def to_dict(self) -> dict:
        return {"rows": list(self.rows), "columns": list(self.columns), "counts": self.counts.tolist()}


def confusion(predicted: dict[str, dict[str, int]], rows: list[str]) -> Confusion:
    """The confusion matrix of ``rows`` (prompted identities, in this order) from ``predicted``
    (prompted identity -> {judged label: count})."""
    labels = {label for n in rows for label in predicted.get(n, {})}
    others = sorted(label for label in labels - set(rows) if is_identity(label))
    none = sorted(label for label in labels - set(rows) if not is_identity(label))
    columns = [*rows, *others, *none]
    index = {c: j for j, c in enumerate(columns)}
    counts = np.zeros((len(rows), len(columns)), np.int64)
    for i, n in enumerate(rows):
        for label, k in predicted.get(n, {}).items():
            counts[i, index[label]] += int(k)
    return Confusion(list(rows), columns, counts)


def top_bleed(name: str, predicted: dict[str, int]) -> dict:
    """``name``'s largest bleed target among its judged labels ``predicted`` (label -> count):
    ``bleed_to`` (None when no image was read as another identity), ``bleed_count``,
    ``bleed_share`` (of all of ``name``'s images) and ``bleed_tied`` (other identities read as
    often, alphabetically: with a handful of images a tie is common, and a single name would hide it)."""
    total = sum(predicted.values())
    wrong = {label: k for label, k in predicted.items() if label != name and is_identity(label) and k > 0}
    if not wrong:
        return {"bleed_to": None, "bleed_count": 0, "bleed_share": 0.0 if total else math.nan, "bleed_tied": []}
    most = max(wrong.values())
    targets = sorted(label for label, k in wrong.items() if k == most)
    return {"bleed_to": targets[0], "bleed_count": most, "bleed_share": most / total, "bleed_tied": targets[1:]}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def bleed_summary(per_identity: dict[str, dict], few, real_predicted: dict[str, dict[str, int]] | None = None) -> dict:
    """The aggregate over ``per_identity`` (rows with ``predicted`` and :func:`top_bleed`'s keys):

    - ``share_all`` / ``share_majority`` / ``share_few``: the mean over identities of ``bleed_share``
      (0 when every wrong image went to a different identity or to none, 1 - accuracy when they
      all went to one);
    - ``pairs``: up to :data:`TOP_PAIRS` (prompted, judged) pairs with the largest share of the
      prompted identity's images, ties by count then names; with ``real_predicted`` (the judge's
      labels of each identity's real held-out images) each pair also says how often the judge
      itself reads a real image of the prompted identity as the judged one, ``judge_real``
      ``[count, images]``: a pair the judge confuses on real images is not all the model's bleed;
    - ``absorbs``: up to :data:`TOP_ABSORBERS` identities most often judged for other prompts
      (``count`` images from ``prompts`` identities): where the bleed goes.
    """
    few = set(few)
    names = list(per_identity)
    pairs, absorbed = [], {}
    for n in names:
        predicted = per_identity[n]["predicted"]
        total = sum(predicted.values())
        for label, k in predicted.items():
            if label == n or not is_identity(label) or k == 0:
                continue
            pair = {"prompted": n, "judged": label, "count": int(k), "images": int(total), "share": k / total}
            if real_predicted is not None and n in real_predicted:
                real = real_predicted[n]
                pair["judge_real"] = [int(real.get(label, 0)), int(sum(real.values()))]
            pairs.append(pair)
            count, prompts = absorbed.get(label, (0, 0))
            absorbed[label] = (count + int(k), prompts + 1)
    pairs.sort(key=lambda p: (-p["share"], -p["count"], p["prompted"], p["judged"]))
    absorbs = [{"judged": label, "count": count, "prompts": prompts}
               for label, (count, prompts) in sorted(absorbed.items(), key=lambda x: (-x[1][0], -x[1][1], x[0]))]
    return {
        "share_all": _mean(per_identity[n]["bleed_share"] for n in names),
        "share_majority": _mean(per_identity[n]["bleed_share"] for n in names if n not in few),
        "share_few": _mean(per_identity[n]["bleed_share"] for n in names if n in few),
        "pairs": pairs[:TOP_PAIRS],
        "absorbs": absorbs[:TOP_ABSORBERS],
    }


def identity_bleed(per_identity: dict[str, dict], few, real_predicted: dict[str, dict[str, int]] | None = None) -> dict:
    """:func:`top_bleed` added to every row of ``per_identity`` (in place), and metrics.json's
    ``bleed`` section: :func:`bleed_summary` plus the :func:`confusion` matrix."""
    for n, row in per_identity.items():
        row.update(top_bleed(n, row["predicted"]))
    rows = list(per_identity)
    return {**bleed_summary(per_identity, few, real_predicted),
            "confusion": confusion({n: per_identity[n]["predicted"] for n in rows}, rows).to_dict(),
            "definition": "bleed target: the identity other than the prompted one that the judge reads most often "
                          "in its generated images; share: of all its generated images"}
