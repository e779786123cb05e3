"""Reader for user datasets: both layouts, validation messages, keys, load_image."""

import re

import numpy as np
import pytest
from PIL import Image

from pogdiff_dist.data.records import Record, load_image, read_dataset


def _png(path, size=(12, 8), value=128, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255)).save(path)
    return path


def _table(root, rows, header="image,caption,identity,split"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.csv").write_text("\n".join([header, *rows]) + "\n")


def _truncated_png(path):
    _png(path, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_table_layout_reads_splits_counts_and_absolute_paths(tmp_path):
    for i in range(3):
        _png(tmp_path / "img" / f"a{i}.png")
    outside = _png(tmp_path.parent / f"{tmp_path.name}_outside.png")
    _table(tmp_path, ["img/a0.png,cap zero,Ann,train", "img/a1.png,cap one,Ann,",
                      "img/a2.png,cap two,Ann,heldout", f"{outside},far away,Bob,train",
                      "img/a0.png,again,Bob,train"])
    ds = read_dataset(tmp_path)
    assert [r.caption for r in ds.records] == ["cap zero", "cap one", "cap two", "far away", "again"]
    assert ds.counts() == {"Ann": 2, "Bob": 2} and ds.counts("heldout") == {"Ann": 1}
    assert [r.split for r in ds.heldout()] == ["heldout"] and len(ds.train()) == 4
    assert ds.identities() == ["Ann", "Bob"]
    assert all(r.image.is_absolute() and r.image.is_file() for r in ds.records)
    assert ds.records[3].image == outside and ds.skipped == [] and ds.warnings == []


def test_folder_layout_with_and_without_captions(tmp_path):
    for name in ("b.png", "a.jpg", "c.webp"):
        _png(tmp_path / "Ann Lee" / name)
    _png(tmp_path / "Bob" / "x.bmp")
    _png(tmp_path / "Bob" / "y.png")
    (tmp_path / "Bob" / "notes.txt").write_text("ignored")
    (tmp_path / "Ann Lee" / "captions.csv").write_text("image,caption\nb.png,Ann smiling\n")
    ds = read_dataset(tmp_path)
    assert [(r.identity, r.image.name) for r in ds.records] == [
        ("Ann Lee", "a.jpg"), ("Ann Lee", "b.png"), ("Ann Lee", "c.webp"), ("Bob", "x.bmp"), ("Bob", "y.png")]
    caps = {r.image.name: r.caption for r in ds.records}
    assert caps["b.png"] == "Ann smiling"
    assert caps["a.jpg"] == "An image of Ann Lee." and caps["x.bmp"] == "An image of Bob."
    assert {r.split for r in ds.records} == {"train"} and ds.counts() == {"Ann Lee": 3, "Bob": 2}
    assert ds.unused == [("Bob/notes.txt", "caption file without an image of the same name")]


def test_keys_unique_and_webdataset_safe(tmp_path):
    for name in ("a.b.png", "a b.png", "a_b.png"):
        _png(tmp_path / "Zoë O'Neil" / name)
    _png(tmp_path / "img" / "a b.png")
    _table(tmp_path / "t", [f"{tmp_path}/img/a b.png,c,Q,train"] * 3 + [f"{tmp_path}/Zoë O'Neil/a.b.png,c,Q,train"])
    for ds in (read_dataset(tmp_path / "t"), read_dataset(tmp_path, on_bad="skip")):
        keys = [r.key for r in ds.records]
        assert len(set(keys)) == len(keys)
        assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys), keys
    assert read_dataset(tmp_path / "t").records[0].key == read_dataset(tmp_path / "t").records[0].key


def test_corrupt_and_truncated_images_raise_listing_all_then_skip(tmp_path):
    _png(tmp_path / "ok1.png")
    _png(tmp_path / "ok2.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    _truncated_png(tmp_path / "trunc.png")
    _table(tmp_path, ["ok1.png,c,A,train", "garbage.png,c,A,train", "trunc.png,c,A,train",
                      "ok2.png,c,A,train", "gone.png,c,A,train"])
    with pytest.raises(ValueError) as e:
        read_dataset(tmp_path)
    msg = str(e.value)
    assert "garbage.png" in msg and "trunc.png" in msg and "gone.png" in msg
    assert "row 2" in msg and "row 3" in msg and "row 5" in msg and "'image'" in msg
    ds = read_dataset(tmp_path, on_bad="skip")
    assert [r.image.name for r in ds.records] == ["ok1.png", "ok2.png"]
    skipped = " ".join(f"{ref} {why}" for ref, why in ds.skipped)
    assert len(ds.skipped) == 3 and "garbage.png" in skipped and "trunc.png" in skipped


def test_folder_layout_corrupt_file_named(tmp_path):
    _png(tmp_path / "A" / "good.png")
    _png(tmp_path / "A" / "good2.png")
    _truncated_png(tmp_path / "A" / "broken.png")
    with pytest.raises(ValueError, match="broken.png"):
        read_dataset(tmp_path)
    ds = read_dataset(tmp_path, on_bad="skip")
    assert len(ds.records) == 2 and ds.skipped[0][0] == "A/broken.png"


def test_field_and_split_errors_name_row_and_field(tmp_path):
    _png(tmp_path / "a.png")
    _table(tmp_path, ["a.png,,A,train", "a.png,c,,train", "a.png,c,A,test", ",c,A,train"])
    with pytest.raises(ValueError) as e:
        read_dataset(tmp_path)
    msg = str(e.value)
    for needle in ("row 1", "'caption'", "row 2", "'identity'", "row 3", "'split'", "'test'", "row 4", "'image'"):
        assert needle in msg
    with pytest.raises(ValueError, match="no valid images"):
        read_dataset(tmp_path, on_bad="skip")


def test_bad_listing_is_capped(tmp_path):
    _png(tmp_path / "a.png")
    _table(tmp_path, [f"missing{i}.png,c,A,train" for i in range(30)] + ["a.png,c,A,train"])
    with pytest.raises(ValueError) as e:
        read_dataset(tmp_path)
    assert "30 bad item(s)" in str(e.value) and "and 10 more" in str(e.value)
    assert "missing19.png" in str(e.value) and "missing20.png" not in str(e.value)


def test_missing_column_named(tmp_path):
    _table(tmp_path, ["a.png,cap"], header="image,caption")
    with pytest.raises(ValueError, match="missing column.*identity"):
        read_dataset(tmp_path)
    _png(tmp_path / "a.png")
    _table(tmp_path, ["a.png,A"], header="image,identity")  # no caption column: the default caption
    assert read_dataset(tmp_path).records[0].caption == "An image of A."


def test_single_image_identity_warns_but_is_kept(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png")
    _table(tmp_path, ["0.png,c,Major,train", "1.png,c,Major,train", "2.png,c,Lonely,train"])
    ds = read_dataset(tmp_path)
    assert len(ds.warnings) == 1 and "Lonely" in ds.warnings[0]
    assert ds.counts()["Lonely"] == 1


def test_empty_dataset_and_bad_on_bad(tmp_path):
    (tmp_path / "empty_identity").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        read_dataset(tmp_path)
    with pytest.raises(ValueError, match="on_bad"):
        read_dataset(tmp_path, on_bad="ignore")


def test_load_image_shape_range_and_crop(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 10:30] = 255  # the centre square is white, the sides black
    Image.fromarray(arr).save(tmp_path / "wide.png")
    rgb = load_image(tmp_path / "wide.png", 16, 3)
    assert rgb.shape == (3, 16, 16) and rgb.dtype == np.float32
    assert rgb.min() >= -1 and rgb.max() <= 1 and np.allclose(rgb, 1.0, atol=1e-2)  # centre-cropped
    gray = load_image(_png(tmp_path / "g.png", size=(10, 10), value=0, mode="L"), 8, 1)
    assert gray.shape == (1, 8, 8) and np.allclose(gray, -1.0)
    with pytest.raises(ValueError):
        load_image(tmp_path / "g.png", 8, 2)


def test_record_is_frozen():
    r = Record("k", __import__("pathlib").Path("/x.png"), "c", "i", "train")
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        r.key = "other"
