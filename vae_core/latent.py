"""Latent-space geometry for exploring a trained VAE: paths, grids, projections, prior draws.

Pure numpy, no torch: the dashboard builds codes here and decodes them through the
trainer's published weights. Every function returns float32 codes shaped (N, D).
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

DEFAULT_SPAN: tuple[float, float] = (0.05, 0.95)  # probability range of the quantile grids
_PARALLEL_EPS = 1e-4  # below this sin(omega), slerp's weights lose precision: use lerp


def _check_steps(steps: int) -> None:
    if steps < 2:
        raise ValueError(f"a path needs at least 2 steps (its two ends); got {steps}")


def lerp(z0: np.ndarray, z1: np.ndarray, steps: int) -> np.ndarray:
    """Straight line from z0 to z1, both ends included: (steps, D)."""
    _check_steps(steps)
    z0, z1 = np.asarray(z0, np.float64), np.asarray(z1, np.float64)
    t = np.linspace(0.0, 1.0, steps)[:, None]  # (steps, 1)
    return ((1 - t) * z0 + t * z1).astype(np.float32)


def slerp(z0: np.ndarray, z1: np.ndarray, steps: int) -> np.ndarray:
    """Spherical interpolation from z0 to z1, both ends included: (steps, D).

    slerp(t) = sin((1-t)w)/sin(w) z0 + sin(tw)/sin(w) z1, w the angle between z0 and z1
    (Shoemake 1985; White 2016, "Sampling Generative Networks", sec. 2.1). Under a
    Gaussian prior, straight-line midpoints have atypically small norms in high
    dimensions; slerp keeps the norm constant for equal-norm ends. Parallel,
    anti-parallel or zero vectors leave the plane undefined, so those fall back to lerp.
    """
    _check_steps(steps)
    z0, z1 = np.asarray(z0, np.float64), np.asarray(z1, np.float64)
    n0, n1 = np.linalg.norm(z0), np.linalg.norm(z1)
    if n0 == 0 or n1 == 0:
        return lerp(z0, z1, steps)
    cos = np.clip(np.dot(z0, z1) / (n0 * n1), -1.0, 1.0)
    omega = np.arccos(cos)
    sin = np.sin(omega)
    if sin < _PARALLEL_EPS:
        return lerp(z0, z1, steps)
    t = np.linspace(0.0, 1.0, steps)[:, None]  # (steps, 1)
    return (np.sin((1 - t) * omega) / sin * z0 + np.sin(t * omega) / sin * z1).astype(np.float32)


def prior_quantiles(n: int, span: tuple[float, float] = DEFAULT_SPAN) -> np.ndarray:
    """n values of z ~ N(0, 1) at evenly spaced probabilities from span[0] to span[1]: (n,)."""
    lo, hi = span
    if not 0.0 < lo < hi < 1.0:
        raise ValueError(f"span must be probabilities with 0 < low < high < 1; got {span}")
    if n < 1:
        raise ValueError(f"need at least one grid point; got {n}")
    probs = np.linspace(lo, hi, n) if n > 1 else np.array([0.5 * (lo + hi)])
    inv_cdf = NormalDist().inv_cdf
    return np.array([inv_cdf(p) for p in probs], dtype=np.float32)


def prior_quantile_grid(n: int, span: tuple[float, float] = DEFAULT_SPAN) -> np.ndarray:
    """The n x n grid of 2D codes on the prior's quantiles (Kingma & Welling 2014, fig. 4): (n*n, 2).

    Row-major as it is drawn: z1 grows left to right along a row, z2 shrinks from the top row
    to the bottom one (so up is +z2, as on a plot). Equal steps in probability put more
    points where the prior has more mass.
    """
    q = prior_quantiles(n, span)
    z2, z1 = np.meshgrid(q[::-1], q, indexing="ij")  # (n, n) each; row r holds z2 = q[n-1-r]
    return np.stack([z1.ravel(), z2.ravel()], axis=1).astype(np.float32)


def slice_grid(n: int, dims: tuple[int, int], base: np.ndarray,
               span: tuple[float, float] = DEFAULT_SPAN) -> np.ndarray:
    """A 2D slice through latent dims (i, j): `base` with z_i, z_j laid on the quantile grid: (n*n, D).

    Same layout as prior_quantile_grid (z_i along a row, z_j up the columns). `base` (D,)
    holds the other coordinates: zeros (the prior's mean) or an image's code.
    """
    base = np.asarray(base, dtype=np.float32).reshape(-1)
    i, j = dims
    d = base.shape[0]
    if i == j or not (0 <= i < d and 0 <= j < d):
        raise ValueError(f"dims must be two different indices below the latent size {d}; got {dims}")
    grid = prior_quantile_grid(n, span)  # (n*n, 2)
    z = np.repeat(base[None, :], n * n, axis=0)
    z[:, i], z[:, j] = grid[:, 0], grid[:, 1]
    return z


def pca_basis(x: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Principal axes of the rows of x (N, D): (mean (D,), axes (k, D), explained_variance_ratio (k,)).

    Project with (x - mean) @ axes.T. Ratios are out of the total variance over all D axes.
    Signs are fixed so each axis' largest loading is positive, which keeps the picture from
    flipping between calls on similar data. Axes beyond the rank of x are zero.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < k:
        raise ValueError(f"PCA to {k} axes needs an (N, D) array with D >= {k}; got shape {x.shape}")
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)  # x - mean = U diag(s) Vt
    axes = np.zeros((k, x.shape[1]))
    axes[:len(vt[:k])] = vt[:k]  # rows are principal directions, by decreasing variance
    signs = np.sign(axes[np.arange(k), np.abs(axes).argmax(axis=1)])
    axes *= np.where(signs == 0, 1.0, signs)[:, None]
    var = np.zeros(k)
    var[:len(s[:k])] = s[:k] ** 2
    total = (s ** 2).sum()
    return mean, axes, var / total if total > 0 else var


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of x (N, D), D >= 2, on their first two principal axes: (coords (N, 2), explained_variance_ratio (2,))."""
    mean, axes, ratio = pca_basis(x, 2)
    coords = (np.asarray(x, dtype=np.float64) - mean) @ axes.T  # (N, 2)
    return coords.astype(np.float32), ratio


def prior_samples(n: int, d: int, temperature: float = 1.0, seed: int = 0) -> np.ndarray:
    """n codes z = T * eps, eps ~ N(0, I_d): draws from N(0, T^2 I), reproducible by seed: (n, d)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    eps = np.random.default_rng(seed).standard_normal((n, d))  # (n, d)
    return (temperature * eps).astype(np.float32)
