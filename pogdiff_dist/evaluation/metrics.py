"""Per-identity metric math on feature arrays: pure numpy/scipy, no models, no I/O.

Every function takes features ``[N, d]`` of one identity's images (generated or real)
and returns numbers, so each can be checked against a closed form or a hand-built case
(tests/test_metrics.py). Features are L2-normalised by the encoders; the functions that
need unit vectors (cosine) normalise again, so raw features are fine too.

Definitions (METHOD.md, "Evaluation"; PoGDiff Sec. 4.1 and Appendix F):

- **FID per identity**: Fréchet distance between Gaussian fits of generated and real
  features, ``|mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_g S_r)^{1/2})``. An identity has a
  handful of images, so its covariances are singular (rank <= n - 1 < d). Two remedies,
  both documented in the JSON: features are first projected on a few principal axes of
  the real features (``fit_projection``; ``EvalConfig.fid_dims``, default 16), and both
  covariances get ``eps * I`` added before the matrix square root (``eps`` = 1e-6 by
  default, far below the variance of the retained axes), which makes them positive
  definite so ``scipy.linalg.sqrtm`` of their product is well defined. The numbers are
  on the scale of unit-norm features, not comparable with Inception-FID values.
- **DINO score**: mean cosine similarity over all (generated, real) pairs.
- **gRecall**: a training image is *covered* if at least one generated image of its
  identity has cosine similarity >= 0.7 to it (inclusive); per identity
  ``#covered / #training images``, and gRecall is the mean over identities.
- **Identity accuracy**: the fraction of generated images a classifier assigns to the
  prompted identity.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from pogdiff_dist.config.evaluation import FID_EPS, GRECALL_THRESHOLD  # defined with Config.eval


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` cosine similarities (float64)."""
    return l2_normalize(a) @ l2_normalize(b).T


# ---- FID ---------------------------------------------------------------------------

def gaussian_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[d]`` and unbiased covariance ``[d, d]`` (zero for a single sample)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"need features [N >= 1, d], got shape {x.shape}")
    mu = x.mean(0)
    if len(x) == 1:
        return mu, np.zeros((x.shape[1], x.shape[1]))
    return mu, np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray,
                     eps: float = FID_EPS) -> float:
    """``|mu1 - mu2|^2 + tr(C1 + C2 - 2 sqrtm(C1 C2))`` with ``C = cov + eps * I``.

    ``eps`` is added always (not only on failure, as pytorch-fid does), so a number never
    depends on whether sqrtm happened to succeed; the identical-sets case stays exactly 0
    up to rounding. Tiny imaginary parts from rounding are dropped; the result is
    clipped at 0 (it is a squared distance).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    eye = np.eye(len(mu1))
    c1 = np.atleast_2d(cov1).astype(np.float64) + eps * eye
    c2 = np.atleast_2d(cov2).astype(np.float64) + eps * eye
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def fid(generated: np.ndarray, real: np.ndarray, eps: float = FID_EPS) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (already projected)."""
    return frechet_distance(*gaussian_fit(generated), *gaussian_fit(real), eps=eps)


def fit_projection(real: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the real features: ``(mean [d], components [k, d])`` with
    ``k = min(dims, d, N - 1)``. Fitted on the real images of every identity, so one
    projection serves all identities and all models evaluated on the same data."""
    real = np.asarray(real, dtype=np.float64)
    mean = real.mean(0)
    _, _, vt = np.linalg.svd(real - mean, full_matrices=False)
    k = max(1, min(dims, real.shape[1], len(real) - 1))
    return mean, vt[:k]


def project(x: np.ndarray, projection: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    mean, components = projection
    return (np.asarray(x, dtype=np.float64) - mean) @ components.T


# ---- DINO score, gRecall, accuracy -------------------------------------------------

def dino_score(generated: np.ndarray, real: np.ndarray) -> float:
    """Mean cosine similarity over all (generated, real) pairs."""
    return float(cosine_matrix(generated, real).mean())


def coverage(similarity: np.ndarray, threshold: float = GRECALL_THRESHOLD) -> np.ndarray:
    """``similarity`` [n_generated, n_train] -> bool [n_train]: training image j is covered
    when some generated image has similarity >= ``threshold`` to it (inclusive)."""
    similarity = np.asarray(similarity)
    if similarity.shape[0] == 0:
        return np.zeros(similarity.shape[1], dtype=bool)
    return (similarity >= threshold).any(axis=0)


def grecall_identity(generated: np.ndarray, train: np.ndarray,
                     threshold: float = GRECALL_THRESHOLD) -> tuple[int, int]:
    """(#covered training images, #training images) for one identity."""
    covered = coverage(cosine_matrix(generated, train), threshold)
    return int(covered.sum()), len(covered)


def identity_accuracy(predicted: list, target) -> float:
    """Fraction of ``predicted`` labels equal to ``target``."""
    if len(predicted) == 0:
        return math.nan
    return float(np.mean([p == target for p in predicted]))


# ---- aggregation ---------------------------------------------------------------------

def mean_over(per_identity: dict[str, dict[str, float]], metric: str, names) -> float | None:
    """Mean of ``metric`` over ``names`` (identities without a finite value are left out);
    None when none has one."""
    values = [per_identity[n][metric] for n in names if n in per_identity]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def summarize(per_identity: dict[str, dict[str, float]], metrics, few) -> dict[str, float | None]:
    """``{"<metric>_all": ..., "<metric>_few": ..., "<metric>_majority": ...}``: averages over
    identities (the paper's all-shot and few-shot columns, and the rest: what a method that
    helps the few-shot identities may cost the others)."""
    few = [n for n in per_identity if n in set(few)]
    out = {}
    for m in metrics:
        out[f"{m}_all"] = mean_over(per_identity, m, list(per_identity))
        out[f"{m}_few"] = mean_over(per_identity, m, few)
        out[f"{m}_majority"] = mean_over(per_identity, m, [n for n in per_identity if n not in set(few)])
    return out
