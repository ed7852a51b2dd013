"""The trainer: one VAE run in one daemon thread, with a thread-safe read/control API.

A Trainer holds the math of its run (run_math.RunMath, built in the thread when training starts)
and publishes what readers see under one lock: a status, metric rows, images and a CPU copy of
the weights (inference.Weights). Readers never touch the model the optimiser updates. Beside the
training thread a sync thread (run_sync.RunSync) beats status.json and applies control.json, so
other processes can follow and steer the run through its directory.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import data as data_mod
from . import runs, snapshots
from .config import LIVE_FIELDS, ConfigError, RunConfig, fit_to_data
from .devices import CpuShare, NoSharing, default_threads, describe_device, mixed_dtype, resolve_device
from .images import to_uint8
from .inference import N_FIXED, N_SAMPLES, Weights, get_dataset
from .records import Status, TestRow, TrainRow
from .run_math import EVIDENCE_KS, RunMath
from .run_sync import RunSync

__all__ = ["N_FIXED", "N_SAMPLES", "STATES", "Status", "Trainer", "get_dataset", "os_error_text"]

STATES = ("idle", "running", "paused", "finished", "stopped", "failed")


def _step_of(row: dict[str, Any]) -> int | None:
    """A metrics row's step when it is a whole number (a hand-edited row may hold anything)."""
    step = row.get("step", 0)
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def os_error_text(e: OSError) -> str:
    """One line for a failed read or write: the file's name (never its full path) and the system's reason."""
    what = Path(str(e.filename)).name if e.filename else "the run directory"
    return f"cannot write {what} ({e.strerror or type(e).__name__})"


class Trainer:
    """Owns one run: its data, model, optimiser, thread, run directory and published snapshots."""

    math_class = RunMath  # what builds the run's math (distributed.DistTrainer: one rank's DDP math)

    def __init__(self, config: RunConfig, *, runs_dir: str | Path | None = None, name: str | None = None,
                 data_dir: str | None = None, num_threads: int | None = None, log_every: int = 20,
                 persist: bool = True, init_from: str | Path | None = None, sharing_with_server: bool = False,
                 data: data_mod.ImageData | None = None) -> None:
        if not isinstance(config, RunConfig):
            raise ConfigError("Trainer needs a RunConfig")
        self.config = config
        self.device = resolve_device(config.train.device)  # fails fast on a missing CUDA/MPS
        mixed_dtype(config.train.precision, self.device)  # and on bf16 where it cannot run
        self.runs_dir = Path(runs_dir) if runs_dir else runs.default_runs_dir()
        self.name = name
        self.data_dir = data_dir
        self.num_threads = num_threads or default_threads(sharing_with_server=False)
        # Beside a web server the best thread count changes with the page's load: a policy measures it.
        self.cpu = CpuShare.for_device(self.device, num_threads=num_threads) if sharing_with_server else NoSharing()
        self.log_every = max(1, int(log_every))
        self.persist = persist
        self.init_from = Path(init_from) if init_from else None  # fork: start from this run's checkpoint
        self.run_dir: Path | None = None
        self.parent: dict[str, Any] | None = None

        self._lock = threading.Lock()  # guards everything below that readers see
        self._wake = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state, self._message = "idle", "not started"
        self._pending_steps = 0  # single steps requested while paused
        self._pause_reason: str | None = None  # why the run paused itself (out of memory), shown while parked
        self._live = {k: getattr(config.train, k) for k in LIVE_FIELDS}
        self._metrics: list[dict[str, Any]] = []
        self._artifacts: dict[str, Any] = {}
        self.weights = Weights(config, data_dir=data_dir, data=data)  # CPU weights for readers
        self._step, self._epoch, self._steps_per_epoch = 0, 0.0, 1
        self._epochs_target = config.train.epochs
        self._samples_per_s = 0.0
        self._resume_ckpt: dict[str, Any] | None = None
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

        self.math: RunMath | None = None  # built in the thread when training first starts
        self._last_good: dict[str, torch.Tensor] | None = None  # CPU weights of the last finite log point
        self._writer: runs.MetricsWriter | None = None
        self.timelapse: snapshots.Recorder | None = None  # weight snapshots on a geometric schedule of steps
        # Cross-process side: status.json heartbeats, control.json steering, the train.lock.
        self.sync = RunSync(self)
        self._run_lock: runs.RunLock | None = None
        self._on_exit: list[Callable[["Trainer"], None]] = []

    # ------------------------------------------------------------ constructing from disk

    @classmethod
    def open(cls, run_dir: str | Path, *, device: str | None = None, **kwargs: Any) -> "Trainer":
        """A trainer for an existing run: its weights, metrics and images from disk; start() resumes it.

        `device` overrides the recorded one (a run made on a GPU machine, resumed on a laptop).
        """
        run_dir = Path(run_dir)
        config = runs.read_config(run_dir)
        if device is not None:
            config = config.replace(device=device)
        ckpt = runs.load_checkpoint(run_dir / runs.CHECKPOINT)
        # The checkpoint's own config wins over a hand-edited config.json only for the model shape.
        try:
            ckpt_config = RunConfig.from_dict(ckpt["config"])
        except ConfigError as e:
            raise runs.RunFileError(f"{run_dir / runs.CHECKPOINT}: {e}") from None
        config = dataclasses.replace(config, model=ckpt_config.model)
        kwargs.setdefault("runs_dir", run_dir.parent)
        t = cls(config, **kwargs)
        t.run_dir, t.name = run_dir, run_dir.name
        t._resume_ckpt = ckpt
        t._step = int(ckpt["step"])
        t._epoch = float(ckpt.get("epoch", 0))
        t._live.update({k: float(v) for k, v in ckpt.get("live", {}).items() if k in LIVE_FIELDS})
        t._metrics = [m for m in runs.read_metrics(run_dir) if _step_of(m) is not None and _step_of(m) <= t._step]
        st = runs.read_status(run_dir)
        # Resumed-for-more and forked runs plan past config.epochs; status.json records where they were headed.
        if isinstance(st.get("epochs_target"), int) and st["epochs_target"] > 0:
            t._epochs_target = st["epochs_target"]
        # Steps per epoch, for "step 1,560 / 1,560" (not "/ 10") before the data are loaded again.
        spe = st.get("steps_per_epoch")
        if not (isinstance(spe, int) and spe > 0):
            spe = round(t._step / t._epoch) if t._epoch > 0 else 1
        t._steps_per_epoch = max(1, int(spe))
        t._state = "stopped" if st.get("state") in ("running", "paused", "interrupted", "unknown") else st.get("state", "stopped")
        if t._state not in STATES:
            t._state = "stopped"
        message = st.get("message")
        t._message = message[:500] if isinstance(message, str) and message else f"opened from {run_dir.name}"
        if st.get("state") == "interrupted":
            t._message = "interrupted: the process training it ended; Resume continues from the last checkpoint"
        t.weights.publish(ckpt["model"], t._step)
        return t

    # ------------------------------------------------------------ control (any thread)

    def create_run_dir(self) -> Path | None:
        """Create the run directory with its config.json now (not in the thread), so callers know its name at once."""
        if self.persist and self.run_dir is None:
            run_dir = runs.create_run_dir(self.runs_dir, self.config, self.name)
            parent = {"run": self.init_from.name} if self.init_from is not None else None
            try:
                runs.write_config(run_dir, self.config, created=time.time(), parent=parent,
                                  device=describe_device(self.device))
            except OSError:  # a full disk: no empty folder left behind (atomic_write_bytes left no temp file)
                try:
                    run_dir.rmdir()
                except OSError:
                    pass
                raise
            self.run_dir, self.name = run_dir, run_dir.name
        return self.run_dir

    def start(self, *, epochs: int | None = None) -> None:
        """Start or continue training in the background; idempotent while running.

        For an opened run, `epochs` is how many more to train (default: up to its planned total).
        Raises runs.RunBusy when another live process trains this run.
        """
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                if self._state == "paused":
                    self._state, self._message = "running", "resumed"
                    self._wake.notify_all()
                return
        if self.persist:
            self.create_run_dir()
            self._run_lock = runs.RunLock(self.run_dir)
            self._run_lock.acquire()
            self.sync.skip_old_requests()
        with self._lock:
            if epochs is not None:
                self._epochs_target = math.ceil(self._epoch) + int(epochs)
            elif self._resume_ckpt is not None and self._epoch >= self._epochs_target:
                self._epochs_target = math.ceil(self._epoch) + self.config.train.epochs
            self._stop.clear()
            self._state, self._message = "running", "starting"
            self._thread = threading.Thread(target=self._run, name=f"vae-trainer-{self.name or 'new'}", daemon=True)
            self._thread.start()
        if self.persist:
            try:
                self.sync.write_status()
            except OSError:  # the thread runs now: it fails in one line if the disk takes nothing
                pass
            self.sync.follow(self._thread)

    def starts_at(self, step: int, epoch: float) -> None:
        """A fork continues its parent's count: say so from the start, not once the thread has loaded the
        weights (until then the Runs table read "0 / 3" beside a Training tab at "epoch 10.7 / 13")."""
        with self._lock:
            self._step, self._epoch = int(step), float(epoch)
            if epoch > 0:  # the checkpoint's epoch is step / steps_per_epoch
                self._steps_per_epoch = max(1, round(step / epoch))
            self._epochs_target = math.ceil(self._epoch) + self.config.train.epochs
            if self.init_from is not None:
                self.parent = {"run": self.init_from.name, "step": int(step)}

    def add_exit_listener(self, fn: Callable[["Trainer"], None]) -> None:
        """fn(trainer) is called from the training thread as it ends (finished, stopped or failed)."""
        self._on_exit.append(fn)

    def pause(self) -> None:
        with self._lock:
            if self._state == "running":
                self._state, self._message = "paused", f"paused at step {self._step}"

    def resume(self) -> None:
        """Continue a paused run, or restart the thread of a stopped/finished/failed one."""
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive()
            if alive and self._state == "paused":
                self._state, self._message = "running", "resumed"
                self._wake.notify_all()
                return
        if not alive:
            self.start()

    def step(self) -> None:
        """Do exactly one optimisation step, pausing the run (starting it paused if needed)."""
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive()
            if alive:
                self._state = "paused"
                self._pending_steps += 1
                self._wake.notify_all()
                return
        self.start()
        with self._lock:
            self._state, self._pending_steps = "paused", 1
            self._wake.notify_all()

    def stop(self, timeout: float = 1.0) -> None:
        """Ask the thread to end and wait up to `timeout` seconds; it checkpoints on its way out."""
        self._stop.set()
        with self._lock:
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def request_stop(self) -> None:
        """Ask the thread to end (it checkpoints on its way out) without waiting for it."""
        self._stop.set()
        with self._lock:
            self._wake.notify_all()

    def mark(self, state: str, message: str) -> None:
        """Record a state for a run that is not training (e.g. one that leaves the Lab's queue unstarted)."""
        self._set(state, message)

    def note(self, message: str) -> None:
        """Replace the status message of a running run (e.g. what a steering request changed)."""
        with self._lock:
            if self._state == "running":
                self._message = message

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def update(self, **changes: float) -> None:
        """Change live settings (beta, lr, warmup_epochs, free_bits); they apply from the next step."""
        bad = set(changes) - set(LIVE_FIELDS)
        if bad:
            raise ConfigError(f"{', '.join(sorted(bad))} cannot change while a run trains; start a new run")
        # Validate through the config so the rules live in one place.
        new_train = dataclasses.replace(self.config.train, **{**self._live, **changes})
        with self._lock:
            self._live.update({k: getattr(new_train, k) for k in LIVE_FIELDS})
            self.config = dataclasses.replace(self.config, train=new_train)

    def make_room(self, seconds: float) -> None:
        """Train on fewer threads for the next `seconds`: the caller is about to make the machine busy.

        The dashboard calls this as it sends a refresh, which the browser then spends a fraction
        of a second drawing. On a small CPU a lockstep 2-thread loop stalls whenever one of its
        threads is descheduled for the browser, so yielding a core for that moment is faster
        than fighting for it. Calls at a steady rhythm also open the window just before the next
        is due (QuietWindows). Only runs with a thread tuner (training beside the server) react.
        """
        self.cpu.make_room(seconds)

    def add_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """fn(row) is called from the training thread for each metrics row (the CLI's progress bar)."""
        self._listeners.append(fn)

    # ------------------------------------------------------------ reading (any thread)

    def status(self) -> Status:
        with self._lock:
            remaining = max(0, self._epochs_target * self._steps_per_epoch - self._step)
            sps = self._samples_per_s
            eta = remaining * self.config.train.batch_size / sps if sps > 0 and self._state == "running" else None
            return Status(self._state, self._message, self._step, self._epoch, self._epochs_target,
                          self._epochs_target * self._steps_per_epoch, sps, eta, self._device_text(),
                          str(self.run_dir) if self.run_dir else None, self._live["beta"],
                          self._beta_effective_locked(), self._live["lr"], self._live["warmup_epochs"],
                          self._live["free_bits"])

    def _device_text(self) -> str:
        """The device, with the thread count the tuner chose rather than the one in use this instant.

        A tuned run trains on one thread while each refresh is drawn, which is when the page
        reads this, so torch.get_num_threads() would nearly always say 1.
        """
        text = self.cpu.describe(self.device)
        return text + " · bf16 mixed precision" if self.config.train.precision == "bf16" else text

    def metrics(self, since: int = 0) -> list[dict[str, Any]]:
        """Metric rows from index `since` on (pass len(previous) to get only new ones); copies."""
        with self._lock:
            return [dict(m) for m in self._metrics[since:]]

    def metrics_count(self) -> int:
        with self._lock:
            return len(self._metrics)

    def artifacts(self) -> dict[str, Any]:
        """Latest images as uint8 arrays: 'originals' and 'reconstructions' (N, 28, 28), 'samples' (64, 28, 28)."""
        with self._lock:
            missing = not self._artifacts
        if missing and self.weights.version() > 0:  # opened, not trained here: render from the published weights
            art = self.weights.render_artifacts()
            with self._lock:
                self._artifacts = self._artifacts or art
        with self._lock:
            return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self._artifacts.items()}

    def weights_version(self) -> int:
        return self.weights.version()

    def published_state(self) -> dict[str, torch.Tensor] | None:
        """A CPU copy of the latest good weights (for evaluation jobs); never the live model."""
        return self.weights.state_copy()

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Decode codes (N, D) to mean images (N, 28, 28) float32 in [0, 1] with the published weights."""
        return self.weights.decode(z)

    def encode(self, x: np.ndarray, batch: int = 2000) -> tuple[np.ndarray, np.ndarray]:
        """Encode images (N, 28, 28) in [0, 1] to (mu, logvar), each (N, D), with the published weights."""
        return self.weights.encode(x, batch)

    def dataset(self) -> data_mod.ImageData:
        """The run's dataset on the CPU (loaded on first use)."""
        return self.weights.dataset()

    def check(self) -> data_mod.ImageData:
        """Load the data and check the settings against it; raises ConfigError/DatasetUnavailable."""
        data = self.dataset().subset_train(self.config.train.train_size)
        if self.config.train.batch_size > len(data.train_x):
            raise ConfigError(f"batch size {self.config.train.batch_size} is larger than the training set "
                              f"({len(data.train_x)} images)")
        return data

    def test_set(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        """Test images (N, 28, 28) float32, labels (N,), label names: what panels pick from."""
        return self.weights.test_set(n)

    # ------------------------------------------------------------ the thread

    def _beta_effective_locked(self) -> float:
        w = self._live["warmup_epochs"]
        return self._live["beta"] * (min(1.0, self._epoch / w) if w > 0 else 1.0)

    def _set(self, state: str | None = None, message: str | None = None) -> None:
        with self._lock:
            if state is not None:
                self._state = state
            if message is not None:
                self._message = message
        try:
            self.sync.write_status()
        except OSError:  # a full or read-only disk: the state lives on in memory; the heartbeat retries
            pass

    def _run(self) -> None:
        try:
            self._run_guarded()
        finally:
            if self._run_lock is not None:
                try:
                    self._run_lock.release()
                except OSError:  # a read-only directory: the lock reads as stale once this process ends
                    self._run_lock.held = False
            for fn in self._on_exit:
                fn(self)

    def _run_guarded(self) -> None:
        try:
            torch.set_num_threads(self.num_threads)
            self._train()
        except (ConfigError, data_mod.DatasetUnavailable, runs.RunFileError) as e:  # expected, already worded
            self._close_writer()
            if self.math is None and self._resume_ckpt is None and self.init_from is None:
                self._discard_unstarted_dir()  # e.g. a batch larger than the data: nothing was trained, keep nothing
            self._set("failed", str(e))
        except OSError as e:  # a full disk, a read-only or removed run directory
            self._close_writer()
            kept = "nothing was trained"
            if self.math is not None:
                try:  # keep what was trained if the disk still takes it; the old checkpoint stays if not
                    self._checkpoint()
                    kept = f"saved a checkpoint at step {self._step}"
                except OSError:
                    kept = "the last checkpoint on disk is kept" if self.persist and self.run_dir is not None and \
                        (self.run_dir / runs.CHECKPOINT).exists() else "no checkpoint could be saved"
            elif self._resume_ckpt is None and self.init_from is None:
                self._discard_unstarted_dir()
            else:
                kept = "the checkpoint it started from is kept"
            self._set("failed", f"{os_error_text(e)}; {kept}. Free disk space or fix the permissions, then resume")
        except torch.OutOfMemoryError:
            self._close_writer()
            self._set("failed", f"out of memory on {self.device.type} at batch size {self.config.train.batch_size}; "
                                "start again with a smaller batch size")
        except Exception as e:  # anything else in the thread becomes a failed status, never a hang
            self._close_writer()
            traceback.print_exc()
            self._set("failed", f"{type(e).__name__}: {e}")

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass

    def _discard_unstarted_dir(self) -> None:
        if not (self.persist and self.run_dir is not None):
            return
        try:
            if not (self.run_dir / runs.CHECKPOINT).exists():
                for f in self.run_dir.iterdir():
                    if f.is_file():
                        f.unlink()
                self.run_dir.rmdir()
                self.persist = False  # nothing more is written for this run
        except OSError:  # a read-only directory keeps its config.json; the run lists and can be resumed
            pass

    def _prepare(self) -> RunMath:
        """Build the run's math (first start) and open the run directory for writing."""
        if self.math is None:
            # A restarted trainer (stopped, failed or finished, then started again) keeps its math: its
            # model, optimiser and generator in memory are exactly what it last checkpointed.
            cfg = self.config
            self._set(message=f"loading {cfg.train.dataset}")
            data = self.check()
            # A folder's channels and size are known once its images are (config.model left them open).
            cfg = self.config = self.weights.config = fit_to_data(cfg, tuple(data.test_x.shape[1:]))
            ckpt = self._resume_ckpt
            if ckpt is None and self.init_from is not None:
                ckpt = runs.load_checkpoint(self.init_from / runs.CHECKPOINT)
                self.parent = {"run": self.init_from.name, "step": int(ckpt["step"])}
            math_ = self.math_class(cfg, data, self.device, lr=self._live["lr"], checkpoint=ckpt)
            with self._lock:
                self._steps_per_epoch = math_.steps_per_epoch
                if self.parent is not None and ckpt is not None:  # a fork starts its own step count at the parent's
                    self._step, self._epoch = int(ckpt["step"]), float(ckpt.get("epoch", 0))
                    self._epochs_target = math.ceil(self._epoch) + cfg.train.epochs
            if self.persist:  # start() created the directory; record what only loading the data told us
                previous = runs.read_json(self.run_dir / runs.CONFIG)
                kept = {k: v for k, v in previous.items()  # owner, ...; "distributed" was the last segment's
                        if k not in ("model", "train", "versions", "distributed")}
                runs.write_config(self.run_dir, cfg, **{**kept, "created": previous.get("created", time.time()),
                                                         "parent": self.parent or previous.get("parent"),
                                                         "device": describe_device(self.device),
                                                         "dataset_source": data.source})
            self.math = math_
            self._last_good = math_.weights_cpu()
        if self.persist:
            runs.truncate_metrics(self.run_dir, self._step)  # resuming: drop rows written after the checkpoint
            self._writer = runs.MetricsWriter(self.run_dir)
            self.timelapse = snapshots.Recorder.for_run(self.run_dir, self.config)
            self._snapshot(self._step)  # a new run's (or fork's) starting weights: the time-lapse's first frame
        self._publish()
        return self.math

    def _train(self) -> None:
        m = self._prepare()
        spe = m.steps_per_epoch
        # The device only: its thread count is the progress bar's (Status.device), which follows the tuner.
        self._set(message=f"training on {self.device.type}")
        acc = torch.zeros(5, device=self.device)  # loss, recon, kl, beta, n: summed between log points
        last_publish = time.monotonic()
        while self._step // spe < self._epochs_target:
            order = m.batcher.epoch()[self._step % spe:]  # a resumed run finishes its epoch
            t_epoch, n_seen = time.perf_counter(), 0
            for idx in order:
                if not self._wait_turn():
                    return self._finish("stopped", f"stopped at step {self._step}")
                with self._lock:
                    beta, free_bits, lr = self._beta_effective_locked(), self._live["free_bits"], self._live["lr"]
                try:
                    with self.cpu.step():  # the CPU-sharing policy: thread count and timing
                        acc += m.train_step(m.batch(idx), beta=beta, free_bits=free_bits, lr=lr)
                except torch.OutOfMemoryError:  # keep the run: pause it and say why (this batch is skipped)
                    self._out_of_memory()
                    continue
                n_seen += len(idx)
                with self._lock:
                    self._step += 1
                    self._epoch = self._step / spe
                if self.timelapse is not None and self.timelapse.due(self._step):
                    self._snapshot(self._step)
                if self._step % self.log_every == 0 or self._step % spe == 0:
                    if not self._log_train(acc):
                        return
                    acc.zero_()
                    dt = time.perf_counter() - t_epoch
                    with self._lock:
                        self._samples_per_s = n_seen / dt if dt > 0 else 0.0
                    if time.monotonic() - last_publish > 1.0:
                        self._publish()
                        last_publish = time.monotonic()
            train_time = time.perf_counter() - t_epoch
            if not self._end_epoch(n_seen / train_time if train_time > 0 else 0.0):
                return
        self._finish("finished", f"finished {self._epochs_target} epochs ({self._step} steps)")

    def _out_of_memory(self) -> None:
        """Pause after a step ran out of device memory; the weights are those of the last finished step."""
        self.math.opt.zero_grad(set_to_none=True)  # the half-done step's gradients hold memory
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        with self._lock:
            self._state = "paused"
            self._pause_reason = (f"paused at step {self._step}: out of memory on {self.device.type} at batch size "
                                  f"{self.config.train.batch_size}. Free memory (e.g. end other runs) and resume, "
                                  "or start again with a smaller batch size")
            self._message = self._pause_reason
        self.sync.write_status()

    def _wait_turn(self) -> bool:
        """Block while paused (letting single steps through); False when asked to stop."""
        with self._lock:
            go = self._ready_locked()
            if go is not None:
                return go
            # parked: the step in flight at pause() is done (an out-of-memory pause keeps saying why)
            self._message = self._pause_reason or f"paused at step {self._step}"
        self.sync.write_status()  # so a follower sees the step the run really stays at
        with self._lock:
            while True:
                go = self._ready_locked()
                if go is not None:
                    self._pause_reason = None
                    return go
                self._wake.wait(0.25)

    def _ready_locked(self) -> bool | None:
        """True: train the next step; False: stop; None: stay paused. Call under self._lock."""
        if self._stop.is_set():
            return False
        if self._state == "running":
            return True
        if self._pending_steps > 0:
            self._pending_steps -= 1
            return True
        return None

    def _log_train(self, acc: torch.Tensor) -> bool:
        loss, recon, kl, beta_sum, n = acc.tolist()  # the one sync point per log interval
        if n == 0:
            return True
        loss, recon, kl = loss / n, recon / n, kl / n
        if not all(math.isfinite(v) for v in (loss, recon, kl)):
            self.math.restore(self._last_good, self._live["lr"])
            self._finish("failed", f"the loss became {'NaN' if math.isnan(loss) else 'infinite'} at step {self._step} "
                                   f"(beta={self._live['beta']:g}, lr={self._live['lr']:g}); the last good weights "
                                   f"were kept. Lower the learning rate, then resume.")
            return False
        self._last_good = self.math.weights_cpu()
        # beta: the set value, as in Status; beta_effective: the mean weight of the KL over the interval the
        # numbers average (warm-up moves it within one). Rows written before this have beta = effective, beta_set.
        self._emit(TrainRow(step=self._step, epoch=round(self._epoch, 4), split="train", elbo=recon - kl,
                            recon=recon, kl=kl, loss=loss, beta=self._live["beta"], beta_effective=beta_sum / n,
                            lr=self._live["lr"], free_bits=self._live["free_bits"], wall_time=time.time()))
        return True

    def _emit(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._metrics.append(row)
        if self._writer is not None:
            self._writer.write(row)
        for fn in self._listeners:
            fn(row)

    def _end_epoch(self, samples_per_s: float) -> bool:
        """Test-set numbers, the evidence when due, a checkpoint; False when the run failed."""
        ev = self.math.evaluate()
        self._publish()
        # Before the test row, so an epoch's rows still end with it (or its evidence row), as readers expect.
        from .disentangle import epoch_row  # MIG/DCI where the factors are known, the β-TCVAE KL terms always
        self._emit({"step": self._step, "epoch": int(round(self._epoch)), "split": "disentangle",
                    **epoch_row(self.math, self.dataset()), "wall_time": time.time()})
        row = TestRow(step=self._step, epoch=int(round(self._epoch)), split="test", **ev, beta=self._live["beta"],
                      beta_effective=self.status().beta_effective, samples_per_s=samples_per_s, wall_time=time.time())
        self._emit(row)
        if not math.isfinite(ev["elbo"]):
            self._finish("failed", f"the test ELBO became non-finite after epoch {int(self._epoch)}; lower the learning rate")
            return False
        every = self.config.train.evidence_every
        epoch = int(round(self._epoch))
        if every and (epoch % every == 0 or epoch == self._epochs_target or epoch == 1):
            self._set(message=f"epoch {epoch}: estimating log p(x) with importance sampling")
            # k = 1000 costs ~0.5 s for the MLP but ~8 s for the conv net on 2 CPU cores; the panel's
            # on-demand evaluation goes higher when asked.
            ks = EVIDENCE_KS if self.config.model.arch == "mlp" or self.device.type != "cpu" else EVIDENCE_KS[:3]
            self._emit({"step": self._step, "epoch": epoch, "split": "evidence",
                        **self.math.evidence(ks, seed=20_000 + self._step), "wall_time": time.time()})
        self._checkpoint()
        self._set(message=f"epoch {epoch} of {self._epochs_target}: test ELBO {ev['elbo']:.2f} nats")
        return True

    def _checkpoint(self) -> None:
        if not self.persist or self.run_dir is None or self.math is None:
            return
        runs.save_checkpoint(self.run_dir, {**self.math.checkpoint_state(), "config": self.config.to_dict(),
                                            "step": self._step, "epoch": self._epoch, "live": dict(self._live)})

    def _snapshot(self, step: int, *, last: bool = False) -> None:
        """Keep the model's weights as a time-lapse frame when the schedule (or the run's end) says so."""
        if self.timelapse is not None and self.math is not None and (last or self.timelapse.due(step)):
            self.timelapse.take(step, self.math.weights_cpu())

    def _finish(self, state: str, message: str) -> None:
        self._checkpoint()  # on failure the model already holds the last good weights again
        self._snapshot(self._step, last=True)
        self._publish()
        self._close_writer()
        self._set(state, message)

    def _publish(self) -> None:
        """Readers' copy: the last good weights and the images they give."""
        self.weights.publish(self._last_good, self._step)
        images = self.math.render_images()
        art = {k: to_uint8(v) for k, v in images.items()}
        with self._lock:
            self._artifacts = {**art, "step": self._step}
