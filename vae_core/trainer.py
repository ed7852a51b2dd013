"""The trainer: one VAE run in one daemon thread, with a thread-safe read/control API.

Readers (the dashboard, the CLI) never touch the model the optimiser updates: they get
copies of metrics and images, and decode/encode through a CPU copy of the weights that
the thread publishes about once a second. This module holds the API any thread may call
(construction, control, reading); what runs in the training thread is in training_loop.py.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import data as data_mod
from . import runs
from .config import LIVE_FIELDS, ConfigError, RunConfig
from .devices import CpuShare, NoSharing, default_threads, describe_device, resolve_device
from .inference import N_FIXED, N_SAMPLES, Weights, get_dataset
from .records import Status
from .training_loop import STATES, TrainingLoop

__all__ = ["N_FIXED", "N_SAMPLES", "Status", "Trainer", "get_dataset"]  # get_dataset: older imports

class Trainer(TrainingLoop):
    """Owns one run: its data, model, optimiser, thread, run directory and published snapshots."""

    def __init__(self, config: RunConfig, *, runs_dir: str | Path | None = None, name: str | None = None,
                 data_dir: str | None = None, num_threads: int | None = None, log_every: int = 20,
                 persist: bool = True, init_from: str | Path | None = None, sharing_with_server: bool = False,
                 data: data_mod.ImageData | None = None) -> None:
        if not isinstance(config, RunConfig):
            raise ConfigError("Trainer needs a RunConfig")
        self.config = config
        self.device = resolve_device(config.train.device)  # fails fast on a missing CUDA/MPS
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
        self._live = {k: getattr(config.train, k) for k in LIVE_FIELDS}
        self._metrics: list[dict[str, Any]] = []
        self._artifacts: dict[str, Any] = {}
        self.weights = Weights(config, data_dir=data_dir, data=data)  # CPU weights for readers
        self._step, self._epoch, self._steps_per_epoch = 0, 0.0, 1
        self._epochs_target = config.train.epochs
        self._samples_per_s = 0.0
        self._resume_ckpt: dict[str, Any] | None = None
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

        # Cross-process side: status.json heartbeats, control.json steering, the train.lock.
        self._status_write = threading.Lock()  # one status.json writer at a time (loop or heartbeat thread)
        self._control_seq = 0  # the last control.json entry applied (acknowledged in status.json)
        self._control_seen: tuple[int, int] | None = None
        self._run_lock = runs.RunLock(self.run_dir) if self.run_dir else None
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
        t._metrics = runs.read_metrics(run_dir)
        t._metrics = [m for m in t._metrics if m.get("step", 0) <= t._step]
        st = runs.read_status(run_dir)
        # Resumed-for-more and forked runs plan past config.epochs; status.json records where they were headed.
        if isinstance(st.get("epochs_target"), int) and st["epochs_target"] > 0:
            t._epochs_target = st["epochs_target"]
        t._state = "stopped" if st.get("state") in ("running", "paused", "interrupted", "unknown") else st.get("state", "stopped")
        if t._state not in STATES:
            t._state = "stopped"
        t._message = st.get("message", "") or f"opened from {run_dir.name}"
        if st.get("state") == "interrupted":
            t._message = "interrupted: the process training it ended; Resume continues from the last checkpoint"
        t.weights.publish(ckpt["model"], t._step)
        return t

    # ------------------------------------------------------------ control (any thread)

    def create_run_dir(self) -> Path | None:
        """Create the run directory with its config.json now (not in the thread), so callers know its name at once."""
        if self.persist and self.run_dir is None:
            self.run_dir = runs.create_run_dir(self.runs_dir, self.config, self.name)
            self.name = self.run_dir.name
            parent = {"run": self.init_from.name} if self.init_from is not None else None
            runs.write_config(self.run_dir, self.config, created=time.time(), parent=parent,
                              device=describe_device(self.device))
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
            self._control_seq = int(runs.read_control(self.run_dir).get("seq", 0))  # older requests are not for us
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
            self._write_status()
            threading.Thread(target=self._sync_loop, args=(self._thread,), name=f"vae-sync-{self.name}",
                             daemon=True).start()

    def add_exit_listener(self, fn: Callable[["Trainer"], None]) -> None:
        """fn(trainer) is called from the training thread as it ends (finished, stopped or failed)."""
        self._on_exit.append(fn)

    # ------------------------------------------------------------ other processes: heartbeat and control.json

    def _sync_loop(self, thread: threading.Thread) -> None:
        """While `thread` trains: apply control.json within half a second, and beat status.json every HEARTBEAT_S."""
        last_beat = time.monotonic()
        while thread.is_alive():
            try:
                self._poll_control()
                if time.monotonic() - last_beat >= runs.HEARTBEAT_S:
                    self._write_status()
                    last_beat = time.monotonic()
            except OSError:  # a full disk or a removed directory must not end the process's training
                pass
            thread.join(0.5)

    def _poll_control(self) -> None:
        path = self.run_dir / runs.CONTROL
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        key = (st.st_mtime_ns, st.st_size)
        if key == self._control_seen:
            return
        self._control_seen = key
        ctl = runs.read_control(self.run_dir)
        seq = int(ctl.get("seq", 0) or 0)
        if seq <= self._control_seq:
            return
        live = {k: ctl[k] for k in LIVE_FIELDS if isinstance(ctl.get(k), (int, float))}
        note = None
        try:
            if live:
                self.update(**live)
                note = ", ".join(f"{k}={v:g}" for k, v in live.items() if k in ctl)
        except ConfigError as e:
            note = f"ignored a request: {e}"
        command = ctl.get("command")
        if command == "pause":
            self.pause()
        elif command == "resume":
            self.resume()
        elif command == "stop":
            self._stop.set()
            with self._lock:
                self._wake.notify_all()
        self._control_seq = seq
        with self._lock:
            if note and self._state == "running":
                self._message = f"applied {note} from control.json"
        self._write_status()

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
        return self.cpu.describe(self.device)

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
