"""The dashboard's logic through streamlit.testing.v1.AppTest: controls -> config, live runs, errors, panels.

AppTest never fires `run_every` and does not wait for the training thread, so tests
poll `at.run()` against a deadline. The Lab is process-wide (st.cache_resource), so every
test shuts it down and clears the cache afterwards. Each AppTest is one browser session,
named by its `sid` URL parameter as a tab is.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import plotly.graph_objects as go
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from dashboard import common, settings
from dashboard.panels import training
from dashboard.state import get_lab, get_viewers
from vae_core.lab import Lab, RunBusy, RunConfig, Status

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
# Seconds-long runs: 512 sprites, batch 64 -> 8 steps per epoch; no importance-sampling evaluations.
TINY = {"cfg_train_size": 512, "cfg_batch_size": 64, "cfg_hidden_dim": 64, "cfg_evidence_every": 0}


def session(sid: str = "sessiona1") -> AppTest:
    """A browser tab: its own identity (the URL's sid), so its own current run."""
    at = AppTest.from_file(APP, default_timeout=30)
    at.query_params["sid"] = sid
    return at


@pytest.fixture
def app(runs_dir):
    yield session()
    get_lab().shutdown()
    st.cache_resource.clear()


def configure(at: AppTest, **values) -> AppTest:
    """Set controls by key (cfg_<field>) through their widgets, as a person would."""
    for key, value in {**TINY, **values}.items():
        widget = at.get_widget(key) if hasattr(at, "get_widget") else None
        widget = widget or _find(at, key)
        widget.set_value(value)
    return at


def _find(at: AppTest, key: str):
    for kind in ("number_input", "slider", "select_slider", "selectbox", "checkbox", "toggle"):
        try:
            return getattr(at, kind)(key=key)
        except KeyError:
            continue
    raise KeyError(key)


def sid_of(at: AppTest) -> str:
    sid = at.query_params["sid"]
    return sid[0] if isinstance(sid, list) else sid


def run_of(at: AppTest):
    """The run this session's page shows (None before any)."""
    return get_lab().current(sid_of(at))


def _status(at: AppTest) -> Status | None:
    run = run_of(at)
    return run.status() if run is not None else None


def state(at: AppTest) -> str | None:
    s = _status(at)
    return s.state if s is not None else None


def run_until(at: AppTest, predicate, timeout: float = 90.0, what: str = "condition") -> AppTest:
    deadline = time.monotonic() + timeout
    while True:
        at.run()
        assert not at.exception, at.exception
        if predicate(at):
            return at
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; status: {_status(at)}")
        time.sleep(0.2)


def wait_for(predicate, timeout: float = 90.0, what: str = "condition") -> None:
    """Poll a condition on the runs themselves (no page run)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def settled_step(at: AppTest, timeout: float = 30.0) -> int:
    """The step count of a paused run once it stopped moving (two looks 0.3 s apart agree)."""
    deadline = time.monotonic() + timeout
    last = _status(at).step
    while True:
        time.sleep(0.3)
        now = _status(at).step
        if now == last:
            return now
        if time.monotonic() > deadline:
            raise AssertionError("the paused run kept stepping")
        last = now


def panels(at: AppTest) -> list:
    """The live panel components (dashboard/live_panel) on the page."""
    return [c for c in at.get("component_instance") if c.proto.component_name.endswith("live_panel")]


def panel(at: AppTest) -> dict:
    """What the Training tab's live panel was handed: status, metrics, notice, figure spec, footer..."""
    (only,) = panels(at)
    return json.loads(only.proto.json_args)


def curves(at: AppTest) -> list[dict]:
    """The figures of the live curves: specs handed to the live panel, which updates its chart in place."""
    return [json.loads(spec) for c in panels(at) if (spec := json.loads(c.proto.json_args)["spec"])]


def status_text(at: AppTest, kind: str) -> str:
    """The live panel's status message if it is of this kind ("success", "warning", ...), else ""."""
    s = panel(at)["status"]
    return s["text"] if s and s["kind"] == kind else ""


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def steering_disabled(at: AppTest) -> bool:
    return all(at.button(key=k).disabled for k in ("btn_pause", "btn_step", "btn_stop"))


# ------------------------------------------------------------------ pure helpers

def test_default_values_build_the_default_config():
    assert settings.config_from_values(settings.DEFAULTS) == RunConfig()
    assert settings.field_errors(settings.DEFAULTS) == {}


def test_field_errors_name_the_control():
    errs = settings.field_errors({**settings.DEFAULTS, "lr": 5.0, "train_size": 100, "batch_size": 128})
    assert "lr" in errs and "between" in errs["lr"]
    assert "batch_size" in errs and "100" in errs["batch_size"]
    errs = settings.field_errors(settings.DEFAULTS, {"sprites": (False, "gone")})
    assert errs == {"dataset": "Not available: gone"}


def test_bf16_on_a_device_without_it_is_an_error_on_the_precision_control(monkeypatch):
    from vae_core import devices

    assert settings.field_errors({**settings.DEFAULTS, "device": "cpu", "precision": "bf16"}) == {}
    monkeypatch.setattr(devices, "available_devices", lambda: {"cpu": True, "cuda": False, "mps": True})
    assert settings.field_errors({**settings.DEFAULTS, "device": "mps"}) == {}
    errs = settings.field_errors({**settings.DEFAULTS, "device": "mps", "precision": "bf16"})
    assert list(errs) == ["precision"] and "not on mps" in errs["precision"]
    errs = settings.field_errors({**settings.DEFAULTS, "device": "auto", "precision": "bf16"})  # auto picks MPS
    assert list(errs) == ["precision"]


def test_curve_helpers():
    assert common.smooth([2.0, 2.0, 2.0]).tolist() == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected
    idx = common.downsample(10_000, 300)
    assert len(idx) <= 300 and idx[0] == 0 and idx[-1] == 9_999
    assert training.format_duration(75) == "1 min 15 s"
    bce = RunConfig().replace(binarize=False)
    assert "not a log-likelihood" in common.units(bce)[1]
    assert common.units(RunConfig())[0] == "nats per example"
    rows = [{"step": i, "elbo": -100.0 + i, "recon": -90.0 + i, "kl": 10.0, "beta": 1.0} for i in range(1, 40)]
    fig = training.curves_figure(rows, [{"step": 39, "elbo": -70.0, "recon": -60.0, "kl": 10.0}], RunConfig(),
                                 log_y=True)
    assert fig.layout.yaxis.type == "log" and all(min(tr.y) > 0 for tr in fig.data if len(tr.y))  # losses
    assert fig.layout.yaxis.title.text == "nats per example"
    # The live figure is built as a plain spec without Plotly's validators (they cost ~16 ms a refresh):
    # Plotly must still accept every property of it, for each kind of panel it draws.
    bce = RunConfig().replace(binarize=False)
    for train, test, config, log_y in [(rows, [], RunConfig(), False), (rows[:2], rows[:1], bce, True),
                                       ([], [], RunConfig(), False), (rows * 3, rows[::5], RunConfig(), False)]:
        spec = training.curves_figure(train, test, config, log_y=log_y).to_dict()
        validated = go.Figure(spec)  # raises on any property Plotly does not know or a bad value
        assert len(validated.data) == len(spec["data"])
        # Plotly draws no axes for a panel without a trace: each panel has one (empty ones only before data)
        assert {tr["yaxis"] for tr in spec["data"]} == {"y", "y2", "y3"}
        assert all(len(tr["x"]) for tr in spec["data"]) == bool(train or test)
    fig = training.curves_figure(rows, [], RunConfig())
    assert fig.layout.yaxis.range[0] < min(fig.data[1].y[len(rows) // 10:])  # the robust range holds the curve
    # Autorange is stated on every axis, whether or not a robust range is set (tests/test_live_panel.py shows
    # in Chromium what leaving it unsaid did), and a new run gets fresh axes (its own uirevision).
    for train in ([], rows[:5], rows):
        spec = training.curves_figure(train, [], RunConfig(), revision="run-b").to_dict()["layout"]
        assert all(spec[f"yaxis{i}"]["autorange"] is (len(train) < 20) for i in ("", "2", "3"))
    assert (training.curves_figure([], [], RunConfig(), revision="a").layout.uirevision
            != training.curves_figure([], [], RunConfig(), revision="b").layout.uirevision)


def _st(state: str, **kw) -> Status:
    base = dict(state=state, message="epoch 2 of 10", step=1234, epoch=2.468, epochs_target=10, total_steps=5000,
                samples_per_s=20_000.0, eta_s=75.0, device="cpu (2 threads)", run_dir=None, beta=1.0,
                beta_effective=1.0, lr=1e-3, warmup_epochs=0.0, free_bits=0.0)
    return Status(**{**base, **kw})


def test_status_and_metrics_views_say_what_the_run_is_doing():
    """The live panel's texts are built in Python (the component only lays them out): one per run state."""
    from types import SimpleNamespace

    t = SimpleNamespace(name="b2")
    views = {state: training.status_view(t, _st(state))
             for state in ("running", "paused", "finished", "stopped", "failed", "idle", "interrupted")}
    assert views["running"]["kind"] == "caption" and views["running"]["text"].startswith("**b2** · ▶")
    assert views["running"]["progress_text"] == ("epoch 2.47 / 10 · step 1,234 / 5,000 · 20,000 samples/s · "
                                                 "ETA 1 min 15 s · cpu (2 threads)")
    assert views["paused"]["kind"] == "warning" and "Paused at step 1,234" in views["paused"]["text"]
    assert views["finished"]["kind"] == "success" and views["finished"]["progress"] == 1.0
    assert views["paused"]["progress"] == pytest.approx(1234 / 5000)
    assert views["stopped"]["kind"] == "info" and "**Resume** continues" in views["stopped"]["text"]
    assert views["interrupted"]["kind"] == "warning" and "Interrupted" in views["interrupted"]["text"]
    assert views["failed"] == {"progress": None, "kind": "error", "text": "**b2** · Training failed: epoch 2 of 10"}
    assert views["idle"]["progress"] is None
    queued = training.status_view(t, _st("queued", queue_position=2, step=0, epoch=0.0, samples_per_s=0.0, eta_s=None))
    assert queued["kind"] == "info" and queued["progress"] is None
    assert "Waiting for a free slot: place 2 in the queue" in queued["text"]
    followed = training.status_view(t, _st("running", followed=True))
    assert "trained by another process" in followed["text"]
    assert "another process" not in training.status_view(t, _st("finished", followed=True))["text"]


def test_progress_text_never_counts_past_its_total():
    """A run opened here but not restarted yet reported epochs_target as its total steps: "step 1,560 / 10"."""
    from types import SimpleNamespace

    opened = _st("stopped", step=1560, epoch=195.0, epochs_target=200, total_steps=200, samples_per_s=0.0, eta_s=None)
    assert "step 1,560 / 1,600" in training.progress_text(opened)
    view = training.status_view(SimpleNamespace(name="old"), opened)
    assert view["progress"] == pytest.approx(1560 / 1600)
    unknown = _st("stopped", step=1560, epoch=0.0, epochs_target=10, total_steps=10, samples_per_s=0.0, eta_s=None)
    assert "step 1,560 ·" in training.progress_text(unknown)  # no total rather than a wrong one
    fresh = _st("running", step=0, epoch=0.0, epochs_target=10, total_steps=10, samples_per_s=0.0, eta_s=None)
    assert "step 0 ·" in training.progress_text(fresh)  # steps per epoch not known before the data load
    assert "step 1,234 / 5,000" in training.progress_text(_st("running"))


    test = [{"epoch": 1, "elbo": -90.0, "recon": -80.0, "kl": 10.0, "active_units": 2},
            {"epoch": 2, "elbo": -85.5, "recon": -76.0, "kl": 9.5, "active_units": 2}]
    cards = training.metrics_view(test, RunConfig())
    assert [(c["label"], c["value"], c["delta"]) for c in cards] == [
        ("Test ELBO (nats)", "-85.50", "+4.50"), ("Reconstruction E[log p(x|z)]", "-76.00", "+4.00"),
        ("KL(q(z|x) ‖ p(z))", "9.50", "-0.50"), ("Active latent units", f"2 / {RunConfig().model.latent_dim}", None)]
    assert cards[2]["delta_color"] == "off" and "after epoch 2" in cards[0]["help"]
    assert training.metrics_view(test[:1], RunConfig())[0]["delta"] is None  # nothing to compare with yet
    assert training.metrics_view([], RunConfig()) == []
    grey = training.metrics_view(test, RunConfig().replace(binarize=False))
    assert grey[0]["label"] == "Test −BCE − KL (not a bound)" and "not a log-likelihood" in grey[0]["help"]


def test_server_config_is_quiet_local_and_themed_both_ways():
    import tomllib

    cfg = tomllib.loads((Path(APP).parents[1] / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["headless"] and not cfg["server"]["runOnSave"] and cfg["server"]["address"] == "localhost"
    assert cfg["browser"]["gatherUsageStats"] is False
    assert "base" not in cfg["theme"]  # follows the browser's light/dark preference; the menu switches
    for palette in ("light", "dark"):
        assert {"primaryColor", "backgroundColor", "secondaryBackgroundColor", "textColor"} <= set(cfg["theme"][palette])


# ------------------------------------------------------------------ the app

def test_first_page_renders_idle(app):
    app.run()
    assert not app.exception and not errors(app)
    assert app.button(key="btn_train").label == "Train"
    assert app.button(key="btn_stop").disabled and app.button(key="btn_pause").disabled
    assert "No run yet" in panel(app)["notice"] and len(curves(app)) == 1  # empty axes, where the curves will be
    assert run_of(app) is None


def test_controls_build_the_configuration_of_the_run(app):
    app.run()
    configure(app, cfg_latent_dim=8, cfg_beta=2.5, cfg_lr=3e-4, cfg_epochs=3, cfg_warmup_epochs=1.5,
              cfg_free_bits=0.25, cfg_seed=7, cfg_arch="conv", cfg_likelihood="gaussian-fixed", cfg_device="cpu",
              cfg_binarize=False, cfg_precision="bf16")
    app.run()
    assert not errors(app)
    app.button(key="btn_train").click().run()
    run = run_of(app)
    assert run is not None
    expected = RunConfig().replace(latent_dim=8, beta=2.5, lr=3e-4, epochs=3, warmup_epochs=1.5, free_bits=0.25,
                                   seed=7, arch="conv", likelihood="gaussian-fixed", device="cpu", binarize=False,
                                   precision="bf16", train_size=512, batch_size=64, hidden_dim=64, evidence_every=0)
    assert run.config == expected
    assert run.status().owner == sid_of(app)  # this session steers it


def test_train_shows_metrics_then_pause_step_resume_stop_reset(app):
    app.run()
    configure(app, cfg_epochs=400).run()
    app.button(key="btn_train").click()
    run_until(app, lambda a: len(panel(a)["metrics"]) == 4 and len(curves(a)) == 1, what="test metrics and curves")
    assert {t["name"] for t in curves(app)[0]["data"]} >= {"train (smoothed)", "test (per epoch)"}
    assert [m["label"] for m in panel(app)["metrics"]][0] == "Test ELBO (nats)"
    assert "epoch" in panel(app)["status"]["progress_text"] and not panel(app)["notice"]
    (png,) = [a.bytes for a in panels(app)[0].proto.special_args if a.key == "png"]  # reconstructions
    assert png.startswith(b"\x89PNG") and "from the weights at step" in panel(app)["recon"]["caption"]
    assert app.button(key="btn_pause").label == "Pause"

    app.button(key="btn_pause").click().run()
    assert state(app) == "paused" and app.button(key="btn_pause").label == "Resume"
    assert "Paused" in status_text(app, "warning")
    before = settled_step(app)  # a step under way when Pause came still finishes
    app.button(key="btn_step").click().run()
    wait_for(lambda: _status(app).step > before, timeout=30, what="one step")
    assert settled_step(app) == before + 1 and state(app) == "paused"

    app.button(key="btn_pause").click().run()
    assert state(app) == "running"
    app.button(key="btn_stop").click().run()
    run_until(app, lambda a: "Stopped" in status_text(a, "info"), what="stopped")  # the page, not only the run
    stopped_at = _status(app).step
    assert state(app) == "stopped"

    app.button(key="btn_pause").click().run()  # Resume a stopped run: continues from its checkpoint
    run_until(app, lambda a: _status(a).step > stopped_at, what="resumed steps")
    name = run_of(app).name
    assert _status(app).run_dir == str(run_of(app).run_dir)

    app.button(key="btn_reset").click().run()  # this session's own active run: stopped, then the page is cleared
    assert run_of(app) is None and "No run yet" in panel(app)["notice"]
    wait_for(lambda: get_lab().open(name).status().state == "stopped", what="the reset run stopped")


def test_live_setting_reaches_the_running_run(app):
    app.run()
    configure(app, cfg_epochs=400).run()
    app.button(key="btn_train").click()
    run_until(app, lambda a: state(a) == "running" and _status(a).step > 0, what="steps")
    app.select_slider(key="cfg_beta").set_value(4.0).run()
    assert _status(app).beta == 4.0
    applied = lambda: any("applied to the running run" in s.value for s in app.success)  # noqa: E731
    assert applied()
    # The live panel reruns the page by itself (first metrics, run ended): the message stays for those,
    # and goes with the person's next action. (The first-metrics rerun once cut the run above short in CI.)
    app.session_state["_app_rerun"] = True  # what common.app_rerun sets before st.rerun()
    app.run()
    assert applied()
    app.slider(key="cfg_latent_dim").set_value(5).run()  # not live: the run keeps its D and the UI says so
    assert not applied()
    assert run_of(app).config.model.latent_dim == settings.DEFAULTS["latent_dim"] != 5
    assert any("Changed since this run started" in i.value for i in app.info)


def test_train_again_replaces_this_sessions_own_run_when_no_slot_is_free(app, monkeypatch):
    """One slot: a person who changes a setting and presses Train gets the new run now, not a queue behind
    their own previous run, which is stopped and checkpointed (and says so); another session's run is untouched."""
    monkeypatch.setenv("VAE_MAX_RUNS", "1")
    app.run()
    configure(app, cfg_epochs=400).run()
    app.button(key="btn_train").click()
    run_until(app, lambda a: state(a) == "running" and _status(a).step > 0, what="the first run")
    first = run_of(app).name
    configure(app, cfg_beta=2.0).run()
    app.button(key="btn_train").click()
    run_until(app, lambda a: state(a) == "running" and run_of(a).name != first, what="the new run to train")
    assert get_lab().open(first).status().state == "stopped"
    assert any("was stopped and checkpointed" in i.value for i in app.info)


def test_the_sidebar_follows_live_changes_made_elsewhere(app):
    """The controls are the only writer of their keys: a change made through the Lab (a remedy, another
    process's control.json) moves the control on the next rerun; a person's own edit is left alone."""
    app.run()
    configure(app, cfg_epochs=400).run()
    app.button(key="btn_train").click()
    run_until(app, lambda a: state(a) == "running" and _status(a).step > 0, what="steps")
    run = run_of(app)
    get_lab().update(run.name, beta=0.25, free_bits=0.5)  # not through the sidebar
    app.run()
    assert app.session_state["cfg_beta"] == 0.25 and app.session_state["cfg_free_bits"] == 0.5
    configure(app, cfg_latent_dim=3).run()  # the person's own (non-live) edit stays
    app.run()
    assert app.session_state["cfg_latent_dim"] == 3 and app.session_state["cfg_beta"] == 0.25


def test_invalid_input_shows_an_error_not_a_traceback(app):
    app.run()
    configure(app, cfg_train_size=100, cfg_batch_size=128).run()
    assert not app.exception
    assert any("larger than" in e for e in errors(app))
    assert app.button(key="btn_train").disabled
    if not Lab.devices()["cuda"]:
        configure(app, cfg_batch_size=64, cfg_device="cuda").run()
        assert any("CUDA" in e and "not available" in e for e in errors(app))
        assert app.button(key="btn_train").disabled
    assert run_of(app) is None


def test_reload_shows_the_same_run_and_a_new_tab_its_own(app):
    app.run()
    configure(app, cfg_epochs=400, cfg_latent_dim=3).run()
    app.button(key="btn_train").click()
    run_until(app, lambda a: _status(a).step > 0, what="steps")
    first = run_of(app).name
    reload = session(sid_of(app)).run()  # a reload keeps the URL, so its sid
    assert not reload.exception
    assert run_of(reload).name == first
    assert reload.slider(key="cfg_latent_dim").value == 3  # controls show the run's settings, not defaults
    assert "epoch" in panel(reload)["status"]["progress_text"]
    other = session("sessionb2").run()  # another tab: its own page, no run yet
    assert run_of(other) is None and "No run yet" in panel(other)["notice"]
    assert not steering_disabled(app)


def test_two_sessions_train_side_by_side_and_neither_stops_the_other(app, monkeypatch):
    monkeypatch.setenv("VAE_MAX_RUNS", "2")  # read by the Lab this test's first page makes
    a, b = app, session("sessionb2")
    a.run()
    b.run()
    assert get_lab().max_runs == 2
    configure(a, cfg_epochs=400, cfg_beta=0.5).run()
    configure(b, cfg_epochs=400, cfg_beta=2.0).run()
    a.button(key="btn_train").click().run()
    b.button(key="btn_train").click().run()
    run_a, run_b = run_of(a), run_of(b)
    assert run_a.name != run_b.name
    assert (run_a.config.train.beta, run_b.config.train.beta) == (0.5, 2.0)
    for at, run in ((a, run_a), (b, run_b)):  # each page shows its own run, with its own β in the sidebar
        run_until(at, lambda x: _status(x).step > 0 and panel(x)["status"] is not None, what=f"{run.name} training")
        assert run_of(at).name == run.name and f"**{run.name}**" in panel(at)["status"]["text"]
        assert not steering_disabled(at)
    steps = {r.name: r.status().step for r in (run_a, run_b)}
    wait_for(lambda: all(get_lab().open(n).status().step > s for n, s in steps.items()), what="both runs progressing")
    assert {get_lab().open(n).status().state for n in steps} == {"running"}
    assert a.select_slider(key="cfg_beta").value == 0.5 and b.select_slider(key="cfg_beta").value == 2.0


def test_a_train_beyond_the_servers_slots_waits_in_the_queue(app, monkeypatch):
    monkeypatch.setenv("VAE_MAX_RUNS", "1")
    a, b = app, session("sessionb2")
    a.run()
    b.run()
    assert get_lab().max_runs == 1
    configure(a, cfg_epochs=400).run()
    configure(b, cfg_epochs=400, cfg_beta=2.0).run()
    a.button(key="btn_train").click().run()
    run_until(a, lambda x: state(x) == "running", what="the first run training")
    b.button(key="btn_train").click().run()
    assert state(b) == "queued" and _status(b).queue_position == 1
    # The waiting line is the queue watch's own element above the panel (it flips the moment the run starts).
    assert panel(b)["status"] is None
    assert any("Waiting for a free slot: place 1 in the queue" in i.value for i in b.info)
    assert b.button(key="btn_pause").disabled and not b.button(key="btn_stop").disabled  # Stop leaves the queue
    assert "Refreshes every" in panel(b)["footer"]  # the waiting page polls, so it sees its run start
    assert state(a) == "running"  # nothing was stopped to make room
    a.button(key="btn_stop").click().run()  # the first run ends: the queued one starts by itself
    run_until(b, lambda x: "samples/s" in (panel(x)["status"] or {}).get("progress_text", ""),
              what="the queued run starting")
    assert _status(b).queue_position is None and _status(b).beta == 2.0
    assert "Waiting" not in panel(b)["status"]["text"] and state(b) in ("running", "finished")


def test_a_session_cannot_steer_another_sessions_run(app):
    a, b = app, session("sessionb2")
    a.run()
    configure(a, cfg_epochs=400).run()
    a.button(key="btn_train").click()
    run_until(a, lambda x: state(x) == "running", what="a's run training")
    name = run_of(a).name
    b.run()
    get_lab().show(sid_of(b), name)  # what the Runs tab's Open does
    b.run()
    assert run_of(b).name == name and f"**{name}**" in panel(b)["status"]["text"]
    assert steering_disabled(b) and not b.button(key="btn_train").disabled and not b.button(key="btn_reset").disabled
    assert any("Read-only" in c.value for c in b.caption)
    b.select_slider(key="cfg_beta").set_value(4.0).run()  # a ⚡ setting: not applied to a's run
    assert any("was not applied" in i.value for i in b.info)
    assert _status(a).beta == 1.0
    with pytest.raises(RunBusy):
        get_lab().pause(name, owner=sid_of(b))
    b.button(key="btn_reset").click().run()  # clears b's page; a's run trains on
    assert run_of(b) is None
    a.run()
    assert state(a) == "running" and not steering_disabled(a)


def test_many_sessions_refresh_less_often(app):
    """Sessions watching one run share the refresh budget, and the panel says why it refreshes less often."""
    app.run()
    configure(app, cfg_epochs=400).run()
    app.button(key="btn_train").click()

    def caption(a, text):
        return text in panel(a)["footer"]

    run_until(app, lambda a: _status(a).step > 0 and caption(a, "Refreshes every 1 s"), what="the live caption")
    for i in range(4):  # four more tabs polling
        get_viewers().seen(f"other-tab-{i}", 1.0)
    run_until(app, lambda a: caption(a, "Refreshes every 3.3 s") and caption(a, "5 sessions are watching"),
              timeout=2.5, what="a shared refresh budget")
    assert state(app) == "running"


def test_every_tab_renders_with_and_without_a_run(app):
    app.run()
    titles = [t.label for t in app.tabs]
    assert titles == ["Training", "Explore latent space", "Latents", "Your own input", "Time-lapse",
                      "Evidence: ELBO ≤ log p(x)", "Experiments", "Runs", "Sweeps"]
    for title in titles:
        app.session_state["main_tab"] = title
        app.run()
        assert not app.exception and not errors(app), title
    configure(app, cfg_epochs=2).run()
    app.session_state["main_tab"] = "Training"
    app.button(key="btn_train").click()
    run_until(app, lambda a: "Finished" in status_text(a, "success"), what="finished run")
    for title in titles:
        app.session_state["main_tab"] = title
        app.run()
        assert not app.exception and not errors(app), title
    app.session_state["main_tab"] = "Training"
    app.run()
    app.session_state["live_panel"] = {"log_y": True}  # what the panel's Log scale switch sends
    app.run()
    assert not app.exception and len(curves(app)) == 1
    assert curves(app)[0]["layout"]["yaxis"]["type"] == "log"


def test_a_run_opened_after_a_restart_counts_its_steps_right(app):
    """A run trained before the server restarted, shown again: its total steps come from its files."""
    app.run()
    configure(app, cfg_epochs=2).run()
    app.button(key="btn_train").click()
    run_until(app, lambda a: state(a) == "finished", what="finished run")
    name, steps = run_of(app).name, _status(app).step
    assert f"step {steps:,} / {steps:,}" in training.progress_text(_status(app))
    get_lab().shutdown()
    st.cache_resource.clear()  # a new server process: a new Lab that did not train it
    app.run()
    get_lab().show(sid_of(app), name)
    app.run()
    assert f"step {steps:,} / {steps:,}" in panel(app)["status"]["progress_text"]


def test_url_parameters_round_trip_settings(app):
    app.run()
    configure(app, cfg_latent_dim=6, cfg_beta=2.5, cfg_lr=3e-4, cfg_binarize=False).run()
    params = {k: v for k, v in app.query_params.items() if k != "sid"}
    assert {"latent_dim": ["6"], "beta": ["2.5"], "lr": ["0.0003"], "binarize": ["false"]}.items() <= \
        {k: (v if isinstance(v, list) else [v]) for k, v in params.items()}.items()
    assert "dataset" not in params  # defaults stay out of the URL

    shared = session("sessionb2")  # someone opens the copied URL
    for k, v in params.items():
        shared.query_params[k] = v[0] if isinstance(v, list) else v
    shared.query_params["epochs"] = "lots"
    shared.run()
    assert not shared.exception
    assert shared.slider(key="cfg_latent_dim").value == 6 and shared.select_slider(key="cfg_beta").value == 2.5
    assert shared.checkbox(key="cfg_binarize").value is False
    assert shared.number_input(key="cfg_epochs").value == settings.DEFAULTS["epochs"]
    assert any("epochs=lots" in w.value for w in shared.warning)


def test_query_helpers_keep_only_valid_non_defaults():
    values = {**settings.DEFAULTS, "latent_dim": 16, "beta": 0.5, "binarize": False, "train_size": 4096}
    query = settings.query_from_values(values)
    assert query == {"latent_dim": "16", "beta": "0.5", "binarize": "false", "train_size": "4096"}
    assert settings.values_from_query(query) == (values, [])
    back, ignored = settings.values_from_query({"latent_dim": "500", "lr": "-1", "arch": "rnn", "seed": "1.5",
                                                "unrelated": "x", "beta": "1.37"})
    assert sorted(ignored) == ["arch=rnn", "latent_dim=500", "lr=-1", "seed=1.5"]
    assert back == {**settings.DEFAULTS, "beta": 1.37}


def test_sessions_share_a_refresh_budget(monkeypatch):
    """One or two sessions refresh every second; more stretch their interval so the total stays ~2/s."""
    from dashboard.state import Viewers

    clock = [100.0]
    monkeypatch.setattr("dashboard.state.time.monotonic", lambda: clock[0])
    v = Viewers(budget=2.0)
    assert v.interval(None, "a") is None  # idle: no polling at all
    assert v.interval(1.0, "a") == 1.0
    v.seen("a", 1.0)
    v.seen("b", 1.0)
    assert v.count() == 2 and v.interval(1.0, "b") == 1.0
    for s in "cde":
        v.seen(s, 1.0)
    assert v.count() == 5 and v.interval(1.0, "a") == 2.5
    assert v.interval(2.0, "a") == 2.5 and v.interval(4.0, "a") == 4.0  # paused runs poll slower anyway
    assert v.interval(1.0, "new") == 3.0  # a sixth session counts itself before its first poll
    clock[0] += 2.5
    for s in "abcd":  # "e" closed its tab: it drops out after two of its intervals
        v.seen(s, 2.5)
    clock[0] += 1.0
    assert v.count() == 4 and v.interval(1.0, "a") == 2.0


def test_warm_up_freezes_the_long_lived_heap_once_before_any_run(monkeypatch):
    """Full garbage collections over torch's and Streamlit's objects stalled training 100-260 ms each."""
    from dashboard import state

    frozen = []
    monkeypatch.setattr(state.gc, "freeze", lambda: frozen.append(1))
    monkeypatch.setattr(state, "_frozen", False)
    monkeypatch.setattr(Lab, "warm_up", lambda self, dataset="sprites": None)
    busy = Lab(max_runs=1)
    monkeypatch.setattr(busy, "training_count", lambda: 1)
    state._warm_up(busy)
    assert frozen == []  # a run exists: its objects must stay collectable
    state._warm_up(Lab(max_runs=1))
    state._warm_up(Lab(max_runs=1))
    assert frozen == [1]  # once per process


@pytest.mark.slow
def test_train_on_two_processes_is_followed_like_any_run(app, tiny_idx_dir, monkeypatch):
    monkeypatch.setenv("VAE_DATA_DIR", str(tiny_idx_dir))  # this server and the processes it starts
    import vae_core.lab as lab_module

    monkeypatch.delitem(lab_module._PROBES, "datasets", raising=False)  # an earlier test's probe knew no VAE_DATA_DIR
    app.run()
    configure(app, cfg_dataset="mnist", cfg_latent_dim=2, cfg_epochs=2).run()
    app.number_input(key="train_processes").set_value(2).run()
    assert not errors(app)
    app.button(key="btn_train").click().run()
    assert any("Training on 2 processes" in i.value for i in app.info)
    run = run_of(app)
    assert run.status().followed and run.status().owner == sid_of(app)  # started by this session, outside it
    run_until(app, lambda a: state(a) == "finished", timeout=240, what="the 2-process run to finish")
    assert _status(app).device.startswith("2 × cpu") and "gloo" in _status(app).device
    assert [m["step"] for m in run.metrics() if m["split"] == "test"] == [8, 16]
    config = json.loads((Path(run.run_dir) / "config.json").read_text())
    assert config["distributed"]["world_size"] == 2 and config["owner"] == sid_of(app)
