"""The process-wide run registry: which trainers this server owns and which one the page shows.

One registry per server process (plain `st.cache_resource`), shared by every browser
tab, so a reload or a second tab reattaches to the run that is training instead of
starting a new one. Sessions keep only UI choices in `st.session_state`; trainers
(threads, models) live here. All methods are safe to call from any script thread.
"""
from __future__ import annotations

import atexit
import gc
import itertools
import logging
import sys
import threading
import time
from pathlib import Path

import streamlit as st

from vae_core.config import LIVE_FIELDS, ConfigError, RunConfig
from vae_core.trainer import Trainer, get_dataset

log = logging.getLogger(__name__)


# Live-panel refreshes per second the server allows across all sessions watching a run. Each refresh
# costs its browser ~0.15 s of a core to redraw (measured with Chromium on 2 cores, the same machine):
# with more sessions watching, each refreshes less often, so training keeps its speed. At 2/s five
# tabs trained at 72% of one tab's speed (steady polling, benchmarks/bench_dashboard.py --tabs 5).
REFRESH_BUDGET = 1.5


class Viewers:
    """The sessions polling the live panel, so that together they keep within REFRESH_BUDGET."""

    def __init__(self, budget: float = REFRESH_BUDGET) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, float]] = {}  # session -> (last poll, its interval)

    def seen(self, session: str, interval: float) -> None:
        with self._lock:
            self._seen[session] = (time.monotonic(), interval)

    def count(self) -> int:
        """Sessions that polled within two of their intervals (a closed tab drops out after that)."""
        now = time.monotonic()
        with self._lock:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] <= 2 * v[1] + 1.0}
            return len(self._seen)

    def interval(self, base: float | None, session: str | None = None) -> float | None:
        """Seconds between one session's refreshes: `base`, or longer when many sessions watch."""
        if base is None:
            return None
        with self._lock:
            new = session is not None and session not in self._seen
        n = self.count() + (1 if new else 0)
        return max(base, round(n / self.budget, 1))


class Registry:
    """Trainers by id, and the current one. One run trains at a time: Train stops the active run first."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._trainers: dict[str, Trainer] = {}
        self._current: str | None = None
        self._ids = itertools.count(1)
        self.viewers = Viewers()

    # ------------------------------------------------------------ reading

    def current(self) -> Trainer | None:
        with self._lock:
            return self._trainers.get(self._current) if self._current else None

    def current_id(self) -> str | None:
        """Changes whenever the page should show a different run (new run, reset, opened run)."""
        with self._lock:
            return self._current

    def trainers(self) -> dict[str, Trainer]:
        with self._lock:
            return dict(self._trainers)

    def find(self, run_dir: str | Path) -> Trainer | None:
        """The in-process trainer for a run directory, if this process has one."""
        target = Path(run_dir).resolve()
        with self._lock:
            for t in self._trainers.values():
                if t.run_dir is not None and Path(t.run_dir).resolve() == target:
                    return t
        return None

    def is_training(self, run_dir: str | Path) -> bool:
        t = self.find(run_dir)
        return t is not None and t.status().active

    # ------------------------------------------------------------ control

    def train(self, config: RunConfig, *, name: str | None = None, step_only: bool = False) -> Trainer:
        """Start a new run with `config` and show it; an active run is stopped (and checkpointed) first.

        With step_only the new run does one optimisation step and waits paused.
        Raises ConfigError (e.g. a device that is not available) before anything is stopped.
        """
        trainer = Trainer(config, name=name, sharing_with_server=True)
        with self._lock:
            self._stop_active()
            self._add(trainer, show=True)
        if step_only:
            trainer.step()
        else:
            trainer.start()
        return trainer

    def pause(self) -> None:
        t = self.current()
        if t is not None:
            t.pause()

    def resume(self, live: dict[str, float] | None = None) -> Trainer | None:
        """Continue the current run: unpause it, or restart a stopped/failed one where it left off.

        `live` (β, lr, warm-up, free bits) is applied first, so "lower the learning rate,
        then resume" works after a failure.
        """
        t = self._continuable()
        if t is None:
            return None
        if live:
            t.update(**{k: v for k, v in live.items() if k in LIVE_FIELDS})
        t.resume()
        return t

    def step(self, config: RunConfig | None) -> Trainer:
        """One optimisation step on the current run (pausing it), or a new run started paused after one step."""
        t = self._continuable()
        if t is None:
            if config is None:
                raise ConfigError("fix the settings marked in red first: Step starts a new run here")
            return self.train(config, step_only=True)
        t.step()
        return t

    def stop(self) -> None:
        t = self.current()
        if t is not None:
            t.stop()

    def reset(self) -> None:
        """Stop the current run (it stays on disk) and show none."""
        with self._lock:
            self._stop_active()
            self._current = None
            self._prune()

    def open(self, run_dir: str | Path, *, show: bool = True) -> Trainer:
        """A trainer for a saved run (weights, metrics, images from disk), shown if `show`.

        Reuses this process's own trainer for that run when there is one. Raises RunFileError.
        """
        with self._lock:
            t = self.find(run_dir)
            if t is None:
                t = Trainer.open(run_dir, sharing_with_server=True)
                self._add(t, show=show)
            elif show:
                self._current = self._id_of(t)
            return t

    def show(self, trainer: Trainer) -> None:
        with self._lock:
            key = self._id_of(trainer)
            if key is None:
                self._add(trainer, show=True)
            else:
                self._current = key

    def stop_all(self, timeout: float = 5.0) -> None:
        """Stop every trainer and forget them all (tests, shutdown)."""
        with self._lock:
            trainers, self._trainers, self._current = list(self._trainers.values()), {}, None
        for t in trainers:
            t.stop(timeout)

    # ------------------------------------------------------------ internals

    def _continuable(self) -> Trainer | None:
        """The current trainer if it can go on: alive, or stopped/failed (restarting continues its model)."""
        with self._lock:
            t = self.current()
            if t is None or (not t.is_alive() and t.status().state == "finished"):
                return None
            return t

    def _stop_active(self) -> None:
        for t in self._trainers.values():
            if t.is_alive():
                t.stop(timeout=5.0)

    def _add(self, trainer: Trainer, *, show: bool) -> None:
        key = f"run{next(self._ids)}"
        self._trainers[key] = trainer
        if show:
            self._current = key
        self._prune()

    def _prune(self) -> None:
        """Forget ended trainers other than the current one; their runs stay on disk."""
        for key in [k for k, t in self._trainers.items() if k != self._current and not t.is_alive()]:
            del self._trainers[key]

    def _id_of(self, trainer: Trainer) -> str | None:
        for k, t in self._trainers.items():
            if t is trainer:
                return k
        return None

    # ------------------------------------------------------------ saved runs (the Runs panel)

    def resume_run(self, run_dir: str | Path, *, epochs: int | None = None) -> Trainer:
        """Continue a saved run from its last checkpoint and show it; the active run, if another, stops first.

        A stopped, interrupted or failed run trains on to its planned epochs (or `epochs` more);
        a finished one trains `epochs` more (default: its configured epoch count). A run that
        another live process is training is refused (RunFileError), as is an unreadable one.
        """
        from vae_core import runs  # local: the registry itself only needs the trainer

        with self._lock:
            t = self.find(run_dir)
            if t is None:
                st_ = runs.read_status(Path(run_dir))
                if st_.get("state") in ("running", "paused"):
                    raise runs.RunFileError(f"run {Path(run_dir).name!r} is being trained by another process "
                                            f"(pid {st_.get('pid')}); stop it there first")
                t = Trainer.open(run_dir, sharing_with_server=True)
            for other in self._trainers.values():
                if other is not t and other.is_alive():
                    other.stop(timeout=5.0)
            self.show(t)
        if t.is_alive():  # paused here: just let it go on
            t.resume()
            return t
        if epochs is None and t.status().state == "finished":
            epochs = t.config.train.epochs
        t.start(epochs=epochs)
        return t

    def fork(self, run_dir: str | Path, *, epochs: int | None = None, name: str | None = None,
             **live_changes: float) -> Trainer:
        """Start a new run from a saved run's checkpoint with new β / lr / warm-up / free bits, and show it.

        The child records {"run", "step"} of its parent and continues its step count. Raises
        ConfigError (bad values) or RunFileError (unreadable parent) before anything is stopped.
        """
        from vae_core import runs

        bad = set(live_changes) - set(LIVE_FIELDS)
        if bad:
            raise ConfigError(f"a fork keeps its parent's {', '.join(sorted(bad))}; start a new run to change them")
        run_dir = Path(run_dir)
        runs.load_checkpoint(run_dir / runs.CHECKPOINT)  # fail here, not later in the thread
        config = runs.read_config(run_dir).replace(**live_changes, **({"epochs": epochs} if epochs else {}))
        trainer = Trainer(config, runs_dir=run_dir.parent, name=name, init_from=run_dir, sharing_with_server=True)
        with self._lock:
            self._stop_active()
            self._add(trainer, show=True)
        trainer.start()
        return trainer

    def forget(self, run_dir: str | Path) -> bool:
        """Drop this process's idle trainer for a run (before it is renamed or deleted); True if it was shown.

        Raises RunFileError while that trainer is training or paused.
        """
        from vae_core import runs

        with self._lock:
            t = self.find(run_dir)
            if t is None:
                return False
            if t.is_alive():
                raise runs.RunFileError(f"run {Path(run_dir).name!r} is training here; stop it first")
            key = self._id_of(t)
            del self._trainers[key]
            shown = self._current == key
            if shown:
                self._current = None
            return shown


_frozen = False  # gc.freeze() once per process


def _warm_up(name: str, registry: Registry) -> None:
    """One-off costs of a process's first run, paid before anyone presses Train."""
    global _frozen
    try:
        get_dataset(name)  # rendering the sprites: ~2.5 s
        # The first torch.optim.Adam imports torch._dynamo: ~1 s, measured as most of a first run's start-up.
        import torch._dynamo  # noqa: F401
    except Exception:  # a warm-up only; the run reports any real problem itself
        log.exception("warm-up for %s failed", name)
    if not _frozen and not registry.trainers():
        # Torch, its compiler stack, Streamlit and Plotly leave ~600k long-lived objects that every full
        # garbage collection walks with the GIL held: 100-260 ms in which the training thread cannot
        # start a single torch call. Freezing them (gc.freeze) makes those collections ~2 ms. Only
        # before the first run: objects frozen are never collected, and a run's must be.
        gc.collect()
        gc.freeze()
        _frozen = True


@st.cache_resource(show_spinner=False)
def get_registry() -> Registry:
    """The one registry of this server process (shared by all tabs and reloads)."""
    reg = Registry()
    # The training thread and the page's script threads share the GIL. Python's default 5 ms switch
    # interval lets a script thread rendering a refresh hold it while the trainer waits at every
    # torch call, so training steps run ~5x slower for the length of each refresh; 0.5 ms cuts that
    # stall (measured: +7-10% training throughput with the live panel open).
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
    # On a clean server shutdown (Ctrl-C, SIGTERM) runs checkpoint and record "stopped", so nothing
    # trained since the last epoch is lost; atexit runs before daemon threads are abandoned.
    atexit.register(reg.stop_all)
    # Paying the first run's one-off costs now keeps click-to-first-curve short.
    threading.Thread(target=_warm_up, args=("sprites", reg), name="vae-data-warmup", daemon=True).start()
    return reg
