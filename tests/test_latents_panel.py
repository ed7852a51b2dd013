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
