"""Evaluation metrics against naive references and closed forms; the identity classifiers
against real held-out data. Pure CPU, no Ray."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from pogdiff_dist.evaluation import metrics as M


def _naive_cos(a, b):
    return np.array([[float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) for y in b] for x in a])


# ---- FID -----------------------------------------------------------------------------

def test_fid_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(6, 4))  # n > d: full-rank covariance
    assert M.fid(x, x) == pytest.approx(0.0, abs=1e-8)
    y = np.random.default_rng(1).normal(size=(3, 8))  # n < d: singular covariance, still 0
    assert M.fid(y, y) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_closed_form_diagonal():
    """Diagonal covariances: FID = |mu1 - mu2|^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i))."""
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = M.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), eps=1e-12)
    assert got == pytest.approx(closed, rel=1e-9)
    # same covariance, shifted mean: exactly the squared mean distance
    assert M.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s1), eps=1e-12) == pytest.approx(
        np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_frechet_distance_full_covariances_against_symmetric_formula():
    """tr sqrtm(C1 C2) = tr sqrtm(C1^1/2 C2 C1^1/2) (a symmetric PSD form computed by eigh)."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    c1, c2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    w, v = np.linalg.eigh(c1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(r1 @ c2 @ r1)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.sum(np.sqrt(inner))
    assert M.frechet_distance(mu1, c1, mu2, c2, eps=1e-12) == pytest.approx(ref, rel=1e-8)


def test_fid_of_shifted_gaussian_samples_approaches_closed_form():
    rng = np.random.default_rng(0)
    n, shift = 20000, np.array([0.5, -1.0, 0.0, 2.0])
    cov2 = np.diag([1.0, 1.0, 4.0, 1.0])
    x = rng.normal(size=(n, 4))
    y = rng.normal(size=(n, 4)) @ np.sqrt(cov2) + shift
    closed = float(shift @ shift) + (1 + 4 - 2 * 2)  # trace term only from the third axis
    assert M.fid(x, y) == pytest.approx(closed, abs=0.1)


def test_fid_regularisation_is_what_the_docstring_says():
    """eps * I is added to both covariances: check against the formula with it spelled out."""
    rng = np.random.default_rng(5)
    g, r = rng.normal(size=(3, 6)), rng.normal(size=(2, 6)) + 1  # both singular
    eps = 1e-3
    mu_g, mu_r = g.mean(0), r.mean(0)
    c_g = np.cov(g, rowvar=False) + eps * np.eye(6)
    c_r = np.cov(r, rowvar=False) + eps * np.eye(6)
    ref = np.sum((mu_g - mu_r) ** 2) + np.trace(c_g + c_r - 2 * scipy.linalg.sqrtm(c_g @ c_r).real)
    assert M.fid(g, r, eps=eps) == pytest.approx(ref, rel=1e-9)
    assert math.isfinite(M.fid(g[:1], r[:1]))  # a single image per side still gives a number


def test_projection_keeps_at_most_n_minus_1_axes():
    x = np.random.default_rng(0).normal(size=(5, 40))
    mean, comp = M.fit_projection(x, 16)
    assert comp.shape == (4, 40)
    np.testing.assert_allclose(comp @ comp.T, np.eye(4), atol=1e-10)  # orthonormal axes
    assert M.project(x, (mean, comp)).shape == (5, 4)


# ---- DINO score, gRecall, accuracy ------------------------------------------------------

def test_dino_score_is_mean_pairwise_cosine():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 7)), rng.normal(size=(3, 7))
    assert M.dino_score(a, b) == pytest.approx(_naive_cos(a, b).mean(), rel=1e-12)
    # identical sets: the mean over all pairs, including each image with itself (1.0)
    assert M.dino_score(a, a) == pytest.approx(_naive_cos(a, a).mean(), rel=1e-12)
    assert M.dino_score(a[:1], a[:1] * 3) == pytest.approx(1.0)


def test_coverage_threshold_is_inclusive_at_exactly_0_7():
    sim = np.array([[0.7, 0.69999, 0.2],
                    [0.1, 0.5, 0.2]])
    np.testing.assert_array_equal(M.coverage(sim, 0.7), [True, False, False])
    np.testing.assert_array_equal(M.coverage(sim[:0], 0.7), [False, False, False])


def test_grecall_hand_built_example():
    """Paper's example: 2 training images of an identity; generated images resembling only
    x1 give 1/2, images resembling both give 1."""
    x1, x2 = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    near = lambda v, c: c * v + math.sqrt(1 - c * c) * np.array([0.0, 0.0, 1.0])  # cosine c to v
    train = np.stack([x1, x2])
    only_x1 = np.stack([near(x1, 0.9), near(x1, 0.75), near(x2, 0.6)])
    assert M.grecall_identity(only_x1, train) == (1, 2)
    both = np.stack([near(x1, 0.9), near(x2, 0.71)])
    assert M.grecall_identity(both, train) == (2, 2)
    assert M.grecall_identity(both, train, threshold=0.8) == (1, 2)
    # one generated image close to both training images covers both
    t = np.stack([x1, near(x1, 0.95)])
    assert M.grecall_identity(x1[None], t) == (2, 2)
    # gRecall = mean over identities of covered / #train (Appendix F: 0.5 * 18/30 + 0.5 * 2/2 = 0.8)
    per = {"maj": {"grecall": 18 / 30}, "min": {"grecall": 2 / 2}}
    assert M.summarize(per, ["grecall"], ["min"]) == {"grecall_all": pytest.approx(0.8), "grecall_few": 1.0,
                                                      "grecall_majority": pytest.approx(0.6)}


def test_identity_accuracy_and_all_few_split():
    assert M.identity_accuracy(["a", "a", "b", "a"], "a") == 0.75
    assert math.isnan(M.identity_accuracy([], "a"))
    per = {"a": {"fid": 1.0, "accuracy": 1.0}, "b": {"fid": 3.0, "accuracy": 0.5},
           "c": {"fid": math.nan, "accuracy": 0.0}}
    s = M.summarize(per, ["fid", "accuracy"], few=["b", "c"])
    assert s["fid_all"] == pytest.approx(2.0)  # c has no FID: left out of the mean
    assert s["fid_few"] == pytest.approx(3.0)
    assert s["accuracy_all"] == pytest.approx(0.5) and s["accuracy_few"] == pytest.approx(0.25)
    assert M.summarize(per, ["fid"], few=[])["fid_few"] is None


# ---- classifiers and encoders --------------------------------------------------------------

def test_nearest_centroid_classifier():
    from pogdiff_dist.evaluation.judges import NearestCentroidClassifier

    rng = np.random.default_rng(0)
    centres = np.eye(3) * 5
    train = {n: centres[i] + rng.normal(size=(4, 3)) * 0.3 for i, n in enumerate("abc")}
    clf = NearestCentroidClassifier(train)
    test = np.concatenate([centres[i] + rng.normal(size=(5, 3)) * 0.3 for i in range(3)])
    pred = clf.predict(None, test)
    assert pred == ["a"] * 5 + ["b"] * 5 + ["c"] * 5


@pytest.fixture(scope="module")
def digits_heldout(tmp_path_factory):
    """Digits-IT2I M at 32 px with 20 held-out images per identity, as prepare builds it."""
    from pogdiff_dist.data.bundled.digits import build_digits_it2i
    from pogdiff_dist.data.records import read_dataset

    root = build_digits_it2i(tmp_path_factory.mktemp("digits"), preset="M", resolution=32, heldout_per_identity=20)
    return read_dataset(root).heldout()


def test_digits_classifier_accuracy_on_unseen_real_digits(digits_heldout):
    """Train without the held-out images' source digits, then classify those images (the
    prepared Digits-IT2I files) and, as sklearn digits, the same images rendered again."""
    from PIL import Image

    from pogdiff_dist.data.bundled.digits import NAMES, digit_names, judge_spec, render_digits
    from pogdiff_dist.evaluation.judges import CNNJudge

    src = [int(Path(r.image).stem.rsplit("-", 1)[1]) for r in digits_heldout]
    clf = CNNJudge.train(judge_spec(list(NAMES), 32), exclude=src)
    assert clf.info["train_images"] == 1797 - len(set(src)) and clf.name == "digits-cnn"
    images = np.stack([np.asarray(Image.open(r.image))[..., None] for r in digits_heldout])
    truth = [r.identity for r in digits_heldout]
    pred = clf.predict(images, None, list(NAMES))
    acc_files = np.mean([p == t for p, t in zip(pred, truth)])
    rendered, labels = render_digits(32, src)
    acc_rendered = np.mean(clf.predict_classes(rendered) == labels)  # class k is digit k
    print(f"digits CNN held-out accuracy: {acc_files:.3f} on {len(truth)} Digits-IT2I files, "
          f"{acc_rendered:.3f} re-rendered")
    assert acc_files >= 0.95 and acc_rendered >= 0.95
    assert {digit_names()[t] for t in truth} == set(range(10))


def test_digits_classifier_cache_round_trip(tmp_path_factory):
    """The cached 16-px CNN (shared with tests/test_evaluate.py in a session): reloads to
    the same predictions, and reads all of load_digits, which it was trained on."""
    from pogdiff_dist.data.bundled.digits import NAMES, judge_spec, render_digits
    from pogdiff_dist.evaluation.judges import CNNJudge

    cache = tmp_path_factory.getbasetemp() / "eval_cache"
    spec = judge_spec(list(NAMES), 16)
    a = CNNJudge.load_or_train(cache, spec)
    stem = CNNJudge.cache_stem(cache, spec)
    assert stem.name.startswith("digits_cnn_r16_c1_")
    assert {stem.name + ".json", stem.name + ".safetensors"} <= {p.name for p in cache.iterdir()}
    assert CNNJudge.cache_stem(cache, judge_spec(["Alice Moreau"], 16)) == stem  # same ten classes, same entry
    b = CNNJudge.load_or_train(cache, judge_spec(["Alice Moreau"], 16))
    assert {k: v for k, v in b.info.items() if k != "class_of"} == {
        k: v for k, v in json.loads(stem.with_suffix(".json").read_text()).items() if k != "class_of"}
    images, labels = render_digits(16)
    np.testing.assert_array_equal(a.predict_classes(images), b.predict_classes(images))
    assert np.mean(b.predict_classes(images) == labels) >= 0.97
    # an image of a digit with no identity in the dataset is wrong for every prompt
    pred = b.predict(images[:20], None, ["Alice Moreau"])
    digits = b.predict_classes(images[:20])
    assert all(p == "Alice Moreau" if d == 0 else p.startswith("<") for p, d in zip(pred, digits))


def test_vision_encoder_from_local_dir(tmp_path):
    """A transformers vision model saved to a dir (DINOv2 layout, tiny): pooled, unit-norm."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from pogdiff_dist.evaluation.features import ImageEncoder

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                      image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp_path)
    enc = ImageEncoder(str(tmp_path))
    images = np.random.default_rng(0).integers(0, 255, size=(3, 16, 16, 1), dtype=np.uint8)
    f = enc(images)
    assert f.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="neither"):
        ImageEncoder(str(tmp_path / "missing"))


def test_pixel_encoder_and_identity_seed():
    from pogdiff_dist.evaluation.features import ImageEncoder
    from pogdiff_dist.evaluation.generate import identity_seed

    images = np.random.default_rng(0).integers(0, 255, size=(2, 8, 8, 1), dtype=np.uint8)
    f = ImageEncoder("pixels")(images)
    x = images.reshape(2, -1).astype(np.float32) / 127.5 - 1
    x = x - x.mean(1, keepdims=True)
    np.testing.assert_allclose(f, x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert identity_seed(0, "Alice") == identity_seed(0, "Alice") != identity_seed(0, "Bob")
    assert identity_seed(0, "Alice") != identity_seed(1, "Alice") and 0 <= identity_seed(7, "x") < 2 ** 63


def test_eval_config_validates(tmp_path):
    from pogdiff_dist.config import EvalConfig

    with pytest.raises(ValueError, match="num_images"):
        EvalConfig(num_images=0)
    with pytest.raises(ValueError, match="classifier"):
        EvalConfig(classifier="gpt4o")
    # a folder is checked where the run starts (config validation reads no disk): a relative
    # eval.encoder that names nothing is an error naming the setting, before any work
    from pogdiff_dist.config import load_config
    from pogdiff_dist.runtime import absolute_paths

    assert EvalConfig(encoder="/no/such/dinov2").encoder == "/no/such/dinov2"
    with pytest.raises(ValueError, match="eval.encoder='no/such/dinov2'"):
        absolute_paths(load_config(None, {"eval.encoder": "no/such/dinov2"}), cwd=tmp_path)
