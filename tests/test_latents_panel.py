"""The Latents tab's pieces that need no server: the GIF export and the charts' inputs."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dashboard.panels import latents
from vae_core.disentangle import Traversal


def test_traversal_gif_sweeps_every_row_forth_and_back():
    d, s = 3, 5
    images = np.zeros((d, s, 28, 28), np.float32)
    for i in range(s):
        images[:, i, :, :i + 1] = 1.0  # column i lights i + 1 pixel columns
    tr = Traversal(images, np.array([2, 0, 1]), np.array([2.0, 1.0, 0.01]), np.array([False, False, True]),
                   np.linspace(-1, 1, s), np.zeros(d), 7)
    gif = Image.open(io.BytesIO(latents.traversal_gif(tr)))
    assert gif.format == "GIF" and gif.n_frames == 2 * s - 2  # 0..4 then 3..1
    assert gif.size == ((3 * 28 + 2) * latents.SCALE, 28 * latents.SCALE)
    lit = []
    for f in range(gif.n_frames):
        gif.seek(f)
        frame = np.asarray(gif.convert("L"))
        lit.append(int((frame[:, :28 * latents.SCALE] > 128).any(0).sum() // latents.SCALE))
    assert lit == [1, 2, 3, 4, 5, 4, 3, 2]
    gif.seek(0)
    collapsed_tile = np.asarray(gif.convert("L"))[:, -28 * latents.SCALE:]
    assert collapsed_tile.max() < 200 and collapsed_tile.min() > 50  # greyed: pulled toward mid-grey


def test_charts_take_the_disentangle_rows():
    rows = [{"epoch": e, "split": "disentangle", "mig": 0.1 * e, "dci_disentanglement": 0.2, "dci_completeness": 0.3,
             "dci_informativeness": 0.4, "tc_mi": 1.0, "tc_tc": 0.5, "tc_dwkl": 0.2, "tc_kl": 1.7} for e in (1, 2)]
    train = [{"epoch": 0.5, "split": "train", "beta": 4.0, "beta_effective": 2.0}]
    fig = latents.scores_figure(rows, train)
    assert [t.name for t in fig.data][-1] == "β" and list(fig.data[-1].y) == [2.0]
    assert list(latents.kl_terms_figure(rows).data[-1].y) == [1.7, 1.7]


def test_traversal_and_its_gif_on_colour_64_by_64_images():
    from vae_core.disentangle import traversal

    d, s = 2, 4
    mu, logvar = np.array([[2.0, 0.0], [-2.0, 0.0]]), np.zeros((2, 2))

    def decode(z):  # (M, D) -> (M, 64, 64, 3): red follows z0, green follows z1
        out = np.zeros((len(z), 64, 64, 3), np.float32)
        out[..., 0] = (z[:, 0, None, None] > 0)
        out[..., 1] = (z[:, 1, None, None] > 0)
        return out

    tr = traversal(mu, logvar, np.zeros(d), decode, steps=s)
    assert tr.images.shape == (d, s, 64, 64, 3) and list(tr.dims) == [0, 1]
    assert tr.images[0, -1, 0, 0, 0] == 1.0 and tr.images[0, 0, 0, 0, 0] == 0.0  # row 0 sweeps z0: red turns on
    gif = Image.open(io.BytesIO(latents.traversal_gif(tr)))
    assert gif.size == (2 * 64 + 1, 64) and latents.scale_for(tr.images) == 1  # 64 x 64: not upscaled
