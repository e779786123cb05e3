"""Text-density VAE (Eq. 10) and self-normalised log-weights (Eq. 11)."""

import json
import struct

import numpy as np
import pytest
from safetensors import safe_open

from pogdiff_dist.data.density import (
    DensityVAEConfig,
    compute_elbo,
    fit_density_vae,
    load_density_vae,
    save_density_vae,
)


def log_density_weights(elbo, temperature=1.0):
    """log(a3 * psi_den) as the training step computes it (pogdiff_dist.losses, Eq. 11)."""
    import torch

    from pogdiff_dist.losses import log_density_normaliser, psi_den

    e = torch.from_numpy(np.asarray(elbo, dtype=np.float64))
    return psi_den(e, log_density_normaliser(e, temperature), a3=1.0, den_temperature=temperature).log().numpy()

CFG = DensityVAEConfig(latent_dim=4, hidden_dim=32, epochs=60, batch_size=64, seed=3)



@pytest.fixture(scope="module")
def fitted(cluster_and_outliers):
    return fit_density_vae(cluster_and_outliers, CFG)


def test_dense_cluster_has_higher_elbo(cluster_and_outliers, fitted):
    elbo = compute_elbo(fitted, cluster_and_outliers, batch_size=100)
    assert elbo.shape == (305,) and elbo.dtype == np.float64 and np.isfinite(elbo).all()
    assert elbo[:300].mean() > elbo[300:].max() + 5.0  # clear margin in nats
    log_w = log_density_weights(elbo)
    assert log_w[300:].min() > log_w[:300].mean()  # outliers get the large psi_den


def test_fit_is_deterministic(cluster_and_outliers, fitted):
    again = fit_density_vae(cluster_and_outliers, CFG)
    np.testing.assert_array_equal(compute_elbo(fitted, cluster_and_outliers), compute_elbo(again, cluster_and_outliers))


def test_save_load_round_trip(tmp_path, cluster_and_outliers, fitted):
    path = tmp_path / "density.safetensors"
    save_density_vae(fitted, path)
    loaded = load_density_vae(path)
    np.testing.assert_array_equal(compute_elbo(loaded, cluster_and_outliers), compute_elbo(fitted, cluster_and_outliers))
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header size + JSON header, no pickle
    assert json.loads(raw[8 : 8 + header_len])["__metadata__"]["format"].startswith("pogdiff_dist.TextDensityVAE")
    assert not raw.startswith(b"\x80") and b"PK\x03\x04" not in raw[:8]
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["config"]) == {"latent_dim": 4, "hidden_dim": 32, "epochs": 60, "batch_size": 64, "lr": 1e-3, "seed": 3}
        assert {"x_mean", "x_std"} <= set(f.keys())


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_log_weights_self_normalised(temperature):
    elbo = np.random.default_rng(1).normal(-500.0, 40.0, size=1000)  # exp(-ELBO) overflows float64
    log_w = log_density_weights(elbo, temperature)
    assert log_w.dtype == np.float64 and np.isfinite(log_w).all()
    assert abs(np.exp(log_w).mean() - 1.0) < 1e-9
    spread_1 = np.ptp(log_density_weights(elbo, 1.0))
    np.testing.assert_allclose(np.ptp(log_w), spread_1 / temperature, rtol=1e-12)
    np.testing.assert_array_equal(np.argsort(log_w), np.argsort(-elbo))  # lower ELBO -> larger weight


def test_validation():
    from pogdiff_dist.config import LossConfig

    with pytest.raises(ValueError, match="den_temperature"):
        LossConfig(den_temperature=0.0)
    with pytest.raises(ValueError, match="N >= 2"):
        fit_density_vae(np.zeros((1, 4), np.float32), CFG)
    with pytest.raises(ValueError, match="2-D"):
        fit_density_vae(np.zeros(4, np.float32), CFG)
    bad = np.zeros((5, 4), np.float32)
    bad[2, 0] = np.inf
    with pytest.raises(ValueError, match="row 2"):
        fit_density_vae(bad, CFG)
    with pytest.raises(ValueError, match="epochs"):
        DensityVAEConfig(epochs=0)
