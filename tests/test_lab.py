"""The Lab: runs started here (owners, the queue), runs followed from other processes, steering through files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vae_core import runs
from vae_core.lab import FollowedRun, Lab, RunBusy, RunConfig
from helpers import poll_until

ROOT = Path(__file__).resolve().parents[1]
TINY_CLI = ["--dataset", "sprites", "--train-size", "1024", "--batch-size", "64", "--hidden-dim", "64",
            "--latent-dim", "2", "--evidence-every", "0", "--threads", "1", "--quiet"]





def test_start_creates_the_run_directory_before_the_thread(lab, tiny_config):
    run = lab.start(tiny_config.replace(epochs=50), owner="alice")
    assert (run.run_dir / runs.CONFIG).exists()  # no polling for the name
    assert json.loads((run.run_dir / runs.CONFIG).read_text())["owner"] == "alice"
    lab.stop(run.name, owner="alice", wait=10)


def test_second_run_queues_and_starts_when_the_first_ends(lab, tiny_config):
    first = lab.start(tiny_config.replace(epochs=3), owner="a")
    second = lab.start(tiny_config.replace(epochs=1, beta=2.0), owner="b")
    assert second.status().state == "queued" and second.status().queue_position == 1
    assert runs.read_status(second.run_dir)["state"] == "queued"
    assert [r.status for r in lab.list_runs() if r.name == second.name] == ["queued"]
    poll_until(lambda: lab.open(second.name).status().state == "finished", what="the queued run to finish")
    assert lab.open(first.name).status().state == "finished"  # never stopped by the second session's Train
    assert lab.open(second.name).metrics_count() > 0


def test_a_waiting_page_wakes_when_its_run_starts(lab, tiny_config):
    """wait_queue_moves returns as the scheduler launches the run (or the run ahead leaves), not at its timeout."""
    import threading

    first = lab.start(tiny_config.replace(epochs=10_000), owner="a")
    second = lab.start(tiny_config.replace(epochs=1), owner="b")
    third = lab.start(tiny_config.replace(epochs=1), owner="c")
    assert third.status().queue_position == 2
    first.wait_queue_moves(600)  # not queued: at once
    woke: list[int | None] = []
    waiter = threading.Thread(target=lambda: (third.wait_queue_moves(600), woke.append(third.status().queue_position)))
    waiter.start()
    lab.stop(second.name, owner="b")  # leaves the queue: the run behind it moves up
    waiter.join(60)
    assert not waiter.is_alive() and woke == [1]
    woke.clear()
    waiter = threading.Thread(target=lambda: (third.wait_queue_moves(600), woke.append(third.status().queue_position)))
    waiter.start()
    lab.stop(first.name, owner="a", wait=30)  # a slot frees: the scheduler starts the third run
    waiter.join(60)
    assert not waiter.is_alive() and woke == [None]
    assert third.status().state in ("running", "finished")
    t0 = time.monotonic()
    third.wait_queue_moves(600)  # no longer queued: at once
    assert time.monotonic() - t0 < 60


def test_only_the_owner_steers(lab, tiny_config):
    run = lab.start(tiny_config.replace(epochs=200), owner="alice")
    with pytest.raises(RunBusy, match="another session"):
        lab.pause(run.name, owner="bob")
    with pytest.raises(RunBusy):
        lab.update(run.name, owner="bob", beta=3.0)
    assert lab.can_steer(run.name, "alice") and not lab.can_steer(run.name, "bob")
    lab.update(run.name, owner="alice", beta=3.0)
    assert lab.open(run.name).status().beta == 3.0
    lab.stop(run.name, owner="alice", wait=10)
    # The runs table lists the β it trains with now, and the one it started with.
    listed = next(r for r in lab.list_runs() if r.name == run.name)
    assert listed.beta == 3.0 and listed.beta_start == 1.0


def test_sessions_keep_their_own_current_run(lab, tiny_config):
    a = lab.start(tiny_config.replace(epochs=1), owner="s1")
    lab.show("s1", a.name)
    assert lab.current("s1").name == a.name and lab.current("s2") is None
    poll_until(lambda: a.status().state == "finished", what="the run to finish")
    lab.delete(a.name)
    assert lab.current("s1") is None  # a deleted run is no session's current run


def test_delete_right_after_finished_waits_for_the_thread_to_close(lab, tiny_config):
    """"Finished" shows before the training thread has closed its files; Delete at that moment once said
    "is training here; stop it first" (seen in the suite under load). A listener holds the thread open."""
    import threading

    closing, release = threading.Event(), threading.Event()
    run = lab.start(tiny_config.replace(epochs=1), owner="s1")
    run.trainer.add_exit_listener(lambda _t: (closing.set(), release.wait(120)))
    poll_until(closing.is_set, what="the training thread to reach its end")
    assert run.status().state == "finished" and run.is_alive()
    threading.Timer(0.5, release.set).start()  # the thread closes while Delete waits (or has already refused)
    lab.delete(run.name)
    assert not run.run_dir.exists() and run.name not in [r.name for r in lab.list_runs()]


def test_follower_tails_new_rows_and_rereads_a_rewritten_file(tmp_path, tiny_config):
    run_dir = runs.create_run_dir(tmp_path, tiny_config, "followed")
    runs.write_config(run_dir, tiny_config)
    w = runs.MetricsWriter(run_dir)
    for step in (1, 2, 3):
        w.write({"step": step, "split": "train", "elbo": -step})
    f = FollowedRun(run_dir)
    assert [r["step"] for r in f.metrics()] == [1, 2, 3]
    w.write({"step": 4, "split": "train", "elbo": -4})
    with open(run_dir / runs.METRICS, "a") as half:  # a line still being written is not read yet
        half.write('{"step": 5, "spl')
    f._refreshed = 0.0
    assert [r["step"] for r in f.metrics()] == [1, 2, 3, 4]
    runs.truncate_metrics(run_dir, 2)  # what a resume from step 2 does: the file is replaced, shorter
    f._refreshed = 0.0
    assert [r["step"] for r in f.metrics()] == [1, 2]
    w.close()


def test_heartbeat_decides_for_runs_on_other_hosts(tmp_path, tiny_config):
    run_dir = runs.create_run_dir(tmp_path, tiny_config, "elsewhere")
    base = {"state": "running", "message": "", "pid": 1, "host": "another-machine"}
    runs.atomic_write_json(run_dir / runs.STATUS, {**base, "heartbeat": time.time()})
    assert runs.read_status(run_dir)["state"] == "running"  # PID 1 here says nothing about that machine
    runs.atomic_write_json(run_dir / runs.STATUS, {**base, "heartbeat": time.time() - 10 * runs.STALE_S})
    assert runs.read_status(run_dir)["state"] == "interrupted"
    # On this host a dead PID says so at once, however fresh the heartbeat.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    runs.atomic_write_json(run_dir / runs.STATUS, {**base, "host": runs.HOST, "pid": dead.pid, "heartbeat": time.time()})
    assert runs.read_status(run_dir)["state"] == "interrupted"


def test_a_stale_lock_is_taken_over_and_a_live_one_refuses(tmp_path, tiny_config):
    run_dir = runs.create_run_dir(tmp_path, tiny_config, "locked")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / runs.LOCK).write_text(json.dumps({"host": runs.HOST, "pid": dead.pid}))
    lock = runs.RunLock(run_dir).acquire()  # the holder is gone: recovered
    assert lock.held
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.release()
        (run_dir / runs.LOCK).write_text(json.dumps({"host": runs.HOST, "pid": live.pid}))
        runs.write_status(run_dir, "running")
        with pytest.raises(RunBusy, match=f"process {live.pid}"):
            runs.RunLock(run_dir).acquire()
    finally:
        live.kill()


@pytest.mark.slow
def test_cli_run_is_followed_steered_stopped_and_resumed(runs_dir, tmp_path):
    """The CLI trains; the Lab of another process follows it, moves its β, stops it and resumes it."""
    env = {**os.environ, "VAE_RUNS_DIR": str(runs_dir)}
    cmd = [sys.executable, "-m", "vae_core", "train", "--name", "cli-run", "--epochs", "500", *TINY_CLI]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lab = Lab(runs_dir, max_runs=1, num_threads=1)
    try:
        run = poll_until(lambda: (runs_dir / "cli-run" / runs.CONFIG).exists() and lab.open("cli-run"),
                         what="the CLI run's directory")
        assert isinstance(run, FollowedRun)
        poll_until(lambda: run.metrics_count() >= 2 and run.status().state == "running", what="rows from the CLI run")
        assert run.status().followed

        # A second trainer of the same run is refused with one line while the first lives.
        second = subprocess.run([sys.executable, "-m", "vae_core", "train", "--resume", "cli-run", "--quiet"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode != 0 and "being trained by process" in second.stderr
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1

        lab.update("cli-run", beta=3.5)
        seen = run.metrics_count()
        poll_until(lambda: any(r.get("beta") == 3.5 for r in run.metrics(seen)), what="rows with the new β")
        poll_until(lambda: run.status().beta == 3.5, what="the status to acknowledge β")

        lab.stop("cli-run")
        proc.wait(timeout=300)
        assert proc.returncode == 0, proc.stderr.read()
        assert poll_until(lambda: run.status().state == "stopped", what="the stopped status")
        assert (runs_dir / "cli-run" / runs.CHECKPOINT).exists()
        assert not (runs_dir / "cli-run" / runs.LOCK).exists()

        stopped_at = run.status().step
        resumed = lab.resume("cli-run", epochs=1)
        poll_until(lambda: resumed.status().state == "finished", what="the resumed run to finish")
        train = [r for r in resumed.metrics() if r["split"] == "train"]
        assert train[-1]["step"] > stopped_at and train[-1]["beta"] == 3.5  # the live β carried over
    finally:
        if proc.poll() is None:
            proc.kill()
        lab.shutdown()


def test_a_fork_lists_where_it_continues_from_before_it_trains(lab, tiny_config):
    parent = lab.start(tiny_config.replace(epochs=2), owner="a")
    poll_until(lambda: parent.status().state == "finished", what="the parent to finish")
    busy = lab.start(tiny_config.replace(epochs=500), owner="b")  # takes the one slot: the fork waits in the queue
    fork = lab.fork(parent.name, owner="a", epochs=3, beta=2.0)
    assert fork.status().state == "queued"
    # Before it has loaded anything it already says where it stands: the parent's 2 epochs of 5.
    assert (fork.status().epoch, fork.status().epochs_target) == (2.0, 5)
    row = next(r for r in lab.list_runs() if r.name == fork.name)
    assert (row.status, row.epochs_done, row.epochs_planned) == ("queued", 2, 5)
    lab.stop(fork.name, owner="a")
    lab.stop(busy.name, owner="b", wait=10)
