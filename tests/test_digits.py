"""Bundled Digits-IT2I: preset sizes, disjoint splits, varied captions, determinism."""

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pogdiff_dist.data.bundled.digits import NAMES, PRESETS, build_digits_it2i, caption_for
from pogdiff_dist.data.records import load_image, read_dataset


def _src(record):
    """Source index into load_digits, encoded in the file name."""
    return int(re.search(r"-(\d{4})$", record.image.stem).group(1))


@pytest.fixture(scope="module")
def digits_m(tmp_path_factory):
    return read_dataset(build_digits_it2i(tmp_path_factory.mktemp("m"), "M", resolution=16, seed=0))


def test_names_and_presets():
    assert len(NAMES) == len(set(NAMES)) == 10
    assert sorted(PRESETS["S"].train_counts.values()) == [2, 30]
    assert Counter(PRESETS["M"].train_counts.values()) == Counter({30: 3, 2: 7})
    assert sum(PRESETS["L"].train_counts.values()) >= 300


@pytest.mark.parametrize("preset", ["S", "M", "L"])
def test_preset_sizes_roundtrip(tmp_path, preset):
    ds = read_dataset(build_digits_it2i(tmp_path, preset, resolution=16, heldout_per_identity=5))
    expected = {NAMES[d]: n for d, n in PRESETS[preset].train_counts.items()}
    assert ds.counts() == dict(sorted(expected.items()))
    assert ds.counts("heldout") == {name: 5 for name in expected}
    assert ds.skipped == [] and ds.warnings == []


def test_exact_sizes():
    assert PRESETS["S"].train_counts == {0: 30, 1: 2}
    assert PRESETS["M"].train_counts == {0: 30, 1: 30, 2: 30, **{d: 2 for d in range(3, 10)}}
    assert list(PRESETS["L"].train_counts.values()) == [120, 90, 60, 45, 30, 20, 10, 5, 3, 2]


def test_train_and_heldout_disjoint(digits_m):
    train = {(r.identity, _src(r)) for r in digits_m.train()}
    held = {(r.identity, _src(r)) for r in digits_m.heldout()}
    assert len(train) == 104 and len(held) == 200 and not train & held
    from sklearn.datasets import load_digits
    target = load_digits().target
    assert all(NAMES[target[s]] == name for name, s in train | held)  # identity = digit class
    pixels = lambda rs: {load_image(r.image, 16, 1).tobytes() for r in rs}
    assert not pixels(digits_m.train()) & pixels(digits_m.heldout())


def test_captions_vary_and_name_identity(digits_m):
    for name in NAMES:
        caps = [r.caption for r in digits_m.records if r.identity == name]
        assert all(c.startswith(f"An image of {name}, ") and c.endswith(".") for c in caps)
    big = [r.caption for r in digits_m.train() if r.identity == NAMES[0]]
    assert len(big) == 30 and len(set(big)) >= 3


def test_caption_descriptors():
    img = np.zeros((8, 8))
    img[:, 2:6] = 16  # a heavy, narrow vertical bar
    assert caption_for(img, "X") == "An image of X, bold strokes, upright, small."
    lean = np.zeros((8, 8))
    for r in range(8):
        lean[r, max(0, 7 - r - 1):8 - r] = 6  # faint line rising to the right
    assert "slanted right" in caption_for(lean, "X") and "thin strokes" in caption_for(lean, "X")
    assert "slanted left" in caption_for(lean[:, ::-1], "X")


def test_images_are_grayscale_at_resolution(digits_m):
    with Image.open(digits_m.records[0].image) as im:
        assert im.mode == "L" and im.size == (16, 16)


def test_deterministic_per_seed_and_differs_across_seeds(tmp_path):
    def srcs(root, seed):
        return [(r.split, _src(r), r.caption) for r in read_dataset(build_digits_it2i(root, "S", 16, seed)).records]
    a, b, c = srcs(tmp_path / "a", 1), srcs(tmp_path / "b", 1), srcs(tmp_path / "c", 2)
    assert a == b and a != c
    assert (tmp_path / "a" / "metadata.csv").read_bytes() == (tmp_path / "b" / "metadata.csv").read_bytes()


def test_idempotent_and_rebuilds_on_new_params(tmp_path):
    build_digits_it2i(tmp_path, "S", 16, seed=0)
    meta = tmp_path / "metadata.csv"
    mtime = meta.stat().st_mtime_ns
    assert build_digits_it2i(tmp_path, "S", 16, seed=0) == tmp_path
    assert meta.stat().st_mtime_ns == mtime
    build_digits_it2i(tmp_path, "S", 16, seed=3, heldout_per_identity=4)
    assert json.loads((tmp_path / "digits_it2i.json").read_text())["params"]["seed"] == 3
    ds = read_dataset(tmp_path)
    assert ds.counts("heldout") == {NAMES[0]: 4, NAMES[1]: 4}
    assert len(list((tmp_path / "images").rglob("*.png"))) == len(ds.records)  # no stale files


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        build_digits_it2i(tmp_path, "XL")
    with pytest.raises(ValueError, match="cannot take"):
        build_digits_it2i(tmp_path, "L", heldout_per_identity=100)
