"""Latent-space geometry against known answers: path ends and norms, normal quantiles, PCA axes."""
from __future__ import annotations

import numpy as np
import pytest

from vae_core.latent import (lerp, pca_2d, pca_basis, prior_quantile_grid, prior_quantiles, prior_samples, slerp,
                             slice_grid)


def test_lerp_ends_and_midpoint():
    z0, z1 = np.array([0.0, 2.0, -4.0]), np.array([2.0, 0.0, 4.0])
    path = lerp(z0, z1, 5)
    assert path.shape == (5, 3) and path.dtype == np.float32
    np.testing.assert_allclose(path[0], z0)
    np.testing.assert_allclose(path[-1], z1)
    np.testing.assert_allclose(path[2], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(np.diff(path, axis=0), np.tile([[0.5, -0.5, 2.0]], (4, 1)))  # even steps


def test_slerp_ends_constant_norm_and_even_angles():
    rng = np.random.default_rng(0)
    z0, z1 = rng.standard_normal(16), rng.standard_normal(16)
    z1 *= np.linalg.norm(z0) / np.linalg.norm(z1)  # equal norms
    path = slerp(z0, z1, 9)
    np.testing.assert_allclose(path[0], z0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(path[-1], z1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), np.linalg.norm(z0), rtol=1e-5)
    unit = path / np.linalg.norm(path, axis=1, keepdims=True)
    angles = np.arccos(np.clip((unit[:-1] * unit[1:]).sum(1), -1, 1))
    np.testing.assert_allclose(angles, angles[0], rtol=1e-3)  # constant angular speed
    # ... while the straight line's midpoint is shorter, the reason slerp exists
    assert np.linalg.norm(lerp(z0, z1, 9)[4]) < 0.9 * np.linalg.norm(z0)


def test_slerp_quarter_circle():
    path = slerp(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 3)
    np.testing.assert_allclose(path[1], [np.sqrt(0.5), np.sqrt(0.5)], atol=1e-6)


@pytest.mark.parametrize("z1", [[2.0, 4.0], [-1.0, -2.0], [0.0, 0.0]])
def test_slerp_falls_back_to_lerp_for_parallel_or_zero(z1):
    z0 = np.array([1.0, 2.0])
    path = slerp(z0, np.array(z1), 4)
    assert np.all(np.isfinite(path))
    np.testing.assert_allclose(path, lerp(z0, np.array(z1), 4), atol=1e-6)


def test_slerp_one_dimensional_codes():
    np.testing.assert_allclose(slerp(np.array([-1.0]), np.array([3.0]), 5)[:, 0], [-1, 0, 1, 2, 3], atol=1e-6)


def test_paths_need_two_steps():
    with pytest.raises(ValueError, match="at least 2"):
        lerp(np.zeros(2), np.ones(2), 1)


def test_prior_quantiles_known_values():
    q = prior_quantiles(3, (0.025, 0.975))
    np.testing.assert_allclose(q, [-1.959964, 0.0, 1.959964], atol=1e-5)
    q = prior_quantiles(11, (0.05, 0.95))
    np.testing.assert_allclose(q, -q[::-1], atol=1e-6)  # symmetric about the mean
    assert np.all(np.diff(q) > 0)
    np.testing.assert_allclose(q[0], -1.644854, atol=1e-5)


@pytest.mark.parametrize("span", [(0.0, 0.9), (0.6, 0.4), (0.1, 1.0)])
def test_prior_quantiles_rejects_bad_span(span):
    with pytest.raises(ValueError, match="span"):
        prior_quantiles(5, span)


def test_prior_quantile_grid_layout():
    n = 4
    grid = prior_quantile_grid(n, (0.1, 0.9))
    q = prior_quantiles(n, (0.1, 0.9))
    assert grid.shape == (n * n, 2)
    rows = grid.reshape(n, n, 2)
    np.testing.assert_allclose(rows[0, :, 0], q)  # z1 grows along a row
    np.testing.assert_allclose(rows[:, 0, 1], q[::-1])  # z2 shrinks down the rows
    np.testing.assert_allclose(grid.mean(0), 0.0, atol=1e-6)  # symmetric grid
    np.testing.assert_allclose(rows[0, -1], [1.2815516, 1.2815516], atol=1e-5)  # top right = (q90, q90)


def test_slice_grid_holds_other_dims_at_base():
    base = np.arange(5, dtype=np.float32)
    z = slice_grid(3, dims=(3, 1), base=base, span=(0.025, 0.975))
    assert z.shape == (9, 5)
    np.testing.assert_array_equal(z[:, [0, 2, 4]], np.tile(base[[0, 2, 4]], (9, 1)))
    np.testing.assert_allclose(z[:, [3, 1]], prior_quantile_grid(3, (0.025, 0.975)))
    with pytest.raises(ValueError, match="different"):
        slice_grid(3, dims=(1, 1), base=base)
    with pytest.raises(ValueError, match="different"):
        slice_grid(3, dims=(0, 5), base=base)


def test_pca_recovers_known_axes_and_ratios():
    rng = np.random.default_rng(1)
    # Independent coordinates with std 3, 2, 1, 0 along a random rotation of R^4.
    stds = np.array([3.0, 2.0, 1.0, 0.0])
    a = rng.standard_normal((20_000, 4)) * stds
    a -= a.mean(0)
    a /= a.std(0) + (stds == 0)  # exact unit variance, then the intended stds
    a *= stds
    rot, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    x = a @ rot.T + np.array([5.0, -1.0, 2.0, 0.5])  # an offset PCA must remove
    coords, ratio = pca_2d(x)
    assert coords.shape == (20_000, 2)
    np.testing.assert_allclose(ratio, [9 / 14, 4 / 14], atol=0.01)
    np.testing.assert_allclose(coords.std(0), [3.0, 2.0], rtol=0.01)
    # The first PC is the hidden first coordinate, up to sign.
    assert abs(np.corrcoef(coords[:, 0], a[:, 0])[0, 1]) > 0.999
    assert abs(np.corrcoef(coords[:, 1], a[:, 1])[0, 1]) > 0.999


def test_pca_of_2d_data_keeps_all_variance_and_is_deterministic():
    x = np.random.default_rng(2).standard_normal((100, 2)) * [2.0, 0.5]
    c1, r1 = pca_2d(x)
    c2, _ = pca_2d(x.copy())
    np.testing.assert_allclose(r1.sum(), 1.0)
    np.testing.assert_array_equal(c1, c2)
    with pytest.raises(ValueError, match="D >= 2"):
        pca_2d(np.zeros((10, 1)))


def test_pca_basis_projects_new_points_like_the_data():
    x = np.random.default_rng(3).standard_normal((200, 6)) * np.arange(1, 7)
    mean, axes, ratio = pca_basis(x)
    coords, ratio2 = pca_2d(x)
    np.testing.assert_allclose((x - mean) @ axes.T, coords, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ratio, ratio2)
    np.testing.assert_allclose(axes @ axes.T, np.eye(2), atol=1e-9)  # orthonormal directions


def test_pca_of_degenerate_data_is_finite():
    for x in (np.ones((1, 3)), np.ones((50, 3))):
        coords, ratio = pca_2d(x)
        assert coords.shape == (len(x), 2)
        assert np.all(np.isfinite(coords)) and np.all(ratio == 0)


def test_prior_samples_temperature_scales_std_and_seed_repeats():
    z1 = prior_samples(20_000, 4, temperature=1.0, seed=3)
    z05 = prior_samples(20_000, 4, temperature=0.5, seed=3)
    assert z1.shape == (20_000, 4) and z1.dtype == np.float32
    np.testing.assert_allclose(z1.std(0), 1.0, atol=0.02)
    np.testing.assert_allclose(z05, 0.5 * z1, rtol=1e-6)  # same noise, scaled
    np.testing.assert_array_equal(prior_samples(8, 4, 1.0, seed=3), prior_samples(8, 4, 1.0, seed=3))
    assert not np.allclose(prior_samples(8, 4, 1.0, seed=3), prior_samples(8, 4, 1.0, seed=4))
    assert np.all(prior_samples(5, 2, 0.0, seed=0) == 0)
