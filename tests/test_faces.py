"""Bundled Faces-IT2I: preset sizes, determinism, captions that tell the truth, base
population disjoint from the targets, identities a pixel classifier tells apart."""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pogdiff_dist.data.bundled import digits
from pogdiff_dist.data.bundled.faces import (
    BASE_NAMES,
    PRESETS,
    TARGET_NAMES,
    build_faces_it2i,
    caption_for,
    identities,
    image_variation,
    main,
    preview_grid,
    render,
)
from pogdiff_dist.data.bundled.faces_render import BACKGROUNDS, EXPRESSIONS, LIGHTS, TILTS
from pogdiff_dist.data.records import load_image, read_dataset

REPO = Path(__file__).resolve().parents[1]


def _j(record):
    """Image number within its identity and split, encoded in the file name."""
    return int(record.image.stem.rsplit("-", 1)[1])


def _pixels(records, resolution=16):
    return np.stack([load_image(r.image, resolution, 3).ravel() for r in records])


@pytest.fixture(scope="module")
def faces_m(tmp_path_factory):
    return read_dataset(build_faces_it2i(tmp_path_factory.mktemp("m"), "M", resolution=16, seed=0))


@pytest.fixture(scope="module")
def faces_base(tmp_path_factory):
    return read_dataset(build_faces_it2i(tmp_path_factory.mktemp("base"), "base", resolution=16, seed=0,
                                         heldout_per_identity=10))


def test_exact_preset_sizes():
    counts = {p: list(PRESETS[p].train_counts.values()) for p in PRESETS}
    assert counts["S"] == [30, 2]
    assert counts["M"] == [30] * 3 + [2] * 7 and sum(counts["M"]) == 104  # Digits-IT2I M's layout
    assert counts["L"] == [100, 80, 60, 45, 35, 30, 25, 20, 15, 10, 8, 6, 4, 3, 2, 2] and sum(counts["L"]) == 445
    assert counts["base"] == [20] * 24
    assert list(PRESETS["L"].train_counts) == list(TARGET_NAMES)  # S and M are its first identities
    assert list(PRESETS["base"].train_counts) == list(BASE_NAMES)


@pytest.mark.parametrize("preset", ["S", "M", "L", "base"])
def test_preset_sizes_roundtrip(tmp_path, preset):
    ds = read_dataset(build_faces_it2i(tmp_path, preset, resolution=8, heldout_per_identity=2))
    expected = PRESETS[preset].train_counts
    assert ds.counts() == dict(sorted(expected.items()))
    assert ds.counts("heldout") == {name: 2 for name in expected}
    assert ds.skipped == [] and ds.warnings == []
    with Image.open(ds.records[0].image) as im:
        assert im.mode == "RGB" and im.size == (8, 8)


def test_names_disjoint_everywhere():
    names = TARGET_NAMES + BASE_NAMES + digits.NAMES + digits.BASE_NAMES
    firsts, lasts = zip(*(n.split(" ") for n in names))
    assert len(set(firsts)) == len(set(lasts)) == len(names)  # no first name or surname shared


def test_base_traits_disjoint_from_targets():
    people = identities()
    assert list(people) == list(TARGET_NAMES + BASE_NAMES)
    for b in BASE_NAMES:
        for t in TARGET_NAMES:
            sb, st = people[b].signature(), people[t].signature()
            assert sum(x != y for x, y in zip(sb, st)) >= 2, (b, t)  # >= 2 salient traits differ
            assert not np.allclose(people[b].vector(), people[t].vector())
    vectors = {tuple(p.vector()) for p in people.values()}
    assert len(vectors) == len(people)
    assert len({p.hair_style for p in people.values()}) >= 6  # shared structure, varied details


def test_deterministic_per_seed_and_differs_across_seeds(tmp_path):
    def digest(root, seed):
        build_faces_it2i(root, "S", resolution=16, seed=seed, heldout_per_identity=3)
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}
    a, b, c = digest(tmp_path / "a", 1), digest(tmp_path / "b", 1), digest(tmp_path / "c", 2)
    assert a == b  # identical bytes, metadata and every image
    assert a.keys() == c.keys()
    changed = [k for k in a if k.endswith(".png") and a[k] != c[k]]
    assert len(changed) == len([k for k in a if k.endswith(".png")])
    assert a["metadata.csv"] != c["metadata.csv"]


def test_presets_nest_and_heldout_count_leaves_train_alone(tmp_path):
    s = read_dataset(build_faces_it2i(tmp_path / "s", "S", resolution=8, heldout_per_identity=1))
    m = read_dataset(build_faces_it2i(tmp_path / "m", "M", resolution=8, heldout_per_identity=4))
    m_train = {(r.key, r.caption, r.image.read_bytes()) for r in m.train()}
    assert {(r.key, r.caption, r.image.read_bytes()) for r in s.train()} <= m_train


def test_captions_vary_and_name_identity(faces_m):
    for name in PRESETS["M"].train_counts:
        caps = [r.caption for r in faces_m.records if r.identity == name]
        assert all(c.startswith(f"An image of {name}, ") and c.endswith(" background.") for c in caps)
        assert len(set(caps)) >= len(caps) // 2  # varied: 3 x 3 x 4 x 8 combinations
    big = [r.caption for r in faces_m.train() if r.identity == TARGET_NAMES[0]]
    assert len(big) == 30 and len(set(big)) >= 20
    for parts in (EXPRESSIONS, TILTS, LIGHTS, tuple(BACKGROUNDS)):  # every option occurs
        assert all(any(f" {p}" in r.caption for r in faces_m.records) for p in parts)


def test_captions_fit_the_text_encoder():
    """The longest caption must fit max_length 32 (the default) or it loses its tail."""
    from transformers import AutoTokenizer

    from pogdiff_dist.config import BUNDLED_TEXT_ENCODER
    from pogdiff_dist.models import resolve_text_encoder_dir

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_text_encoder_dir(BUNDLED_TEXT_ENCODER, None)[1]))
    longest = lambda options: max(options, key=lambda o: len(tokenizer.tokenize(o)))
    var = replace(image_variation(TARGET_NAMES[0], "train", 0, 0), expression=longest(EXPRESSIONS),
                  tilt_label=longest(TILTS), light=longest(LIGHTS), background=longest(tuple(BACKGROUNDS)))
    worst = max(len(tokenizer(caption_for(n, var))["input_ids"]) for n in TARGET_NAMES + BASE_NAMES)
    assert worst <= 32


def test_captions_describe_the_image():
    """Lighting and tilt words match the pixels (left/right as seen in the image)."""
    people = identities()
    ident = people["Sena Holloway"]  # black side-swept hair on light skin
    var = replace(image_variation(ident.name, "train", 0, 0), tilt=0.0, shift=(0.0, 0.0), scale=1.0,
                  light="the front", light_strength=0.0, background_rgb=(128, 128, 128))
    gray = lambda v: render(ident, v, 32).astype(float).mean(axis=2)
    for light, sign in (("the left", 1), ("the right", -1)):
        img = gray(replace(var, light=light, light_strength=0.3))
        assert sign * (img[:, :4].mean() - img[:, -4:].mean()) > 30
    top = gray(replace(var, light="above", light_strength=0.3))
    assert top[:4].mean() - top[-4:].mean() > 30

    def top_of_head_x(tilt):
        hair = gray(replace(var, tilt=tilt)) < 60  # dark hair on a grey background and light skin
        rows = np.flatnonzero(hair.any(axis=1))[:4]  # the topmost hair rows
        return np.mean([np.flatnonzero(hair[r]).mean() for r in rows])
    assert top_of_head_x(12.0) < top_of_head_x(0.0) < top_of_head_x(-12.0)  # +tilt: top leans left
    assert image_variation(ident.name, "train", 0, 0).tilt_label in TILTS


def test_identities_distinguishable_and_images_vary(faces_m, faces_base):
    """A nearest-centroid classifier on 16x16 RGB pixels, fitted on some images of each
    identity and tested on others, beats chance by far (measured: M 0.53 vs chance
    0.10; base 0.50 vs 0.042), despite backgrounds and lighting that change per image."""
    ids = faces_m.identities()
    held = faces_m.heldout()
    x, y, j = _pixels(held), np.array([ids.index(r.identity) for r in held]), np.array([_j(r) for r in held])
    centroids = np.stack([x[(j < 10) & (y == k)].mean(0) for k in range(len(ids))])
    test = j >= 10
    pred = ((x[test][:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    acc_m = float((pred == y[test]).mean())
    assert acc_m >= 0.45, acc_m  # chance: 0.10

    ids = faces_base.identities()
    train, held = faces_base.train(), faces_base.heldout()
    xt, yt = _pixels(train), np.array([ids.index(r.identity) for r in train])
    centroids = np.stack([xt[yt == k].mean(0) for k in range(len(ids))])
    xh, yh = _pixels(held), np.array([ids.index(r.identity) for r in held])
    acc_base = float((((xh[:, None] - centroids[None]) ** 2).sum(-1).argmin(1) == yh).mean())
    assert acc_base >= 0.35, acc_base  # chance: 1/24 = 0.042

    for name in ids:  # and every identity's images differ from each other
        imgs = xt[yt == ids.index(name)]
        assert imgs.std(axis=0).mean() > 0.05 and len({im.tobytes() for im in imgs}) == len(imgs)


def test_train_and_heldout_disjoint(faces_m):
    assert faces_m.counts("heldout") == {n: 20 for n in PRESETS["M"].train_counts}
    train = {x.tobytes() for x in _pixels(faces_m.train())}
    assert not train & {x.tobytes() for x in _pixels(faces_m.heldout())}


def test_idempotent_rebuilds_on_new_params_and_replaces_digits(tmp_path):
    build_faces_it2i(tmp_path, "S", 8, seed=0)
    meta = tmp_path / "metadata.csv"
    mtime = meta.stat().st_mtime_ns
    assert build_faces_it2i(tmp_path, "S", 8, seed=0) == tmp_path
    assert meta.stat().st_mtime_ns == mtime
    build_faces_it2i(tmp_path, "S", 8, seed=3, heldout_per_identity=4)
    assert json.loads((tmp_path / "faces_it2i.json").read_text())["params"]["seed"] == 3
    ds = read_dataset(tmp_path)
    assert ds.counts("heldout") == {TARGET_NAMES[0]: 4, TARGET_NAMES[1]: 4}
    assert len(list((tmp_path / "images").rglob("*.png"))) == len(ds.records)  # no stale files

    # one folder, switching between bundled datasets: no stale images, no stale stamp
    digits.build_digits_it2i(tmp_path, "S", 8, heldout_per_identity=1)
    assert not (tmp_path / "faces_it2i.json").exists()
    assert read_dataset(tmp_path).identities() == sorted(digits.NAMES[:2])
    build_faces_it2i(tmp_path, "S", 8, seed=3, heldout_per_identity=4)
    assert not (tmp_path / "digits_it2i.json").exists()
    ds = read_dataset(tmp_path)
    assert ds.identities() == sorted(TARGET_NAMES[:2])
    assert len(list((tmp_path / "images").rglob("*.png"))) == len(ds.records)


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        build_faces_it2i(tmp_path, "XL")
    with pytest.raises(ValueError, match="resolution"):
        build_faces_it2i(tmp_path, "S", resolution=4)
    with pytest.raises(ValueError, match="heldout"):
        build_faces_it2i(tmp_path, "S", heldout_per_identity=-1)


def test_load_records_with_faces_config(tmp_path):
    from pogdiff_dist.config import load_config
    from pogdiff_dist.prepare.pipeline import load_records

    overrides = {"prepare.out_dir": str(tmp_path / "prepared"), "data.resolution": 16,
                 "data.heldout_per_identity": 2}
    cfg = load_config(REPO / "configs" / "faces.yaml", overrides)
    records = load_records(cfg)
    assert records.counts() == dict(sorted(PRESETS["M"].train_counts.items()))
    assert len(records.heldout()) == 20 and records.records[0].image.is_relative_to(tmp_path / "prepared" / "raw")
    assert load_image(records.records[0].image, 16, cfg.data.channels).shape == (3, 16, 16)

    with pytest.raises(ValueError, match="data.channels=3"):
        load_records(cfg.with_overrides({"data.channels": 1}))

    base = load_config(REPO / "configs" / "faces_base.yaml", overrides)
    assert base.prepare.out_dir == overrides["prepare.out_dir"]
    assert load_config(REPO / "configs" / "faces_base.yaml").prepare.out_dir != cfg.prepare.out_dir
    assert base.data.bundled == ("faces-it2i", "base") and base.train.name != cfg.train.name


def test_preview_grid(tmp_path):
    grid = preview_grid("S", per_identity=3, resolution=8, zoom=2)
    assert grid.height == 2 * (16 + 4) + 4  # one row per identity
    out = tmp_path / "grid.png"
    main(["--preset", "S", "--per-identity", "2", "--resolution", "8", "--out", str(out)])
    assert Image.open(out).size[1] == 2 * (24 + 4) + 4
