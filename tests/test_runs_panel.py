"""The Runs tab through AppTest: listing, open, resume, fork, compare, export, import, rename, delete.

Three tiny runs (one made through the CLI) are trained once per module and copied into each
test's own runs directory (VAE_RUNS_DIR; AppTest runs the app in this process, and the app's
Lab is created over that directory). Rows are ticked by writing the table's selection state, as
the browser would send it. The Lab is process-wide (st.cache_resource), so every test shuts it
down and clears the caches afterwards. One test trains a run in a separate process (the CLI) and
opens it while it trains: the page follows it from its files.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

from dashboard.panels import compare
from dashboard.panels import run_actions as actions
from dashboard.panels import runs as panel
from dashboard.state import get_lab
from vae_core import cli, runs
from vae_core.lab import Lab, LocalRun, RunConfig, RunHandle

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboard" / "app.py")
TINY = RunConfig().replace(epochs=1, train_size=256, hidden_dim=32, batch_size=64, evidence_every=0)
STEPS = 4  # 256 images / batch 64, one epoch


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    """Runs 'b0.5' and 'b2' (a Lab in this process) and 'cli-b1' (python -m vae_core train), oldest first."""
    d = tmp_path_factory.mktemp("saved") / "runs"
    lab = Lab(d, num_threads=1)
    for beta in (0.5, 2.0):
        run = lab.start(TINY.replace(beta=beta), name=f"b{beta:g}")
        run.join(120)
        assert run.status().state == "finished", run.status().message
        time.sleep(0.02)  # distinct creation times, so the order is defined
    lab.shutdown()
    assert cli.main(["train", "--epochs", "1", "--train-size", "256", "--hidden-dim", "32", "--batch-size", "64",
                     "--evidence-every", "0", "--threads", "1", "--runs-dir", str(d), "--name", "cli-b1",
                     "--quiet"]) == 0
    return d


@pytest.fixture
def runs_dir(saved_runs, tmp_path, monkeypatch):
    d = tmp_path / "runs"
    shutil.copytree(saved_runs, d)
    monkeypatch.setenv("VAE_RUNS_DIR", str(d))
    yield d
    get_lab().shutdown()
    st.cache_resource.clear()
    st.cache_data.clear()


def runs_tab() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=30)
    at.run()
    at.session_state["main_tab"] = "Runs"
    return rerun(at)


def rerun(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def table(at: AppTest):
    return at.dataframe(key=panel.TABLE).value


def tick(at: AppTest, *names: str) -> AppTest:
    shown = list(table(at)["Name"])
    at.session_state[panel.TABLE] = {"selection": {"rows": [shown.index(n) for n in names], "columns": [],
                                                   "cells": []}}
    return rerun(at)


def texts(elements) -> str:
    return " ".join(e.value for e in elements)


def sid(at: AppTest) -> str:
    """The page's session id (dashboard.state.session_id): who owns what it starts."""
    return at.session_state["_sid"]


def current(at: AppTest) -> RunHandle | None:
    """The run the page shows (the Lab's record for this session)."""
    return get_lab().current(sid(at))


def wait_finished(at: AppTest, timeout: float = 120.0) -> RunHandle:
    run = current(at)
    assert isinstance(run, LocalRun), run
    run.join(timeout)
    assert run.status().state == "finished", run.status().message
    return run


# ------------------------------------------------------------------ listing

def test_table_lists_every_run_newest_first(runs_dir):
    at = runs_tab()
    df = table(at)
    assert list(df["Name"]) == ["cli-b1", "b2", "b0.5"]  # the CLI's run is listed like the others
    row = df.iloc[1]
    assert (row["Dataset"], row["Arch"], row["Latent D"], row["β"], row["Epochs"]) == \
        ("sprites", "mlp", TINY.model.latent_dim, "2", "1 / 1")
    assert row["Status"].endswith("finished") and row["When"][:2] == "20"
    best = max(m["elbo"] for m in runs.read_metrics(runs_dir / "b2") if m["split"] == "test")
    assert row["Best test ELBO"] == pytest.approx(best)
    assert (row["Owner"], row["Host"]) == ("anyone (CLI)", runs.HOST)  # no session started it: anyone steers it
    assert "Tick a second run" not in texts(at.caption)  # nothing ticked: no actions yet
    assert all(b.key != "runs_open" for b in at.button)
    assert "3 runs in" in texts(at.caption)


def test_listing_200_runs(runs_dir):
    """All 200 are listed (how fast: benchmarks/bench_runs.py)."""
    src = runs_dir / "b2"
    for i in range(200):
        d = runs_dir / f"many-{i:03d}"
        d.mkdir()
        for f in (runs.CONFIG, runs.METRICS, runs.STATUS):  # what the table reads; no checkpoint needed
            shutil.copy(src / f, d / f)
    rows = panel.table_rows(Lab(runs_dir).list_runs())
    assert len(rows) == 203
    assert len(table(runs_tab())) == 203


def test_interrupted_run_is_listed_and_resumes(runs_dir):
    """As after a server killed mid-run: status says running, by a process that no longer exists."""
    d = runs_dir / "b2"
    status = json.loads((d / runs.STATUS).read_text())
    status.update(state="running", pid=2**22 + 4321, epochs_target=2)  # a 2-epoch run killed after epoch 1
    (d / runs.STATUS).write_text(json.dumps(status))
    at = runs_tab()
    assert table(at).set_index("Name").loc["b2", "Status"].endswith("interrupted")
    tick(at, "b2")
    assert "continues from its last checkpoint" in texts(at.caption)
    at.button(key="runs_resume").click()
    rerun(at)
    assert "Training **b2** again from step 4" in texts(at.success)
    t = wait_finished(at)
    assert t.run_dir == d and t.status().step == 2 * STEPS  # same run, same step count, on to epoch 2
    assert [m["epoch"] for m in runs.read_metrics(d) if m["split"] == "test"] == [1, 2]
    assert table(rerun(at)).set_index("Name").loc["b2", "Epochs"] == "2 / 2"


# ------------------------------------------------------------------ open, fork

def test_open_makes_the_run_current_for_every_tab(runs_dir):
    at = tick(runs_tab(), "b0.5")
    at.button(key="runs_open").click()
    rerun(at)
    assert "Opened **b0.5**" in texts(at.success)
    t = current(at)
    assert t is not None and t.run_dir == runs_dir / "b0.5" and t.weights_version() > 0
    assert t.status().state == "finished" and not isinstance(t, LocalRun)  # read from its files, nothing retrained
    assert at.session_state["cfg_beta"] == 0.5 and at.session_state["cfg_train_size"] == 256  # the sidebar follows
    at.session_state["main_tab"] = "Explore latent space"
    rerun(at)
    assert not at.error and at.get("image")  # the explore panels draw from the opened checkpoint
    at.session_state["main_tab"] = "Runs"
    rerun(at).button(key="runs_delete").click()
    rerun(at).button(key="runs_delete_confirm").click()
    rerun(at)
    assert "Deleted **b0.5**" in texts(at.success) and current(at) is None  # nothing shows a ghost


def test_fork_creates_a_child_that_records_its_parent(runs_dir):
    at = tick(runs_tab(), "b0.5")
    assert at.select_slider(key="runs_fork_beta").value == 0.5  # starts from the parent's settings
    at.select_slider(key="runs_fork_beta").set_value(4.0)
    at.button(key="runs_fork_submit").click()
    rerun(at)
    assert "Forked **b0.5**" in texts(at.success), texts(at.error)
    child = wait_finished(at)
    assert at.subheader[0].value == child.run_dir.name and len(at.get("plotly_chart")) == 2  # child vs parent
    cfg = json.loads((child.run_dir / runs.CONFIG).read_text())
    assert child.run_dir.parent == runs_dir and child.run_dir.name != "b0.5"
    assert cfg["parent"] == {"run": "b0.5", "step": STEPS} and cfg["train"]["beta"] == 4.0
    assert child.status().step == 2 * STEPS  # continues the parent's step count
    df = table(rerun(at)).set_index("Name")
    assert df.loc[child.run_dir.name, "Parent"] == f"b0.5 @ step {STEPS}"
    assert df.loc[child.run_dir.name, "Epochs"] == "2 / 2"


# ------------------------------------------------------------------ compare

def test_compare_two_runs(runs_dir):
    at = tick(runs_tab(), "b2", "b0.5")
    assert not at.error, texts(at.error)
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(charts) == 2  # curves, rate–distortion plane
    names = {tr.get("name") for tr in charts[0]["data"]}
    assert {"b2", "b0.5"} <= names
    assert all(charts[0]["layout"][f"yaxis{s}"]["title"]["text"] == "nats per example" for s in ("", "2", "3"))
    rd = charts[1]
    labels = {t for tr in rd["data"] for t in (tr.get("text") or [])}
    assert labels == {"β=2", "β=0.5"}
    final = {r["Run"]: r for r in at.dataframe[1].value.to_dict("records")}
    last = [m for m in runs.read_metrics(runs_dir / "b2") if m["split"] == "test"][-1]
    assert final["b2"]["Test ELBO"] == f"{last['elbo']:.2f}" and final["b2"]["KL"] == f"{last['kl']:.2f}"  # as shown
    assert len(at.get("image")) == 4  # samples and reconstructions for each run
    at.segmented_control(key="runs_cmp_x").set_value("epoch")
    at.toggle(key="runs_cmp_train").set_value(False)
    rerun(at)
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert spec["layout"]["xaxis"]["title"]["text"] == "epoch" and len(spec["data"]) == 2 * 3


def test_comparison_data_is_aligned(runs_dir):
    lab = Lab(runs_dir)
    a, b = compare.load(lab, "b0.5"), compare.load(lab, "b2")
    for run in (a, b):
        x, y = compare.series(run.split("test"), "elbo", "epoch")
        assert list(x) == [1.0]
        x, _ = compare.series(run.split("test"), "kl", "step")
        assert list(x) == [STEPS]
        xs, _ = compare.series(run.split("train"), "elbo", "epoch")
        assert xs[-1] == pytest.approx(1.0)
    rate, dist = compare.rd_points(a)
    last = a.split("test")[-1]
    assert rate[-1] == pytest.approx(last["kl"]) and dist[-1] == pytest.approx(-last["recon"])
    # A fork continues its parent's step axis; evidence rows give the best IWAE bound at the largest k.
    rows = [{"split": "test", "step": 10, "epoch": 3, "elbo": -90.0, "recon": -85.0, "kl": 5.0, "active_units": 2},
            {"split": "evidence", "step": 10, "epoch": 3, "ks": [1, 10, 100], "iwae": [-90.0, -88.5, -87.9]}]
    run = compare.RunData("child", "x", RunConfig(), rows)
    assert compare.best_iwae(rows) == (-87.9, 100)
    assert compare.best_iwae([{"split": "evidence", "iwae": {"1": -3.0, "50": -2.0}}]) == (-2.0, 50)
    n = compare.final_numbers(run)
    assert (n["Steps"], n["Test ELBO"], n["Best IWAE bound"], n["Active units"]) == \
        (10, -90.0, -87.9, f"2 / {RunConfig().model.latent_dim}")


# ------------------------------------------------------------------ export and import

def test_exports_round_trip_through_the_cli(runs_dir, tmp_path):
    at = tick(runs_tab(), "b2")
    keys = {b.key for b in at.get("download_button")}
    assert {"runs_dl_csv", "runs_dl_samples", "runs_dl_recon", "runs_dl_ckpt", "runs_dl_zip"} <= keys
    d, lab = runs_dir / "b2", get_lab()
    rows = list(csv.DictReader(io.StringIO(actions.metrics_csv_bytes(lab, "b2").decode())))
    metrics = runs.read_metrics(d)
    assert len(rows) == len(metrics) and float(rows[-1]["elbo"]) == pytest.approx(metrics[-1]["elbo"])
    assert actions.checkpoint_bytes(lab, "b2") == (d / runs.CHECKPOINT).read_bytes()
    png = Image.open(io.BytesIO(actions.samples_png(lab, "b2")))
    assert png.format == "PNG" and png.size == (4 * (8 * 29 - 1),) * 2
    assert Image.open(io.BytesIO(actions.reconstructions_png(lab, "b2"))).size == (4 * (8 * 29 - 1), 4 * (4 * 29 - 1))
    data = actions.zip_bytes(lab, "b2")
    names = set(zipfile.ZipFile(io.BytesIO(data)).namelist())
    assert {"b2/config.json", "b2/metrics.jsonl", "b2/checkpoint.pt"} <= names
    zpath = tmp_path / "b2.zip"
    zpath.write_bytes(data)
    other = tmp_path / "other-machine"
    assert cli.main(["train", "--resume", str(zpath), "--epochs", "1", "--runs-dir", str(other), "--threads", "1",
                     "--quiet"]) == 0
    (resumed,) = runs.list_runs(other)
    assert resumed.epochs_done == 2 and resumed.status == "finished"


def test_import_accepts_a_run_zip_and_rejects_bad_ones(runs_dir, tmp_path):
    at = runs_tab()
    good = actions.zip_bytes(get_lab(), "b2")
    at.file_uploader(key="runs_import").set_value(("b2.zip", good, "application/zip"))
    rerun(at)
    assert "Imported **b2.zip** as **b2-2**" in texts(at.success)
    assert "b2-2" in list(table(at)["Name"]) and at.get("download_button")  # imported and ticked
    assert runs.load_checkpoint(runs_dir / "b2-2" / runs.CHECKPOINT)["step"] == STEPS

    before = sorted(p.name for p in runs_dir.iterdir())
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../escaped/config.json", (runs_dir / "b2" / runs.CONFIG).read_text())
        z.writestr("run/checkpoint.pt", (runs_dir / "b2" / runs.CHECKPOINT).read_bytes())
    at.file_uploader(key="runs_import").set_value(("evil.zip", evil.getvalue(), "application/zip"))
    rerun(at)
    assert "Could not import evil.zip" in texts(at.error) and "outside" in texts(at.error)
    at.file_uploader(key="runs_import").set_value(("junk.zip", b"not a zip at all", "application/zip"))
    rerun(at)
    assert "Could not import junk.zip" in texts(at.error) and "not a zip" in texts(at.error)
    assert sorted(p.name for p in runs_dir.iterdir()) == before
    assert not (runs_dir.parent / "escaped").exists()


# ------------------------------------------------------------------ rename and delete

def test_rename_sanitises_the_name(runs_dir):
    at = tick(runs_tab(), "b0.5")
    at.text_input(key="runs_rename_to").input("../my best/run")
    rerun(at)
    assert "Will be saved as `my-best-run`" in texts(at.caption)
    at.button(key="runs_rename").click()
    rerun(at)
    assert "Renamed **b0.5** to **my-best-run**" in texts(at.success)
    assert (runs_dir / "my-best-run" / runs.CHECKPOINT).exists() and not (runs_dir / "b0.5").exists()
    assert not (runs_dir.parent / "my best").exists()
    assert "my-best-run" in list(table(at)["Name"])
    assert at.get("subheader")[0].value == "my-best-run"  # still ticked under its new name


def test_delete_asks_first_and_refuses_a_training_run(runs_dir):
    at = tick(runs_tab(), "b2")
    at.button(key="runs_delete").click()
    rerun(at)
    assert "cannot be undone" in texts(at.warning) and (runs_dir / "b2").exists()  # only asked
    at.button(key="runs_delete_cancel").click()
    rerun(at)
    assert not at.warning and (runs_dir / "b2").exists()

    runs.write_status(runs_dir / "b2", "running")  # trained by a live process (this one's pid)
    at.button(key="runs_delete").click()
    rerun(at)
    at.button(key="runs_delete_confirm").click()
    rerun(at)
    assert "training" in texts(at.error) and (runs_dir / "b2" / runs.CHECKPOINT).exists()

    runs.write_status(runs_dir / "b2", "stopped")
    at.button(key="runs_delete").click()
    rerun(at)
    at.button(key="runs_delete_confirm").click()
    rerun(at)
    assert "Deleted **b2**" in texts(at.success) and not (runs_dir / "b2").exists()
    assert list(table(at)["Name"]) == ["cli-b1", "b0.5"]


def test_a_run_training_in_this_server_cannot_be_deleted(runs_dir):
    at = tick(runs_tab(), "b2")
    slow = get_lab().fork("b2", epochs=500)  # long enough to still be training
    try:
        rerun(at)
        tick(at, slow.name)
        assert "Training now in this server" in texts(at.caption)
        assert at.button(key="runs_resume").disabled
        at.button(key="runs_delete").click()
        rerun(at)
        at.button(key="runs_delete_confirm").click()
        rerun(at)
        assert "is training" in texts(at.error)
        assert slow.run_dir.exists() and slow.status().state in ("running", "queued")
    finally:
        get_lab().stop(slow.name, wait=10)


def test_ticks_and_forms_survive_a_visit_to_another_tab(runs_dir):
    """Streamlit drops a widget's state while its tab is closed; the ticks and the fork form come back."""
    at = tick(runs_tab(), "b2", "b0.5")
    at.session_state["main_tab"] = "Training"
    rerun(at)
    at.session_state["main_tab"] = "Runs"
    rerun(at)
    assert not at.error, texts(at.error)
    assert at.subheader[0].value == "b2" and len(at.get("plotly_chart")) == 2
    assert at.select_slider(key="runs_fork_beta").value == 2.0


def test_an_unreadable_run_is_listed_and_can_still_be_deleted(runs_dir):
    (runs_dir / "b2" / runs.CONFIG).write_text("{ half a config")
    at = tick(runs_tab(), "b2")
    assert table(at).set_index("Name").loc["b2", "Status"].endswith("unreadable")
    assert "cannot be opened" in texts(at.error) and "config.json" in texts(at.error)
    assert at.button(key="runs_open").disabled and at.button(key="runs_resume").disabled
    at.button(key="runs_delete").click()
    rerun(at)
    at.button(key="runs_delete_confirm").click()
    rerun(at)
    assert "Deleted **b2**" in texts(at.success) and not (runs_dir / "b2").exists()


# ------------------------------------------------------------------ everyone's runs: owners, the Mine filter

def _set_owner(run_dir: Path, owner: str) -> None:
    """As if another browser tab had started the run (config.json records its session)."""
    path = run_dir / runs.CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), "owner": owner}))


def test_only_mine_keeps_the_runs_this_session_started(runs_dir):
    at = tick(runs_tab(), "b0.5")
    at.button(key="runs_fork_submit").click()
    rerun(at)
    child = wait_finished(at)
    df = table(rerun(at)).set_index("Name")
    assert df.loc[child.name, "Owner"] == "you" and df.loc["b2", "Owner"] == "anyone (CLI)"
    at.toggle(key="runs_mine").set_value(True)
    rerun(at)
    assert list(table(at)["Name"]) == [child.name]
    assert "1 run in" in texts(at.caption) and "(of 4)" in texts(at.caption)
    at.toggle(key="runs_mine").set_value(False)
    rerun(at)
    assert len(table(at)) == 4


def test_another_sessions_run_opens_read_only_and_forks(runs_dir):
    _set_owner(runs_dir / "b2", "0123456789abcdef")
    at = runs_tab()
    assert table(at).set_index("Name").loc["b2", "Owner"] == "session 012345"
    tick(at, "b2")
    assert at.button(key="runs_resume").disabled and not at.button(key="runs_open").disabled
    assert "Started by another session" in texts(at.caption)
    at.button(key="runs_open").click()
    rerun(at)
    assert "Opened **b2**" in texts(at.success)
    shown = current(at)
    assert shown is not None and shown.name == "b2"
    assert not get_lab().can_steer(shown.run_dir, sid(at))
    at.button(key="runs_fork_submit").click()  # anyone may fork it: the child is this session's
    rerun(at)
    assert "Forked **b2**" in texts(at.success), texts(at.error)
    child = wait_finished(at)
    assert get_lab().owner(child.name) == sid(at)
    assert json.loads((child.run_dir / runs.CONFIG).read_text())["parent"]["run"] == "b2"


# ------------------------------------------------------------------ a run trained by another process

def _drawn_step(at: AppTest) -> int:
    """The weights' step the Explore tab's prior samples say they were decoded with."""
    caption = at.get("image")[0].captions[0]
    return int(re.search(r"weights from step ([\d,]+)", caption).group(1).replace(",", ""))


def _poll(at: AppTest, predicate, timeout: float, what: str) -> AppTest:
    deadline = time.monotonic() + timeout
    while True:
        rerun(at)
        if predicate(at):
            return at
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.mark.slow
def test_a_run_trained_by_another_process_is_followed_live(runs_dir):
    """The CLI trains in its own process; the Runs tab opens it and Explore and Evidence draw its newest weights."""
    cmd = [sys.executable, "-m", "vae_core", "train", "--runs-dir", str(runs_dir), "--name", "cli-live",
           "--dataset", "sprites", "--train-size", "512", "--batch-size", "64", "--hidden-dim", "64",
           "--latent-dim", "2", "--epochs", "2000", "--evidence-every", "0", "--threads", "1", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    d = runs_dir / "cli-live"
    try:
        deadline = time.monotonic() + 120
        while not (d / runs.CHECKPOINT).exists():  # its first epoch's checkpoint
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the CLI run wrote no checkpoint"
            time.sleep(0.2)
        at = runs_tab()
        assert table(at).set_index("Name").loc["cli-live", "Status"].endswith("running")
        tick(at, "cli-live")
        assert "Being trained by another process" in texts(at.caption)
        assert at.button(key="runs_resume").disabled
        at.button(key="runs_open").click()
        rerun(at)
        assert "another process is training" in texts(at.success), texts(at.error)
        run = current(at)
        assert run is not None and run.status().followed and run.status().state == "running"

        at.session_state["main_tab"] = "Explore latent space"
        rerun(at)
        assert not at.error, texts(at.error)
        first = _drawn_step(at)
        assert first > 0
        # Each new checkpoint the other process writes is picked up: a later look decodes newer weights.
        _poll(at, lambda a: a.get("image") and _drawn_step(a) > first, 120, "newer followed weights")

        at.session_state["main_tab"] = "Evidence: ELBO ≤ log p(x)"
        rerun(at)
        at.button(key="evidence_grid_go").click()  # the posterior grid is computed only when asked
        rerun(at)
        assert not at.error, texts(at.error)
        page = texts(at.markdown) + texts(at.caption)
        assert "✓ pass · ELBO" in page
        step = int(re.search(r"Weights from step ([\d,]+)", page).group(1).replace(",", ""))
        assert step > first  # the posterior is integrated with the followed weights, not the first ones

        get_lab().stop("cli-live")  # steering through its control file: the CLI run has no owner
        assert proc.wait(timeout=120) == 0
        assert runs.read_status(d)["state"] == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_table_shows_the_beta_a_run_trains_with_now(runs_dir):
    """A run moved live from β = 1 to β = 4 is listed at 4, and says where it started."""
    lab = get_lab()
    run = lab.start(RunConfig().replace(epochs=200, train_size=512, batch_size=64, hidden_dim=32, evidence_every=0),
                    name="moved")
    try:
        lab.update(run.name, beta=4.0)
    finally:
        lab.stop(run.name, wait=30)
    row = next(r for r in panel.table_rows(lab.list_runs()) if r["Name"] == "moved")
    assert row["β"] == "4 (started at 1)"
