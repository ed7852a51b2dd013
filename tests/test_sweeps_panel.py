"""The Sweeps tab through AppTest: launch from the sidebar's settings, runs arriving, the map, open, cancel.

The sweep trains real tiny runs in their own processes (lab.start_sweep), so the page test is
marked slow; it polls `at.run()` against generous deadlines, as a browser's refresh would.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from dashboard.panels import sweeps as panel
from dashboard.state import get_lab
from tests.helpers import poll_until
from vae_core import runs
from vae_core.sweep import PointStatus

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
TINY = {"cfg_train_size": 512, "cfg_batch_size": 64, "cfg_hidden_dim": 64, "cfg_evidence_every": 0, "cfg_epochs": 1}


def test_map_cells_average_seeds_and_leave_unmeasured_cells_empty():
    pts = (PointStatus("s-b1-z2-s0", 1.0, 2, 0, "finished", kl=3.0, active_units=2),
           PointStatus("s-b1-z2-s1", 1.0, 2, 1, "finished", kl=5.0, active_units=1),
           PointStatus("s-b4-z2-s0", 4.0, 2, 0, "running"), PointStatus("s-b4-z2-s1", 4.0, 2, 1, "pending"),
           PointStatus("s-b1-z8-s0", 1.0, 8, 0, "finished", kl=float("nan")),
           PointStatus("s-b1-z8-s1", 1.0, 8, 1, "pending"),
           PointStatus("s-b4-z8-s0", 4.0, 8, 0, "pending"), PointStatus("s-b4-z8-s1", 4.0, 8, 1, "pending"))
    status = SimpleNamespace(betas=(1.0, 4.0), latent_dims=(2, 8), points=pts)
    z, text = panel.cell_values(status, "kl")
    assert z == [[4.0, None], [None, None]]  # rows: D=2, D=8; columns: β=1, β=4; NaN is no number
    assert text == [["4.00", panel.MISSING], [panel.MISSING, panel.MISSING]]
    assert panel.cell_values(status, "active_units")[1][0][0] == "1.5 / 2"
    assert panel.cell_run(status, 4.0, 2) == "s-b4-z2-s0" and panel.cell_run(status, 4.0, 8) is None


@pytest.fixture
def sweeps_tab(runs_dir):
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["sid"] = "sweeper01"
    at.run()
    at.session_state["main_tab"] = panel.TITLE
    for key, value in TINY.items():
        at.session_state[key] = value
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    yield at
    for s in get_lab().list_sweeps():
        if s.state == "running":
            get_lab().cancel_sweep(s.id)
    get_lab().shutdown()
    st.cache_resource.clear()


def start(at: AppTest, betas: list[float], latents: list[int]) -> str:
    at.multiselect(key=panel.K + "betas").set_value(betas)
    at.multiselect(key=panel.K + "latents").set_value(latents)
    at.button(key=panel.K + "start").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert "Started sweep" in " ".join(s.value for s in at.success), [e.value for e in at.error]
    return at.selectbox(key=panel.K + "pick").value


@pytest.mark.slow
def test_a_sweep_launched_from_the_page_fills_its_map_and_opens_its_runs(sweeps_tab, runs_dir):
    at = sweeps_tab
    sid = start(at, [0.5, 2.0], [2])
    lab = get_lab()
    st0 = lab.sweep_status(sid)
    assert st0.owner == at.session_state["_sid"] and len(st0.points) == 2
    poll_until(lambda: at.run() and lab.sweep_status(sid).state == "finished", 180, "the sweep to finish")
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    status = lab.sweep_status(sid)
    rows = at.dataframe[0].value  # the only table on this tab (a table without on_select keeps no key)
    assert list(rows["State"]) == ["finished", "finished"]
    for p in status.points:  # the table's numbers are each run's last test row, with the run's base settings
        last = runs.read_metrics_tail(runs_dir / p.name)[-1]
        assert rows.loc[rows["Run"] == p.name, "Test ELBO"].item() == f"{last['elbo']:.2f}"
        cfg = runs.read_config(runs_dir / p.name)
        assert (cfg.model.hidden_dim, cfg.train.train_size, cfg.train.beta) == (64, 512, p.beta)
    charts = [c.proto.spec for c in at.get("plotly_chart")]
    assert len(charts) == 2 and '"heatmap"' in charts[0]
    assert json.loads(charts[0])["data"][0]["text"] == [[f"{p.test_elbo:.2f}" for p in status.points]]
    at.segmented_control(key=panel.K + "map").set_value("Active units").run()
    text = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["text"]  # Plotly escapes "/" in JSON
    assert text == [[f"{p.active_units} / 2" for p in status.points]]
    at.button(key=f"{panel.K}open_2_2").click().run()
    assert lab.current_name(at.session_state["_sid"]) == f"{sid}-b2-z2"


@pytest.mark.slow
def test_cancel_stops_a_running_sweep_from_the_page(sweeps_tab, runs_dir):
    at = sweeps_tab
    at.session_state["cfg_epochs"] = 50
    sid = start(at, [0.5, 1.0, 2.0], [2, 4])
    lab = get_lab()
    poll_until(lambda: at.run() and lab.sweep_status(sid).count("running"), 120, "a run of the sweep to train")
    at.button(key=panel.K + "cancel").click().run()
    assert "Cancelling" in " ".join(i.value for i in at.info)
    poll_until(lambda: lab.sweep_status(sid).state == "cancelled", 120, "the sweep to end cancelled")
    status = lab.sweep_status(sid)
    assert status.count("finished") < len(status.points)
    for p in status.points:  # no run keeps training
        if p.state != "pending":
            assert runs.training_reason(runs_dir / p.name) is None
    at.run()
    assert not at.exception
    assert any("--resume" in c.value for c in at.caption)
