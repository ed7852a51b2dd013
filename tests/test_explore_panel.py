"""The Explore tab through AppTest: every section renders for latent sizes 1, 2 and 5, and the controls act.

The panel runs in-process against small runs trained by a Lab (AppTest passes the run's handle,
a vae_core.lab.RunHandle, to the script function), so these tests check behaviour a person
sees: images and the scatter appear, controls change what is decoded, picks move the
interpolation ends. The same handle API serves a run followed from its files.
"""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from dashboard.panels import explore
from vae_core import runs
from vae_core.lab import DatasetUnavailable, Lab, RunConfig, RunHandle

K = explore.K


def _script(run):
    from dashboard.panels import explore

    explore.render(run)


def _config(latent_dim: int, **kw) -> RunConfig:
    return RunConfig().replace(**{"epochs": 1, "train_size": 512, "batch_size": 64, "hidden_dim": 64,
                                  "latent_dim": latent_dim, "evidence_every": 0, **kw})


def finish(run: RunHandle, timeout: float = 120.0) -> RunHandle:
    """Wait for a run of this process to end, and check that it finished."""
    run.join(timeout)
    assert run.status().state == "finished", run.status().message
    return run


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("explore") / "runs", num_threads=1, max_runs=4)
    yield lab
    lab.shutdown()


@pytest.fixture(scope="module")
def trained(lab):
    started = {d: lab.start(_config(d), name=f"z{d}") for d in (1, 2, 5)}
    return {d: finish(run) for d, run in started.items()}


def app(run: RunHandle) -> AppTest:
    at = AppTest.from_function(_script, args=(run,), default_timeout=30)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def images(at: AppTest) -> list[tuple[str, str]]:
    """(url, caption) of every st.image, in page order."""
    return [(url, cap) for img in at.get("image") for url, cap in zip(img.value, img.captions)]


def drawn_step(at: AppTest) -> int:
    """The weights' step the prior samples say they were decoded with."""
    return int(re.search(r"weights from step ([\d,]+)", images(at)[0][1]).group(1).replace(",", ""))


def scatter_spec(at: AppTest) -> dict:
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    return json.loads(charts[0].proto.spec)


@pytest.mark.parametrize("d, axes", [(1, ("z1", "shape")), (2, ("z1", "z2")), (5, ("PC1", "PC2"))])
def test_every_section_renders(trained, d, axes):
    at = app(trained[d])
    heads = [h.value for h in at.subheader]
    assert heads == ["Sampling from the prior", "2D latent manifold" if d > 1 else "Latent manifold (one dimension)",
                     "Latent scatter", "Interpolation"]
    imgs = images(at)
    # samples, manifold, linear strip, spherical strip: all PNG (numpy arrays default to JPEG)
    assert len(imgs) == 4
    assert all(url.endswith(".png") for url, _ in imgs)
    assert "draws at T = 1.00" in imgs[0][1]
    assert imgs[2][1].startswith("Linear") and imgs[3][1].startswith("Spherical")
    layout = scatter_spec(at)["layout"]
    assert layout["xaxis"]["title"]["text"].startswith(axes[0])
    assert layout["yaxis"]["title"]["text"].startswith(axes[1])
    page = " ".join(m.value for m in at.markdown)
    if d == 5:
        assert "principal components" in page
        assert at.selectbox(key=K + "manifold_dim_x").value != at.selectbox(key=K + "manifold_dim_y").value
    if d == 1:
        assert "coincide" in " ".join(c.value for c in at.caption)


def test_scatter_points_carry_test_indices_and_labels(trained):
    at = app(trained[2])
    traces = [t for t in scatter_spec(at)["data"] if t.get("customdata") is not None]
    _, y, names = trained[2].test_set()
    assert [t["name"] for t in traces] == list(names)  # one trace per label, named for the legend
    assert all("test image %{customdata}" in t["hovertemplate"] for t in traces)
    assert sum(len(t["x"]) if isinstance(t["x"], list) else 1 for t in traces) > 0


def test_paths_and_ends_take_the_ink_they_are_given():
    """Black paths and rings vanished on the dark page: they are drawn in the colour the theme asks for."""
    mu = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    y = np.arange(50) % 2
    paths = {"linear": mu[:2], "spherical": mu[:2]}
    for ink in (explore.INK["dark"], explore.INK["light"]):
        fig, _ = explore.scatter_figure(mu, y, ("a", "b"), "label", (0, 1), paths, ink=ink)
        drawn = {t.name: t for t in fig.data}
        assert drawn["linear path"].line.color == drawn["spherical path"].line.color == ink
        assert drawn["ends"].marker.line.color == ink and drawn["ends"].textfont.color == ink


def test_sampling_controls_change_the_samples(trained):
    at = app(trained[2])
    first = images(at)[0][0]
    at.slider(key=K + "sample_temp").set_value(0.5).run()
    cooler = images(at)[0][0]
    assert cooler != first
    at.button(key=K + "sample_resample").click().run()
    assert at.number_input(key=K + "sample_seed").value == 1
    assert images(at)[0][0] != cooler
    at.select_slider(key=K + "sample_n").set_value(16).run()
    assert "16 draws at T = 0.50, seed 1" in images(at)[0][1]
    assert not at.exception


def test_manifold_grid_and_span(trained):
    at = app(trained[2])
    before = images(at)[1]
    assert "from -1.64 to 1.64" in before[1]  # the 5% and 95% normal quantiles
    at.select_slider(key=K + "manifold_span").set_value(0.95).run()
    assert "from -1.96 to 1.96" in images(at)[1][1]
    at.slider(key=K + "manifold_n").set_value(5).run()
    assert images(at)[1][0] != before[0]


def test_slice_through_chosen_dimensions_and_an_image_code(trained):
    at = app(trained[5])
    at.selectbox(key=K + "manifold_dim_x").set_value(3).run()
    at.selectbox(key=K + "manifold_dim_y").set_value(0).run()
    assert "across: z4, up: z1" in images(at)[1][1]
    at.selectbox(key=K + "manifold_dim_y").set_value(3).run()
    assert any("two different" in w.value for w in at.warning)
    assert not at.exception
    at.selectbox(key=K + "manifold_dim_y").set_value(1).run()
    at.radio(key=K + "manifold_base").set_value("a test image's code").run()
    at.number_input(key=K + "manifold_base_idx").set_value(7).run()
    assert len(images(at)) == 5  # the chosen test image joins samples, slice and two strips
    assert not at.exception


def test_interpolation_ends_by_index_and_by_label(trained):
    at = app(trained[2])
    _, y, names = trained[2].test_set()
    a, b = explore.default_ends(y)
    assert y[a] != y[b]
    assert at.number_input(key=K + "interp_b").value == b
    at.number_input(key=K + "interp_a").set_value(7).run()
    assert f"**A** = test image 7 ({names[y[7]]})" in " ".join(m.value for m in at.markdown)
    target = names[(y[b] + 1) % len(names)]
    at.selectbox(key=K + "interp_label_b").set_value(target).run()
    new_b = at.number_input(key=K + "interp_b").value
    assert names[y[new_b]] == target
    assert at.selectbox(key=K + "interp_label_b").value is None  # the picker resets for the next jump
    at.selectbox(key=K + "interp_label_b").set_value(target).run()
    assert at.number_input(key=K + "interp_b").value > new_b  # the next image with that label
    at.slider(key=K + "interp_steps").set_value(4).run()
    assert len(images(at)) == 4 and not at.exception


def test_picked_points_become_the_ends():
    event = {"selection": {"points": [{"x": 0.1, "y": 2.0, "customdata": 12},
                                      {"x": 0.0, "y": 0.0},  # a point of no test image (a path line)
                                      {"customdata": [40]}]}}
    assert explore.picked_indices(event) == [12, 40]
    assert explore.picked_indices(None) == []
    assert explore.picked_indices({"selection": {"points": []}}) == []
    assert explore.pick_ends((1, 2), [12, 40]) == (12, 40)  # shift-click: the last two
    assert explore.pick_ends((1, 2), [9]) == (2, 9)  # one click: old B becomes A
    assert explore.pick_ends((1, 2), [2]) == (1, 2)  # clicking B again changes nothing
    assert explore.pick_ends((1, 2), []) == (1, 2)


def test_strip_frames_the_path_with_the_originals():
    first, last = np.zeros((28, 28)), np.ones((28, 28))
    out = explore.strip(first, np.full((5, 28, 28), 0.5), last, target_px=10_000)
    assert out.dtype == np.uint8
    width = 28 + 6 + 5 * 29 - 1 + 6 + 28
    assert out.shape == (28 * 4, width * 4)  # nearest-neighbour upscale, capped at 4x
    assert out[0, 0] == 0 and out[0, -1] == 255 and out[0, 4 * 40] == 128


def test_no_weights_yet_shows_a_message(lab):
    d = runs.create_run_dir(lab.runs_dir, _config(2), name="no-weights")
    runs.write_config(d, _config(2))  # config.json only: a run that has not written its first checkpoint
    run = lab.open(d.name)
    assert run.weights_version() == 0
    at = AppTest.from_function(_script, args=(run,), default_timeout=30).run()
    assert not at.exception
    assert any("no weights yet" in i.value for i in at.info)
    assert not at.get("image")


def test_missing_test_set_keeps_the_decoder_sections(trained, lab, monkeypatch):
    run = Lab(lab.runs_dir).open("z2")  # a fresh handle (its own cache token) on the same weights

    def unavailable(n=None):
        raise DatasetUnavailable("mnist: not downloaded and no network")

    monkeypatch.setattr(run, "test_set", unavailable)
    at = AppTest.from_function(_script, args=(run,), default_timeout=30).run()
    assert not at.exception and not at.error
    assert any("not available" in i.value for i in at.info)
    assert len(images(at)) == 2  # samples and manifold need only the decoder
    assert not at.get("plotly_chart")


def test_works_while_the_run_trains(lab):
    run = lab.start(_config(3, epochs=500), name="training-z3")
    try:
        at = AppTest.from_function(_script, args=(run,), default_timeout=30)
        deadline = time.monotonic() + 60
        while True:  # until the first weights are published
            at.run()
            assert not at.exception
            if at.get("image"):
                break
            assert time.monotonic() < deadline, run.status()
            time.sleep(0.2)
        assert run.status().state == "running"
        version, first = run.weights_version(), drawn_step(at)
        for temp in (0.8, 1.2, 0.9):
            at.slider(key=K + "sample_temp").set_value(temp).run()
            assert not at.exception and len(images(at)) == 4
        deadline = time.monotonic() + 60
        while run.weights_version() == version:  # the weights move on while the page is used
            assert time.monotonic() < deadline, run.status()
            time.sleep(0.1)
        at.slider(key=K + "sample_temp").set_value(1.0).run()
        assert not at.exception and drawn_step(at) > first  # the samples come from the newer weights
    finally:
        lab.stop(run.name, wait=10)
