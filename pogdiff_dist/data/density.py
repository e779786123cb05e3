"""Text-density weights psi_den from a small VAE on the pooled text embeddings (Eq. 10-11 of PoGDiff).

A sample whose caption embedding y lies in a sparse region of text space (a minority
identity) has a low evidence lower bound, ELBO(y) <= log p(y), and Eq. 11 gives it a large
weight psi_den = exp(-ELBO) / a3. For real embeddings -ELBO is hundreds of nats, so
exp(-ELBO) overflows; we store log-weights and self-normalise instead:

    log(a3 * psi_den_i) = -ELBO_i / T - logmeanexp_j(-ELBO_j / T)

so exp(log_w) averages to exactly 1 over the dataset and psi_den averages to 1 / a3
(:func:`pogdiff_dist.losses.psi_den`, what the training step uses). The
normalisation only rescales a3, which is a free hyperparameter anyway. T = 1 is Eq. 11;
T > 1 (a temperature on -ELBO) compresses the dynamic range of psi_den and is a departure
from the paper, off unless chosen (untempered ELBO spreads of 30-150 nats put nearly all
of the psi_den mass on one sample; see METHOD.md).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from pogdiff_dist.data.columns import ArrayRows, RowSource

_FORMAT = "pogdiff_dist.TextDensityVAE/1"
# Floor on the decoder's learned variance (standardised units): without it a dimension the
# decoder predicts exactly (e.g. a constant one) drives log-variance, and the ELBO, to infinity.
_MIN_DECODER_LOGVAR = math.log(1e-4)
# Rows held (and shuffled together) at a time by the streamed fit: 64k x 512 float32 is 128 MiB.
DEFAULT_BUFFER_ROWS = 65536


@dataclass(frozen=True)
class DensityVAEConfig:
    """Architecture and training schedule of the text-density VAE."""

    latent_dim: int = 16
    hidden_dim: int = 256
    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("latent_dim", "hidden_dim", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DensityVAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"DensityVAEConfig.lr must be > 0, got {self.lr}")


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d_out))


class TextDensityVAE(nn.Module):
    """Gaussian VAE on standardised text embeddings; its ELBO is the density score of Eq. 10.

    Encoder: MLP -> (mu, logvar) of q(z | u). Decoder: MLP -> mean of p(u | z) = N(mean,
    diag(exp(log_var))) with a learned global per-dimension log-variance. u = (y - x_mean) /
    x_std, with the statistics held as buffers so a saved state_dict is self-contained.
    """

    def __init__(self, input_dim: int, cfg: DensityVAEConfig = DensityVAEConfig()) -> None:
        super().__init__()
        self.input_dim, self.cfg = input_dim, cfg
        self.encoder = _mlp(input_dim, cfg.hidden_dim, 2 * cfg.latent_dim)
        self.decoder = _mlp(cfg.latent_dim, cfg.hidden_dim, input_dim)
        self.log_var = nn.Parameter(torch.zeros(input_dim))
        self.register_buffer("x_mean", torch.zeros(input_dim))
        self.register_buffer("x_std", torch.ones(input_dim))

    def set_standardisation(self, y: torch.Tensor) -> None:
        """Fit the input mean/std buffers on training data y [N, D] (constant dims keep std 1)."""
        self.set_moments(y.mean(dim=0), y.std(dim=0))

    def set_moments(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the input mean/std buffers from precomputed moments (constant dims keep std 1)."""
        self.x_mean.copy_(mean)
        self.x_std.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def elbo(self, y: torch.Tensor, n_samples: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample ELBO in nats [N] of y [N, D] (Eq. 10).

        E_q[log N(u; dec(z), diag(exp(log_var)))] - KL(q(z | u) || N(0, I)) on the standardised
        input u, including the -D/2 log(2 pi) constant. In training mode the expectation uses
        ``n_samples`` reparameterised draws; in eval mode z = mu (deterministic), so stored
        values are reproducible.
        """
        u = (y - self.x_mean) / self.x_std
        mu, logvar = self.encoder(u).chunk(2, dim=-1)
        logvar = logvar.clamp(-20.0, 10.0)
        if self.training:
            eps = torch.randn((n_samples, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + (0.5 * logvar).exp() * eps  # [S, N, L]
        else:
            z = mu.unsqueeze(0)
        dec_logvar = self.log_var.clamp(min=_MIN_DECODER_LOGVAR)
        sq = (u - self.decoder(z)).square() * (-dec_logvar).exp()
        log_lik = -0.5 * (sq + dec_logvar + math.log(2 * math.pi)).sum(-1).mean(0)
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1)
        return log_lik - kl


def _validated(pooled: np.ndarray) -> np.ndarray:
    pooled = np.asarray(pooled)
    if pooled.ndim != 2 or pooled.shape[0] < 2 or pooled.shape[1] < 1:
        raise ValueError(f"pooled must be 2-D [N, D] with N >= 2, got shape {pooled.shape}")
    bad = np.flatnonzero(~np.isfinite(pooled).all(axis=1))
    if bad.size:
        raise ValueError(f"pooled text embeddings have a NaN/Inf value in row {int(bad[0])}")
    return np.ascontiguousarray(pooled, dtype=np.float32)


def _as_source(pooled: np.ndarray | RowSource) -> RowSource:
    """An in-memory [N, D] array (validated up front) or a streamed row source as-is."""
    if isinstance(pooled, np.ndarray) or not hasattr(pooled, "chunks"):
        return ArrayRows(_validated(pooled))
    if pooled.n_rows < 2 or pooled.dim < 1:
        raise ValueError(f"pooled must be 2-D [N, D] with N >= 2, got {pooled.n_rows} rows of dim {pooled.dim}")
    return pooled


def _float_chunk(index: np.ndarray, values: np.ndarray) -> np.ndarray:
    values = np.require(values, np.float32, ["C", "W"]).reshape(len(index), -1)  # torch wants writable
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if bad.size:
        raise ValueError(f"pooled text embeddings have a NaN/Inf value in row {int(index[bad].min())}")
    return values


def streamed_moments(source: RowSource) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and unbiased std of every row of ``source``, in one pass.

    Chunks are merged with Chan et al.'s pairwise update in float64, so the result does not
    depend on how the rows are chunked beyond rounding."""
    n, mean, m2 = 0, np.zeros(source.dim), np.zeros(source.dim)
    for index, values in source.chunks():
        v = _float_chunk(index, values).astype(np.float64)
        c, c_mean = len(v), v.mean(axis=0)
        c_m2 = np.square(v - c_mean).sum(axis=0)
        delta = c_mean - mean
        total = n + c
        mean = mean + delta * (c / total)
        m2 = m2 + c_m2 + np.square(delta) * (n * c / total)
        n = total
    assert n == source.n_rows, f"the source yielded {n} rows, not {source.n_rows}"
    std = np.sqrt(m2 / (n - 1))
    # a constant dimension's merged m2 can be a rounding residue rather than 0: keep its std 1
    std[std <= 1e-6 * np.abs(mean)] = 0.0
    return mean, std


def shuffled_buffers(source: RowSource, buffer_rows: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """One epoch of ``source`` as buffers of ``buffer_rows`` rows (the last may be smaller).

    The pieces are visited in an ``rng``-shuffled order and cut into buffers; each buffer
    is sorted by sample index, for the caller to permute. So with N <= buffer_rows an epoch
    is one buffer holding the whole dataset in index order, however it is stored, and the
    fit is the same as over the in-memory array; beyond that, rows mix within a buffer
    and across the pieces that fill it."""
    pending_idx: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    count = 0

    def take(rows: int) -> np.ndarray:
        nonlocal pending_idx, pending, count
        idx, val = np.concatenate(pending_idx), np.concatenate(pending)
        pending_idx, pending, count = [idx[rows:]], [val[rows:]], len(idx) - rows
        order = np.argsort(idx[:rows], kind="stable")
        return val[:rows][order]

    for index, values in source.chunks(rng):
        pending_idx.append(np.asarray(index, dtype=np.int64))
        pending.append(_float_chunk(index, values))
        count += len(index)
        while count >= buffer_rows:
            yield take(buffer_rows)
    if count:
        yield take(count)


def fit_density_vae(pooled: np.ndarray | RowSource, cfg: DensityVAEConfig = DensityVAEConfig(),
                    progress: bool = False, device: torch.device | str = "cpu",
                    buffer_rows: int = DEFAULT_BUFFER_ROWS) -> TextDensityVAE:
    """Train the density VAE on pooled text embeddings [N, D] by maximising the mean ELBO (Adam).

    ``pooled`` is an in-memory array or a streamed :class:`~pogdiff_dist.data.columns.RowSource`
    (e.g. a column of the encoded Parquet): the standardisation comes from one streamed pass
    (:func:`streamed_moments`), and each of the ``cfg.epochs`` epochs is one pass over the
    data in shuffled buffers of ``buffer_rows`` rows (:func:`shuffled_buffers`), each
    permuted and cut into mini-batches of ``cfg.batch_size``. At most ``buffer_rows`` rows
    are held at a time; a dataset that fits in one buffer is shuffled as a whole each epoch.

    Seeded: initialisation, shuffling and reparameterisation noise depend only on ``cfg.seed``
    (the global torch RNG is left untouched; the draws differ between CPU and CUDA, each
    reproducible). The model and the generator live on ``device``; the model is returned
    there, in eval mode.
    """
    if buffer_rows < 1:
        raise ValueError(f"buffer_rows must be >= 1, got {buffer_rows}")
    device = torch.device(device)
    source = _as_source(pooled)
    mean, std = streamed_moments(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = TextDensityVAE(source.dim, cfg)
    model.to(device)
    model.set_moments(torch.from_numpy(mean).float(), torch.from_numpy(std).float())
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    bar = tqdm(range(cfg.epochs), desc="density vae", unit="epoch", disable=not progress)
    for epoch in bar:
        total = 0.0
        # the piece order has its own generator, so the torch draws do not depend on the chunking
        for buffer in shuffled_buffers(source, buffer_rows, np.random.default_rng([cfg.seed, epoch])):
            y = torch.from_numpy(buffer).to(device)
            perm = torch.randperm(len(y), generator=gen, device=device)
            for start in range(0, len(y), cfg.batch_size):
                batch = y[perm[start : start + cfg.batch_size]]
                loss = -model.elbo(batch, generator=gen).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(batch)
        bar.set_postfix(neg_elbo=f"{total / source.n_rows:.2f}")
    return model.eval()


@torch.no_grad()
def compute_elbo(model: TextDensityVAE, pooled: np.ndarray | RowSource, batch_size: int = 4096) -> np.ndarray:
    """Deterministic (eval-mode) ELBO of every row of pooled [N, D] (an array or a streamed
    row source, whose rows land at their sample index), as float64 [N]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    source = _as_source(pooled)
    device = model.x_mean.device
    was_training = model.training
    model.eval()
    out = np.full(source.n_rows, np.nan)
    for index, values in source.chunks():
        y = torch.from_numpy(_float_chunk(index, values))
        if len(index) and (index.min() < 0 or index.max() >= source.n_rows):
            raise ValueError(f"row source index out of range 0..{source.n_rows - 1}")
        for s in range(0, len(y), batch_size):
            out[index[s : s + batch_size]] = model.elbo(y[s : s + batch_size].to(device)).double().cpu().numpy()
    model.train(was_training)
    missing = np.flatnonzero(np.isnan(out))
    if missing.size:
        raise ValueError(f"row source left sample {int(missing[0])} without a row (indices must be 0..N-1)")
    return out


def save_density_vae(model: TextDensityVAE, path: str | os.PathLike) -> None:
    """Write weights and standardisation buffers as safetensors, the config in its metadata (no pickle)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": _FORMAT, "input_dim": json.dumps(model.input_dim), "config": json.dumps(asdict(model.cfg))}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_density_vae(path: str | os.PathLike) -> TextDensityVAE:
    """Inverse of :func:`save_density_vae`; returns the model in eval mode, on CPU."""
    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a saved TextDensityVAE (format {metadata.get('format')!r})")
    model = TextDensityVAE(json.loads(metadata["input_dim"]), DensityVAEConfig(**json.loads(metadata["config"])))
    model.load_state_dict(load_file(path))
    return model.eval()
