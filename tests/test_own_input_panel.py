"""The own-input panel's geometry: q's ellipse (also projected) and the posterior's highest-density level."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dashboard.panels.own_input import MASS, ellipse, hpd_level
from vae_core import latent


def inside(points: np.ndarray, mean: np.ndarray, cov: np.ndarray, sigmas: float = 2.0) -> np.ndarray:
    d = points - mean
    return np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d) <= sigmas ** 2


def test_the_2_sigma_ellipse_of_a_projected_q_holds_its_share_of_projected_draws():
    rng = np.random.default_rng(0)
    codes = rng.standard_normal((500, 6)) * np.array([3, 2, 1, 0.5, 0.2, 0.1])  # the test codes to project on
    mean, axes, _ = latent.pca_basis(codes)
    mu, var = rng.standard_normal(6), np.exp(rng.standard_normal(6))
    draws = mu + rng.standard_normal((20_000, 6)) * np.sqrt(var)  # z ~ q(z|x)
    xy = (draws - mean) @ axes.T
    m2, c2 = (mu - mean) @ axes.T, axes @ np.diag(var) @ axes.T  # what the panel draws
    assert np.mean(inside(xy, m2, c2)) == pytest.approx(MASS, abs=0.01)
    boundary = ellipse(m2, c2)
    r2 = np.einsum("ni,ij,nj->n", boundary - m2, np.linalg.inv(c2), boundary - m2)
    assert np.allclose(r2, 4.0)  # every boundary point is at Mahalanobis distance 2


def test_hpd_level_of_a_gaussian_grid_is_its_2_sigma_density():
    z = np.linspace(-8, 8, 401)
    z1, z2 = np.meshgrid(z, z)
    log_density = -0.5 * (z1 ** 2 / 4 + z2 ** 2)  # N(0, diag(4, 1)), unnormalised
    level = hpd_level(log_density, MASS)
    assert level == pytest.approx(math.exp(-2.0), rel=0.03)  # density at Mahalanobis distance 2, relative to peak
