"""Budget advice (pogdiff_dist/budget.py): exposures per image against hand counts, and the
line a run prints when its majority identities are not learned yet."""

import numpy as np

from pogdiff_dist.budget import exposures_per_image, majority_advice, steps_for_exposures

COUNTS = [30, 30, 30, 2, 2, 2, 2, 2, 2, 2]  # Digits-IT2I / Faces-IT2I M: 104 images


def test_exposures_per_image_by_hand():
    # uniform: 104 rows an epoch, 600 steps x 16 = 9600 rows = 92.3 epochs, each image once an epoch
    np.testing.assert_allclose(exposures_per_image(600, 16, COUNTS), np.full(10, 9600 / 104))
    # balanced: each identity 9600 / 10 = 960 rows, spread over its images
    e = exposures_per_image(600, 16, COUNTS, "balanced")
    np.testing.assert_allclose(e, [32] * 3 + [480] * 7)
    # kohya repeats x15 on the 2-image identities, uniform: the same shares as balanced here
    r = [1, 1, 1] + [15] * 7
    np.testing.assert_allclose(exposures_per_image(600, 16, COUNTS, "uniform", repeats=r), e)


def test_steps_for_exposures_inverts_exposures():
    for sampling in ("uniform", "balanced", "power"):
        s = steps_for_exposures(120, 16, COUNTS, sampling, identities=[0, 1, 2])
        assert exposures_per_image(s, 16, COUNTS, sampling)[:3].min() >= 120 - 1e-9
        assert exposures_per_image(s - 1, 16, COUNTS, sampling)[:3].min() < 120


def test_majority_advice_only_when_the_majority_is_not_learned():
    assert majority_advice(0.9, 300, 16, COUNTS) is None
    assert majority_advice(None, 300, 16, COUNTS) is None
    text = majority_advice(0.5, 300, 16, COUNTS, "balanced", exposures=120)
    steps = steps_for_exposures(120, 16, COUNTS, "balanced", identities=[0, 1, 2])
    assert f"optim.max_steps={steps}" in text and "0.50" in text and "balanced" in text
    assert "seen about 16 times" in text  # 300 x 16 / 10 / 30
    late = majority_advice(0.5, 10 * steps, 16, COUNTS, "balanced", exposures=120)
    assert "optim.max_steps" not in late and "learning rate" in late


def test_the_advices_reference_is_the_committed_learning_curve():
    """MAJORITY_EXPOSURES / MAJORITY_REFERENCE_ACCURACY are vanilla's last budget in
    benchmarks/results/reproduce-faces-it2i-cpu/curves-main.json (batch 16, uniform sampling)."""
    import json
    from pathlib import Path

    from pogdiff_dist import budget

    r = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "reproduce-faces-it2i-cpu"
                    / "curves-main.json").read_text())
    last = max(r["budgets"])
    vanilla = r["rows"]["vanilla"]["budgets"][str(last)]["accuracy_majority"]["mean"]
    assert round(vanilla, 3) == budget.MAJORITY_REFERENCE_ACCURACY < budget.MAJORITY_THRESHOLD
    batch = r["local"]["optim.batch_size"]
    assert round(exposures_per_image(last, batch, COUNTS)[0]) == budget.MAJORITY_EXPOSURES
