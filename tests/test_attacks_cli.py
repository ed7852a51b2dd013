"""Attacks on the CLI, the training thread and checkpoints (issue 21: items 7, 12, 13, 15, 16, 21).

Every hostile input is made here by the test itself: crafted checkpoints (wrong types, NaN,
out-of-range live settings, code payloads, compressed and oversized storages, lying zip sizes),
bad arguments, and faults injected into the writers (a full or read-only disk). Each must end
in one line and a non-zero exit, never a traceback, and leave the run as it was: the
checkpoint bytes unchanged, no temporary files, no half-made run folder; a run that failed
on a write resumes once the disk takes writes again. SIGINT and SIGTERM are sent to a real
`python -m vae_core train` process.
"""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from vae_core import cli, runs
from vae_core.config import LIVE_FIELDS, RunConfig
from vae_core.models import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = RunConfig().replace(epochs=1, batch_size=64, hidden_dim=32, latent_dim=2, train_size=512, evidence_every=0)


# ------------------------------------------------------------------ helpers

def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (as `python -m vae_core` runs it): exit code, stdout, stderr."""
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str) -> str:
    assert rc != 0
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def make_run(runs_dir: Path, name: str = "victim", config: RunConfig = TINY, step: int = 8) -> Path:
    """A run directory as the trainer leaves it after one epoch, written directly (no training)."""
    run = runs_dir / name
    run.mkdir(parents=True)
    runs.write_config(run, config, created=time.time())
    torch.manual_seed(0)
    runs.save_checkpoint(run, good_state(config, step))
    runs.write_status(run, "stopped", f"stopped at step {step}", step=step, epoch=1.0, epochs_target=1,
                      steps_per_epoch=step)
    return run


def good_state(config: RunConfig, step: int = 8) -> dict:
    return {"model": build_model(config.model).state_dict(), "config": config.to_dict(), "step": step,
            "epoch": 1.0, "live": {k: getattr(config.train, k) for k in LIVE_FIELDS}}


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ crafted checkpoints

def _save(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _with(**changes):
    def craft(config: RunConfig) -> bytes:
        state = {"version": 1, **good_state(config), **changes}
        return _save({k: v for k, v in state.items() if v is not _DROP})
    return craft


_DROP = object()


def _model_with(fn):
    def craft(config: RunConfig) -> bytes:
        state = {"version": 1, **good_state(config)}
        state["model"] = fn(dict(state["model"]))
        return _save(state)
    return craft


def _recompressed(extra_floats: int):
    """A checkpoint whose storages are deflate-compressed: a few KB on disk inflate to extra_floats * 4 bytes."""
    def craft(config: RunConfig) -> bytes:
        raw = _save({"version": 1, **good_state(config), "junk": torch.zeros(extra_floats)})
        src, out = zipfile.ZipFile(io.BytesIO(raw)), io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
        return out.getvalue()
    return craft


def _lying_sizes(config: RunConfig) -> bytes:
    """Stored entries whose central directory claims a 1 GiB storage in a file of a few hundred KB."""
    raw = bytearray(_save({"version": 1, **good_state(config)}))
    z = zipfile.ZipFile(io.BytesIO(bytes(raw)))
    biggest = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name = biggest.filename.encode()
    at = raw.find(b"PK\x01\x02")  # the first central directory header
    while at >= 0:
        n = int.from_bytes(raw[at + 28:at + 30], "little")
        if bytes(raw[at + 46:at + 46 + n]) == name:
            raw[at + 24:at + 28] = (1 << 30).to_bytes(4, "little")  # uncompressed size
            break
        at = raw.find(b"PK\x01\x02", at + 4)
    return bytes(raw)


def _oversized_stored(config: RunConfig) -> bytes:
    """Plain torch.save output holding far more tensor bytes than the run's model needs."""
    return _save({"version": 1, **good_state(config), "junk": torch.zeros(1 << 20)})  # 4 MiB for a ~0.2 MB model


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _code_payload(config: RunConfig) -> bytes:
    return _save({"version": 1, **good_state(config), "x": _Payload(str(Path(os.environ["ATTACK_MARKER"])))})


CHECKPOINT_ATTACKS = {
    "step-abc": (_with(step="abc"), "'step'"),
    "step-negative": (_with(step=-5), "'step'"),
    "step-bool": (_with(step=True), "'step'"),
    "step-float": (_with(step=3.5), "'step'"),
    "step-missing": (_with(step=_DROP), "lacks 'step'"),
    "epoch-nan": (_with(epoch=float("nan")), "'epoch'"),
    "epoch-inf": (_with(epoch=float("inf")), "'epoch'"),
    "epoch-text": (_with(epoch="x"), "'epoch'"),
    "live-list": (_with(live=[1, 2]), "'live'"),
    "live-beta-1e9": (_with(live={"beta": 1e9}), "beta must be between"),
    "live-beta-nan": (_with(live={"beta": float("nan")}), "beta must be finite"),
    "live-lr-negative": (_with(live={"lr": -1.0}), "lr must be between"),
    "live-lr-text": (_with(live={"lr": "fast"}), "lr must be a number"),
    "live-unknown-key": (_with(live={"batch_size": 4}), "unknown setting"),
    "model-list": (_with(model=[1, 2, 3]), "'model'"),
    "model-text": (_with(model="weights"), "'model'"),
    "model-value-not-tensor": (_model_with(lambda m: {**m, "encoder.fc1.bias": 3}), "'model'"),
    "model-missing-key": (_model_with(lambda m: {k: v for k, v in m.items() if k != "decoder.fc2.weight"}),
                          "missing decoder.fc2.weight"),
    "model-extra-key": (_model_with(lambda m: {**m, "backdoor": torch.zeros(3)}), "unexpected backdoor"),
    "model-wrong-shape": (_model_with(lambda m: {**m, "decoder.fc2.weight": torch.zeros(784, 33)}),
                          "its config needs (784, 32)"),
    "model-wrong-dtype": (_model_with(lambda m: {**m, "decoder.fc2.bias": torch.zeros(784, dtype=torch.float64)}),
                          "torch.float32"),
    "config-list": (_with(config=[1]), "config"),
    "config-latent-0": (_with(config={"model": {"latent_dim": 0}, "train": {}}), "latent_dim"),
    "optimizer-text": (_with(optimizer="adam"), "'optimizer'"),
    "generator-float": (_with(generator=torch.zeros(3)), "'generator'"),
    "version-text-1": (_with(version="1"), "not a number"),
    "version-missing": (_with(version=_DROP), "no checkpoint version"),
    "version-99": (_with(version=99), "version 99"),
    "not-a-dict": (lambda c: _save([1, 2, 3]), "not a checkpoint"),
    "random-bytes": (lambda c: bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3),
                                                   dtype=torch.uint8).tolist()), "not a torch zip file"),
    "truncated": (lambda c: _save({"version": 1, **good_state(c)})[:5000], "checkpoint.pt"),
    "deflate-bomb-64MiB": (_recompressed(16 << 20), "compressed entries"),
    "lying-zip-sizes-1GiB": (_lying_sizes, "declares"),
    "stored-oversized-storage": (_oversized_stored, "MiB of tensors"),
    "pickled-code": (_code_payload, "never loaded"),
}


@pytest.fixture
def victim(runs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTACK_MARKER", str(tmp_path / "PWNED"))
    return make_run(runs_dir)


@pytest.mark.parametrize("attack", list(CHECKPOINT_ATTACKS))
def test_crafted_checkpoint_is_refused_in_one_line_everywhere(attack, victim, runs_dir, tmp_path, capsys):
    craft, needle = CHECKPOINT_ATTACKS[attack]
    (victim / runs.CHECKPOINT).write_bytes(craft(TINY))
    before = snapshot(victim)

    with pytest.raises(runs.RunFileError) as e:
        runs.load_checkpoint(victim / runs.CHECKPOINT)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and "checkpoint.pt" in msg, msg
    if attack == "random-bytes":
        assert "code" not in msg  # random bytes are corrupt, not "possibly code"

    line = assert_one_line_error(*run_cli(capsys, "evaluate", victim, "--num-examples", "8", "--grid", "0")[::2])
    assert needle in line
    rc, _, err = run_cli(capsys, "train", "--resume", "victim", "--runs-dir", runs_dir, "--epochs", "1", "--quiet")
    line = assert_one_line_error(rc, err)
    assert needle in line
    assert snapshot(victim) == before  # nothing trained, nothing rewritten
    assert sorted(p.name for p in runs_dir.iterdir()) == ["victim"]
    assert not (tmp_path / "PWNED").exists()


def test_the_untouched_run_loads_evaluates_and_resumes(victim, runs_dir, capsys):
    """The attacks above start from this run: it must be good, so each refusal is about the attack."""
    ckpt = runs.load_checkpoint(victim / runs.CHECKPOINT)
    assert ckpt["step"] == 8
    rc, out, err = run_cli(capsys, "evaluate", victim, "--num-examples", "8", "--grid", "0", "--json")
    assert rc == 0, err
    assert json.loads(out)["step"] == 8
    rc, _, err = run_cli(capsys, "train", "--resume", "victim", "--runs-dir", runs_dir, "--epochs", "1", "--quiet")
    assert rc == 0, err
    assert runs.load_checkpoint(victim / runs.CHECKPOINT)["step"] == 16


# ------------------------------------------------------------------ arguments

EVALUATE_ARGS = {
    "grid-3000": (["--grid", "3000"], "--grid must be between 0"),
    "grid-negative": (["--grid", "-1"], "--grid must be between 0"),
    "grid-examples-negative": (["--grid-examples", "-5"], "--grid-examples must be between 1"),
    "grid-examples-zero": (["--grid-examples", "0"], "--grid-examples must be between 1"),
    "grid-examples-above-examples": (["--num-examples", "8", "--grid-examples", "9"], "--grid-examples must be"),
    "num-examples-huge": (["--num-examples", str(10**9)], "--num-examples must be between 1"),
    "num-examples-zero": (["--num-examples", "0"], "--num-examples must be between 1"),
}


@pytest.mark.parametrize("case", list(EVALUATE_ARGS))
def test_evaluate_arguments_are_bounded_before_anything_loads(case, tmp_path, capsys):
    """Checked first: the run given does not even exist, so any other answer means the bound came too late."""
    args, needle = EVALUATE_ARGS[case]
    rc, out, err = run_cli(capsys, "evaluate", tmp_path / "no-such-run", *args)
    line = assert_one_line_error(rc, err)
    assert needle in line and out == ""


def test_grid_examples_default_fits_few_examples(victim, capsys):
    rc, out, err = run_cli(capsys, "evaluate", victim, "--num-examples", "4", "--grid", "8", "--json")
    assert rc == 0, err
    assert json.loads(out)["grid_examples"] == 4


@pytest.mark.parametrize("name", ["///", "..", "-"])
def test_bad_name_is_refused_before_the_data_load(name, runs_dir, capsys):
    # A batch larger than the data fails only once the data are loaded: the name must fail first.
    rc, _, err = run_cli(capsys, "train", "--runs-dir", runs_dir, "--name", name, "--batch-size", "600",
                         "--train-size", "512", "--quiet")
    line = assert_one_line_error(rc, err)
    assert "has no usable characters" in line
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def test_a_taken_name_is_said_not_silently_changed(runs_dir, capsys):
    make_run(runs_dir, "same")
    rc, out, err = run_cli(capsys, "train", "--runs-dir", runs_dir, "--name", "same", "--epochs", "1",
                           "--train-size", "512", "--batch-size", "64", "--hidden-dim", "32", "--evidence-every", "0",
                           "--quiet")
    assert rc == 0, err
    assert "already exists" in err and "'same-2'" in err
    assert "same-2" in out


def test_resume_refuses_a_name_it_would_ignore(victim, runs_dir, capsys):
    rc, _, err = run_cli(capsys, "train", "--resume", "victim", "--runs-dir", runs_dir, "--name", "other")
    assert "--resume keeps the run's name" in assert_one_line_error(rc, err)


# ------------------------------------------------------------------ faults: a full or read-only disk

class Fault:
    """Raise OSError(code) from the wrapped writer from its `after`-th call on; counts the calls."""

    def __init__(self, original, code: int, after: int = 0, filename: str = "x") -> None:
        self.original, self.code, self.after, self.filename, self.calls = original, code, after, filename, 0

    def patch(self):
        """A plain function (so it binds as a method when it replaces one)."""
        def faulty(*a, **k):
            self.calls += 1
            if self.calls > self.after:
                raise OSError(self.code, os.strerror(self.code), self.filename)
            return self.original(*a, **k)
        return faulty


# (where, errno, calls that succeed first, what a resume must find: "run" a run folder, None none at all)
FAULTS = {
    "metrics-row-enospc": ("MetricsWriter.write", errno.ENOSPC, 1, "run"),
    "metrics-open-erofs": ("MetricsWriter.__init__", errno.EROFS, 0, "run"),
    "checkpoint-enospc": ("save_checkpoint", errno.ENOSPC, 0, "run"),
    "status-enospc": ("write_status", errno.ENOSPC, 0, "run"),
    "config-in-thread-enospc": ("write_config", errno.ENOSPC, 1, None),
    "config-at-start-enospc": ("write_config", errno.ENOSPC, 0, None),
    "runs-dir-erofs": ("create_run_dir", errno.EROFS, 0, None),
    "every-atomic-write-erofs": ("atomic_write_bytes", errno.EROFS, 0, None),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_write_failure_is_one_line_and_the_run_resumes(fault, runs_dir, monkeypatch, capsys):
    where, code, after, leaves = FAULTS[fault]
    owner, attr = (runs.MetricsWriter, where.split(".")[1]) if "." in where else (runs, where)
    f = Fault(getattr(owner, attr), code, after, filename=str(runs_dir / "victim" / "file.x"))
    with monkeypatch.context() as m:
        m.setattr(owner, attr, f.patch())
        rc, _, err = run_cli(capsys, "train", "--runs-dir", runs_dir, "--name", "victim", "--epochs", "2",
                             "--train-size", "512", "--batch-size", "64", "--hidden-dim", "32",
                             "--evidence-every", "0", "--quiet")
    assert f.calls > after  # the fault fired
    assert "Traceback" not in err, err
    if fault == "status-enospc":  # status.json is a view: training goes on and says so when it can
        assert rc == 0, err
    else:
        line = assert_one_line_error(rc, err)
        assert os.strerror(code) in line
    assert no_temp_files(runs_dir) if runs_dir.exists() else True
    run = runs_dir / "victim"
    if leaves is None:
        assert not run.exists()  # nothing half-made
        return
    assert run.is_dir()
    ckpt = run / runs.CHECKPOINT
    step = runs.load_checkpoint(ckpt)["step"] if ckpt.exists() else 0
    assert all(r["step"] <= step for r in runs.read_metrics(run)) or not ckpt.exists()
    # The disk takes writes again: the run resumes (item 16: it once raised AttributeError here).
    rc, _, err = run_cli(capsys, "train", "--resume", "victim", "--runs-dir", runs_dir, "--epochs", "1", "--quiet")
    assert rc == 0, err
    assert runs.load_checkpoint(ckpt)["step"] > step
    assert runs.read_status(run)["state"] == "finished"


def test_resume_in_the_same_process_after_a_failed_start(runs_dir, tiny_sprites, monkeypatch):
    """The dashboard's path: the Lab keeps the failed trainer and Resume restarts it."""
    from vae_core.lab import Lab

    lab = Lab(runs_dir, max_runs=1)
    f = Fault(runs.MetricsWriter.__init__, errno.ENOSPC)
    monkeypatch.setattr(runs.MetricsWriter, "__init__", f.patch())
    h = lab.start(TINY, name="victim")
    h.join(60)
    assert h.status().state == "failed" and "No space left" in h.status().message
    monkeypatch.undo()
    h = lab.resume("victim")
    h.join(60)
    assert h.status().state == "finished", h.status().message
    assert runs.load_checkpoint(runs_dir / "victim" / runs.CHECKPOINT)["step"] == h.status().step > 0


# ------------------------------------------------------------------ signals to a real CLI process

def _start(tmp_path: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "VAE_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("VAE_RUNS_DIR", None)
    return subprocess.Popen([sys.executable, "-m", "vae_core", "train", "--dataset", "sprites", "--epochs", "200",
                             "--train-size", "1024", "--batch-size", "32", "--hidden-dim", "32",
                             "--evidence-every", "0", "--name", name, "--quiet"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(run: Path) -> list[dict]:
    return runs.read_metrics(run) if (run / runs.METRICS).exists() else []


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_checkpoints_and_resumes(sig, code, tmp_path, capsys):
    proc = _start(tmp_path, "victim")
    run = tmp_path / "runs" / "victim"
    try:
        deadline = time.monotonic() + 120
        while len(_rows(run)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_rows(run)) >= 3, "the run never logged"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == code, err
    assert "terminate called" not in err and "Traceback" not in err, err
    assert "resume with" in err
    st = json.loads((run / runs.STATUS).read_text())
    assert st["state"] == "stopped"
    step = runs.load_checkpoint(run / runs.CHECKPOINT)["step"]
    assert step == st["step"] > 0  # the checkpoint is at the step it stopped at, not the last epoch's
    assert all(r["step"] <= step for r in _rows(run))
    assert no_temp_files(run) and not (run / runs.LOCK).exists()

    rc, _, err = run_cli(capsys, "train", "--resume", run, "--epochs", "1", "--quiet")
    assert rc == 0, err
    new = [r for r in _rows(run) if r["step"] > step]
    assert new and runs.load_checkpoint(run / runs.CHECKPOINT)["step"] > step
    assert runs.read_status(run)["state"] == "finished"


def test_ctrl_c_in_evaluate_is_one_line(victim, monkeypatch, capsys):
    """Ctrl-C while evaluate loads the test images: exit 130 and a word, not a traceback."""
    from vae_core import evaluate

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "held_out_batch", interrupted)
    try:
        rc, out, err = run_cli(capsys, "evaluate", victim, "--num-examples", "8", "--grid", "0")
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main() (a traceback for the user)")
    assert rc == 130 and "Traceback" not in err and err.strip() == "interrupted" and out == ""


def test_train_from_a_worker_thread_does_not_touch_signal_handlers(victim, runs_dir, capsys):
    """signal.signal works only in the main thread: a script calling main() from a thread still trains."""
    import threading

    result = {}
    th = threading.Thread(target=lambda: result.setdefault("rc", cli.main(
        ["train", "--resume", "victim", "--runs-dir", str(runs_dir), "--epochs", "1", "--quiet"])))
    th.start()
    th.join(120)
    assert result.get("rc") == 0, capsys.readouterr().err
    assert runs.load_checkpoint(victim / runs.CHECKPOINT)["step"] == 16


# ------------------------------------------------------------------ hostile steering and run files

CONTROL_ATTACKS = {
    "seq-text": {"seq": "abc", "command": "stop"},
    "seq-list": {"seq": [1], "command": "stop"},
    "seq-bool": {"seq": True, "command": "stop"},
    "seq-float-huge": {"seq": 1e300, "command": "stop"},
    "beta-bool": {"seq": 1, "beta": True},
    "beta-1e9": {"seq": 2, "beta": 1e9},
}


@pytest.mark.parametrize("attack", list(CONTROL_ATTACKS))
def test_hostile_control_json_neither_stops_the_start_nor_kills_steering(attack, victim, runs_dir, capsys):
    """A control.json written by hand: resume starts, it is ignored, and a real request still works after."""
    from vae_core.lab import Lab

    (victim / runs.CONTROL).write_text(json.dumps(CONTROL_ATTACKS[attack]))
    lab = Lab(runs_dir, max_runs=1)
    h = lab.resume("victim", epochs=10_000)  # long enough that only the stop below ends it
    try:
        hostile = dict(CONTROL_ATTACKS[attack])
        if attack.startswith("beta"):
            hostile["seq"] = 10**6  # newer than anything applied: read and refused on its values
        written = time.time()
        (victim / runs.CONTROL).write_text(json.dumps({**hostile, "written": written}))
        # The steering thread polls control.json, then beats status.json, in one loop: once a beat later
        # than the first beat after the write is seen, the file has been read.
        first = None
        deadline = time.monotonic() + 120
        while h.is_alive() and time.monotonic() < deadline:
            beat = runs.read_status_raw(victim).get("heartbeat", 0)
            if first is None and beat > written:
                first = beat
            elif first is not None and beat > first:
                break
            time.sleep(0.05)
        assert h.is_alive() and h.status().state == "running", h.status().message  # the hostile stop ignored
        assert h.status().beta == TINY.train.beta  # and nothing hostile applied
        # A well-formed request after the hostile one (as runs.write_control writes it; that writer itself
        # reads the old seq, so it is left out here: the steering thread is what this test is about).
        (victim / runs.CONTROL).write_text(json.dumps({"seq": 10**7, "command": "stop", "written": time.time()}))
        deadline = time.monotonic() + 120
        while h.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert h.status().state == "stopped", h.status().message
    finally:
        lab.shutdown(60)
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("row", [{"step": "x", "split": "train"}, {"step": None, "split": "train"}, {"step": [1]}])
def test_a_hostile_metrics_row_does_not_stop_a_run_from_opening(row, victim):
    from vae_core.trainer import Trainer

    with open(victim / runs.METRICS, "a") as f:
        f.write(json.dumps({"step": 8, "split": "train", "loss": 1.0}) + "\n" + json.dumps(row) + "\n")
    t = Trainer.open(victim)
    assert [m["step"] for m in t.metrics()] == [8]
