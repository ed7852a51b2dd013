"""Faults lose nothing: SIGKILL at any moment leaves a run that lists, opens and resumes; no leaked threads."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from helpers import train_to_end
from vae_core import runs
from vae_core.trainer import Trainer


def start_cli_run(tmp_path, name):
    # PYTHONPATH: this checkout's code, whatever `pip install -e` points at (the run starts in tmp_path).
    env = {**os.environ, "VAE_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-m", "vae_core", "train", "--dataset", "sprites", "--epochs", "200",
                             "--train-size", "1024", "--batch-size", "32", "--hidden-dim", "64",
                             "--evidence-every", "0", "--name", name, "--quiet"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_epochs", [1, 2, 4])
def test_sigkill_leaves_a_run_that_lists_opens_and_resumes(tmp_path, kill_after_epochs):
    proc = start_cli_run(tmp_path, "victim")
    run = tmp_path / "runs" / "victim"
    deadline = time.monotonic() + 90
    # Kill at varied moments: after N checkpoints, plus a little into the next epoch.
    while time.monotonic() < deadline:
        tests = [m for m in runs.read_metrics_tail(run)] if run.exists() else []
        if len(tests) >= kill_after_epochs and (run / "checkpoint.pt").exists():
            break
        time.sleep(0.05)
    time.sleep(0.05 * kill_after_epochs)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    listed = {r.name: r for r in runs.list_runs(tmp_path / "runs")}
    assert listed["victim"].status == "interrupted"
    t = Trainer.open(run)
    step = t.status().step
    assert step > 0 and all(m["step"] <= step for m in t.metrics())
    assert t.decode([[0.0] * t.config.model.latent_dim]).shape == (1, 28, 28)
    train_to_end(t, epochs=1)
    rows = runs.read_metrics(run)
    steps = [m["step"] for m in rows]
    assert steps == sorted(steps) and steps[-1] > step
    assert runs.read_status(run)["state"] == "finished"


def test_stop_start_50_runs_no_leaks(tiny_config, tiny_sprites, tmp_path):
    base_threads = threading.active_count()
    tracemalloc.start()
    sizes = []
    for i in range(50):
        t = Trainer(tiny_config.replace(epochs=100), runs_dir=tmp_path / "runs", data=tiny_sprites, persist=False)
        t.start()
        time.sleep(0.02)
        t.stop()
        t.join(60)
        assert not t.is_alive()
        del t
        if i % 10 == 9:
            gc.collect()
            sizes.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    assert threading.active_count() <= base_threads  # (a thread of an earlier test may have ended meanwhile)
    # Python-heap growth between the 10th and 50th run stays under 5 MB (one model is ~0.5 MB).
    assert sizes[-1] - sizes[0] < 5 * 2**20, sizes
