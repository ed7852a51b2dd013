"""Hostile run directories, locks and zips (issue 21, items 9-13, 17-21): each input is made here by the test.

What a run directory, a train.lock or an imported zip holds is untrusted: a bad field lists the run
as "unreadable: <why>" (and it can still be deleted), a bad zip is refused in one line with nothing
left behind, a bomb stops at the byte limit, and one process trains a run at a time. Faults are
injected for real: processes are killed while they hold a lock, while a checkpoint is written and
while a zip is imported.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from helpers import poll_until
from vae_core import cli, runs, transfer
from vae_core.lab import FollowedRun, Lab, RunBusy
from vae_core.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "VAE_NUM_THREADS": "1"}




@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sprites):
    """One tiny trained run (1 epoch, checkpoint and metrics), copied by the tests that need one."""
    from vae_core.config import RunConfig

    d = tmp_path_factory.mktemp("trained")
    cfg = RunConfig().replace(epochs=1, batch_size=64, hidden_dim=32, latent_dim=2, evidence_every=0)
    t = Trainer(cfg, runs_dir=d, data=tiny_sprites, name="good", log_every=2)
    t.start()
    t.join(120)
    assert t.status().state == "finished", t.status().message
    return t.run_dir


def copy_run(trained: Path, runs_dir: Path, name: str = "good") -> Path:
    runs_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(trained, runs_dir / name))


def one_line(text: str) -> str:
    text = text.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


# ------------------------------------------------------------------ item 11: liveness is the process, not a bare PID

def start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat: when the process started (clock ticks after boot), read here independently."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return int(raw[raw.rindex(b")") + 2:].split()[19])


def _other_process_start() -> tuple[int, int]:
    """(pid, start time) of a live process that is not this one: PID 1."""
    return 1, start_time(1)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _status_cases():
    now = time.time()
    me = {"pid": os.getpid(), "pid_start": start_time(os.getpid())}
    pid1, start1 = _other_process_start()
    here = {"state": "running", "message": "", "host": runs.HOST, "heartbeat": now}
    return {
        "pid 0": {**here, "pid": 0},
        "pid -1 (kill(-1, 0) succeeds as root)": {**here, "pid": -1},
        "pid 1, another start time (the server restarted as PID 1)": {**here, "pid": pid1, "pid_start": start1 + 7},
        "pid 1, no start time, heartbeat expired": {**here, "pid": pid1, "heartbeat": now - 10 * runs.STALE_S},
        "a dead pid": {**here, "pid": _dead_pid()},
        "this pid reused (another start time)": {**here, **me, "pid_start": me["pid_start"] + 1},
        "no heartbeat at all": {k: v for k, v in {**here, **me}.items() if k != "heartbeat"},
        "a heartbeat a year ahead": {**here, **me, "host": "elsewhere", "heartbeat": now + 3.2e7},
        "another host, heartbeat expired": {**here, "pid": 4242, "host": "elsewhere", "heartbeat": now - 10 * runs.STALE_S},
    }


STATUS_CASES = list(_status_cases()) if Path("/proc/1/stat").exists() else []


@pytest.mark.parametrize("case", STATUS_CASES)
def test_a_run_whose_writer_is_gone_reads_as_interrupted(tmp_path, case):
    run = tmp_path / "r"
    run.mkdir()
    runs.atomic_write_json(run / runs.STATUS, _status_cases()[case])
    st = runs.read_status(run)
    assert st["state"] == "interrupted", (case, st)
    assert runs.training_reason(run) is None  # so it can be renamed, deleted and resumed


def test_a_live_writer_reads_as_running_here_and_elsewhere(tmp_path):
    """The other side of the cases above: the check can say "alive"."""
    run = tmp_path / "r"
    run.mkdir()
    runs.write_status(run, "running")
    assert runs.read_status(run)["state"] == "running"
    assert runs.read_status_raw(run)["pid_start"] == start_time(os.getpid())
    runs.atomic_write_json(run / runs.STATUS, {"state": "paused", "pid": 4242, "host": "elsewhere",
                                               "heartbeat": time.time()})
    assert runs.read_status(run)["state"] == "paused"


@pytest.mark.parametrize("pid", ["abc", 2.5, True, [1], {"x": 1}, 2**70])
def test_a_pid_that_is_no_number_makes_the_run_unreadable_not_running(tmp_path, pid):
    run = tmp_path / "r"
    run.mkdir()
    runs.atomic_write_json(run / runs.STATUS, {"state": "running", "pid": pid, "host": runs.HOST,
                                               "heartbeat": time.time()})
    st = runs.read_status(run)
    assert st["state"] == "unknown" and "pid" in st["problem"]
    assert not runs.pid_alive(pid)


# ------------------------------------------------------------------ item 10: one malformed run never breaks the listing

def _config(trained: Path) -> dict:
    return json.loads((trained / runs.CONFIG).read_text())


def _status(trained: Path) -> dict:
    return json.loads((trained / runs.STATUS).read_text())


BAD_CONFIG = {
    "created 'x'": lambda c: {**c, "created": "x"},
    "created 1e300": lambda c: {**c, "created": 1e300},
    "created NaN": lambda c: {**c, "created": float("nan")},
    "created a list": lambda c: {**c, "created": [1]},
    "created a markdown image": lambda c: {**c, "created": "![t](http://attacker/x.png) :red[**expired**]"},
    "parent a string": lambda c: {**c, "parent": "x"},
    "parent run a number": lambda c: {**c, "parent": {"run": 5, "step": 1}},
    "parent step 'x'": lambda c: {**c, "parent": {"run": "a", "step": "x"}},
    "owner a number": lambda c: {**c, "owner": 5},
    "model a string": lambda c: {**c, "model": "x"},
    "latent_dim 'x'": lambda c: {**c, "model": {**c["model"], "latent_dim": "x"}},
    "train a list": lambda c: {**c, "train": [1, 2]},
    "a JSON list": lambda c: [c],
    "not JSON": lambda c: "{ half a config",
    "nested 100,000 deep": lambda c: "[" * 100_000 + "]" * 100_000,
    "2 MB of JSON": lambda c: {**c, "pad": "x" * (2 << 20)},
    "not UTF-8": lambda c: b"\xff\xfe{}",
}
BAD_STATUS = {
    "pid 'abc'": lambda s: {**s, "pid": "abc"},
    "epochs_done 'x'": lambda s: {**s, "epochs_done": "x"},
    "epochs_target -3": lambda s: {**s, "epochs_target": -3},
    "epochs_target 1e400 (inf)": lambda s: json.dumps(s)[:-1] + ', "epochs_target": 1e400}',
    "state 5": lambda s: {**s, "state": 5},
    "state 'hacked'": lambda s: {**s, "state": "hacked"},
    "heartbeat 'x'": lambda s: {**s, "heartbeat": "x"},
    "beta 'x'": lambda s: {**s, "beta": "x"},
    "beta NaN": lambda s: {**s, "beta": float("nan")},
    "message a dict": lambda s: {**s, "message": {"a": 1}},
    "host a number": lambda s: {**s, "host": 7},
    "epochs_done a markdown link": lambda s: {**s, "epochs_done": "[click](http://attacker/)"},
    "pid_start 'x'": lambda s: {**s, "pid_start": "x"},
    "a JSON list": lambda s: [s],
    "nested deep": lambda s: "{\"a\":" * 50_000 + "1" + "}" * 50_000,
}


def _write(path: Path, value) -> None:
    if isinstance(value, bytes):
        path.write_bytes(value)
    elif isinstance(value, str):
        path.write_text(value)
    else:
        path.write_text(json.dumps(value))


def _malformed_runs(trained: Path, runs_dir: Path) -> dict[str, Path]:
    out = {}
    for i, (case, make) in enumerate(BAD_CONFIG.items()):
        d = copy_run(trained, runs_dir, f"badcfg-{i}")
        _write(d / runs.CONFIG, make(_config(trained)))
        out[f"config.json: {case}"] = d
    for i, (case, make) in enumerate(BAD_STATUS.items()):
        d = copy_run(trained, runs_dir, f"badst-{i}")
        _write(d / runs.STATUS, make(_status(trained)))
        out[f"status.json: {case}"] = d
    return out


def test_malformed_runs_list_as_unreadable_and_can_be_deleted(trained, runs_dir, capsys):
    good = copy_run(trained, runs_dir)
    bad = _malformed_runs(trained, runs_dir)
    rows = {r.name: r for r in Lab(runs_dir).list_runs()}
    assert set(rows) == {good.name, *(d.name for d in bad.values())}
    assert rows["good"].status == "finished" and rows["good"].error is None and rows["good"].best_test_elbo < 0
    for case, d in bad.items():
        r = rows[d.name]
        assert r.status == "corrupt" and r.message.startswith("unreadable: ") and r.error, case
        assert str(runs_dir) not in r.message and "\n" not in r.message, (case, r.message)
        assert "attacker" not in r.message, r.message  # what the file holds is described, not repeated
    # the CLI lists them all, one line each
    assert cli.main(["runs", "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert all(d.name in out for d in bad.values()) and "good" in out
    assert cli.main(["runs", "--runs-dir", str(runs_dir), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(bad) + 1
    # the Runs tab's table draws them
    from dashboard.panels.runs import table_rows

    table = table_rows(list(rows.values()), "me")
    assert {t["Status"] for t in table if t["Name"] != "good"} == {"✖ unreadable"}
    # and each can be deleted
    lab = Lab(runs_dir)
    for d in bad.values():
        lab.delete(d.name)
        assert not d.exists()
    assert [r.name for r in lab.list_runs()] == ["good"]
    assert sorted(p.name for p in runs_dir.iterdir()) == ["good"]  # nothing hidden left either


BAD_METRICS_LINES = {
    "a JSON list": b"[1, 2, 3]\n",
    "a JSON string": b'"test"\n',
    "step 'x'": b'{"step": "x", "split": "test", "elbo": 5.0}\n',
    "elbo 'x'": b'{"step": 3, "split": "test", "elbo": "x"}\n',
    "split 5": b'{"step": 3, "split": 5, "elbo": 5.0}\n',
    "kl_per_dim of strings": b'{"step": 3, "split": "test", "elbo": 5.0, "kl_per_dim": ["a"]}\n',
    "nested deep": b'{"split": "test", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
    "not UTF-8": b'{"split": "test", "elbo": \xff}\n',
    "a NUL line": b"\x00" * 100 + b"\n",
}


def test_bad_metrics_lines_are_skipped_and_the_run_still_lists(trained, runs_dir):
    d = copy_run(trained, runs_dir)
    before = runs.list_runs(runs_dir)[0]
    with open(d / runs.METRICS, "ab") as f:
        for line in BAD_METRICS_LINES.values():
            f.write(line)
    row = runs.list_runs(runs_dir)[0]
    assert row.error is None and row.best_test_elbo == before.best_test_elbo
    with pytest.warns(RuntimeWarning, match="skipped"):
        rows = runs.read_metrics(d)
    assert len(rows) == len(runs.read_metrics(trained))
    t = Trainer.open(d)  # opening (and so resuming) reads the same rows
    assert len(t.metrics()) == len(rows)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_metrics_file_that_is_no_file_does_not_hang_the_listing(trained, runs_dir, kind):
    d = copy_run(trained, runs_dir)
    (d / runs.METRICS).unlink()
    if kind == "fifo":
        os.mkfifo(d / runs.METRICS)  # reading it would block for ever
    else:
        (d / runs.METRICS).mkdir()
    (row,) = runs.list_runs(runs_dir)
    assert row.status == "corrupt" and "metrics.jsonl" in row.message
    assert runs.read_metrics(d) == []
    runs.delete_run(runs_dir, "good")
    assert not d.exists()


def test_the_runs_tab_draws_unreadable_rows_and_deletes_one(trained, runs_dir, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from dashboard.panels import runs as panel
    from dashboard.state import get_lab

    copy_run(trained, runs_dir)
    bad = copy_run(trained, runs_dir, "bad-created")
    _write(bad / runs.CONFIG, {**_config(trained), "created": "x"})
    worse = copy_run(trained, runs_dir, "bad-pid")
    _write(worse / runs.STATUS, {**_status(trained), "pid": "abc", "epochs_done": "x"})
    monkeypatch.setenv("VAE_RUNS_DIR", str(runs_dir))
    try:
        at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60)
        at.run()
        at.session_state["main_tab"] = "Runs"
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        table = at.dataframe(key=panel.TABLE).value.set_index("Name")
        assert table.loc["bad-created", "Status"].endswith("unreadable")
        assert table.loc["bad-pid", "Status"].endswith("unreadable")
        assert not table.loc["good", "Status"].endswith("unreadable")
        shown = list(at.dataframe(key=panel.TABLE).value["Name"])
        at.session_state[panel.TABLE] = {"selection": {"rows": [shown.index("bad-pid")], "columns": [], "cells": []}}
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        assert "pid" in " ".join(e.value for e in at.error)
        at.button(key="runs_delete").click()
        at.run()
        at.button(key="runs_delete_confirm").click()
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        assert not worse.exists() and bad.exists()
    finally:
        get_lab().shutdown()
        st.cache_resource.clear()
        st.cache_data.clear()


# ------------------------------------------------------------------ item 12: metrics lines are capped, listings incremental

def test_an_overlong_metrics_line_is_never_parsed_and_listings_read_only_what_is_new(trained, runs_dir, monkeypatch):
    monkeypatch.setattr(runs, "MAX_METRICS_LINE", 4096)  # the real cap is 1 MB; the line is 200 kB here
    d = copy_run(trained, runs_dir)
    best = runs.list_runs(runs_dir)[0].best_test_elbo
    huge = {"step": 10**6, "split": "test", "elbo": 1e9, "pad": "x" * 200_000}
    with open(d / runs.METRICS, "a") as f:
        f.write(json.dumps(huge) + "\n")
    parsed: list[int] = []
    real_loads = json.loads

    def spy(s, *a, **k):
        parsed.append(len(s))
        return real_loads(s, *a, **k)

    monkeypatch.setattr(runs.json, "loads", spy)
    assert runs.list_runs(runs_dir)[0].best_test_elbo == best  # the 1e9 line was not believed...
    assert parsed and max(parsed) < 4096  # ...nor parsed
    with pytest.warns(RuntimeWarning, match="longer than"):
        assert all(r["step"] < 10**6 for r in runs.read_metrics(d))
    assert max(parsed) < 4096
    # The next listing parses only what was appended since (nothing, here; then one new test row).
    parsed.clear()
    runs.list_runs(runs_dir)
    assert all(n < 2000 for n in parsed) and len(parsed) <= 2  # config.json and status.json only
    with open(d / runs.METRICS, "a") as f:
        f.write(json.dumps({"step": 10**6 + 1, "split": "test", "elbo": best + 1.0}) + "\n")
    parsed.clear()
    assert runs.list_runs(runs_dir)[0].best_test_elbo == best + 1.0
    assert len(parsed) <= 3


def test_an_overlong_line_still_being_written_is_skipped_once_it_ends(trained, runs_dir, monkeypatch):
    monkeypatch.setattr(runs, "MAX_METRICS_LINE", 1000)
    d = copy_run(trained, runs_dir)
    best = runs.list_runs(runs_dir)[0].best_test_elbo
    with open(d / runs.METRICS, "a") as f:
        f.write('{"step": 999999, "split": "test", "elbo": 1e9, "pad": "' + "x" * 5000)
    assert runs.list_runs(runs_dir)[0].best_test_elbo == best
    with open(d / runs.METRICS, "a") as f:
        f.write('"}\n' + json.dumps({"step": 10**6, "split": "test", "elbo": best + 2.0}) + "\n")
    assert runs.list_runs(runs_dir)[0].best_test_elbo == best + 2.0


def test_a_rewritten_metrics_file_is_read_again(trained, runs_dir):
    d = copy_run(trained, runs_dir)
    best = runs.list_runs(runs_dir)[0].best_test_elbo
    runs.truncate_metrics(d, 0)  # a resume from step 0 drops every row: a new file
    assert runs.list_runs(runs_dir)[0].best_test_elbo is None
    with open(d / runs.METRICS, "a") as f:
        f.write(json.dumps({"step": 1, "split": "test", "elbo": best - 1}) + "\n")
    assert runs.list_runs(runs_dir)[0].best_test_elbo == best - 1


# ------------------------------------------------------------------ item 9: one process trains a run at a time

HOLDER = r"""
import sys
from vae_core import runs
lock = runs.RunLock(sys.argv[1]).acquire()
runs.write_status(sys.argv[1], "stopped", "holding the lock, status not yet written (the race)")
if len(sys.argv) > 2:  # append rows as a live trainer does, past the checkpoint's step
    w = runs.MetricsWriter(sys.argv[1])
    w.write({"step": 10**6, "split": "train", "elbo": -1.0, "recon": -1.0, "kl": 0.0})
print("held", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""


def hold_lock(run: Path, *extra: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), *extra], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=ENV, text=True)
    line = p.stdout.readline().strip()
    assert line == "held", (line, p.stderr.read() if p.poll() is not None else "")
    return p


def test_a_second_process_is_refused_and_the_metrics_stay_whole(trained, runs_dir, tiny_sprites):
    d = copy_run(trained, runs_dir)
    holder = hold_lock(d, "append")
    try:
        before = (d / runs.METRICS).read_bytes()
        ino = os.stat(d / runs.METRICS).st_ino
        lab = Lab(runs_dir, num_threads=1)
        with pytest.raises(RunBusy, match=f"being trained by process {holder.pid} on {runs.HOST}"):
            lab.resume("good")
        assert isinstance(lab.open("good"), FollowedRun)  # the Lab follows the other process, keeps no dead copy
        t = Trainer.open(d, data=tiny_sprites)
        with pytest.raises(RunBusy, match=f"process {holder.pid}"):
            t.start()
        assert not t.is_alive()
        assert (d / runs.METRICS).read_bytes() == before and os.stat(d / runs.METRICS).st_ino == ino
        assert runs.lock_holder(d)["pid"] == holder.pid
        with pytest.raises(runs.RunFileError, match="training"):
            runs.delete_run(runs_dir, "good")
        with pytest.raises(runs.RunFileError, match="training"):
            runs.rename_run(runs_dir, "good", "other")
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(60)
    assert not (d / runs.LOCK).exists()  # released: the file goes with it
    lock = runs.RunLock(d).acquire()
    lock.release()


def test_the_cli_refuses_in_one_line_while_another_process_holds_the_lock(trained, runs_dir, capsys):
    d = copy_run(trained, runs_dir)
    holder = hold_lock(d)
    try:
        rc = cli.main(["train", "--resume", str(d), "--epochs", "1", "--quiet", "--threads", "1"])
        err = one_line(capsys.readouterr().err)
        assert rc == 1 and f"process {holder.pid}" in err and "stop it there first" in err
    finally:
        holder.kill()
        holder.wait(60)


def test_a_lock_whose_holder_was_killed_is_taken_over(trained, runs_dir):
    d = copy_run(trained, runs_dir)
    holder = hold_lock(d)
    holder.send_signal(signal.SIGKILL)  # injected fault: the holder dies without releasing
    holder.wait(60)
    assert json.loads((d / runs.LOCK).read_text())["pid"] == holder.pid  # the file stays behind...
    assert runs.lock_holder(d) is None  # ...naming a process that is gone
    lock = runs.RunLock(d).acquire()
    assert json.loads((d / runs.LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def _lock_cases():
    now = time.time()
    pid1, start1 = _other_process_start()
    return {
        "this host, PID 1 with another start time (reused)": ({"host": runs.HOST, "pid": pid1, "pid_start": start1 + 3,
                                                             "heartbeat": now}, True),
        "this host, a dead pid": ({"host": runs.HOST, "pid": _dead_pid(), "heartbeat": now}, True),
        "this host, pid 0": ({"host": runs.HOST, "pid": 0, "heartbeat": now}, True),
        "this host, pid 'abc'": ({"host": runs.HOST, "pid": "abc", "heartbeat": now}, True),
        "another host, heartbeat expired": ({"host": "elsewhere", "pid": 77, "heartbeat": now - 10 * runs.STALE_S},
                                            True),
        "another host, no heartbeat": ({"host": "elsewhere", "pid": 77}, True),
        "another host, heartbeat fresh": ({"host": "elsewhere", "pid": 77, "heartbeat": now}, False),
        "not JSON": ("{{{", True),
        "a JSON list": ([1, 2], True),
    }


LOCK_CASES = list(_lock_cases()) if Path("/proc/1/stat").exists() else []


@pytest.mark.parametrize("case", LOCK_CASES)
def test_stale_locks_are_recovered_and_live_ones_elsewhere_refuse(tmp_path, case):
    run = tmp_path / "r"
    run.mkdir()
    content, stale = _lock_cases()[case]
    _write(run / runs.LOCK, content)
    if stale:
        lock = runs.RunLock(run).acquire()
        assert json.loads((run / runs.LOCK).read_text())["pid"] == os.getpid()
        lock.release()
    else:
        with pytest.raises(RunBusy, match="process 77 on elsewhere"):
            runs.RunLock(run).acquire()
        # once its heartbeat (the lock's or status.json's) is old, it is taken over
        runs.atomic_write_json(run / runs.STATUS, {"state": "running", "host": "elsewhere", "pid": 77,
                                                   "heartbeat": time.time()})
        _write(run / runs.LOCK, {**content, "heartbeat": time.time() - 10 * runs.STALE_S})
        with pytest.raises(RunBusy):  # status.json still beats
            runs.RunLock(run).acquire()
        runs.atomic_write_json(run / runs.STATUS, {"state": "running", "host": "elsewhere", "pid": 77,
                                                   "heartbeat": time.time() - 10 * runs.STALE_S})
        runs.RunLock(run).acquire().release()


def test_two_locks_in_one_process_and_a_linked_lock_file(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    first = runs.RunLock(run).acquire()
    with pytest.raises(RunBusy, match="already training in this process"):
        runs.RunLock(run).acquire()
    first.release()
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (run / runs.LOCK).symlink_to(outside)  # a planted link: taking the lock must not write through it
    runs.RunLock(run).acquire().release()
    assert outside.read_text() == "keep me"


def test_without_flock_the_holders_identity_still_decides(tmp_path, monkeypatch):
    """Some network file systems refuse flock (ENOLCK): the lock then rests on who the holder is."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = tmp_path / "r"
    run.mkdir()
    first = runs.RunLock(run).acquire()
    with pytest.raises(RunBusy, match="already training in this process"):
        runs.RunLock(run).acquire()
    first.release()
    _write(run / runs.LOCK, {"host": runs.HOST, "pid": _dead_pid(), "pid_start": 5, "heartbeat": time.time()})
    runs.RunLock(run).acquire().release()


RACERS = r"""
import sys, time
from vae_core import runs
while time.time() < float(sys.argv[2]):
    pass
try:
    runs.RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
except runs.RunBusy:
    print("busy", flush=True)
sys.stdin.readline()
"""


def test_racing_processes_take_a_stale_lock_once(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    for _ in range(3):
        _write(run / runs.LOCK, {"host": runs.HOST, "pid": _dead_pid(), "heartbeat": time.time()})
        go = time.time() + 3.0
        procs = [subprocess.Popen([sys.executable, "-c", RACERS, str(run), str(go)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, cwd=ROOT, env=ENV, text=True) for _ in range(4)]
        try:
            said = sorted(p.stdout.readline().strip() for p in procs)
        finally:
            for p in procs:
                p.kill()
                p.wait(60)
        assert said == ["busy", "busy", "busy", "held"], said


def test_a_run_trained_by_the_lab_refuses_a_cli_resume(runs_dir, tiny_config, tiny_sprites):
    lab = Lab(runs_dir, num_threads=1)
    run = lab.start(tiny_config.replace(epochs=1000), name="busy")
    try:
        poll_until(lambda: run.status().step > 0 and (run.run_dir / runs.METRICS).exists(), what="training")
        ino = os.stat(run.run_dir / runs.METRICS).st_ino
        r = subprocess.run([sys.executable, "-m", "vae_core", "train", "--resume", str(run.run_dir), "--quiet"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and "being trained by process" in one_line(r.stderr), r.stderr
        step = run.status().step
        poll_until(lambda: run.status().step > step, what="training to go on")
        assert os.stat(run.run_dir / runs.METRICS).st_ino == ino
    finally:
        lab.shutdown()
    run.join(60)
    rows = runs.read_metrics(run.run_dir)
    ckpt = runs.load_checkpoint(run.run_dir / runs.CHECKPOINT)
    steps = [m["step"] for m in rows]
    assert steps == sorted(steps) and steps[-1] <= ckpt["step"]
    assert len({(m["step"], m["split"]) for m in rows}) == len(rows)  # no row written twice
    assert sum(m["split"] == "test" for m in rows) == int(ckpt["epoch"])  # every epoch checkpointed is in the metrics


TINY_CLI = ["--dataset", "sprites", "--train-size", "256", "--batch-size", "32", "--hidden-dim", "32",
            "--evidence-every", "0", "--threads", "1", "--quiet"]


@pytest.mark.slow
def test_two_cli_resumes_at_once_one_trains_the_other_is_refused(runs_dir):
    assert cli.main(["train", "--epochs", "1", "--name", "good", "--runs-dir", str(runs_dir), *TINY_CLI]) == 0
    d = runs_dir / "good"
    resume = [sys.executable, "-m", "vae_core", "train", "--resume", str(d), "--threads", "1", "--quiet"]
    first = subprocess.Popen([*resume, "--epochs", "500"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        poll_until(lambda: runs.read_status(d).get("state") == "running" and runs.lock_holder(d), 180,
                   what="the first resume to train")
        epochs = int(runs.load_checkpoint(d / runs.CHECKPOINT)["epoch"])
        poll_until(lambda: int(runs.load_checkpoint(d / runs.CHECKPOINT)["epoch"]) > epochs, 180,
                   what="a checkpoint of the first resume")
        ino = os.stat(d / runs.METRICS).st_ino
        second = subprocess.run([*resume, "--epochs", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 1 and "being trained by process" in one_line(second.stderr)
        assert os.stat(d / runs.METRICS).st_ino == ino
        runs.write_control(d, command="stop")
        assert first.wait(180) == 0, first.stderr.read()
    finally:
        first.kill()
        first.wait(60)
    ckpt = runs.load_checkpoint(d / runs.CHECKPOINT)
    rows = runs.read_metrics(d)
    steps = [m["step"] for m in rows]
    assert steps == sorted(steps) and steps[-1] <= ckpt["step"]
    assert len({(m["step"], m["split"]) for m in rows}) == len(rows)  # no row written twice
    assert sum(m["split"] == "test" for m in rows) == int(ckpt["epoch"])
    assert runs.read_status(d)["state"] == "stopped"


# ------------------------------------------------------------------ item 17: temp files of killed writes

WRITER = r"""
import os, sys, time
from pathlib import Path
from vae_core import runs
def stall(fd):
    print("writing", flush=True)
    time.sleep(600)
os.fsync = stall
runs.atomic_write_bytes(Path(sys.argv[1]) / runs.CHECKPOINT, b"x" * 1_000_000)
"""


def test_temp_files_of_a_checkpoint_write_killed_midway_are_removed(trained, runs_dir, tiny_sprites):
    d = copy_run(trained, runs_dir)
    for _ in range(2):  # two kills: two leftovers
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(d)], stdout=subprocess.PIPE, cwd=ROOT, env=ENV,
                             text=True)
        assert p.stdout.readline().strip() == "writing"
        p.send_signal(signal.SIGKILL)  # injected fault: killed while the checkpoint is being written
        p.wait(60)
    left = sorted(d.glob(".checkpoint.pt.*.tmp"))
    assert len(left) == 2 and all(f.stat().st_size == 1_000_000 for f in left)
    runs.load_checkpoint(d / runs.CHECKPOINT)  # the checkpoint itself is whole
    # Opening the run later removes them (a temp file that old is no write in progress) ...
    old = time.time() - 2 * runs.TEMP_AGE_S
    os.utime(left[0], (old, old))
    Lab(runs_dir).open("good")
    assert sorted(d.glob(".checkpoint.pt.*.tmp")) == left[1:]
    # ... and training it removes them at once: it holds the lock, nobody else writes its checkpoint.
    t = Trainer.open(d, data=tiny_sprites)
    t.start(epochs=1)
    t.join(120)
    assert t.status().state == "finished" and not list(d.glob(".*.tmp"))


# ------------------------------------------------------------------ items 19, 20, 21: delete, links, modes

def test_delete_removes_a_run_holding_sub_folders(trained, runs_dir):
    d = copy_run(trained, runs_dir)
    (d / "notes" / "deeper").mkdir(parents=True)
    (d / "notes" / "deeper" / "x.txt").write_text("x")
    (d / ".hidden").write_text("x")
    Lab(runs_dir).delete("good")
    assert not d.exists() and list(runs_dir.iterdir()) == []


def test_a_run_folder_linked_outside_the_runs_directory(trained, runs_dir, tmp_path, tiny_sprites, capsys):
    elsewhere = copy_run(trained, tmp_path / "elsewhere", "target")
    before = {p.name: p.stat().st_mtime_ns for p in elsewhere.iterdir()}
    runs_dir.mkdir()
    (runs_dir / "linked").symlink_to(elsewhere)
    (row,) = runs.list_runs(runs_dir)
    assert row.status == "corrupt" and "link to a folder outside the runs directory" in row.message
    lab = Lab(runs_dir, num_threads=1)
    with pytest.raises(runs.RunFileError, match="outside the runs directory"):
        lab.resume("linked")
    assert cli.main(["train", "--resume", str(runs_dir / "linked"), "--quiet", "--threads", "1"]) == 1
    assert "outside the runs directory" in one_line(capsys.readouterr().err)
    t = Trainer.open(runs_dir / "linked", data=tiny_sprites)
    with pytest.raises(runs.RunFileError, match="outside the runs directory"):
        t.start()
    assert {p.name: p.stat().st_mtime_ns for p in elsewhere.iterdir()} == before  # nothing written there
    assert lab.rename("linked", "still-linked") == "still-linked"
    assert (runs_dir / "still-linked").is_symlink()
    lab.delete("still-linked")  # the link goes; the folder it pointed to stays whole
    assert list(runs_dir.iterdir()) == [] and {p.name for p in elsewhere.iterdir()} == set(before)


def test_a_link_to_a_run_beside_it_trains_the_run(trained, runs_dir):
    copy_run(trained, runs_dir)
    (runs_dir / "alias").symlink_to(runs_dir / "good")
    assert runs.link_problem(runs_dir / "alias") is None
    runs.RunLock(runs_dir / "alias").acquire().release()


def test_resuming_keeps_the_metrics_file_mode(trained, runs_dir, tiny_sprites):
    d = copy_run(trained, runs_dir)
    os.chmod(d / runs.METRICS, 0o644)
    with open(d / runs.METRICS, "a") as f:  # a row past the checkpoint: the resume must drop it
        f.write(json.dumps({"step": 10**6, "split": "train", "elbo": -1.0}) + "\n")
    t = Trainer.open(d, data=tiny_sprites)
    t.start(epochs=1)
    t.join(120)
    assert t.status().state == "finished"
    assert stat.S_IMODE(os.stat(d / runs.METRICS).st_mode) == 0o644
    assert all(m["step"] < 10**6 for m in runs.read_metrics(d))


def test_truncating_nothing_leaves_the_file_alone(trained, runs_dir):
    d = copy_run(trained, runs_dir)
    ino, data = os.stat(d / runs.METRICS).st_ino, (d / runs.METRICS).read_bytes()
    runs.truncate_metrics(d, 10**9)
    assert os.stat(d / runs.METRICS).st_ino == ino and (d / runs.METRICS).read_bytes() == data
    with open(d / runs.METRICS, "a") as f:
        f.write('{"step": 5, "spl')  # half a line, as after a kill: it goes, or the next row would glue to it
    runs.truncate_metrics(d, 10**9)
    assert (d / runs.METRICS).read_bytes() == data


# ------------------------------------------------------------------ items 12, 13, 18: zips

def run_zip(files: dict[str, bytes], top: str = "run", method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as z:
        for name, data in files.items():
            z.writestr(f"{top}/{name}", data)
    return buf.getvalue()


def patch_member(data: bytes, name: str, **fields: int) -> bytes:
    """Rewrite header fields of member `name` in both its local header and the central directory:
    flags, method, crc, size (the uncompressed size the archive declares)."""
    local = {"flags": (6, "<H"), "method": (8, "<H"), "crc": (14, "<I"), "size": (22, "<I")}
    central = {"flags": (8, "<H"), "method": (10, "<H"), "crc": (16, "<I"), "size": (24, "<I")}
    buf = bytearray(data)
    for sig, layout, name_at, len_at in ((b"PK\x03\x04", local, 30, 26), (b"PK\x01\x02", central, 46, 28)):
        i = buf.find(sig)
        while i != -1:
            n = struct.unpack_from("<H", buf, i + len_at)[0]
            if bytes(buf[i + name_at:i + name_at + n]).endswith(name.encode()):
                for key, value in fields.items():
                    off, fmt = layout[key]
                    struct.pack_into(fmt, buf, i + off, value)
            i = buf.find(sig, i + 4)
    return bytes(buf)


def good_files(trained: Path) -> dict[str, bytes]:
    return {n: (trained / n).read_bytes() for n in (runs.CONFIG, runs.METRICS, runs.CHECKPOINT, runs.STATUS)}


def _bad_zips(trained: Path) -> dict[str, bytes]:
    files = good_files(trained)
    good = run_zip(files)
    cfg = json.loads(files[runs.CONFIG])
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as z:
        for i in range(getattr(transfer, "MAX_MEMBERS", 10_000) + 1):
            z.writestr(f"x/{i}", b"")
    return {
        "random bytes": os.urandom(4096),
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "an encrypted checkpoint": patch_member(good, runs.CHECKPOINT, flags=0x1),
        "an encrypted config": patch_member(good, runs.CONFIG, flags=0x1),
        "compression method 99": patch_member(good, runs.CHECKPOINT, method=99),
        "bzip2 (a bomb-friendly method)": run_zip(files, method=zipfile.ZIP_BZIP2),
        "a bad CRC": patch_member(good, runs.CHECKPOINT, crc=0x12345678),
        "a bad CRC on metrics": patch_member(good, runs.METRICS, crc=0),
        "config nested 100,000 deep": run_zip({**files, runs.CONFIG: b"[" * 100_000 + b"]" * 100_000}),
        "config not JSON": run_zip({**files, runs.CONFIG: b"{ half"}),
        "config created 'x'": run_zip({**files, runs.CONFIG: json.dumps({**cfg, "created": "x"}).encode()}),
        "config latent_dim -1": run_zip({**files, runs.CONFIG: json.dumps(
            {**cfg, "model": {**cfg["model"], "latent_dim": -1}}).encode()}),
        "status pid 'abc'": run_zip({**files, runs.STATUS: json.dumps({"state": "stopped", "pid": "abc"}).encode()}),
        "status nested deep": run_zip({**files, runs.STATUS: b"[" * 100_000 + b"]" * 100_000}),
        "status 2 MB": run_zip({**files, runs.STATUS: json.dumps({"state": "stopped", "pad": "x" * (2 << 20)}).encode()}),
        "checkpoint garbage": run_zip({**files, runs.CHECKPOINT: os.urandom(5000)}),
        "no checkpoint": run_zip({runs.CONFIG: files[runs.CONFIG]}),
        "checkpoint twice": _twice(files),
        "a member leaving the run": run_zip({"../../evil/config.json": files[runs.CONFIG], **files}, top="r"),
        "an absolute member": _absolute(files),
        "10,001 entries": many.getvalue(),
    }


def _twice(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(f"a/{name}", data)
        z.writestr("b/checkpoint.pt", b"second")
    return buf.getvalue()


def _absolute(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(zipfile.ZipInfo("/tmp/config.json"), files[runs.CONFIG])
        z.writestr("r/checkpoint.pt", files[runs.CHECKPOINT])
    return buf.getvalue()


BAD_ZIPS = ["random bytes", "empty", "truncated", "an encrypted checkpoint", "an encrypted config",
            "compression method 99", "bzip2 (a bomb-friendly method)", "a bad CRC", "a bad CRC on metrics",
            "config nested 100,000 deep", "config not JSON", "config created 'x'", "config latent_dim -1",
            "status pid 'abc'", "status nested deep", "status 2 MB", "checkpoint garbage", "no checkpoint",
            "checkpoint twice", "a member leaving the run", "an absolute member", "10,001 entries"]


@pytest.mark.parametrize("case", BAD_ZIPS)
def test_a_bad_zip_is_refused_in_one_line_and_leaves_nothing(trained, runs_dir, tmp_path, case, capsys):
    data = _bad_zips(trained)[case]
    with pytest.raises(runs.RunFileError) as e:
        transfer.import_zip(data, runs_dir)
    message = one_line(str(e.value))
    assert str(runs_dir) not in message and str(tmp_path) not in message, message
    assert not runs_dir.exists() or list(runs_dir.iterdir()) == []  # not even a hidden folder
    # The same through the CLI: one line on stderr, exit 1, nothing kept.
    path = tmp_path / "x.zip"
    path.write_bytes(data)
    assert cli.main(["train", "--resume", str(path), "--runs-dir", str(runs_dir), "--quiet"]) == 1
    one_line(capsys.readouterr().err)
    assert not runs_dir.exists() or list(runs_dir.iterdir()) == []


def test_a_good_zip_still_imports_and_an_active_status_is_reset(trained, runs_dir):
    files = good_files(trained)
    status = {**json.loads(files[runs.STATUS]), "state": "running", "host": runs.HOST, "pid": os.getpid(), "pid_start": start_time(os.getpid()),
              "heartbeat": time.time()}  # exported from this very process while it trained
    d = transfer.import_zip(run_zip({**files, runs.STATUS: json.dumps(status).encode()}, top="moved"), runs_dir)
    assert d.name == "moved" and runs.read_status(d)["state"] == "stopped"
    assert [r.name for r in runs.list_runs(runs_dir)] == ["moved"] and runs.list_runs(runs_dir)[0].error is None
    assert sorted(p.name for p in runs_dir.iterdir()) == ["moved"]


def test_a_zip_whose_headers_lie_about_sizes_never_inflates_in_memory(trained, runs_dir):
    """50 MB of zeros deflate to 50 kB; the headers say 1,000 bytes. Reading it must not hold 50 MB."""
    files = good_files(trained)
    bomb = patch_member(run_zip({**files, runs.METRICS: bytes(50 << 20)}), runs.METRICS, size=1000)
    assert len(bomb) < (1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(runs.RunFileError, match="damaged"):
            transfer.import_zip(bomb, runs_dir)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, f"{peak / 2**20:.0f} MB held while importing"
    assert list(runs_dir.iterdir()) == []


def test_inflating_stops_at_the_limit_whatever_the_headers_say(trained, runs_dir, tmp_path, monkeypatch):
    files = good_files(trained)
    monkeypatch.setattr(transfer, "MAX_ZIP_BYTES", 300_000)
    honest = run_zip({**files, runs.METRICS: bytes(1 << 20)})
    with pytest.raises(runs.RunFileError, match="more than 0.286 MB"):  # the declared sizes already say so
        transfer.import_zip(honest, runs_dir)
    # The count itself, with the declared sizes out of the way: it stops at the limit, not at the end.
    z = zipfile.ZipFile(io.BytesIO(honest))
    members = {Path(i.filename).name: i for i in z.infolist()}
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(runs.RunFileError, match="its headers say less"):
        transfer._extract(z, members, dest)
    assert sum(f.stat().st_size for f in dest.iterdir()) <= 300_000
    assert not runs_dir.exists()


def test_the_runs_tab_import_says_one_line_for_a_bad_zip(trained, runs_dir, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from dashboard.state import get_lab

    copy_run(trained, runs_dir)
    monkeypatch.setenv("VAE_RUNS_DIR", str(runs_dir))
    try:
        at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60)
        at.run()
        at.session_state["main_tab"] = "Runs"
        at.run()
        for case in ("an encrypted checkpoint", "compression method 99", "a bad CRC", "config nested 100,000 deep"):
            at.file_uploader(key="runs_import").set_value(("x.zip", _bad_zips(trained)[case], "application/zip"))
            at.run()
            assert not at.exception, [e.message for e in at.exception]
            errors = " ".join(e.value for e in at.error)
            assert "Could not import x.zip" in errors and "Traceback" not in errors and str(runs_dir) not in errors
        assert sorted(p.name for p in runs_dir.iterdir()) == ["good"]
    finally:
        get_lab().shutdown()
        st.cache_resource.clear()
        st.cache_data.clear()


IMPORTER = r"""
import sys, time
from vae_core import runs, transfer
real = runs.load_checkpoint
def slow(path):
    print("checking", flush=True)
    time.sleep(600)
runs.load_checkpoint = slow
transfer.import_zip(open(sys.argv[1], "rb").read(), sys.argv[2])
"""


def test_an_import_killed_midway_leaves_no_run_and_a_full_disk_leaves_nothing(trained, runs_dir, tmp_path, monkeypatch):
    path = tmp_path / "big.zip"
    path.write_bytes(run_zip(good_files(trained)))
    p = subprocess.Popen([sys.executable, "-c", IMPORTER, str(path), str(runs_dir)], stdout=subprocess.PIPE,
                         cwd=ROOT, env=ENV, text=True)
    assert p.stdout.readline().strip() == "checking"  # every file unpacked, the checkpoint being checked
    p.send_signal(signal.SIGKILL)  # injected fault
    p.wait(60)
    assert runs.list_runs(runs_dir) == []
    (left,) = list(runs_dir.iterdir())  # a hidden folder, until the next import tidies it
    assert left.name.startswith(".import-")
    old = time.time() - 7200
    os.utime(left, (old, old))
    # A full disk on the next import: refused in one line, and nothing of it stays.
    import errno

    real_open = open

    class Full(io.RawIOBase):
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.f.close()

        def __exit__(self, *exc):
            self.close()

    monkeypatch.setattr(transfer, "open", Full, raising=False)
    with pytest.raises(runs.RunFileError, match="No space left on device") as e:
        transfer.import_zip(path, runs_dir)
    one_line(str(e.value))
    assert list(runs_dir.iterdir()) == []  # the old leftover went too
    monkeypatch.undo()
    assert transfer.import_zip(path, runs_dir).name == "run"
