"""The Time-lapse tab through AppTest: the slider offers the run's snapshots, and moving it redraws the
samples, reconstructions, manifold and scatter from that step's weights, with the curves marking it."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from dashboard.panels import timelapse
from vae_core.lab import Lab, RunConfig

K = timelapse.K


def _script(lab, name):
    from dashboard.panels import timelapse

    timelapse.render(lab, lab.open(name))


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_sprites):
    from vae_core import inference

    saved = inference._DATA_CACHE.get(("sprites", None, None, None))
    inference._DATA_CACHE[("sprites", None, None, None)] = tiny_sprites
    lab = Lab(tmp_path_factory.mktemp("timelapse_panel") / "runs", max_runs=2, num_threads=1, log_every=2)
    for name, d in (("z2", 2), ("z4", 4)):
        run = lab.start(RunConfig().replace(epochs=2, batch_size=64, hidden_dim=32, latent_dim=d,
                                            evidence_every=0), name=name)
        run.join(120)
        assert run.status().state == "finished", run.status().message
    yield lab
    lab.shutdown()
    st.cache_data.clear()
    if saved is None:
        inference._DATA_CACHE.pop(("sprites", None, None, None), None)
    else:
        inference._DATA_CACHE[("sprites", None, None, None)] = saved


def app(lab, name: str) -> AppTest:
    at = AppTest.from_function(_script, args=(lab, name), default_timeout=60)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def drawn(at: AppTest) -> tuple[list[str], dict, dict]:
    """The images' URLs, the curves' spec and the scatter's spec."""
    charts = {c.proto.id: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
    curves, scatter = (next(s for i, s in charts.items() if K + w in i) for w in ("curves", "scatter"))
    return [url for img in at.get("image") for url in img.value], curves, scatter


def values(x) -> np.ndarray:
    """A Plotly spec's array: a list, or numpy's bytes as {"dtype", "bdata"} (base64)."""
    if isinstance(x, dict):
        return np.frombuffer(base64.b64decode(x["bdata"]), dtype=x["dtype"])
    return np.asarray(x, dtype=float)


def marked_step(curves: dict) -> float:
    (shape,) = curves["layout"]["shapes"]
    return shape["x0"]


@pytest.mark.parametrize("name", ["z2", "z4"])
def test_the_slider_scrubs_through_training(lab, name):
    steps = lab.snapshots(name)
    assert steps == [0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    at = app(lab, name)
    slider = at.select_slider(key=K + "step")
    assert slider.options == [f"{s:,}" for s in steps] and slider.value == 16  # opens at the last step
    last_images, last_curves, last_scatter = drawn(at)
    assert len(last_images) == 3 and marked_step(last_curves) == 16  # samples, reconstructions, manifold
    slider.set_value(2).run()
    assert not at.exception
    early_images, early_curves, early_scatter = drawn(at)
    assert marked_step(early_curves) == 2
    # Every image is another picture (the media URL names its bytes) and the codes moved.
    assert all(a != b for a, b in zip(early_images, last_images))
    codes = [np.concatenate([values(t["x"]) for t in spec["data"]]) for spec in (early_scatter, last_scatter)]
    assert codes[0].shape == codes[1].shape and not np.allclose(*codes, atol=1e-2)
    assert "at step 2" in " ".join(m.value for m in at.markdown)
    # The arrows walk the snapshots; the first one disables "back".
    at.button(key=K + "prev").click().run()
    assert at.select_slider(key=K + "step").value == 1
    at.button(key=K + "prev").click().run()
    assert at.select_slider(key=K + "step").value == 0 and at.button(key=K + "prev").disabled
    assert "initial weights" in json.dumps(drawn(at)[1]["layout"]["annotations"])
    at.button(key=K + "next").click().run()
    assert at.select_slider(key=K + "step").value == 1


def test_a_run_without_snapshots_says_why(lab):
    run = lab.start(RunConfig().replace(epochs=1, batch_size=64, hidden_dim=32, latent_dim=2, evidence_every=0,
                                        snapshot_budget_mb=0), name="none")
    run.join(120)
    at = app(lab, "none")
    assert "kept no snapshots" in at.info[0].value
    assert not at.get("select_slider")


def test_the_budget_has_a_label_where_settings_are_named():
    """A run opened with another budget than the URL's is named in "Changed since this run started"."""
    from dashboard import settings

    assert set(settings.DEFAULTS) <= set(settings.LABELS)
    run = RunConfig().replace(snapshot_budget_mb=10)
    changed = settings.changed_fields(RunConfig(), run)
    assert changed == ["snapshot_budget_mb"] and settings.LABELS[changed[0]].startswith("Time-lapse")
