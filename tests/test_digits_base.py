"""Digits-IT2I "base": the balanced pretraining population under other names, drawn
from the images S, M and L leave unused."""

import re

import numpy as np
import pytest

from pogdiff_dist.data.bundled.digits import BASE_NAMES, NAMES, PRESETS, _digits, _select, build_digits_it2i
from pogdiff_dist.data.records import read_dataset


def _sources(preset, seed=0, heldout=20, split=None):
    return {src for _, s, src in _select(PRESETS[preset], seed, heldout) if split in (None, s)}


def test_base_preset_is_balanced_under_other_names():
    base = PRESETS["base"]
    assert base.train_counts == {d: 20 for d in range(10)} and base.names == BASE_NAMES
    assert all(PRESETS[p].names == NAMES for p in "SML")
    assert not set(BASE_NAMES) & set(NAMES)
    firsts, lasts = zip(*(n.split(" ") for n in NAMES + BASE_NAMES))
    assert len(set(firsts)) == len(set(lasts)) == 20


@pytest.mark.parametrize("seed", [0, 1])
def test_base_images_unused_by_s_m_l(seed):
    """Same seed, default held-out counts: base's training images meet none of S, M, L;
    its held-out images meet only two of L's digit-0 training images (see _select)."""
    base_train, base_held = _sources("base", seed, split="train"), _sources("base", seed, split="heldout")
    assert len(base_train) == 200 and len(base_held) == 200
    for preset in "SML":
        assert not base_train & _sources(preset, seed)
    assert not base_held & (_sources("S", seed) | _sources("M", seed))
    overlap = base_held & _sources("L", seed)
    _, target = _digits()
    assert len(overlap) == 2 and set(target[list(overlap)]) == {0} and overlap <= _sources("L", seed, split="train")
    # less held-out leaves no overlap at all
    assert not _sources("base", seed, heldout=18) & _sources("L", seed, heldout=20)


def test_base_builds_and_reads(tmp_path):
    ds = read_dataset(build_digits_it2i(tmp_path, "base", resolution=8, heldout_per_identity=3))
    assert ds.counts() == {n: 20 for n in sorted(BASE_NAMES)}
    assert ds.counts("heldout") == {n: 3 for n in sorted(BASE_NAMES)}
    _, target = _digits()
    for r in ds.records:  # BASE_NAMES[d] is digit d, like NAMES[d]
        src = int(re.search(r"-(\d{4})$", r.image.stem).group(1))
        assert BASE_NAMES[target[src]] == r.identity and r.caption.startswith(f"An image of {r.identity}, ")
    assert np.mean([len({r.caption for r in ds.train() if r.identity == n}) for n in BASE_NAMES]) >= 3


@pytest.mark.parametrize("seed", [0, 1])
def test_val_preset_is_disjoint_from_m_and_base(seed):
    """Hyperparameters are chosen on "val": other names, and none of M's, S's or base's images."""
    from pogdiff_dist.data.bundled.digits import VAL_NAMES

    val = PRESETS["val"]
    assert val.names == VAL_NAMES and not set(VAL_NAMES) & (set(NAMES) | set(BASE_NAMES))
    assert sorted(val.train_counts.values()) == [2, 2, 2, 2, 30, 30]
    for heldout in (10, 20):
        v = _sources("val", seed, heldout)
        assert len(v) == 68 + 6 * heldout
        for other in ("S", "M", "base"):
            assert not v & _sources(other, seed, heldout), other


def test_val_builds_and_reads(tmp_path):
    from pogdiff_dist.data.bundled.digits import VAL_NAMES

    ds = read_dataset(build_digits_it2i(tmp_path, "val", resolution=8, heldout_per_identity=2))
    names = {d: VAL_NAMES[d] for d in PRESETS["val"].train_counts}
    assert ds.counts() == {names[d]: n for d, n in PRESETS["val"].train_counts.items()}
    _, target = _digits()
    for r in ds.records:
        assert VAL_NAMES[target[int(re.search(r"-(\d{4})$", r.image.stem).group(1))]] == r.identity
