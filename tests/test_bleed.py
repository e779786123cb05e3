"""Identity bleed (who a prompt turns into) from a predictions table worked out by hand; the
confusion-matrix PNG; the printed summary; which settings evaluate a run's model. Pure CPU, no Ray."""

import math

import numpy as np
import pytest
from PIL import Image

from pogdiff_dist.evaluation.bleed import bleed_summary, confusion, identity_bleed, top_bleed

# Three identities, 8 images each. A (majority) is judged right 7 times and once as C; B
# (few-shot) turns into A 5 times, into C once and is right twice; C (few-shot) is split 3 / 3
# between A and B, with one image the judge reads as a class no identity has ("<7>") and one right.
PREDICTED = {
    "A": {"A": 7, "C": 1},
    "B": {"A": 5, "B": 2, "C": 1},
    "C": {"A": 3, "B": 3, "C": 1, "<7>": 1},
}
FEW = ["B", "C"]


def _per():
    return {n: {"predicted": dict(p), "train_count": 30 if n == "A" else 2, "few_shot": n in FEW,
                "accuracy": p.get(n, 0) / 8} for n, p in PREDICTED.items()}


def test_confusion_counts_and_row_shares():
    c = confusion(PREDICTED, ["A", "B", "C"])
    assert c.rows == ["A", "B", "C"] and c.columns == ["A", "B", "C", "<7>"]
    np.testing.assert_array_equal(c.counts, [[7, 0, 1, 0], [5, 2, 1, 0], [3, 3, 1, 1]])
    np.testing.assert_allclose(c.shares(), [[7 / 8, 0, 1 / 8, 0], [5 / 8, 2 / 8, 1 / 8, 0], [3 / 8, 3 / 8, 1 / 8, 1 / 8]])
    # rows in the order asked; an identity judged but not evaluated comes before labels naming none
    c2 = confusion({"B": {"B": 1, "Z": 2, "<3>": 1}}, ["B"])
    assert c2.columns == ["B", "Z", "<3>"] and c2.counts.tolist() == [[1, 2, 1]]
    assert confusion({}, ["A"]).shares().tolist() == [[0.0]]  # no images: zeros, not NaN


def test_top_bleed_target_share_and_ties():
    assert top_bleed("A", PREDICTED["A"]) == {"bleed_to": "C", "bleed_count": 1, "bleed_share": 1 / 8,
                                              "bleed_tied": []}
    assert top_bleed("B", PREDICTED["B"]) == {"bleed_to": "A", "bleed_count": 5, "bleed_share": 5 / 8,
                                              "bleed_tied": []}
    # A and B 3 each: the tie is kept, not hidden behind one name; "<7>" is nobody's identity
    assert top_bleed("C", PREDICTED["C"]) == {"bleed_to": "A", "bleed_count": 3, "bleed_share": 3 / 8,
                                              "bleed_tied": ["B"]}
    assert top_bleed("D", {"D": 4})["bleed_to"] is None and top_bleed("D", {"D": 4})["bleed_share"] == 0.0
    assert top_bleed("D", {"D": 2, "<1>": 2})["bleed_to"] is None  # wrong, but into no identity


def test_bleed_summary_by_hand():
    per = _per()
    for n, row in per.items():
        row.update(top_bleed(n, row["predicted"]))
    real = {"A": {"A": 2}, "B": {"A": 1, "B": 1}}  # the judge on real held-out images (none for C)
    s = bleed_summary(per, FEW, real)
    assert s["share_all"] == pytest.approx((1 / 8 + 5 / 8 + 3 / 8) / 3)
    assert s["share_majority"] == pytest.approx(1 / 8)
    assert s["share_few"] == pytest.approx((5 / 8 + 3 / 8) / 2)
    # every wrong (prompted, judged identity) pair, largest share first, then count, then names
    assert [(p["prompted"], p["judged"], p["count"], p["images"]) for p in s["pairs"]] == [
        ("B", "A", 5, 8), ("C", "A", 3, 8), ("C", "B", 3, 8), ("A", "C", 1, 8), ("B", "C", 1, 8)]
    assert s["pairs"][0]["share"] == 5 / 8
    assert s["pairs"][0]["judge_real"] == [1, 2]  # the judge itself reads 1 of B's 2 real images as A
    assert s["pairs"][3]["judge_real"] == [0, 2] and "judge_real" not in s["pairs"][1]
    # A receives 5 + 3 images from 2 prompts, C 1 + 1 from 2, B 3 from 1
    assert [(a["judged"], a["count"], a["prompts"]) for a in s["absorbs"]] == [("A", 8, 2), ("B", 3, 1), ("C", 2, 2)]


def test_identity_bleed_fills_rows_and_the_matrix():
    per = _per()
    out = identity_bleed(per, FEW)
    assert per["B"]["bleed_to"] == "A" and per["C"]["bleed_tied"] == ["B"]
    assert out["confusion"] == {"rows": ["A", "B", "C"], "columns": ["A", "B", "C", "<7>"],
                                "counts": [[7, 0, 1, 0], [5, 2, 1, 0], [3, 3, 1, 1]]}
    assert bleed_summary({"A": {"predicted": {"A": 3}, "bleed_share": 0.0}}, [])["pairs"] == []


def _results(n_identities=3, images=8):
    """metrics.json's content as far as the report reads it."""
    if n_identities == 3:
        per, few = _per(), FEW
    else:
        rng = np.random.default_rng(0)
        names = [f"Person {i:02d} Longname" for i in range(n_identities)]
        few = names[n_identities // 3:]
        per = {}
        for i, n in enumerate(names):
            labels = rng.choice(names, size=images).tolist() + [n] * images
            labels = labels[:images]
            per[n] = {"predicted": {x: labels.count(x) for x in set(labels)}, "train_count": 2 if n in few else 30,
                      "few_shot": n in few, "accuracy": labels.count(n) / images}
    for row in per.values():
        row.update(fid=0.3, dino=0.5, grecall=0.9)
    from pogdiff_dist.evaluation.metrics import summarize

    results = {"per_identity": per, "identities": list(per), "few_shot_identities": list(few),
               "summary": summarize(per, ["fid", "dino", "grecall", "accuracy"], few),
               "config": {"num_images": images, "steps": 25, "guidance_scale": 3.0, "seed": 7},
               "classifier": {"classifier": "digits-cnn"}, "encoder": "pixels"}
    results["bleed"] = identity_bleed(per, few)
    return results


@pytest.mark.parametrize("n", [3, 60])
def test_confusion_png_is_written_and_grows_with_the_identities(tmp_path, n):
    from pogdiff_dist.evaluation.report import plot_confusion

    path = plot_confusion(_results(n), tmp_path / "confusion.png")
    im = Image.open(path)
    assert im.format == "PNG"
    # sized per cell, not squeezed into a fixed canvas: 60 identities get >= 24 px a cell
    assert im.size[1] >= n * 24 and im.size[0] >= n * 24
    assert plot_confusion({"per_identity": {"A": {"train_count": 1}}}, tmp_path / "x.png") is None  # no predictions


def test_summary_says_the_settings_on_every_figure_line():
    from pogdiff_dist.evaluation.report import mlflow_metrics, summary_text

    results = _results()
    text = summary_text(results)
    lines = text.splitlines()
    figures = [line for line in lines if line.strip().split(" ")[0] in ("fid", "dino", "grecall", "accuracy", "bleed")]
    assert len(figures) == 5
    for line in figures:
        assert "8 images/identity, DDIM 25, guidance 3, seed 7" in line
    assert "judge digits-cnn" in next(line for line in figures if line.strip().startswith("accuracy"))
    assert "encoder pixels" in next(line for line in figures if line.strip().startswith("fid"))
    bleed_line = next(line for line in figures if line.strip().startswith("bleed"))
    assert f"{(1 / 8 + 5 / 8 + 3 / 8) / 3:6.3f}" in bleed_line
    # the table: identity, training images, judged right, top bleed target and share
    row_b = next(line for line in lines if line.strip().startswith("* B"))
    assert row_b.split() == ["*", "B", "2", "2/8", "0.25", "A", "5/8", "0.62"]
    row_c = next(line for line in lines if line.strip().startswith("* C"))
    assert "A (+1 tied)" in row_c
    assert next(line.split() for line in lines if line.startswith("    B -> ")) == ["B", "->", "A", "5/8", "0.62"]
    assert "A (8 images from 2 identities)" in text
    assert mlflow_metrics(results)["bleed_share_few"] == pytest.approx(0.5)
    assert math.isclose(mlflow_metrics(results)["accuracy_all"], results["summary"]["accuracy_all"])


# ---- which settings evaluate a run's model ---------------------------------------------------

def _run_folder(tmp_path, **eval_settings):
    """A training run folder as run_train leaves it: config.yaml (save_config) and model/."""
    from pogdiff_dist.config import load_config, save_config

    run = tmp_path / "runs" / "r"
    (run / "model").mkdir(parents=True)
    save_config(load_config(None, {f"eval.{k}": v for k, v in eval_settings.items()}), run / "config.yaml")
    return run


def test_a_runs_model_gets_the_runs_eval_settings(tmp_path):
    from pogdiff_dist.config import EvalConfig
    from pogdiff_dist.evaluation.evaluate import EvalSource, eval_settings

    run = _run_folder(tmp_path, num_images=16, steps=25, seed=3)
    source = EvalSource(run / "model", tmp_path / "prepared", run_dir=run)
    cfg, origin = eval_settings(source)
    assert (cfg.eval.num_images, cfg.eval.steps, cfg.eval.seed) == (16, 25, 3)
    assert origin == f"{run / 'config.yaml'} (the run's eval section)"
    # --set wins, and says so; the other run settings stay
    cfg, origin = eval_settings(source, None, ["eval.steps=50", "ray.verbose=true"])
    assert (cfg.eval.num_images, cfg.eval.steps) == (16, 50) and cfg.ray.verbose
    assert origin.endswith("; --set eval.steps=50") and "ray.verbose" not in origin
    # an eval section in --config wins over the run's, key by key
    (tmp_path / "c.yaml").write_text("eval:\n  seed: 9\n")
    cfg, origin = eval_settings(source, str(tmp_path / "c.yaml"))
    assert (cfg.eval.num_images, cfg.eval.seed) == (16, 9) and f"--config {tmp_path / 'c.yaml'}" in origin
    # a model outside any run: the defaults, named as such
    cfg, origin = eval_settings(EvalSource(tmp_path / "m", tmp_path / "prepared"))
    assert cfg.eval == EvalConfig() and origin == "the defaults (EvalConfig)"
    # a LoRA's run folder speaks for it when the base model has none
    cfg, _ = eval_settings(EvalSource(tmp_path / "base", tmp_path / "prepared", lora_dir=run / "lora"))
    assert cfg.eval.num_images == 16


def test_a_bad_setting_in_the_runs_config_names_the_file(tmp_path):
    from pogdiff_dist.evaluation.evaluate import EvalSource, eval_settings

    run = _run_folder(tmp_path)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("steps: 50", "steps: 0"))
    with pytest.raises(ValueError, match=r"eval.steps must be >= 1.*config.yaml.*--set eval"):
        eval_settings(EvalSource(run / "model", tmp_path, run_dir=run))
    cfg, _ = eval_settings(EvalSource(run / "model", tmp_path, run_dir=run), None, ["eval.steps=5"])
    assert cfg.eval.steps == 5
