"""A refactor cannot move the numerics silently: a fixed-seed tiny run of every method
reproduces the per-step losses checked in under tests/assets/losses/ (made by make.py there,
which says when to regenerate them). Tolerance: 1e-5 relative (one process, fixed threads,
fixed seeds: the runs are bit-identical on one machine; the margin absorbs another CPU's
summation order)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ASSETS = Path(__file__).resolve().parent / "assets" / "losses"
sys.path.insert(0, str(ASSETS))

from make import METHODS, run_curve


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_reproduces_its_reference_loss_curve(method, synthetic, tmp_path):
    want = json.loads((ASSETS / f"{method}.json").read_text())
    got = run_curve(method, synthetic, tmp_path)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 9))
    for key in ("loss", "loss_denoise", "loss_pog"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-5, atol=1e-7,
                                   err_msg=f"{method} {key}")
    if method in ("pogdiff", "pogdiff_stop", "cbdm", "t2h", "diffrop"):
        assert any(r["loss_pog"] != 0 for r in want)  # the method's own term was active in the reference
