"""Datasets as practitioners keep them: kohya-ss ``<repeats>_<name>`` folders, ``<stem>.txt``
caption files, ``data.dataset`` pointing at ``metadata.csv``; repeats reaching the sampling
plan; every unused file reported; every bad caption file named. Real PNGs in a temp dir."""

import re

import numpy as np
import pytest
from PIL import Image

from pogdiff_dist.data.records import read_dataset
from pogdiff_dist.data.sampling import SamplingPlan, epoch_counts, identity_shares
from pogdiff_dist.data.shards import Manifest


def _png(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 8), (value, 0, 255)).save(path)
    return path


def _kohya(root):
    """15_Leila: 2 images (one caption file); "3_Jonas Weber": 3, all captioned; Bob: 4, no prefix."""
    _png(root / "15_Leila" / "leila_000.png")
    (root / "15_Leila" / "leila_000.txt").write_text("  Leila, red scarf, smiling\n")
    _png(root / "15_Leila" / "leila_001.png")
    for i in range(3):
        _png(root / "3_Jonas Weber" / f"jonas_{i:03d}.jpg")
        (root / "3_Jonas Weber" / f"jonas_{i:03d}.txt").write_text(f"Jonas Weber, photo {i}")
    for i in range(4):
        _png(root / "Bob" / f"b{i}.png")
    return root


def test_kohya_folders_with_caption_files_read_names_captions_and_repeats(tmp_path):
    ds = read_dataset(_kohya(tmp_path))
    assert ds.identities() == ["Bob", "Jonas Weber", "Leila"]
    caps = {r.image.name: (r.identity, r.caption) for r in ds.records}
    assert caps["leila_000.png"] == ("Leila", "Leila, red scarf, smiling")  # as-is, whitespace stripped
    assert caps["leila_001.png"] == ("Leila", "An image of Leila.")  # no caption file: the default
    assert caps["jonas_002.jpg"] == ("Jonas Weber", "Jonas Weber, photo 2")
    assert caps["b0.png"] == ("Bob", "An image of Bob.")
    assert ds.repeats == {"Leila": 15, "Jonas Weber": 3} and ds.repeat("Bob") == 1
    assert ds.identity_table() == (["Bob", "Jonas Weber", "Leila"], [4, 3, 2], [1, 3, 15])
    assert all(r.key.startswith(("bob-", "jonas_weber-", "leila-")) for r in ds.records)
    assert ds.unused == [] and ds.warnings == [] and ds.skipped == []


def _identity_ids(ds):
    identities, counts, repeats = ds.identity_table()
    ident = np.array([identities.index(r.identity) for r in ds.train()])
    return np.arange(len(ident)), ident, counts, repeats


def test_repeats_reach_the_sampling_plan(tmp_path):
    """uniform: every image exactly its identity's repeats per epoch (rows 4 : 9 : 30);
    balanced: equal shares whatever the repeats; power: shares ~ (repeats x images)^alpha."""
    index, ident, counts, repeats = _identity_ids(read_dataset(_kohya(tmp_path)))
    uniform = SamplingPlan(counts, "uniform", 0.5, seed=0, repeats=repeats)
    assert uniform.active and "repeats" in uniform.label
    for epoch in range(5):
        rows = np.bincount(ident, weights=uniform.counts(index, ident, epoch), minlength=3)
        np.testing.assert_array_equal(rows, [4 * 1, 3 * 3, 2 * 15])
    effective = np.array(counts) * np.array(repeats)
    for mode, alpha in (("balanced", 0.0), ("power", 0.5)):
        plan = SamplingPlan(counts, mode, alpha, seed=0, repeats=repeats)
        np.testing.assert_allclose((plan.lam * counts).sum(), effective.sum())  # an epoch is sum r n rows
        rows = sum(np.bincount(ident, weights=epoch_counts(index, ident, plan.lam, 0, e), minlength=3)
                   for e in range(2000))
        target = identity_shares(effective, mode, alpha)
        np.testing.assert_allclose(rows / rows.sum(), target, atol=0.01)
    np.testing.assert_allclose(target, np.sqrt(effective) / np.sqrt(effective).sum())
    np.testing.assert_allclose(identity_shares(effective, "balanced"), [1 / 3] * 3)
    # all repeats 1 (or a manifest written before repeats): the plan of before, uniform inactive
    plain = SamplingPlan(counts, "uniform", 0.5, seed=0, repeats=[1, 1, 1])
    assert not plain.active and plain.label == "data.sampling=uniform"
    np.testing.assert_allclose(SamplingPlan(counts, "power", 0.5, 0, [1, 1, 1]).lam,
                               SamplingPlan(counts, "power", 0.5, 0).lam)
    old = Manifest("f", 9, 1, [1], [1, 1], ["Bob", "Jonas Weber", "Leila"], counts, [], "t", "t", None)
    assert old.repeats() == [1, 1, 1]


def test_metadata_csv_path_accepted_and_caption_files_fill_missing_captions(tmp_path):
    _png(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "a.txt").write_text("Ann by the sea\n")
    _png(tmp_path / "img" / "b.png")
    (tmp_path / "img" / "b.txt").write_text("overridden by the table")
    _png(tmp_path / "img" / "c.png")
    (tmp_path / "metadata.csv").write_text("image,caption,identity\nimg/a.png,,Ann\nimg/b.png,Ann at home,Ann\n")
    ds = read_dataset(tmp_path / "metadata.csv")
    assert ds.root == tmp_path and [r.caption for r in ds.records] == ["Ann by the sea", "Ann at home"]
    assert ds.unused == [("img/b.txt", "caption file overridden: metadata.csv gives the image's caption"),
                         ("img/c.png", "image not listed in metadata.csv")]
    # another name, no caption column: caption files, else the default
    (tmp_path / "people.csv").write_text("image,identity\nimg/a.png,Ann\nimg/c.png,Cy\n")
    ds = read_dataset(tmp_path / "people.csv")
    assert [r.caption for r in ds.records] == ["Ann by the sea", "An image of Cy."]
    unused = dict(ds.unused)
    assert sorted(unused) == ["img/b.png", "img/b.txt", "metadata.csv"]
    assert unused["img/b.txt"] == "caption file without an image listed in people.csv"
    with pytest.raises(ValueError, match=r"notes\.md is a file but not a \.csv table"):
        (tmp_path / "notes.md").write_text("x")
        read_dataset(tmp_path / "notes.md")


def test_unused_files_are_named_counted_and_grouped(tmp_path):
    root = _kohya(tmp_path / "ds")
    (root / "README.md").write_text("my notes")
    _png(root / "stray.png")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "15_Leila" / "leila_000.json").write_text("{}")
    (root / "15_Leila" / "orphan.txt").write_text("no image")
    _png(root / "15_Leila" / "old" / "x.png")
    (root / "2_Nobody").mkdir()
    for i in range(30):
        (root / "Bob" / f"b{i}.npz").write_bytes(b"cache")
    ds = read_dataset(root)
    unused = dict(ds.unused)
    assert set(unused) == {".DS_Store", "README.md", "stray.png", "15_Leila/leila_000.json", "15_Leila/orphan.txt",
                           "15_Leila/old/", "2_Nobody/", *(f"Bob/b{i}.npz" for i in range(30))}
    assert "dataset root" in unused["stray.png"] and "without an image" in unused["15_Leila/orphan.txt"]
    assert "hidden" in unused[".DS_Store"] and "no images" in unused["2_Nobody/"]
    text = "\n".join(ds.warnings)
    for name in ("README.md", "stray.png", "leila_000.json", "orphan.txt", "old/", "2_Nobody/"):
        assert name in text
    many = next(w for w in ds.warnings if "Bob/b0.npz" in w)  # the 30 caches + leila_000.json: one group
    assert many.startswith("31 item(s)") and "and 21 more" in many and "Bob/ 30" in many
    assert "Bob/b29.npz" not in many


def test_bad_caption_files_and_folder_names_are_errors_naming_them(tmp_path):
    root = _kohya(tmp_path / "ds")
    (root / "15_Leila" / "leila_001.txt").write_text("  \n")
    (root / "3_Jonas Weber" / "jonas_001.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    with pytest.raises(ValueError) as e:
        read_dataset(root)
    msg = str(e.value)
    assert "2 bad item(s)" in msg and "15_Leila/leila_001.txt: caption file is empty" in msg
    assert "3_Jonas Weber/jonas_001.txt: cannot read caption file" in msg
    ds = read_dataset(root, on_bad="skip")  # the two images are skipped, counted, named
    assert [ref for ref, _ in ds.skipped] == ["15_Leila/leila_001.txt", "3_Jonas Weber/jonas_001.txt"]
    assert ds.counts() == {"Bob": 4, "Jonas Weber": 2, "Leila": 1}
    # a table row whose caption file is empty names the row and the file
    _png(tmp_path / "t" / "a.png")
    (tmp_path / "t" / "a.txt").write_text("")
    (tmp_path / "t" / "metadata.csv").write_text("image,identity\na.png,A\n")
    with pytest.raises(ValueError, match=r"metadata\.csv row 1: a\.txt: caption file is empty"):
        read_dataset(tmp_path / "t" / "metadata.csv")
    (tmp_path / "t" / "metadata.csv").write_text("image,caption,identity\na.png,,A\n")
    (tmp_path / "t" / "a.txt").unlink()
    with pytest.raises(ValueError, match=r"row 1: field 'caption' is empty and there is no caption file a\.txt"):
        read_dataset(tmp_path / "t")
    # folder names: one identity from two folders, a zero repeat count, no name: raised even with skip
    _png(root / "Leila" / "l.png")
    _png(root / "0_Zed" / "z.png")
    _png(root / "7_" / "q.png")
    with pytest.raises(ValueError) as e:
        read_dataset(root, on_bad="skip")
    msg = str(e.value)
    assert re.search(r"folders '15_Leila' and 'Leila' both give identity 'Leila'", msg), msg
    assert "'0_Zed': repeat count 0 must be >= 1" in msg and "'7_': no identity name" in msg


def test_prepare_names_the_field_and_reports_repeats_and_unused_files(tmp_path, capsys):
    from pogdiff_dist.config import load_config
    from pogdiff_dist.prepare.pipeline import load_records, report_records

    root = _kohya(tmp_path / "ds")
    (root / "notes.md").write_text("x")
    for bad in (tmp_path / "missing", root / "notes.md"):
        with pytest.raises(ValueError, match=r"^data\.dataset: .*" + re.escape(bad.name)):
            load_records(load_config(None, {"data.dataset": str(bad)}))
    with pytest.raises(ValueError, match="data.dataset must name"):
        load_config(None, {"data.dataset": ""})
    (root / "metadata.csv").write_text("image,identity\nBob/b0.png,Bob\nBob/b1.png,Bob\n")
    assert load_records(load_config(None, {"data.dataset": str(root / "metadata.csv")})).counts() == {"Bob": 2}
    (root / "metadata.csv").unlink()
    records = load_records(load_config(None, {"data.dataset": str(root)}))
    report_records(records)
    out = capsys.readouterr().out
    assert "Bob x1 (4 image(s)), Jonas Weber x3 (3 image(s)), Leila x15 (2 image(s))" in out
    assert "an epoch is 43 rows (9 images)" in out
    assert re.search(r"warning: 1 item\(s\) not used \(file at the dataset root; .*\): notes\.md", out), out
