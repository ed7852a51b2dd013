"""Mosaics and conversions for colour and larger images (vae_core/images.py)."""
from __future__ import annotations

import numpy as np

from vae_core.images import from_display, shrink, tile, to_display


def test_display_layout_round_trips_grey_and_colour():
    rng = np.random.default_rng(0)
    for shape in ((1, 28, 28), (3, 16, 16)):
        x = rng.random((5, *shape)).astype(np.float32)
        d = to_display(x)
        assert d.shape == ((5, 28, 28) if shape[0] == 1 else (5, 16, 16, 3))
        np.testing.assert_array_equal(from_display(d, shape), x)
    assert to_display(np.arange(12).reshape(1, 3, 2, 2))[0, 0, 1].tolist() == [1, 5, 9]  # pixel (0, 1): R, G, B


def test_tile_draws_colour_mosaics_and_shrink_averages_blocks():
    imgs = np.zeros((6, 4, 4, 3), np.uint8)
    imgs[:, :, :, 0] = np.arange(6)[:, None, None] * 40
    m = tile(imgs, ncols=3, pad=1, pad_value=7)
    assert m.shape == (2 * 5 - 1, 3 * 5 - 1, 3)
    assert m[5, 0, 0] == 120 and m[4, 0, 1] == 7  # image 3 at row 1, col 0; a gap row between
    big = np.zeros((2, 64, 64, 3), np.uint8)
    big[:, :, 1::2] = 255  # alternate columns: every 2x2 block averages to half
    small = shrink(big, 32)
    assert small.shape == (2, 32, 32, 3) and np.all(np.abs(small.astype(int) - 128) <= 1)
    assert shrink(big, 64) is big


def test_the_discretized_logistic_is_labelled_a_probability_not_a_density():
    from dashboard.common import units
    from vae_core.config import RunConfig

    label, caveat = units(RunConfig().replace(likelihood="logistic"))
    assert label == "nats per image" and "density" not in caveat
    assert "density" in units(RunConfig().replace(likelihood="gaussian-pixel"))[0]
