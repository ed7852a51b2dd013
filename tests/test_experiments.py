"""The guided experiments: Lab.after chains a fork, the outcome text follows the measured numbers, and the tab
runs an experiment end to end (AppTest)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from dashboard.panels import experiments
from dashboard.state import get_lab
from helpers import poll_until
from vae_core.lab import Lab

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
TINY = {"train_size": 512, "hidden_dim": 64, "batch_size": 64}


def row(elbo: float, kl: float, au: int) -> dict:
    return {"split": "test", "elbo": elbo, "recon": elbo + kl, "kl": kl, "active_units": au}


# ------------------------------------------------------------------ the text follows the numbers

def test_beta_outcome_explains_what_the_run_showed_and_says_when_it_did_not():
    shown = experiments.beta_outcome({"β = 1": row(-60, 12, 8), "then β = 8": row(-75, 4, 5)})
    assert shown.supported == 0
    assert "fell from 12.0 to 4.0" in shown.sentences[0] and "dropped from 8 to 5" in shown.sentences[1]
    flat = experiments.beta_outcome({"β = 1": row(-60, 12, 8), "then β = 8": row(-60.2, 11.8, 8)})
    assert flat.supported == 2 and "did not show the effect" in flat.sentences[0]
    assert "did not drop (8 → 8)" in flat.sentences[1]
    assert flat.rows["active units"] == [8, 8]


def test_latents_and_collapse_outcomes_follow_the_measurements():
    better = experiments.latents_outcome({"2 latents": row(-90, 6, 2), "16 latents": row(-70, 14, 9)})
    assert better.supported == 0 and "20.0 nats higher" in better.sentences[0] and "other 7" in better.sentences[1]
    worse = experiments.latents_outcome({"2 latents": row(-80, 6, 2), "16 latents": row(-85, 14, 16)})
    assert worse.supported == 2 and "did not show" in worse.sentences[0] and "All 16" in worse.sentences[1]
    helped = experiments.collapse_outcome({"plain": row(-80, 5, 6), "KL warm-up": row(-79, 6, 6),
                                           "free bits": row(-82, 8, 16)})
    assert helped.supported == 0 and "kept 16 of 16" in helped.sentences[0] and "no difference" in helped.sentences[1]
    none = experiments.collapse_outcome({"plain": row(-80, 5, 6), "KL warm-up": row(-80, 5, 6),
                                         "free bits": row(-80, 5, 6)})
    assert none.supported == 1 and "does not show" in none.sentences[0]


def test_every_arm_builds_a_valid_config_and_forks_change_only_live_settings():
    from vae_core.config import LIVE_FIELDS

    for exp in experiments.EXPERIMENTS:
        assert len(exp.choices) == 3 and exp.key in experiments.OUTCOMES
        for arm in exp.arms:
            experiments.config_of(arm)
            if arm.after is not None:
                assert set(arm.changes) <= set(LIVE_FIELDS)


# ------------------------------------------------------------------ Lab.after

@pytest.mark.slow
def test_after_forks_once_the_parent_finishes_and_never_after_a_stop(runs_dir, tiny_sprites, tiny_config, monkeypatch):
    from vae_core import inference

    monkeypatch.setitem(inference._DATA_CACHE, ("sprites", None, None, None), tiny_sprites)
    lab = Lab(runs_dir, max_runs=1, num_threads=1, log_every=4)
    try:
        parent = lab.start(tiny_config.replace(epochs=1))
        done = []
        thread = lab.after(parent.name, lambda: done.append(lab.fork(parent.name, epochs=1, beta=8.0).name))
        poll_until(lambda: done, what="the fork to start")
        assert lab.open(parent.name).status().state == "finished"
        child = lab.open(done[0])
        poll_until(lambda: child.status().state == "finished", what="the fork to finish")
        tests = [r for r in child.metrics() if r.get("split") == "test"]
        assert tests and tests[-1]["beta"] == 8.0
        thread.join(10)
        assert thread.error is None

        stopped = lab.start(tiny_config.replace(epochs=500))
        called = []
        t2 = lab.after(stopped.name, lambda: called.append(1))
        lab.stop(stopped.name, wait=30)
        t2.join(30)
        assert not t2.is_alive() and called == []
    finally:
        lab.shutdown()


# ------------------------------------------------------------------ the tab, end to end

@pytest.fixture
def app(runs_dir, monkeypatch):
    for k, v in TINY.items():
        monkeypatch.setitem(experiments.BASE, k, v)
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["sid"] = "experimenter1"
    yield at
    get_lab().shutdown()
    st.cache_resource.clear()


def texts(at: AppTest) -> str:
    return " ".join([m.value for m in at.markdown] + [m.value for m in at.caption] + [m.value for m in at.info]
                    + [m.value for m in at.success] + [m.value for m in at.warning])


@pytest.mark.slow
def test_beta_experiment_end_to_end(app):
    at = app.run()
    at.tabs  # noqa: B018  (the tab bar is drawn)
    at.session_state["main_tab"] = experiments.TITLE
    at.run()
    assert at.button(key="exp_beta_run").disabled  # predict first
    at.radio(key="exp_beta_predict").set_value(experiments.EXPERIMENTS[0].choices[0]).run()
    at.button(key="exp_beta_run").click().run()
    names = at.session_state["exp_beta_runs"]
    assert list(names) == ["β = 1"]
    assert get_lab().current_name("experimenter1") == names["β = 1"]  # the sidebar and Training tab follow it

    deadline = time.monotonic() + 240
    while "What your runs measured" not in texts(at):
        assert time.monotonic() < deadline, texts(at)[-2000:]
        time.sleep(0.5)
        at.run()
    assert not at.exception
    lab = get_lab()
    child = [r for r in lab.list_runs() if r.parent and r.parent.get("run") == names["β = 1"]]
    assert len(child) == 1
    first = [r for r in lab.open(names["β = 1"]).metrics() if r["split"] == "test"][-1]
    second = [r for r in lab.open(child[0].name).metrics() if r["split"] == "test"][-1]
    table = at.table[0].value
    assert list(table["rate KL(q‖p) (nats)"]) == [f"{first['kl']:.1f}", f"{second['kl']:.1f}"]  # their own numbers
    assert f"{first['kl']:.1f}" in texts(at) and f"{second['kl']:.1f}" in texts(at)
    assert "You predicted" in texts(at)
    assert lab.current_name("experimenter1") == child[0].name  # followed into the β = 8 phase
