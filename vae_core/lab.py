"""The Lab: the one door to runs, for the CLI and the dashboard alike.

One Lab per process, over one runs directory. It starts runs in this process's background
threads (at most `max_runs` at once; the rest wait in a queue and start in turn), and it
follows runs that any other process trains (the CLI, another server, a torchrun job, a
cluster worker) through their directories: metrics tailed from a byte offset, weights reloaded
when the checkpoint changes, steering written to control.json. Every answer is a plain value,
a dataclass or a numpy array; never a tensor, never a model.

Importing this module does not import torch: the dashboard's first page draws while torch
loads in the background (warm_up), and the test suite checks that the dashboard never imports it.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import runs
from .config import (ARCHS, DATASETS, DEVICES, LIKELIHOODS, LIMITS, LIVE_FIELDS, PRECISIONS, UI_LIMITS,
                     ConfigError, RunConfig)
from .records import (ACTIVE_THRESHOLD, DEFAULT_EXAMPLES, DEFAULT_K, EXAMPLE_CHOICES, IWAE_FAR_NATS, K_CHOICES,
                      DatasetUnavailable, JobSnapshot, Status, active_mask)
from .runs import CHECKPOINT, RunBusy, RunFileError, RunSummary, sanitize_name
from .drawn import FITS, ImageInputError, png_from_data_url

if TYPE_CHECKING:
    from .disentangle import Traversal
    from .examples import Example
    from .inference import PosteriorResult, Weights
    from .sweep import SweepStatus

    from .own_input import OwnInput
    from .trainer import Trainer

__all__ = ["ACTIVE_THRESHOLD", "IWAE_FAR_NATS", "active_mask", "ARCHS", "CHECKPOINT", "DATASETS", "DEFAULT_EXAMPLES", "DEFAULT_K", "DEVICES",
           "EXAMPLE_CHOICES", "K_CHOICES", "LIKELIHOODS", "LIMITS", "LIVE_FIELDS", "UI_LIMITS", "ConfigError",
           "DatasetUnavailable", "FollowedRun", "JobSnapshot", "Lab", "LocalRun", "RunBusy", "RunConfig",
           "RunFileError", "RunHandle", "RunSummary", "Status", "UserError", "default_max_runs", "sanitize_name"]
__all__ += ["FITS", "ImageInputError", "png_from_data_url"]  # the dashboard's own-input panel reads them here
__all__ += ["PRECISIONS"]  # the Advanced precision control

# What a caller shows as one line: bad settings, unusable files, a busy run, missing data.
UserError = (ConfigError, RunFileError, DatasetUnavailable, OSError)
_PROBES: dict[str, Any] = {}  # what this machine offers (devices, datasets), found once per process
FOLLOW_REFRESH_S = 0.3  # a followed run re-reads its files at most this often, however many readers ask
KEEP_ENDED = 32  # ended runs kept in memory (their weights, for fast reads); older ones are followed from disk


def default_max_runs() -> int:
    """Runs that train at once: VAE_MAX_RUNS, else one per 2 CPU cores, or 4 per GPU."""
    env = os.environ.get("VAE_MAX_RUNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        import torch

        if torch.cuda.is_available():
            return 4 * torch.cuda.device_count()
    except ImportError:
        pass
    return max(1, (os.cpu_count() or 1) // 2)


# ------------------------------------------------------------------ what readers hold: run handles

class RunHandle:
    """One run as a reader sees it: status, metrics, images and the computations panels need.

    LocalRun (trained in this process) and FollowedRun (trained elsewhere) answer the same calls,
    so the Training, Explore and Evidence tabs draw either without knowing which it is.
    """

    name: str
    run_dir: Path
    weights: "Weights"

    @property
    def config(self) -> RunConfig:
        return self.weights.config

    def status(self) -> Status:
        raise NotImplementedError

    def metrics(self, since: int = 0) -> list[dict[str, Any]]:
        raise NotImplementedError

    def metrics_count(self) -> int:
        raise NotImplementedError

    def artifacts(self) -> dict[str, Any]:
        raise NotImplementedError

    def make_room(self, seconds: float) -> None:
        """A hint that the caller is about to load the CPU (a page refresh); only runs trained here react."""

    def wait_queue_moves(self, timeout: float, place: int | None = None) -> None:
        """Block until this run's place in the queue differs from `place` (default: its place now), i.e. it
        starts, moves up or leaves the queue, at most `timeout` seconds; at once for a run not queued here."""

    @property
    def token(self) -> int:
        """Unique to this run's weights view in this process (a new one after a rename or a restart here)."""
        return self.weights.token

    # The same for both kinds: computed from the latest weights on a CPU copy.
    def weights_version(self) -> int:
        return self.weights.version()

    def weights_step(self) -> int:
        return self.weights.step()

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Codes (N, D) -> mean images (N, 28, 28) in [0, 1]."""
        return self.weights.decode(z)

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (N, 28, 28) -> (mu, logvar), each (N, D)."""
        return self.weights.encode(x)

    def test_set(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        """Test images (N, 28, 28), labels (N,), label names."""
        return self.weights.test_set(n)

    def test_size(self) -> int:
        return self.weights.test_size()

    def held_out(self, n: int) -> np.ndarray:
        """The first n held-out images as they are evaluated (binarized when the run is)."""
        return self.weights.held_out(n)

    def posterior(self, index: int, n: int) -> "PosteriorResult":
        """Held-out image `index`: its true posterior on an n x n grid (2 latents) and its own IWAE bounds."""
        return self.weights.posterior(index, n)

    def traversal(self, index: int | None = 0, steps: int = 9) -> "Traversal":
        """Each latent swept over the prior's quantiles, most informative first (vae_core.disentangle)."""
        from .disentangle import traversal_for

        return traversal_for(self.weights, index, steps)

    def disentanglement(self) -> dict[str, Any]:
        """MIG, DCI (where the factors are known), the β-TCVAE KL terms and the factor-by-latent MI matrix."""
        from .disentangle import for_weights

        return for_weights(self.weights)

    def own_input(self, image: bytes | np.ndarray, *, fit: str = "whole") -> "OwnInput":
        """A person's own image (file bytes: a drawn canvas's PNG or an upload; or a (28, 28) array in [0, 1])
        encoded by the latest weights: q(z|x), reconstruction, samples, ELBO and IWAE bound beside the test
        set's, and with 2 latents the true posterior on a grid. Bad bytes raise ImageInputError."""
        from .drawn import prepare
        from .own_input import own_input

        if self.config.model.image_shape != (1, 28, 28):
            raise ImageInputError("your own input works on runs over 28 x 28 grey images; this run's are "
                                  "{} x {} x {}".format(*self.config.model.image_shape))

        x = prepare(image, fit) if isinstance(image, (bytes, bytearray)) else np.asarray(image, np.float32)  # type: ignore[arg-type]
        return own_input(self.weights, x)


class LocalRun(RunHandle):
    """A run this process trains (or trained): reads go to its Trainer's in-memory snapshots."""

    def __init__(self, trainer: "Trainer", lab: "Lab") -> None:
        self.trainer, self._lab = trainer, lab
        self.name, self.run_dir = trainer.name, Path(trainer.run_dir)
        self.weights = trainer.weights

    @property
    def config(self) -> RunConfig:
        return self.trainer.config  # carries live changes (β, lr, ...)

    def status(self) -> Status:
        s = self.trainer.status()
        place = self._lab.queue_position(self.name)
        owner = self._lab.owner(self.name)
        if place is not None:
            s = dataclasses.replace(s, state="queued", message=f"waiting for a free slot: place {place} in the "
                                    f"queue ({self._lab.max_runs} run{'s' if self._lab.max_runs != 1 else ''} "
                                    "train at once on this server)")
        return dataclasses.replace(s, queue_position=place, owner=owner)

    def metrics(self, since: int = 0) -> list[dict[str, Any]]:
        return self.trainer.metrics(since)

    def metrics_count(self) -> int:
        return self.trainer.metrics_count()

    def artifacts(self) -> dict[str, Any]:
        return self.trainer.artifacts()

    def make_room(self, seconds: float) -> None:
        self.trainer.make_room(seconds)

    def wait_queue_moves(self, timeout: float, place: int | None = None) -> None:
        self._lab.wait_queue_moves(self.name, timeout, place)

    def is_alive(self) -> bool:
        return self.trainer.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self.trainer.join(timeout)

    def add_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """fn(row) for each new metrics row, from the training thread (the CLI's progress bar)."""
        self.trainer.add_listener(fn)


class FollowedRun(RunHandle):
    """A run read from its directory while any process (or none) writes it; refreshed at most every 0.3 s."""

    def __init__(self, run_dir: Path, *, data_dir: str | None = None) -> None:
        from .inference import Weights

        self.run_dir = Path(run_dir)
        self.name = self.run_dir.name
        config = runs.read_config(self.run_dir)  # RunFileError for a directory that holds no run
        self.weights = Weights(config, data_dir=data_dir)
        self._lock = threading.Lock()
        self._rows: list[dict[str, Any]] = []
        self._offset, self._inode, self._skipping = 0, None, False
        self._ckpt_key: tuple[int, int] | None = None
        self._status: dict[str, Any] = {}
        self._owner: str | None = None
        self._artifacts: dict[str, Any] = {}
        self._artifacts_version = -1
        self._refreshed = 0.0
        self._refresh(force=True)

    # ------------------------------------------------------------ reading the files

    def _refresh(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._refreshed < FOLLOW_REFRESH_S:
                return
            self._refreshed = now
            self._status = runs.read_status(self.run_dir)
            self._owner = runs.read_json_or_empty(self.run_dir / runs.CONFIG).get("owner")
            self._tail_metrics()
            self._reload_weights()

    def _tail_metrics(self) -> None:
        """Read the lines appended since the last look; start over when the file was replaced or shrank."""
        path = self.run_dir / runs.METRICS
        try:
            st = path.stat()
        except FileNotFoundError:
            self._rows, self._offset, self._inode = [], 0, None
            return
        if st.st_ino != self._inode or st.st_size < self._offset:  # a resume rewrote it (truncate_metrics)
            self._rows, self._offset, self._inode, self._skipping = [], 0, st.st_ino, False
        if st.st_size == self._offset:
            return
        with open(path, "rb") as f:  # complete, capped, checked lines; one still being written is read next time
            lines = runs.MetricLines(f, self._offset, st.st_size, self._skipping)
            self._rows.extend(row for row, _ in (runs.parse_row(line) for line in lines if line) if row is not None)
        self._offset, self._skipping = lines.pos, lines.skipping

    def _reload_weights(self) -> None:
        path = self.run_dir / runs.CHECKPOINT
        key = runs.file_version(path)
        if key is None or key == self._ckpt_key:
            return
        try:
            ckpt = runs.load_checkpoint(path)
            self.weights.publish(ckpt["model"], int(ckpt["step"]))
            self.weights.config = dataclasses.replace(self.weights.config, model=RunConfig.from_dict(ckpt["config"]).model)
        except (RunFileError, ConfigError):
            return  # a checkpoint being replaced right now; the next look gets the new one
        self._ckpt_key = key

    # ------------------------------------------------------------ the RunHandle calls

    @property
    def config(self) -> RunConfig:
        self._refresh()
        cfg = self.weights.config
        live = {k: self._status[k] for k in LIVE_FIELDS if isinstance(self._status.get(k), (int, float))}
        try:
            return cfg.replace(**live) if live else cfg
        except ConfigError:
            return cfg

    def status(self) -> Status:
        self._refresh()
        with self._lock:
            st, rows = dict(self._status), self._rows
        cfg = self.weights.config
        last = rows[-1] if rows else {}
        step = int(st.get("step", last.get("step", 0)) or 0)
        spe = int(st.get("steps_per_epoch") or 0)
        target = int(st.get("epochs_target") or cfg.train.epochs)
        total = int(st.get("total_steps") or (target * spe if spe else 0))
        epoch = float(st.get("epoch", step / spe if spe else last.get("epoch", 0.0)) or 0.0)
        state = st.get("state", "unknown")
        if state == "unknown":
            state, st["message"] = "stopped", st.get("message") or "no status recorded"

        def num(key: str, default: float) -> float:
            v = st.get(key)
            return float(v) if isinstance(v, (int, float)) else default

        t = cfg.train
        return Status(state, st.get("message", ""), step, epoch, target, total, num("samples_per_s", 0.0),
                      st.get("eta_s") if state == "running" else None, st.get("device", "another process"),
                      str(self.run_dir), num("beta", t.beta), num("beta_effective", t.beta), num("lr", t.lr),
                      num("warmup_epochs", t.warmup_epochs), num("free_bits", t.free_bits),
                      owner=self._owner, followed=True)

    def weights_version(self) -> int:
        self._refresh()  # a new checkpoint is a new version, whichever call notices it first
        return self.weights.version()

    def weights_step(self) -> int:
        self._refresh()
        return self.weights.step()

    def metrics(self, since: int = 0) -> list[dict[str, Any]]:
        self._refresh()
        with self._lock:
            return [dict(r) for r in self._rows[since:]]

    def metrics_count(self) -> int:
        self._refresh()
        with self._lock:
            return len(self._rows)

    def artifacts(self) -> dict[str, Any]:
        self._refresh()
        version = self.weights.version()
        if version == 0:
            return {}
        if version != self._artifacts_version:
            self._artifacts, self._artifacts_version = self.weights.render_artifacts(), version
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self._artifacts.items()}


# ------------------------------------------------------------------ the Lab

class Lab:
    """Runs under one directory: started here (threads, a capped queue) or followed from another process.

    `owner` identifies who steers a run (a dashboard session's token); a run with no owner (the
    CLI's) may be steered by anyone. Only the owner pauses, steps, stops or changes a run while it
    trains; anyone may open, compare, fork or export any run.
    """

    trainer_class: "type[Trainer] | None" = None  # what trains runs here (torchrun's rank 0: distributed.DistTrainer)

    def __init__(self, runs_dir: str | Path | None = None, *, max_runs: int | None = None,
                 data_dir: str | None = None, num_threads: int | None = None,
                 shares_cpu_with_server: bool = False, log_every: int = 20) -> None:
        self.runs_dir = Path(runs_dir) if runs_dir else runs.default_runs_dir()
        self.max_runs = max_runs or default_max_runs()
        self.data_dir, self.num_threads, self.log_every = data_dir, num_threads, log_every
        self.shares_cpu_with_server = shares_cpu_with_server
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._trainers: collections.OrderedDict[str, Trainer] = collections.OrderedDict()
        self._owners: dict[str, str | None] = {}
        self._queue: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()  # (name, start kwargs)
        self._followers: collections.OrderedDict[str, FollowedRun] = collections.OrderedDict()
        self._sessions: collections.OrderedDict[str, str | None] = collections.OrderedDict()
        self._jobs: Any = None  # jobs.JobBoard, made on first use (it imports torch)
        self._scheduler: threading.Thread | None = None
        self._listening: set[int] = set()  # trainers whose end wakes the scheduler
        self._closed = False
        self._sweep_procs: list[Any] = []  # sweep drivers started here (subprocess.Popen), reaped when they end

    # ------------------------------------------------------------ warm-up and what this machine offers

    def warm_up(self, dataset: str = "sprites") -> None:
        """Pay a process's one-off costs now, e.g. in a background thread: torch, the device and dataset
        probes, the sprites, torch._dynamo (the first Adam imports it: ~1 s of a first run's start-up)."""
        from .inference import get_dataset

        Lab.devices()
        Lab.dataset_availability()
        get_dataset(dataset, self.data_dir)
        import torch._dynamo  # noqa: F401

    @staticmethod
    def devices() -> dict[str, bool]:
        """Which devices this machine has: cpu, cuda, mps (imports torch)."""
        from .devices import available_devices

        have = available_devices()
        _PROBES["devices"] = have
        return have

    @staticmethod
    def devices_if_known() -> dict[str, bool] | None:
        """devices() once something has asked it (the warm-up does, in the background); None before, without waiting."""
        return _PROBES.get("devices")

    @staticmethod
    def check_device(name: str, precision: str = "fp32") -> None:
        """Raise ConfigError when `name` (auto, cpu, cuda, mps) cannot be used here, or not at this precision."""
        from .devices import mixed_dtype, resolve_device

        mixed_dtype(precision, resolve_device(name))

    @staticmethod
    def auto_device() -> str:
        have = Lab.devices()
        return "cuda" if have.get("cuda") else "mps" if have.get("mps") else "cpu"

    @staticmethod
    def default_dataset() -> str:
        """The dataset a first run uses: MNIST or Fashion-MNIST when on this machine, else sprites (no torch)."""
        from . import sources

        return sources.default_dataset()

    @staticmethod
    def dataset_availability(*, wait: bool = True) -> dict[str, tuple[bool, str]]:
        """Each built-in dataset: (usable here, where it comes from or why not); kept for ten minutes.

        The network probe takes ~1 s offline; with wait=False a page that must draw now gets the
        answer from local files only until the probe (started by the warm-up) has finished.
        """
        from . import sources

        cached = _PROBES.get("datasets")
        if cached is not None and time.monotonic() - cached[0] < 600:
            return cached[1]
        if not wait:
            return sources.availability(probe_network=False)
        result = sources.availability()
        _PROBES["datasets"] = (time.monotonic(), result)
        return result

    @staticmethod
    def describe_dataset(name: str, data_dir: str | None = None) -> tuple[bool, str]:
        """(usable, one line saying source, size and count) for any dataset name, before training.

        Folders are described from their listing and image headers (no pixels decoded, no torch).
        """
        from . import colour_sets, image_folders

        if image_folders.is_folder(name):
            try:
                return True, image_folders.describe(name)
            except DatasetUnavailable as e:
                return False, str(e)
        if name in colour_sets.availability():
            return colour_sets.availability(data_dir)[name]
        return Lab.dataset_availability(wait=False).get(name, (False, f"unknown dataset {name!r}"))

    @staticmethod
    def unpack_images_zip(data: bytes) -> str:
        """An uploaded zip of images unpacked safely under the data cache; its dataset name, folder:PATH."""
        from .image_folders import extract_zip
        from .sources import default_cache_dir

        return "folder:" + str(extract_zip(data, default_cache_dir() / "uploads").resolve())

    # ------------------------------------------------------------ sessions (a browser tab's current run)

    def current(self, session: str) -> RunHandle | None:
        with self._lock:
            name = self._sessions.get(session)
        if name is None:
            return None
        try:
            return self.open(name)
        except RunFileError:  # deleted or renamed meanwhile
            self.show(session, None)
            return None

    def current_name(self, session: str) -> str | None:
        with self._lock:
            return self._sessions.get(session)

    def show(self, session: str, run: str | None) -> None:
        """Make `run` (a name, or None for none) the run this session's page shows."""
        with self._lock:
            self._sessions[session] = run
            self._sessions.move_to_end(session)
            while len(self._sessions) > 10_000:  # a token per browser tab ever opened: keep the newest
                self._sessions.popitem(last=False)

    # ------------------------------------------------------------ reading any run

    def path(self, run: str | Path) -> Path:
        """The directory of a run given by name (under runs_dir) or by path."""
        p = Path(run)
        if p.is_absolute() or (len(p.parts) > 1 and p.is_dir()):
            return p
        return runs.resolve_run(self.runs_dir, str(run))

    def open(self, run: str | Path) -> RunHandle:
        """A handle for any run: the live trainer when this process trains it, else a follower of its files."""
        path = self.path(run)
        key = str(path.resolve())
        with self._lock:
            t = self._trainers.get(key)
            if t is not None:
                return LocalRun(t, self)
            f = self._followers.get(key)
            if f is None:
                if not (path / runs.CONFIG).exists():
                    raise RunFileError(f"no run named {path.name!r} in {path.parent}")
                runs.clean_temp_files(path)  # what a kill during a write left (older than any write in progress)
                f = FollowedRun(path, data_dir=self.data_dir)
                self._followers[key] = f
                while len(self._followers) > 64:
                    self._followers.popitem(last=False)
            self._followers.move_to_end(key)
            return f

    def list_runs(self) -> list[RunSummary]:
        """Every run under runs_dir, newest first (queued runs of this process say so)."""
        out = runs.list_runs(self.runs_dir)
        with self._lock:
            queued = {Path(name).name for name, _ in self._queue}
            local = dict(self._trainers)
        rows = []
        for r in out:
            t = local.get(str(Path(r.path).resolve())) if r.error is None else None
            if t is not None and (t.is_alive() or Path(r.path).name in queued):  # this process knows better than its files
                s = t.status()
                r = dataclasses.replace(r, epochs_done=int(s.epoch), epochs_planned=s.epochs_target,
                                        status=s.state if s.state != "idle" else r.status)
            rows.append(dataclasses.replace(r, status="queued") if Path(r.path).name in queued else r)
        return rows

    def owner(self, run: str | Path) -> str | None:
        key = str(self.path(run).resolve())
        with self._lock:
            if key in self._owners:
                return self._owners[key]
        return runs.read_json_or_empty(self.path(run) / runs.CONFIG).get("owner")

    def can_steer(self, run: str | Path, owner: str | None) -> bool:
        """Whether `owner` may pause, resume, step, stop or change this run.

        A run with no owner (the CLI's) is anyone's; a caller with no owner (the CLI, a script on the
        server) may steer any run; a session steers only its own.
        """
        who = self.owner(run)
        return who is None or owner is None or who == owner

    def queue_position(self, run: str | Path) -> int | None:
        name = Path(run).name
        with self._lock:
            for i, (queued, _) in enumerate(self._queue):
                if Path(queued).name == name:
                    return i + 1
        return None

    def wait_queue_moves(self, run: str | Path, timeout: float, place: int | None = None) -> None:
        """Block until `run`'s place in the queue differs from `place` (default: its place now) or `timeout`
        seconds pass; at once if it is not queued here.

        A waiting page blocks here instead of polling: its run's start reaches it as the scheduler launches
        it, not up to a poll interval later (bench_class.py). It costs a waiting thread, no CPU.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            place = place or self.queue_position(run)
            while place is not None and not self._closed and self.queue_position(run) == place:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._wake.wait(left)

    def training_count(self) -> int:
        with self._lock:
            return sum(t.is_alive() for t in self._trainers.values())

    # ------------------------------------------------------------ starting runs

    def start(self, config: RunConfig, *, owner: str | None = None, name: str | None = None,
              step_only: bool = False, check: bool = False) -> RunHandle:
        """A new run with `config`: its directory and config.json exist when this returns; it trains or queues.

        With step_only it does one optimisation step and waits paused. With check the data are
        loaded and the settings checked against them first (the CLI: one clear line, nothing written).
        """
        t = self._trainer(config, name=name)
        if check:
            t.check()
        t.create_run_dir()
        return self._admit(t, owner, {"step_only": step_only})

    def resume(self, run: str | Path, *, owner: str | None = None, epochs: int | None = None,
               live: dict[str, float] | None = None, device: str | None = None, check: bool = False) -> RunHandle:
        """Continue a run from its last checkpoint (unpause it if it is paused here).

        A stopped, interrupted or failed run trains on to its planned epochs (or `epochs` more); a
        finished one trains `epochs` more (default: its configured count). `live` (β, lr, warm-up,
        free bits) applies first. A run another live process trains is refused (RunBusy).
        """
        path = self.path(run)
        key = str(path.resolve())
        self._check_owner(path, owner)
        with self._lock:
            t = self._trainers.get(key)
            if t is not None and t.is_alive():
                if live:
                    t.update(**_live_only(live))
                t.resume()
                return LocalRun(t, self)
            if key in (k for k, _ in self._queue):
                return LocalRun(t, self)
        st = runs.read_status(path)
        if st.get("state") in runs.ACTIVE_STATES:
            raise RunBusy(f"run {path.name!r} is being trained by process {st.get('pid')} on {st.get('host')}; "
                          "stop it there first (or follow it and press Stop)")
        if t is None:
            t = self._open_trainer(path, device=device)
        if live:
            t.update(**_live_only(live))
        if check:
            t.check()
        if epochs is None and t.status().state == "finished":
            epochs = t.config.train.epochs
        return self._admit(t, owner, {"epochs": epochs})

    def fork(self, run: str | Path, *, owner: str | None = None, epochs: int | None = None,
             name: str | None = None, device: str | None = None, seed: int | None = None,
             check: bool = False, **live: float) -> RunHandle:
        """A new run that starts from `run`'s checkpoint with new β / lr / warm-up / free bits.

        The child records {"run", "step"} of its parent and continues its step count.
        """
        from .trainer import Trainer

        bad = set(live) - set(LIVE_FIELDS)
        if bad:
            raise ConfigError(f"a fork keeps its parent's {', '.join(sorted(bad))}; start a new run to change them")
        parent = self.path(run)
        ckpt = runs.load_checkpoint(parent / runs.CHECKPOINT)  # fail here, not later in the thread
        changes: dict[str, Any] = dict(live)
        if epochs:
            changes["epochs"] = epochs
        if device:
            changes["device"] = device
        if seed is not None:
            changes["seed"] = seed
        config = runs.read_config(parent).replace(**changes)
        t = (self.trainer_class or Trainer)(config, runs_dir=self.runs_dir, name=name, init_from=parent,
                                            **self._trainer_kwargs())
        t.starts_at(int(ckpt["step"]), float(ckpt.get("epoch", 0)))
        if check:
            t.check()
        t.create_run_dir()
        return self._admit(t, owner, {})

    def start_distributed(self, config: RunConfig, *, processes: int, owner: str | None = None,
                          name: str | None = None) -> RunHandle:
        """A new run trained by `processes` torchrun processes (DDP: one per GPU, or CPU processes sharing the
        cores) outside this process; its directory exists when this returns, and it is followed like any run."""
        from .launch import launch_torchrun

        if not isinstance(config, RunConfig):
            raise ConfigError("a run needs a RunConfig")
        most = self.max_processes()
        if not (isinstance(processes, int) and 2 <= processes <= most):
            raise ConfigError(f"processes must be between 2 and {most} here")
        if config.train.batch_size < processes:
            raise ConfigError(f"batch size {config.train.batch_size} is smaller than {processes} processes")
        path = runs.create_run_dir(self.runs_dir, config, name)
        runs.write_config(path, config, created=time.time(), parent=None, **({"owner": owner} if owner else {}))
        launch_torchrun(path, processes, data_dir=self.data_dir)
        return self.open(path)

    @staticmethod
    def max_processes() -> int:
        """The most processes one run may train on here (start_distributed): GPUs where there are several, else cores."""
        from .launch import max_processes

        cuda = 0
        if (_PROBES.get("devices") or {}).get("cuda"):
            import torch

            cuda = torch.cuda.device_count()
        return max_processes(cuda)

    def after(self, run: str | Path, action: Callable[[], Any], *, poll_s: float = 0.25) -> threading.Thread:
        """Call action() in a background thread once `run` has finished (never if it stops, fails or is deleted).

        Lets a caller chain runs (the guided experiments fork a run with a new β when it ends) without
        a page having to stay open to notice the end. An exception in action is kept as the thread's `error`.
        """
        path = self.path(run)

        def wait() -> None:
            while not self._closed:
                try:
                    state = self.open(path).status().state
                except RunFileError:
                    return
                if state == "finished":
                    try:
                        action()
                    except Exception as e:  # noqa: BLE001  (a thread has no caller to raise to)
                        thread.error = e  # type: ignore[attr-defined]
                    return
                if state in ("stopped", "failed", "interrupted"):
                    return
                time.sleep(poll_s)

        thread = threading.Thread(target=wait, name=f"vae-after-{path.name}", daemon=True)
        thread.error = None  # type: ignore[attr-defined]
        thread.start()
        return thread

    # ------------------------------------------------------------ steering

    def pause(self, run: str | Path, *, owner: str | None = None) -> None:
        self._command(run, owner, "pause")

    def stop(self, run: str | Path, *, owner: str | None = None, wait: float = 1.0) -> None:
        """End the run; it checkpoints on its way out and can be resumed. A queued run leaves the queue."""
        path = self.path(run)
        key = str(path.resolve())
        with self._lock:
            for i, (queued, _) in enumerate(self._queue):
                if queued == key:
                    self._check_owner(path, owner)
                    del self._queue[i]
                    t = self._trainers[key]
                    t.mark("stopped", "left the queue before it started")
                    self._wake.notify_all()  # the pages of the runs behind it move up
                    return
        self._command(run, owner, "stop", wait=wait)

    def step(self, run: str | Path, *, owner: str | None = None) -> None:
        """Exactly one optimisation step, pausing the run (a stopped run here restarts paused)."""
        path = self.path(run)
        self._check_owner(path, owner)
        t = self._local(path)
        if t is None:
            raise RunFileError(f"run {path.name!r} trains in another process; Step works only for runs trained here "
                               "(use Pause, Resume and Stop)")
        if self.queue_position(path) is not None:
            return
        if not t.is_alive() and self.training_count() >= self.max_runs:
            raise RunBusy(f"{self.max_runs} run(s) already train on this server; wait for a free slot")
        t.step()

    def update(self, run: str | Path, *, owner: str | None = None, **live: float) -> None:
        """Change live settings (β, lr, warm-up, free bits) of a training run, here or in another process."""
        path = self.path(run)
        self._check_owner(path, owner)
        live = _live_only(live)
        t = self._local(path)
        if t is not None:
            t.update(**live)
            return
        runs.read_config(path).replace(**live)  # validate here: one clear message, not a silently ignored request
        runs.write_control(path, **live)

    def _command(self, run: str | Path, owner: str | None, command: str, wait: float = 0.0) -> None:
        path = self.path(run)
        self._check_owner(path, owner)
        t = self._local(path)
        if t is not None:
            {"pause": t.pause, "resume": t.resume, "stop": lambda: t.stop(timeout=wait)}[command]()
            return
        st = runs.read_status(path)
        if st.get("state") not in runs.ACTIVE_STATES:
            raise RunFileError(f"run {path.name!r} is not training ({st.get('state')}); nothing to {command}")
        runs.write_control(path, command=command)

    # ------------------------------------------------------------ run files

    def rename(self, run: str | Path, new_name: str) -> str:
        path = self.path(run)
        self._forget_idle(path)
        return runs.rename_run(self.runs_dir, path.name, new_name).name

    def delete(self, run: str | Path) -> None:
        path = self.path(run)
        self._forget_idle(path)
        runs.delete_run(self.runs_dir, path.name)

    def export(self, run: str | Path) -> bytes:
        """The run as zip bytes (config, metrics, checkpoint, status)."""
        from .transfer import export_zip

        return export_zip(self.path(run))

    def import_zip(self, source: Path | bytes, name: str | None = None) -> str:
        """Unpack a run zip into a new run; returns its name. Unsafe or corrupt archives are refused."""
        from .transfer import import_zip

        return import_zip(source, self.runs_dir, name).name

    @staticmethod
    def example_runs() -> list["Example"]:
        """The ready-made example runs shipped as zips in examples/ (vae_core.examples.Example; no torch)."""
        from .examples import list_examples

        return list_examples()

    @staticmethod
    def metrics_csv(rows: list[dict[str, Any]]) -> str:
        return runs.metrics_csv(rows)

    # ------------------------------------------------------------ the time-lapse

    def snapshots(self, run: str | Path) -> list[int]:
        """Steps at which `run` kept a snapshot of its weights (vae_core/snapshots.py), oldest first."""
        from .snapshots import list_steps

        return list_steps(self.path(run))

    def snapshot(self, run: str | Path, step: int) -> RunHandle:
        """A read-only handle on `run` as it was at snapshot `step`: decode, encode, artifacts from those weights."""
        from .snapshots import open_view

        return open_view(self.open(run), step)

    # ------------------------------------------------------------ background evaluations

    def submit_bounds(self, run: str | Path, *, k: int, n: int, seed: int = 0) -> JobSnapshot:
        """Start importance-weighted bounds up to k on the first n held-out images, on a copy of the weights."""
        from .jobs import IwaeJob, JobBoard

        handle = self.open(run)
        job = IwaeJob.from_weights(handle.weights, k=k, n=n, seed=seed)
        with self._lock:
            if self._jobs is None:
                self._jobs = JobBoard()
            board = self._jobs
        return board.submit(str(handle.run_dir.resolve()), job).snapshot()

    def bounds_job(self, run: str | Path) -> JobSnapshot | None:
        with self._lock:
            board = self._jobs
        job = board.get(str(self.path(run).resolve())) if board is not None else None
        return job.snapshot() if job is not None else None

    def cancel_bounds(self, run: str | Path) -> None:
        with self._lock:
            board = self._jobs
        if board is not None:
            board.cancel(str(self.path(run).resolve()))

    # ------------------------------------------------------------ sweeps (vae_core/sweep.py)

    def start_sweep(self, base: RunConfig, *, betas: Any, latent_dims: Any, seeds: int = 1,
                    owner: str | None = None, name: str | None = None, executor: str = "local",
                    address: str | None = None, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0,
                    workers: int | None = None) -> str:
        """Start a β × latent-size sweep from `base` in a `python -m vae_core sweep` process; returns its id.

        The grid is checked and the sweep recorded before this returns (ConfigError for a bad grid);
        its runs appear under runs_dir as they start.
        """
        import subprocess
        import sys

        from . import sweep

        if not isinstance(base, RunConfig):
            raise ConfigError("a sweep needs a RunConfig")
        if executor == "ray":
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                from .sweep_exec import RAY_HINT

                raise ConfigError(RAY_HINT)
        grid = sweep.make_grid(betas, latent_dims, seeds, first_seed=base.train.seed)
        options = {"executor": executor, "address": address, "cpus_per_run": cpus_per_run,
                   "gpus_per_run": gpus_per_run}
        sid = sweep.create_sweep(self.runs_dir, base, grid, sweep_id=name, owner=owner, options=options)["id"]
        cmd = [sys.executable, "-m", "vae_core", "sweep", "--resume", sid, "--runs-dir", str(self.runs_dir.resolve()),
               "--executor", executor, "--cpus-per-run", str(cpus_per_run), "--gpus-per-run", str(gpus_per_run)]
        for flag, value in (("--address", address), ("--workers", workers), ("--data-dir", self.data_dir)):
            if value is not None:
                cmd += [flag, str(value)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (sweep.source_root(), env.get("PYTHONPATH")) if p)
        with open(sweep.sweep_dir(self.runs_dir, sid) / "driver.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        with self._lock:
            self._sweep_procs = [p for p in self._sweep_procs if p.poll() is None] + [proc]
        return sid

    def list_sweeps(self) -> list["SweepStatus"]:
        """Every sweep under runs_dir with its points' states and numbers, newest first (reads small files only)."""
        from .sweep import list_sweeps

        self._reap_sweeps()
        return list_sweeps(self.runs_dir)

    def sweep_status(self, sweep_id: str) -> "SweepStatus":
        from .sweep import sweep_status

        self._reap_sweeps()
        return sweep_status(self.runs_dir, sweep_id)

    def cancel_sweep(self, sweep_id: str, *, owner: str | None = None) -> None:
        """Stop a sweep: its training runs stop and checkpoint, runs not yet started never start."""
        from .sweep import request_cancel, sweep_status

        who = sweep_status(self.runs_dir, sweep_id).owner
        if not (who is None or owner is None or who == owner):
            raise RunBusy(f"sweep {sweep_id!r} belongs to another session")
        request_cancel(self.runs_dir, sweep_id)

    def _reap_sweeps(self) -> None:
        """Collect the exit status of sweep processes this Lab started (no zombies left behind)."""
        with self._lock:
            self._sweep_procs = [p for p in self._sweep_procs if p.poll() is None]

    # ------------------------------------------------------------ shutting down

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every run this process trains (each checkpoints) and forget the queue."""
        with self._lock:
            self._closed = True
            queued, self._queue = list(self._queue), collections.deque()
            trainers = list(self._trainers.values())
            self._wake.notify_all()
        for key, _ in queued:
            t = self._trainers.get(key)
            if t is not None:
                t.mark("stopped", "the server stopped before it started")
        for t in trainers:
            t.stop(timeout)
        if self._jobs is not None:
            self._jobs.cancel_all()

    # ------------------------------------------------------------ internals

    def _trainer_kwargs(self) -> dict[str, Any]:
        return {"data_dir": self.data_dir, "num_threads": self.num_threads, "log_every": self.log_every,
                "sharing_with_server": self.shares_cpu_with_server}

    def _trainer(self, config: RunConfig, *, name: str | None) -> "Trainer":
        from .trainer import Trainer

        if not isinstance(config, RunConfig):
            raise ConfigError("a run needs a RunConfig")
        return (self.trainer_class or Trainer)(config, runs_dir=self.runs_dir, name=name, **self._trainer_kwargs())

    def _open_trainer(self, path: Path, *, device: str | None = None) -> "Trainer":
        from .trainer import Trainer

        Trainer = self.trainer_class or Trainer  # noqa: N806
        if not (path / runs.CHECKPOINT).exists():  # queued or interrupted before its first checkpoint: start over
            t = Trainer(runs.read_config(path).replace(**({"device": device} if device else {})),
                        runs_dir=path.parent, **self._trainer_kwargs())
            t.run_dir, t.name = path, path.name
            return t
        return Trainer.open(path, device=device, runs_dir=path.parent, **self._trainer_kwargs())

    def _local(self, path: Path) -> "Trainer | None":
        with self._lock:
            return self._trainers.get(str(path.resolve()))

    def _check_owner(self, path: Path, owner: str | None) -> None:
        if not self.can_steer(path, owner):
            raise RunBusy(f"run {path.name!r} belongs to another session: open it read-only, compare or fork it")

    def _forget_idle(self, path: Path) -> None:
        key = str(path.resolve())
        with self._lock:
            t = self._trainers.get(key)
            queued = any(k == key for k, _ in self._queue)
        if t is not None and not queued and t.is_alive() and t.status().state not in runs.ACTIVE_STATES:
            t.join(60)  # it has ended and is closing its files: a Delete right after "Finished" waits for that
        with self._lock:
            t = self._trainers.get(key)
            if t is not None:
                if t.is_alive() or any(k == key for k, _ in self._queue):
                    raise RunFileError(f"run {path.name!r} is training here; stop it first")
                del self._trainers[key]
            self._followers.pop(key, None)
            self._owners.pop(key, None)
            for s, name in list(self._sessions.items()):
                if name is not None and str(self.path(name).resolve()) == key:
                    self._sessions[s] = None

    def _admit(self, t: "Trainer", owner: str | None, start_kwargs: dict[str, Any]) -> RunHandle:
        """Train `t` now if a slot is free, else queue it; the Lab remembers it either way."""
        key = str(Path(t.run_dir).resolve())
        if owner is not None:
            _record_owner(t.run_dir, owner)
        with self._lock:
            if self._closed:
                raise RunFileError("the lab is shut down")
            # Two clicks resuming one run each built a trainer before taking the lock; the second one replaced
            # the first in this registry while the first trained on, out of reach of Stop. One trainer per run:
            # the later click gets the run that already trains (or waits) here, as resume() does for a live one.
            held = self._trainers.get(key)
            if held is not None and held is not t and (held.is_alive() or any(k == key for k, _ in self._queue)):
                return LocalRun(held, self)
            self._trainers[key] = t
            self._trainers.move_to_end(key)
            self._owners[key] = owner
            self._followers.pop(key, None)
            if id(t) not in self._listening:
                t.add_exit_listener(self._on_exit)
                self._listening.add(id(t))
            if self.training_count() < self.max_runs and not self._queue:
                try:
                    self._launch(t, start_kwargs)
                except RunFileError:  # e.g. RunBusy: another process took the run first; follow it, not this copy
                    self._trainers.pop(key, None)
                    raise
            else:
                self._queue.append((key, start_kwargs))
                runs.write_status(t.run_dir, "queued", "waiting for a free slot", epochs_target=t.status().epochs_target)
            self._ensure_scheduler()
            self._prune()
        return LocalRun(t, self)

    @staticmethod
    def _launch(t: "Trainer", start_kwargs: dict[str, Any]) -> None:
        if start_kwargs.get("step_only"):
            t.step()
        else:
            t.start(epochs=start_kwargs.get("epochs"))

    def _on_exit(self, _t: "Trainer") -> None:
        with self._lock:
            self._wake.notify_all()

    def _ensure_scheduler(self) -> None:
        if self._scheduler is None or not self._scheduler.is_alive():
            self._scheduler = threading.Thread(target=self._schedule, name="vae-lab-scheduler", daemon=True)
            self._scheduler.start()

    def _schedule(self) -> None:
        """Start queued runs as slots free up; keep the queued runs' status.json heartbeats fresh."""
        last_beat = 0.0
        while True:
            with self._lock:
                if self._closed:
                    return
                moved = False
                while self._queue and self.training_count() < self.max_runs:
                    key, kwargs = self._queue.popleft()
                    moved = True
                    t = self._trainers.get(key)
                    if t is None:
                        continue
                    try:
                        self._launch(t, kwargs)
                    except UserError as e:
                        t.mark("failed", str(e))
                if moved:
                    self._wake.notify_all()  # waiting pages (wait_queue_moves): a run started, the others moved up
                beat = time.monotonic() - last_beat >= runs.HEARTBEAT_S
                queued = [(i + 1, self._trainers.get(k)) for i, (k, _) in enumerate(self._queue)] if beat else []
                if not self._queue and self.training_count() == 0:
                    self._scheduler = None
                    return
                self._wake.wait(0.5)
            for place, t in queued:
                if t is not None and t.run_dir is not None:
                    runs.write_status(t.run_dir, "queued", f"waiting for a free slot: place {place} in the queue",
                                      epochs_target=t.status().epochs_target)
            if queued:
                last_beat = time.monotonic()

    def _prune(self) -> None:
        """Forget the oldest ended runs beyond KEEP_ENDED (they stay on disk and are followed if opened)."""
        queued = {k for k, _ in self._queue}
        ended = [k for k, t in self._trainers.items() if not t.is_alive() and k not in queued]
        for key in ended[:max(0, len(ended) - KEEP_ENDED)]:
            del self._trainers[key]


def _live_only(live: dict[str, float]) -> dict[str, float]:
    bad = set(live) - set(LIVE_FIELDS)
    if bad:
        raise ConfigError(f"{', '.join(sorted(bad))} cannot change while a run trains; start a new run")
    return {k: float(v) for k, v in live.items()}


def _record_owner(run_dir: Path, owner: str) -> None:
    """The session that started (or resumed) a run, in its config.json: the Runs tab's "mine" filter."""
    path = Path(run_dir) / runs.CONFIG
    d = runs.read_json_or_empty(path)
    if d and d.get("owner") != owner:
        runs.atomic_write_json(path, {**d, "owner": owner})
