"""The trainer: one VAE run in one daemon thread, with a thread-safe read/control API.

Readers (the dashboard, the CLI) never touch the model the optimiser updates: they get
copies of metrics and images, and decode/encode through a CPU copy of the weights that
the thread publishes about once a second.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import data as data_mod
from . import runs
from .config import LIVE_FIELDS, ConfigError, RunConfig
from .devices import ThreadTuner, default_threads, describe_device, resolve_device
from .images import to_uint8
from .models import VAE, build_model
from .objectives import elbo_loss, elbo_terms

N_FIXED = 16  # test images shown with their reconstructions
N_SAMPLES = 64  # prior samples with a fixed z
EVIDENCE_BATCH = 64  # held-out images for the importance-weighted evaluation
EVIDENCE_KS = (1, 10, 100, 1000)
EVIDENCE_GRID_EXAMPLES = 8  # examples whose true log p(x) is integrated on a grid (2 latents)
STATES = ("idle", "running", "paused", "finished", "stopped", "failed")

_DATA_CACHE: dict[tuple[str, str | None], data_mod.ImageData] = {}
_DATA_LOCK = threading.Lock()


def get_dataset(name: str, data_dir: str | None = None) -> data_mod.ImageData:
    """Datasets are loaded once per process (sprites take seconds to render) and shared read-only."""
    key = (name, str(data_dir) if data_dir else None)
    with _DATA_LOCK:
        if key not in _DATA_CACHE:
            _DATA_CACHE[key] = data_mod.load_dataset(name, data_dir)
        return _DATA_CACHE[key]


@dataclass(frozen=True)
class Status:
    """A snapshot of where the run stands; plain values only."""

    state: str
    message: str
    step: int
    epoch: float  # fractional epochs done
    epochs_target: int
    total_steps: int
    samples_per_s: float
    eta_s: float | None
    device: str
    run_dir: str | None
    beta: float
    beta_effective: float
    lr: float
    warmup_epochs: float
    free_bits: float

    @property
    def active(self) -> bool:
        return self.state in ("running", "paused")

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


class Trainer:
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
        # Beside a web server the best thread count changes with the page's load: measure it.
        cores = os.cpu_count() or 1
        self.tuner = (ThreadTuner((max(1, cores // 2), cores)) if sharing_with_server and not num_threads
                      and self.device.type == "cpu" and cores > 1 and "VAE_NUM_THREADS" not in os.environ else None)
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
        self._published: dict[str, torch.Tensor] | None = None  # CPU weights for decode/encode
        self._published_version = 0
        self._step, self._epoch, self._steps_per_epoch = 0, 0.0, 1
        self._epochs_target = config.train.epochs
        self._samples_per_s = 0.0
        self._quiet_until = 0.0  # monotonic time until which the tuned loop uses one thread (see make_room)
        self._resume_ckpt: dict[str, Any] | None = None
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

        self._infer_lock = threading.Lock()  # the CPU inference copy is used by one reader at a time
        self._infer_model: VAE | None = None
        self._infer_version = -1
        self._data: data_mod.ImageData | None = data  # injected by tests and benchmarks; else loaded by name

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
        t._publish_weights(ckpt["model"])
        return t

    # ------------------------------------------------------------ control (any thread)

    def start(self, *, epochs: int | None = None) -> None:
        """Start or continue training in the background; idempotent while running.

        For an opened run, `epochs` is how many more to train (default: up to its planned total).
        """
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                if self._state == "paused":
                    self._state, self._message = "running", "resumed"
                    self._wake.notify_all()
                return
            if epochs is not None:
                self._epochs_target = math.ceil(self._epoch) + int(epochs)
            elif self._resume_ckpt is not None and self._epoch >= self._epochs_target:
                self._epochs_target = math.ceil(self._epoch) + self.config.train.epochs
            self._stop.clear()
            self._state, self._message = "running", "starting"
            self._thread = threading.Thread(target=self._run, name=f"vae-trainer-{self.name or 'new'}", daemon=True)
            self._thread.start()

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
        than fighting for it. Only runs with a thread tuner (training beside the server) react.
        """
        if self.tuner is not None:
            until = time.monotonic() + seconds
            if until > self._quiet_until:
                self._quiet_until = until

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
                          self._epochs_target * self._steps_per_epoch, sps, eta, describe_device(self.device),
                          str(self.run_dir) if self.run_dir else None, self._live["beta"],
                          self._beta_effective_locked(), self._live["lr"], self._live["warmup_epochs"],
                          self._live["free_bits"])

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
            missing = not self._artifacts and self._published is not None
        if missing:  # an opened run that has not trained in this process: render from the published weights
            originals = self.test_set(N_FIXED)[0]
            z = torch.randn((N_SAMPLES, self.config.model.latent_dim), generator=torch.Generator().manual_seed(0))
            mu, _ = self.encode(originals)
            art = {"originals": to_uint8(originals), "reconstructions": to_uint8(self.decode(mu)),
                   "samples": to_uint8(self.decode(z.numpy())), "step": self._step}
            with self._lock:
                self._artifacts = self._artifacts or art
        with self._lock:
            return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self._artifacts.items()}

    def weights_version(self) -> int:
        with self._lock:
            return self._published_version

    def published_state(self) -> dict[str, torch.Tensor] | None:
        """A CPU copy of the latest good weights (for evaluation jobs); never the live model."""
        with self._lock:
            return None if self._published is None else {k: v.clone() for k, v in self._published.items()}

    def inference_model(self) -> VAE:
        """The CPU model holding the published weights; use under `with trainer.inference():`."""
        with self._lock:
            state, version = self._published, self._published_version
        if state is None:
            raise RuntimeError("no weights published yet")
        if self._infer_model is None:
            self._infer_model = build_model(self.config.model).eval()
        if version != self._infer_version:
            self._infer_model.load_state_dict(state)
            self._infer_version = version
        return self._infer_model

    def inference(self) -> threading.Lock:
        return self._infer_lock

    @torch.no_grad()
    def decode(self, z: np.ndarray) -> np.ndarray:
        """Decode codes (N, D) to mean images (N, 28, 28) float32 in [0, 1] with the published weights."""
        z = np.asarray(z, dtype=np.float32).reshape(-1, self.config.model.latent_dim)
        with self._infer_lock:
            model = self.inference_model()
            return model.decode(torch.from_numpy(z)).numpy()[:, 0]

    @torch.no_grad()
    def encode(self, x: np.ndarray, batch: int = 2000) -> tuple[np.ndarray, np.ndarray]:
        """Encode images (N, 28, 28) in [0, 1] to (mu, logvar), each (N, D), with the published weights."""
        x = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28))
        with self._infer_lock:
            model = self.inference_model()
            outs = [model.encode(x[i:i + batch]) for i in range(0, len(x), batch)]
        return torch.cat([o[0] for o in outs]).numpy(), torch.cat([o[1] for o in outs]).numpy()

    def dataset(self) -> data_mod.ImageData:
        """The run's dataset on the CPU (loaded on first use)."""
        if self._data is None:
            self._data = get_dataset(self.config.train.dataset, self.data_dir)
        return self._data

    def check(self) -> data_mod.ImageData:
        """Load the data and check the settings against it; raises ConfigError/DatasetUnavailable."""
        data = self.dataset().subset_train(self.config.train.train_size)
        if self.config.train.batch_size > len(data.train_x):
            raise ConfigError(f"batch size {self.config.train.batch_size} is larger than the training set "
                              f"({len(data.train_x)} images)")
        return data

    def test_set(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        """Test images (N, 28, 28) float32, labels (N,), label names: what panels pick from."""
        d = self.dataset()
        x = d.test_x[:n] if n else d.test_x
        y = d.test_y[:n] if n else d.test_y
        return x[:, 0].numpy().copy(), y.numpy().copy(), d.label_names

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
            st, msg = self._state, self._message
        if self.persist and self.run_dir is not None:
            runs.write_status(self.run_dir, st, msg, step=self._step, epochs_done=int(self._epoch),
                              epochs_target=self._epochs_target)

    def _run(self) -> None:
        try:
            torch.set_num_threads(self.num_threads)
            self._train()
        except (ConfigError, data_mod.DatasetUnavailable, runs.RunFileError) as e:  # expected, already worded
            self._set("failed", str(e))
        except torch.OutOfMemoryError:
            self._set("failed", f"out of memory on {self.device.type} at batch size {self.config.train.batch_size}; "
                                "start again with a smaller batch size")
        except Exception as e:  # anything else in the thread becomes a failed status, never a hang
            traceback.print_exc()
            self._set("failed", f"{type(e).__name__}: {e}")

    def _prepare(self) -> None:
        """Load data, build model and optimiser, create or reopen the run directory."""
        if getattr(self, "model", None) is not None:
            # This trainer ran before (stopped, failed or finished, then started again): its model,
            # optimiser and generator in memory are exactly what it last checkpointed.
            if self.persist and self.run_dir is not None:
                runs.truncate_metrics(self.run_dir, self._step)
                self.writer = runs.MetricsWriter(self.run_dir)
            return
        cfg = self.config
        self._set(message=f"loading {cfg.train.dataset}")
        data = self.check()
        n_train = len(data.train_x)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.train.seed)
        self.train_x = data.train_x.to(self.device)
        self.test_x = data.test_x.to(self.device)
        self.test_y = data.test_y
        # The test set is binarized once with a fixed seed so test numbers are comparable across epochs.
        test_gen = torch.Generator(device=self.device).manual_seed(10_000 + cfg.train.seed)
        self.test_xb = torch.bernoulli(self.test_x, generator=test_gen) if cfg.binarized else self.test_x
        self.batcher = data_mod.IndexBatcher(n_train, cfg.train.batch_size, self.gen, self.device)
        with self._lock:
            self._steps_per_epoch = self.batcher.steps_per_epoch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            self.model = build_model(cfg.model).to(self.device)
        self.opt = self._make_optimizer()
        ckpt = self._resume_ckpt
        if ckpt is None and self.init_from is not None:
            ckpt = runs.load_checkpoint(self.init_from / runs.CHECKPOINT)
            self.parent = {"run": self.init_from.name, "step": int(ckpt["step"])}
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            if "optimizer" in ckpt:
                self.opt.load_state_dict(ckpt["optimizer"])
            if "generator" in ckpt and self.device.type == "cpu":
                self.gen.set_state(ckpt["generator"])
            for g in self.opt.param_groups:
                g["lr"] = self._live["lr"]
            if self.parent is not None:  # a fork starts its own step count at the parent's
                with self._lock:
                    self._step, self._epoch = int(ckpt["step"]), float(ckpt.get("epoch", 0))
                    self._epochs_target = math.ceil(self._epoch) + cfg.train.epochs

        if self.persist:
            if self.run_dir is None:
                self.run_dir = runs.create_run_dir(self.runs_dir, cfg, self.name)
                self.name = self.run_dir.name
                runs.write_config(self.run_dir, cfg, created=time.time(), parent=self.parent,
                                  device=describe_device(self.device), dataset_source=data.source)
            else:  # resuming: drop metric rows written after the checkpoint we continue from
                runs.truncate_metrics(self.run_dir, self._step)
                previous = runs.read_json(self.run_dir / runs.CONFIG)
                runs.write_config(self.run_dir, cfg, created=previous.get("created", time.time()),
                                  parent=previous.get("parent"), device=describe_device(self.device),
                                  dataset_source=data.source)
            self.writer = runs.MetricsWriter(self.run_dir)
        fixed = torch.Generator().manual_seed(0)
        self.fixed_idx = torch.arange(N_FIXED)
        self.fixed_z = torch.randn((N_SAMPLES, cfg.model.latent_dim), generator=fixed).to(self.device)
        self._last_good = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self._publish_weights(self._last_good)
        self._render_artifacts()

    def _train(self) -> None:
        self._prepare()
        cfg = self.config
        spe = self.batcher.steps_per_epoch
        self._set(message=f"training on {describe_device(self.device)}")
        acc = torch.zeros(4, device=self.device)  # loss, recon, kl, n — summed between log points
        last_publish = time.monotonic()
        tuned: list[float] = []  # seconds per step of the tuner's current block
        threads_now = self.tuner.current if self.tuner is not None else self.num_threads
        torch.set_num_threads(threads_now)
        while True:
            epoch_idx = self._step // spe
            if epoch_idx >= self._epochs_target:
                break
            order = self.batcher.epoch()[self._step % spe:]  # a resumed run finishes its epoch
            t_epoch, n_seen = time.perf_counter(), 0
            for idx in order:
                if not self._wait_turn():
                    return self._finish("stopped", f"stopped at step {self._step}")
                x = self.train_x[idx]
                if cfg.binarized:
                    x = torch.bernoulli(x, generator=self.gen)  # dynamic binarization: a fresh draw per batch
                if self.tuner is None:
                    acc += self.train_step(x)
                else:
                    making_room = time.monotonic() < self._quiet_until
                    want = self.tuner.choices[0] if making_room else self.tuner.current
                    if want != threads_now:
                        torch.set_num_threads(want)
                        threads_now = want
                    t0 = time.perf_counter()
                    acc += self.train_step(x)
                    if not making_room:  # the tuner times only steps it chose the thread count for
                        tuned.append(time.perf_counter() - t0)
                        if len(tuned) == self.tuner.block:
                            self.tuner.record(tuned)
                            tuned = []
                n_seen += len(idx)
                with self._lock:
                    self._step += 1
                    self._epoch = self._step / spe
                if self._step % self.log_every == 0 or self._step % spe == 0:
                    if not self._log_train(acc):
                        return
                    acc.zero_()
                    dt = time.perf_counter() - t_epoch
                    with self._lock:
                        self._samples_per_s = n_seen / dt if dt > 0 else 0.0
                    if time.monotonic() - last_publish > 1.0:
                        self._publish_model()
                        last_publish = time.monotonic()
            train_time = time.perf_counter() - t_epoch
            self._end_epoch(n_seen / train_time if train_time > 0 else 0.0)
        self._finish("finished", f"finished {self._epochs_target} epochs ({self._step} steps)")

    def _wait_turn(self) -> bool:
        """Block while paused (letting single steps through); False when asked to stop."""
        with self._lock:
            while True:
                if self._stop.is_set():
                    return False
                if self._state == "running":
                    return True
                if self._pending_steps > 0:
                    self._pending_steps -= 1
                    return True
                self._wake.wait(0.25)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        # The fused kernel updates all parameters in one call: ~10% faster steps for this small MLP on CPU.
        fused = self.device.type in ("cpu", "cuda")
        return torch.optim.Adam(self.model.parameters(), lr=self._live["lr"], fused=fused)

    def train_step(self, x: torch.Tensor) -> torch.Tensor:
        """One Adam step on batch x; returns detached (loss, recon, kl, 1) for logging, no sync."""
        with self._lock:
            beta, free_bits, lr = self._beta_effective_locked(), self._live["free_bits"], self._live["lr"]
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        terms = elbo_terms(self.model, x, self.gen)
        loss = elbo_loss(terms, beta=beta, free_bits=free_bits)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return torch.stack([loss.detach(), terms.recon.detach().mean(), terms.kl.detach().mean(),
                            torch.ones((), device=x.device)])

    def _log_train(self, acc: torch.Tensor) -> bool:
        loss, recon, kl, n = acc.tolist()  # the one sync point per log interval
        if n == 0:
            return True
        loss, recon, kl = loss / n, recon / n, kl / n
        if not all(math.isfinite(v) for v in (loss, recon, kl)):
            self.model.load_state_dict(self._last_good)
            # Adam's moments may hold NaN too; a fresh optimiser is the safe restart.
            self.opt = self._make_optimizer()
            self._finish("failed", f"the loss became {'NaN' if math.isnan(loss) else 'infinite'} at step {self._step} "
                                   f"(beta={self._live['beta']:g}, lr={self._live['lr']:g}); the last good weights "
                                   f"were kept. Lower the learning rate, then resume.")
            return False
        with self._lock:
            beta_eff = self._beta_effective_locked()
        self._last_good = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self._emit({"step": self._step, "epoch": round(self._epoch, 4), "split": "train", "elbo": recon - kl,
                    "recon": recon, "kl": kl, "loss": loss, "beta": beta_eff, "beta_set": self._live["beta"],
                    "lr": self._live["lr"], "free_bits": self._live["free_bits"], "wall_time": time.time()})
        return True

    def _emit(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._metrics.append(row)
        if self.persist and self.run_dir is not None:
            self.writer.write(row)
        for fn in self._listeners:
            fn(row)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor | None = None, batch: int = 1000) -> dict[str, Any]:
        """Test-set ELBO, recon, KL (nats per example), per-dimension KL and active units; no weight change."""
        x = self.test_xb if x is None else x
        self.model.eval()
        sums = torch.zeros(3, device=self.device)
        kl_dims, mus = [], []
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            t = elbo_terms(self.model, xb, self.gen)
            sums += torch.stack([t.recon.sum(), t.kl.sum(), torch.tensor(float(len(xb)), device=self.device)])
            kl_dims.append(t.kl_dims.sum(0))
            mus.append(t.mu)
        recon, kl, n = sums.tolist()
        mu = torch.cat(mus)
        per_dim = (torch.stack(kl_dims).sum(0) / n).cpu().numpy()
        variances = mu.var(0).cpu().numpy() if len(mu) > 1 else np.zeros(mu.shape[1])
        return {"elbo": (recon - kl) / n, "recon": recon / n, "kl": kl / n, "kl_per_dim": per_dim.tolist(),
                "active_units": int((variances > 0.01).sum()), "mu_variance": variances.tolist()}

    @torch.no_grad()
    def evidence(self, ks: tuple[int, ...] = EVIDENCE_KS) -> dict[str, Any]:
        """ELBO and importance-weighted bounds log p_k(x) on a fixed held-out batch, nats per example.

        The bounds rise with k toward log p(x) (Burda et al. 2016); their distance above the
        ELBO estimates KL(q(z|x) || p(z|x)), the inference gap. With 2 latents the true
        log p(x) by quadrature on a grid is added for a few of the examples.
        """
        from .evidence import grid_evidence, iwae_curve

        self.model.eval()
        x = self.test_xb[:EVIDENCE_BATCH]
        gen = torch.Generator(device=self.device).manual_seed(20_000 + self._step)
        out = iwae_curve(self.model, x, ks, generator=gen)
        if self.config.model.latent_dim == 2:
            out.update(grid_evidence(self.model, x[:EVIDENCE_GRID_EXAMPLES], n=64))
            # The same examples' IWAE bound, so the panel compares like with like.
            sub = iwae_curve(self.model, x[:EVIDENCE_GRID_EXAMPLES], (max(ks),), generator=gen)
            out["iwae_grid_examples"] = sub["iwae"][0]
        return out

    def _end_epoch(self, samples_per_s: float) -> None:
        ev = self.evaluate()
        self._publish_model()
        row = {"step": self._step, "epoch": int(round(self._epoch)), "split": "test", **ev,
               "beta": self.status().beta_effective, "samples_per_s": samples_per_s, "wall_time": time.time()}
        self._emit(row)
        if not math.isfinite(ev["elbo"]):
            self._finish("failed", f"the test ELBO became non-finite after epoch {int(self._epoch)}; lower the learning rate")
            return
        every = self.config.train.evidence_every
        epoch = int(round(self._epoch))
        if every and (epoch % every == 0 or epoch == self._epochs_target or epoch == 1):
            self._set(message=f"epoch {epoch}: estimating log p(x) with importance sampling")
            # k = 1000 costs ~0.5 s for the MLP but ~8 s for the conv net on 2 CPU cores; the panel's
            # on-demand evaluation goes higher when asked.
            ks = EVIDENCE_KS if self.config.model.arch == "mlp" or self.device.type != "cpu" else EVIDENCE_KS[:3]
            self._emit({"step": self._step, "epoch": epoch, "split": "evidence", **self.evidence(ks),
                        "wall_time": time.time()})
        self._checkpoint()
        self._set(message=f"epoch {epoch} of {self._epochs_target}: test ELBO {ev['elbo']:.2f} nats")

    def _checkpoint(self) -> None:
        if not self.persist or self.run_dir is None:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "config": self.config.to_dict(),
                 "step": self._step, "epoch": self._epoch, "live": dict(self._live)}
        if self.device.type == "cpu":
            state["generator"] = self.gen.get_state()
        runs.save_checkpoint(self.run_dir, state)

    def _finish(self, state: str, message: str) -> None:
        self._checkpoint()  # on failure the model already holds the last good weights again
        self._publish_model()
        if self.persist and self.run_dir is not None:
            self.writer.close()
        self._set(state, message)

    # ------------------------------------------------------------ publishing

    def _publish_weights(self, state: dict[str, torch.Tensor]) -> None:
        cpu = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        with self._lock:
            self._published = cpu
            self._published_version += 1

    def _publish_model(self) -> None:
        self._publish_weights(self._last_good)
        self._render_artifacts()

    @torch.no_grad()
    def _render_artifacts(self) -> None:
        self.model.eval()
        x = self.test_x[self.fixed_idx]
        mu, _ = self.model.encode(x)
        recon = self.model.decode(mu)
        samples = self.model.decode(self.fixed_z)
        art = {"originals": to_uint8(x[:, 0].cpu().numpy()), "reconstructions": to_uint8(recon[:, 0].cpu().numpy()),
               "samples": to_uint8(samples[:, 0].cpu().numpy()), "step": self._step}
        with self._lock:
            self._artifacts = art
