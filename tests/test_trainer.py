"""The background trainer: controls, live settings, failure handling, determinism, snapshots."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vae_core.devices import CpuShare, NoSharing
from vae_core.run_math import RunMath

from vae_core.config import ConfigError
from vae_core.trainer import Trainer

from tests.helpers import spincount_when_torch_loads


def wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def make(tiny_config, tiny_sprites, runs_dir, **kw):
    return Trainer(tiny_config.replace(**kw), runs_dir=runs_dir, data=tiny_sprites, log_every=2)


def test_runs_to_finish_and_reports_epochs(tiny_config, tiny_sprites, runs_dir):
    t = make(tiny_config, tiny_sprites, runs_dir)
    assert t.status().state == "idle"
    t.start()
    t.join(60)
    st = t.status()
    assert st.state == "finished", st.message
    assert st.step == 2 * (512 // 64)
    tests = [m for m in t.metrics() if m["split"] == "test"]
    assert [m["epoch"] for m in tests] == [1, 2]
    for m in tests:
        assert m["elbo"] == pytest.approx(m["recon"] - m["kl"])
        assert m["elbo"] < 0 and m["kl"] >= 0 and m["samples_per_s"] > 0
        assert len(m["kl_per_dim"]) == 2 and sum(m["kl_per_dim"]) == pytest.approx(m["kl"], rel=1e-4)
    trains = [m for m in t.metrics() if m["split"] == "train"]
    assert trains and all({"step", "epoch", "elbo", "recon", "kl", "beta", "wall_time"} <= set(m) for m in trains)
    art = t.artifacts()
    assert art["reconstructions"].dtype == np.uint8 and art["reconstructions"].shape == (16, 28, 28)
    assert art["samples"].shape == (64, 28, 28)


def test_pause_step_resume_stop(tiny_config, tiny_sprites, runs_dir):
    t = make(tiny_config, tiny_sprites, runs_dir, epochs=500)
    t.start()
    assert wait_for(lambda: t.status().step > 3)
    t.pause()
    assert wait_for(lambda: t.status().state == "paused")
    time.sleep(0.3)
    s0 = t.status().step
    time.sleep(0.3)
    assert t.status().step == s0, "a paused run must not step"
    t.step()
    assert wait_for(lambda: t.status().step == s0 + 1)
    time.sleep(0.2)
    assert t.status().step == s0 + 1 and t.status().state == "paused"
    t.resume()
    assert wait_for(lambda: t.status().step > s0 + 5)
    t.stop()
    assert wait_for(lambda: not t.is_alive(), 60)  # how soon is a benchmark's business, not a test's
    assert t.status().state == "stopped"


def test_step_from_idle_does_one_step(tiny_config, tiny_sprites, runs_dir):
    t = make(tiny_config, tiny_sprites, runs_dir)
    t.step()
    assert wait_for(lambda: t.status().step == 1)
    time.sleep(0.3)
    assert t.status().step == 1 and t.status().state == "paused"
    t.stop()


def test_start_is_idempotent(tiny_config, tiny_sprites, runs_dir):
    t = make(tiny_config, tiny_sprites, runs_dir, epochs=200)

    def ours() -> set[threading.Thread]:  # training and heartbeat threads (an earlier test's may still be ending)
        return {th for th in threading.enumerate() if th.name.startswith(("vae-trainer", "vae-sync"))}

    before = ours()
    for _ in range(3):
        t.start()
    assert len(ours() - before) == 2  # this trainer's two threads, once
    t.stop()


def test_live_beta_applies_from_next_step(tiny_config, tiny_sprites, runs_dir):
    t = make(tiny_config, tiny_sprites, runs_dir, epochs=500)
    t.start()
    assert wait_for(lambda: len(t.metrics()) > 2)
    t.update(beta=4.0, lr=5e-4)
    n = len(t.metrics())
    assert wait_for(lambda: len(t.metrics()) > n + 2)
    last = [m for m in t.metrics() if m["split"] == "train"][-1]
    assert last["beta"] == 4.0 and last["lr"] == 5e-4
    assert t.status().beta == 4.0
    with pytest.raises(ConfigError):
        t.update(latent_dim=3)
    with pytest.raises(ConfigError):
        t.update(beta=-1.0)
    t.stop()


def test_warmup_ramps_beta(tiny_config, tiny_sprites, runs_dir):
    t = make(tiny_config, tiny_sprites, runs_dir, warmup_epochs=2.0, epochs=2)
    t.start()
    t.join(60)
    rows = [m for m in t.metrics() if m["split"] == "train"]
    betas = [m["beta_effective"] for m in rows]
    assert betas[0] < 0.2 and betas == sorted(betas) and all(m["beta"] == 1.0 for m in rows)  # the set value
    # Each row's β is the mean over the steps it averages (β(s) = s / spe / warm-up), not the value at its end.
    spe = 512 // 64
    first, last = rows[-2]["step"], rows[-1]["step"]
    assert betas[-1] == pytest.approx(np.mean([s / spe / 2.0 for s in range(first, last)]))


def test_nan_loss_fails_and_keeps_last_good_weights(tiny_config, tiny_sprites, runs_dir):
    t = make(tiny_config, tiny_sprites, runs_dir, epochs=100)
    t.start()
    assert wait_for(lambda: len(t.metrics()) >= 2)
    t.pause()
    assert wait_for(lambda: t.status().state == "paused")
    time.sleep(0.3)  # pause() returns at once; let the thread finish the step it was in and park
    good = t.published_state()
    with torch.no_grad():  # while paused the thread is blocked, so poisoning the live model is safe here
        t.math.model.decoder.fc2.bias.fill_(float("nan"))
    t.resume()
    assert wait_for(lambda: t.status().state == "failed", 10)
    assert "NaN" in t.status().message and "learning rate" in t.status().message
    assert all(torch.isfinite(v).all() for v in t.published_state().values())
    assert np.isfinite(t.decode(np.zeros((1, 2)))).all()
    assert good is not None


def test_exception_in_thread_becomes_failed_status(tiny_config, tiny_sprites, runs_dir, monkeypatch):
    t = make(tiny_config, tiny_sprites, runs_dir)

    def boom(self, x, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(RunMath, "train_step", boom)
    t.start()
    assert wait_for(lambda: t.status().state == "failed", 10)
    assert "injected fault" in t.status().message


def test_batch_larger_than_dataset_fails_without_run_dir(tiny_config, tiny_sprites, runs_dir):
    t = make(tiny_config, tiny_sprites, runs_dir, batch_size=1024)
    t.start()
    t.join(10)
    assert t.status().state == "failed" and "larger than the training set" in t.status().message
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def test_same_seed_same_metrics(tiny_config, tiny_sprites, runs_dir):
    rows = []
    for _ in range(2):
        t = make(tiny_config, tiny_sprites, runs_dir, epochs=1)
        t.start()
        t.join(60)
        rows.append([(m["step"], round(m["elbo"], 4)) for m in t.metrics() if "elbo" in m])  # not disentangle rows
    assert rows[0] == rows[1]
    t = make(tiny_config, tiny_sprites, runs_dir, epochs=1, seed=1)
    t.start()
    t.join(60)
    assert [(m["step"], round(m["elbo"], 4)) for m in t.metrics() if "elbo" in m] != rows[0]


def test_weights_change_after_step_not_after_evaluate(tiny_config, tiny_sprites):
    m = RunMath(tiny_config, tiny_sprites, torch.device("cpu"), lr=1e-3)  # built whole: nothing to prepare
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    m.evaluate()
    assert all(torch.equal(before[k], v) for k, v in m.model.state_dict().items())
    m.train_step(m.batch(torch.arange(64)), beta=1.0, free_bits=0.0, lr=1e-3)
    assert any(not torch.equal(before[k], v) for k, v in m.model.state_dict().items())


def test_a_fresh_run_math_matches_its_checkpoint(tiny_config, tiny_sprites):
    """Rebuilding from checkpoint_state gives the same model and generator: a resumed run continues exactly."""
    m = RunMath(tiny_config, tiny_sprites, torch.device("cpu"), lr=1e-3)
    for _ in range(3):
        m.train_step(m.batch(torch.arange(64)), beta=1.0, free_bits=0.0, lr=1e-3)
    again = RunMath(tiny_config, tiny_sprites, torch.device("cpu"), lr=1e-3, checkpoint=m.checkpoint_state())
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in m.model.state_dict().items())
    assert torch.equal(m.batch(torch.arange(8)), again.batch(torch.arange(8)))  # same binarization draws next


def test_snapshots_are_copies(tiny_config, tiny_sprites, runs_dir):
    t = make(tiny_config, tiny_sprites, runs_dir, epochs=1)
    t.start()
    t.join(60)
    m = t.metrics()
    m[0]["elbo"] = 123.0
    assert t.metrics()[0]["elbo"] != 123.0
    a = t.artifacts()
    a["samples"][:] = 0
    assert t.artifacts()["samples"].any()
    state = t.published_state()
    next(iter(state.values())).zero_()
    assert any(v.abs().sum() > 0 for v in t.published_state().values())


def test_decode_encode_use_published_cpu_copy(tiny_config, tiny_sprites, runs_dir):
    t = make(tiny_config, tiny_sprites, runs_dir, epochs=1)
    t.start()
    t.join(60)
    imgs, labels, names = t.test_set(8)
    mu, logvar = t.encode(imgs)
    assert mu.shape == (8, 2) and logvar.shape == (8, 2)
    out = t.decode(mu)
    assert out.shape == (8, 28, 28) and out.min() >= 0 and out.max() <= 1
    assert t.weights._current_model() is not t.math.model  # a CPU copy, never the model the optimiser updates
    assert names == ("square", "ellipse", "triangle") and set(labels) <= {0, 1, 2}


def test_restarting_a_stopped_trainer_continues_its_model(tiny_config, tiny_sprites, runs_dir):
    t = make(tiny_config, tiny_sprites, runs_dir, epochs=3)
    t.start()
    assert wait_for(lambda: t.status().step >= 10)
    t.stop()
    t.join(5)
    step = t.status().step
    z = np.zeros((1, 2), dtype=np.float32)
    before = t.decode(z)
    t.resume()
    t.join(60)
    assert t.status().state == "finished" and t.status().step == 3 * (512 // 64)
    steps = [m["step"] for m in t.metrics()]
    assert steps == sorted(steps) and steps[0] <= step
    from vae_core import runs

    assert [m["step"] for m in runs.read_metrics(t.run_dir)] == steps
    assert not np.allclose(before, t.decode(z))


def test_thread_tuner_follows_the_faster_count():
    from vae_core.devices import ThreadTuner

    tuner = ThreadTuner((1, 2), block=10, explore_every=4)
    speeds = {1: 100.0, 2: 300.0}  # steps/s: 2 threads faster while the page is quiet
    counts, sizes = [], []
    for _ in range(200):
        counts.append(tuner.current)
        sizes.append(tuner.block_size())
        tuner.record([1 / speeds[tuner.current]] * sizes[-1])
    assert counts[:2] == [2, 1] and sizes[:2] == [10, 10]  # first, each count gets a whole block
    trials = [i for i, c in enumerate(counts) if c == 1][1:]
    gaps = np.diff(trials)
    # keeps re-checking, less often while the choice holds: waits of 8, 16, 32 blocks after each trial, capped
    assert len(trials) >= 4 and list(gaps[:3]) == [9, 17, 33] and max(gaps) <= tuner.max_explore_every + 1
    assert {sizes[i] for i in trials} == {5} and sizes.count(10) == len(sizes) - len(trials)  # re-tries: half
    speeds = {1: 100.0, 2: 30.0}  # the browser redraws: oversubscribed 2 threads crawl
    counts = []
    for _ in range(40):
        counts.append(tuner.current)
        tuner.record([1 / speeds[tuner.current]] * 10)
    assert counts[-20:].count(1) >= 15


def test_thread_tuner_ignores_stalled_steps():
    """A refresh holding the GIL stalls a few steps at any thread count: the median step decides, not the mean."""
    from vae_core.devices import ThreadTuner

    tuner = ThreadTuner((1, 2), block=20, explore_every=4)
    counts = []
    for i in range(100):
        counts.append(tuner.current)
        step = 0.004 if tuner.current == 2 else 0.0063  # measured: 2 threads ~1.6x faster per step
        stalls = [0.030] * 3 if i % 3 == 0 else []  # every third block overlaps a refresh
        tuner.record(stalls + [step] * (20 - len(stalls)))
    assert counts[2:].count(2) >= 90


def test_thread_tuner_rechecks_soon_when_the_choice_changes():
    """A count's speed measured under a passing load must not decide for long: the first 2-thread block of a
    dashboard run was traced at 1/8 of its speed while the page loaded, and the tuner then trained on one
    thread for 16 blocks. When the choice changes, the other count is re-checked within explore_every blocks."""
    from vae_core.devices import ThreadTuner

    tuner = ThreadTuner((1, 2), block=10, explore_every=4)
    speeds = {1: 150.0, 2: 30.0}  # the page is loading: 2 threads crawl
    counts = []
    for i in range(300):
        if i == 1:
            speeds[2] = 250.0  # loaded: 2 threads are faster from now on
        if i == 200:
            speeds[2] = 40.0  # a burst of load long after the re-try wait has grown
        if i == 203:
            speeds[2] = 250.0
        counts.append(tuner.current)
        tuner.record([1 / speeds[tuner.current]] * tuner.block_size())
    assert counts[:6] == [2, 1, 1, 1, 1, 1]  # chose 1 thread after the slow first block...
    assert counts[6:11] == [2] * 5  # ...re-tried 2 after explore_every blocks, and 2 won
    assert counts[201:205] == [1] * 4 and counts[205:210] == [2] * 5  # the burst: away, back after 4 blocks
    assert counts[20:200].count(1) <= 6  # otherwise only the spaced-out re-tries


def test_quiet_windows_open_before_a_steady_refresh_is_due():
    from vae_core.devices import QuietWindows

    q = QuietWindows(lead=0.03, grace=0.06, history=4)
    assert not q.requested() and not q.quiet(0.0)
    q.request(10.0, 0.15)
    assert q.requested() and q.quiet(10.1) and not q.quiet(10.16)
    for t in (11.0, 12.005, 12.998):  # a timer ticking every second, within a few ms
        q.request(t, 0.15)
    assert not q.quiet(13.5) and not q.quiet(13.96)
    assert q.quiet(13.975) and q.quiet(14.05)  # from `lead` before the next call is due...
    assert not q.quiet(14.07)  # ...until `grace` after it when the call does not come (the tab closed)
    q.request(14.0, 0.15)
    assert q.quiet(14.14) and q.quiet(14.98)
    q2 = QuietWindows(lead=0.03, grace=0.06, history=4)
    for t in (0.0, 0.3, 1.0, 1.3, 2.0):  # two sessions' refreshes interleaved: no rhythm to predict
        q2.request(t, 0.15)
    assert not any(q2.quiet(2.0 + dt) for dt in (0.3 - 0.02, 0.7 - 0.02, 1.0 - 0.02))


def test_dashboard_trainer_tunes_threads(tiny_config, tiny_sprites, runs_dir, monkeypatch):
    monkeypatch.delenv("VAE_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    t = Trainer(tiny_config.replace(epochs=8), runs_dir=runs_dir, data=tiny_sprites, sharing_with_server=True)
    assert isinstance(t.cpu, CpuShare) and t.cpu.tuner.choices == (1, 2)
    t.start()
    t.join(60)
    assert t.status().state == "finished" and set(t.cpu.tuner.speed) == {1, 2}
    assert isinstance(Trainer(tiny_config, runs_dir=runs_dir, data=tiny_sprites).cpu, NoSharing)  # headless: all cores


def test_periodic_evidence_rows_bound_the_elbo(tiny_config, tiny_sprites, runs_dir):
    t = make(tiny_config, tiny_sprites, runs_dir, epochs=2, evidence_every=1)
    t.start()
    t.join(120)
    ev = [m for m in t.metrics() if m["split"] == "evidence"]
    assert [m["epoch"] for m in ev] == [1, 2]
    for m in ev:
        assert m["ks"] == [1, 10, 100, 1000]
        assert m["iwae"][-1] >= m["elbo"] - 3 * m["elbo_se"]  # the bound sits above the ELBO
        assert m["log_px_grid"] >= m["elbo_grid"] and m["kl_to_posterior_grid"] >= 0


def test_make_room_trains_on_one_thread_for_the_window(tiny_config, tiny_sprites, runs_dir, monkeypatch):
    """While the dashboard's refresh is drawn the loop yields a core; the tuner does not time those steps."""
    monkeypatch.delenv("VAE_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    counts = []
    real = torch.set_num_threads
    monkeypatch.setattr("torch.set_num_threads", lambda n: (counts.append(n), real(n)))
    t = Trainer(tiny_config.replace(epochs=2), runs_dir=runs_dir, data=tiny_sprites, sharing_with_server=True)
    t.make_room(60.0)  # the whole run falls inside the window
    t.start()
    t.join(60)
    assert t.status().state == "finished", t.status().message
    assert counts[-1] == 1 and 2 not in counts[2:]  # after the initial setting, only one thread
    assert t.cpu.tuner.blocks == 0 and not t.cpu.tuner.speed  # steps in a window never count as measurements
    # The status names the chosen count, not the one in use while the page redraws (when it reads it).
    assert t.status().device == "cpu (2 threads; 1 while the page redraws)"
    headless = Trainer(tiny_config, runs_dir=runs_dir, data=tiny_sprites)
    headless.make_room(60.0)  # no tuner (CLI, fixed --threads): nothing changes
    assert isinstance(headless.cpu, NoSharing)


def test_importing_the_core_changes_no_environment_variable():
    """A library user's environment is theirs: import vae_core (and its Lab, CLI and trainer) sets nothing."""
    code = """
import json, os
before = dict(os.environ)
import vae_core, vae_core.lab, vae_core.cli, vae_core.trainer
print(json.dumps(sorted(set(os.environ.items()) ^ set(before.items()))))
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_dashboard_shortens_openmp_polling_before_torch_loads():
    """GOMP_SPINCOUNT counts only if set before torch loads libgomp: dashboard/app.py sets it first. A user's value wins."""
    code = """
from streamlit.testing.v1 import AppTest
at = AppTest.from_file("dashboard/app.py", default_timeout=120).run()
from dashboard.state import get_lab
get_lab().warm_up()  # torch loads here at the latest
"""
    assert spincount_when_torch_loads(code) == "['10000']"
    assert spincount_when_torch_loads(code, spincount="500") == "['500']"


def test_out_of_memory_pauses_the_run_with_the_reason(tiny_config, tiny_sprites, runs_dir, monkeypatch):
    """A step that runs out of device memory pauses the run (nothing lost) and says why; resume continues."""
    from tests.helpers import poll_until

    real_step = RunMath.train_step
    calls = {"n": 0}

    def step_or_oom(self, x, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # torch.cuda.OutOfMemoryError is this class; raised here so the CPU suite covers it
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, x, **kwargs)

    monkeypatch.setattr(RunMath, "train_step", step_or_oom)
    t = make(tiny_config, tiny_sprites, runs_dir, epochs=1)
    t.start()
    poll_until(lambda: t.status().state == "paused", 60, "the out-of-memory pause")
    st = t.status()
    assert st.step == 2 and "out of memory" in st.message and "batch size 64" in st.message, st.message
    assert t.is_alive() and "smaller batch size" in st.message
    assert t.decode(np.zeros((1, 2))).shape == (1, 28, 28)  # the last published weights still serve the panels
    time.sleep(0.3)  # no fixed sleep to wait for a state: this checks the message survives parking
    assert "out of memory" in t.status().message
    t.resume()
    t.join(60)
    assert t.status().state == "finished", t.status().message
    assert t.status().step == 512 // 64  # the epoch's planned number of steps, the lost one made up
