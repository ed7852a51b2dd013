"""Hostile use of the web side: sessions clicking at once, and untrusted strings reaching the page.

Each test builds its own hostile input (run directories, URL values) and checks what a person
would see or what would keep running.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from vae_core import runs
from vae_core.config import RunConfig
from vae_core.lab import Lab, UserError
from helpers import poll_until

ROOT = Path(__file__).resolve().parents[1]




def trainer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vae-trainer-") and t.is_alive()]


@pytest.fixture
def lab(runs_dir, sprites_cached):
    lab = Lab(runs_dir, max_runs=2, num_threads=1, log_every=4)
    yield lab
    lab.shutdown()
    poll_until(lambda: not trainer_threads(), what="every trainer thread to end after the test")


def together(n: int, act) -> list:
    """Call act(i) from n threads released at the same instant; return each result or exception."""
    barrier = threading.Barrier(n)
    out: list = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        try:
            out[i] = act(i)
        except Exception as e:  # noqa: BLE001 - the caller looks at what each click got
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def stop_all_through_the_lab(lab: Lab, names_owners: list[tuple[str, str | None]]) -> None:
    for name, owner in names_owners:
        lab.stop(name, owner=owner, wait=0)
    poll_until(lambda: not trainer_threads(), what="Stop to reach every trainer thread")


# ------------------------------------------------------------------ item 8: Train clicks race

def test_four_sessions_pressing_train_together_start_only_tracked_runs(lab, tiny_config):
    """4 tabs press Train within the same instant, for several rounds: every trainer thread alive is one the Lab
    lists as training, at most max_runs train, the rest queue, and Stop through the Lab ends them all."""
    config = tiny_config.replace(epochs=500)
    sids = [f"session{i:04d}" for i in range(4)]
    started: list[tuple[str, str | None]] = []
    for _ in range(3):
        handles = together(4, lambda i: lab.start(config, owner=sids[i]))
        assert not [h for h in handles if isinstance(h, Exception)], handles
        started += [(h.name, sids[i]) for i, h in enumerate(handles)]
        alive = trainer_threads()
        assert len(alive) <= lab.max_runs, [t.name for t in alive]
        assert lab.training_count() == len(alive), [t.name for t in alive]
        states = sorted(lab.open(n).status().state for n, _ in started)
        assert states.count("queued") >= len(started) - lab.max_runs, states
    stop_all_through_the_lab(lab, started)
    assert lab.training_count() == 0
    assert not any(lab.open(n).status().state in ("running", "queued") for n, _ in started)


def test_resume_pressed_in_four_tabs_at_once_trains_the_run_once(lab, tiny_config, runs_dir):
    """An ownerless (CLI) run that anyone may resume: 4 tabs press Resume together. One trainer trains it; the
    Lab's entry for the run is that trainer, so Stop reaches it (a second trainer replacing the entry left the
    first one training with nobody able to stop it)."""
    first = lab.start(tiny_config.replace(epochs=500))
    poll_until(lambda: first.status().step > 0, what="the first steps")
    lab.stop(first.name, wait=60)
    poll_until(lambda: not trainer_threads(), what="the run to stop")
    assert (first.run_dir / runs.CHECKPOINT).exists()

    restarted = Lab(runs_dir, max_runs=2, num_threads=1, log_every=4)  # a server restarted: no trainer in memory
    try:
        for _ in range(3):  # the first round builds the trainer from disk; later ones find it stopped here
            out = together(4, lambda i: restarted.resume(first.name))
            errors = [e for e in out if isinstance(e, Exception)]
            assert all(isinstance(e, UserError) for e in errors), errors  # a refusal in words, never a crash
            assert len(trainer_threads()) == 1, [t.name for t in trainer_threads()]
            assert restarted.training_count() == 1
            stop_all_through_the_lab(restarted, [(first.name, None)])
            assert restarted.open(first.name).status().state == "stopped"
    finally:
        restarted.shutdown()


# ------------------------------------------------------------------ item 14: untrusted strings render as text

HOSTILE = "![t](http://attacker.invalid/x.png) :red[**Session expired, sign in again**] $x^2$"
HOSTILE_DIR = "![n](x.png) :blue[**Named**]"  # a folder name: anything but '/'
# What Markdown or Streamlit would turn into an image, a link, colour or maths if it reached a page unescaped.
ACTIVE = ("![", "](http", ":red[", ":blue[", "**Session", "**Named", "$x^2$")


def page_markdown(at) -> list[str]:
    """The source of every element the page renders as Markdown."""
    kinds = ("markdown", "caption", "info", "warning", "error", "success", "subheader", "header", "title")
    return [e.value for kind in kinds for e in getattr(at, kind)]


def assert_shown_as_text(at, *payloads: str) -> None:
    from dashboard.common import md_text

    bodies = page_markdown(at)
    live = [b for b in bodies if any(a in re.sub(r"\\.", "", b) for a in ACTIVE)]  # escaped marks are text
    assert not live, live
    for p in payloads:  # the strings do reach the page, as text
        assert any(md_text(p) in b for b in bodies), (p, bodies)


@pytest.fixture
def app_session(runs_dir):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from dashboard.state import get_lab

    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=30)
    at.query_params["sid"] = "attacker01"
    yield at
    get_lab().shutdown()
    st.cache_resource.clear()


def test_hostile_url_values_show_as_text(app_session):
    at = app_session
    at.query_params["beta"] = HOSTILE
    at.query_params["dataset"] = HOSTILE_DIR
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert_shown_as_text(at, "beta=" + HOSTILE, "dataset=" + HOSTILE_DIR)


def test_hostile_run_files_show_as_text(app_session, runs_dir, tiny_sprites, monkeypatch):
    """A run whose status.json message and host, and config.json parent, are hostile; and a run folder whose
    name is: the Runs tab, its actions, the comparison and the status line show them as text."""
    import json
    import shutil

    from vae_core import inference

    monkeypatch.setitem(inference._DATA_CACHE, ("sprites", None, None, None), tiny_sprites)
    lab = Lab(runs_dir, num_threads=1)
    tiny = RunConfig().replace(epochs=1, train_size=256, hidden_dim=32, batch_size=64, latent_dim=2, evidence_every=0)
    run = lab.start(tiny, name="evil_run")
    run.join(120)
    assert run.status().state == "finished", run.status().message
    lab.shutdown()
    evil = runs_dir / "evil_run"
    status = json.loads((evil / runs.STATUS).read_text())
    (evil / runs.STATUS).write_text(json.dumps({**status, "message": HOSTILE, "host": HOSTILE}))
    config = json.loads((evil / runs.CONFIG).read_text())
    (evil / runs.CONFIG).write_text(json.dumps({**config, "parent": {"run": HOSTILE, "step": 3}}))
    shutil.copytree(evil, runs_dir / HOSTILE_DIR)

    at = app_session
    at.run()
    at.session_state["main_tab"] = "Runs"
    at.run()
    shown = list(at.dataframe(key="runs_table").value["Name"])
    assert set(shown) == {"evil_run", HOSTILE_DIR}, shown
    at.session_state["runs_table"] = {"selection": {"rows": [0, 1], "columns": [], "cells": []}}
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    for target in shown:  # the actions of each ticked run, and the comparison of both
        at.selectbox(key="runs_target").set_value(target)
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        assert_shown_as_text(at, HOSTILE, HOSTILE_DIR if target == HOSTILE_DIR else "evil_run")
    at.selectbox(key="runs_target").set_value("evil_run")
    at.run()
    at.button(key="runs_open").click()
    at.run()  # the status line above the tab now shows the opened run's hostile message
    assert not at.exception, [e.message for e in at.exception]
    assert_shown_as_text(at, HOSTILE)


def test_errors_name_files_without_the_servers_paths():
    from dashboard.common import md_text
    from vae_core.runs import RunFileError

    shown = md_text(RunFileError("no run named 'x' in /tmp/pytest-of-root/runs"))
    assert "/tmp" not in shown and "runs" in shown
    assert "/srv" not in md_text(OSError("[Errno 2] No such file or directory: '/srv/class/runs/b1/checkpoint.pt'"))
    assert md_text("a URL value /tmp/x") == "a URL value /tmp/x"  # only errors are shortened; values show as given
