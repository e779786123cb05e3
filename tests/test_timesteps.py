"""Flow-matching noise levels against diffusers: the densities of
``compute_density_for_timestep_sampling`` (identical draws for one generator), cosmap against
the density SD3's cosmap loss weighting assumes, the fixed and Flux's resolution-dependent shift
against ``FlowMatchEulerDiscreteScheduler``, and no host read of a device value while drawing."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from pogdiff_dist.losses_flow import flow_t2h_targets
from pogdiff_dist.syncs import HostSyncCounter
from pogdiff_dist.timesteps import (
    TimestepSampling,
    exponential_time_shift,
    flux_mu,
    image_seq_len,
    sample_density,
    shift_sigmas,
)

N = 20_000


@pytest.mark.parametrize("scheme,kw", [("uniform", {}), ("logit_normal", {"logit_mean": 0.0, "logit_std": 1.0}),
                                       ("logit_normal", {"logit_mean": 0.5, "logit_std": 0.8}),
                                       ("mode", {"mode_scale": 1.29}), ("mode", {"mode_scale": 0.5})])
def test_densities_draw_exactly_as_diffusers(scheme, kw):
    ours = sample_density(N, scheme, torch.Generator().manual_seed(3), **kw)
    theirs = compute_density_for_timestep_sampling(scheme, N, logit_mean=kw.get("logit_mean"),
                                                   logit_std=kw.get("logit_std"), mode_scale=kw.get("mode_scale"),
                                                   generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, theirs)
    assert ours.min() >= 0 and ours.max() <= 1


def test_logit_normal_quantiles_match_the_analytic_distribution():
    m, sd = 0.5, 0.8
    s = sample_density(N, "logit_normal", torch.Generator().manual_seed(0), logit_mean=m, logit_std=sd)
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    want = torch.sigmoid(m + sd * math.sqrt(2) * torch.erfinv(2 * q - 1))
    torch.testing.assert_close(torch.quantile(s, q), want, atol=0.01, rtol=0)


def test_cosmap_has_the_density_sd3_cosmap_weighting_assumes():
    """Uniform s weighted by compute_loss_weighting_for_sd3("cosmap") and cosmap-sampled s are
    one distribution: compare the draws' quantiles with the CDF of that weight (integrated)."""
    s = sample_density(N, "cosmap", torch.Generator().manual_seed(1))
    grid = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    density = compute_loss_weighting_for_sd3("cosmap", grid)
    cdf = torch.cumulative_trapezoid(density, grid)
    assert cdf[-1].item() == pytest.approx(1.0, abs=1e-6)  # the weight is a density on [0, 1]
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    want = grid[1:][torch.searchsorted(cdf, q)]
    torch.testing.assert_close(torch.quantile(s.double(), q), want, atol=0.01, rtol=0)
    # deterministic given u: the inverse-CDF map of the SD3 paper
    u = torch.rand(N, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(s, 1 - 1 / (torch.tan(math.pi * u / 2) + 1))


def test_unknown_scheme_is_an_error():
    with pytest.raises(ValueError, match="logit_normal"):
        sample_density(4, "sigma_sqrt")
    with pytest.raises(ValueError, match="logit_normal"):
        TimestepSampling(scheme="beta")


def test_fixed_shift_matches_the_sd3_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)  # its training sigmas are shifted at construction
    grid = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000
    torch.testing.assert_close(shift_sigmas(grid, 3.0), sched.sigmas)
    grid = [float(x) for x in torch.linspace(1.0, 1 / 28, 28)]  # an inference schedule, shifted once
    sched.set_timesteps(sigmas=grid)
    torch.testing.assert_close(shift_sigmas(torch.tensor(grid), 3.0), sched.sigmas[:-1])


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096])
def test_dynamic_shift_matches_flux(seq_len):
    mu = flux_mu(seq_len)
    assert mu == pytest.approx(calculate_shift(seq_len, 256, 4096, 0.5, 1.15), rel=1e-12)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    grid = [float(x) for x in torch.linspace(1.0, 1 / 28, 28)]
    sched.set_timesteps(sigmas=grid, mu=mu)
    ours = exponential_time_shift(torch.tensor(grid), mu)
    torch.testing.assert_close(ours, sched.sigmas[:-1])
    torch.testing.assert_close(ours, shift_sigmas(torch.tensor(grid), math.exp(mu)))  # = a fixed shift of exp(mu)


def test_sampling_reads_the_scheduler_config():
    sd3 = TimestepSampling.from_scheduler_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert sd3.shift == 3.0 and not sd3.dynamic_shift and sd3.scheme == "logit_normal"
    flux = TimestepSampling.from_scheduler_config(
        FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, max_shift=1.2).config, scheme="uniform")
    assert flux.dynamic_shift and flux.max_shift == 1.2 and flux.scheme == "uniform"

    g = lambda: torch.Generator().manual_seed(7)
    u = sample_density(64, "logit_normal", g())
    torch.testing.assert_close(sd3.sample(64, g()), shift_sigmas(u, 3.0))
    seq = image_seq_len(64, 64)  # a 512 px Flux image: 64 x 64 latent, 2 x 2 patches
    assert seq == 1024
    torch.testing.assert_close(flux.sample(64, g(), seq_len=seq),
                               exponential_time_shift(sample_density(64, "uniform", g()), flux.mu(seq)))
    assert torch.equal(flux.sample(64, g(), seq_len=seq), flux.sample(64, g(), seq_len=seq))  # seeded
    with pytest.raises(ValueError, match="sequence length"):
        flux.sample(4, g())
    with pytest.raises(ValueError, match="shift"):
        TimestepSampling(shift=0.0)


def test_draws_and_flow_t2h_never_read_the_device_on_the_host():
    configs = [TimestepSampling(scheme=s) for s in ("uniform", "logit_normal", "mode", "cosmap")]
    configs += [TimestepSampling(shift=3.0), TimestepSampling(dynamic_shift=True)]
    with HostSyncCounter() as counter:
        g = torch.Generator().manual_seed(0)
        for cfg in configs:
            s = cfg.sample(8, g, seq_len=1024)
        x0, eps = torch.randn(8, 4, 4, 4, generator=g), torch.randn(8, 4, 4, 4, generator=g)
        x_t = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
        flow_t2h_targets(x0, x_t, eps - x0, s, torch.zeros(8), g)
    assert not counter.events, counter.events
    with HostSyncCounter() as control:  # the counter sees a read when there is one
        configs[0].sample(8, g).max().item()
    assert control.events
