"""The server's one Lab and this browser session's place in it.

One `vae_core.lab.Lab` per server process (plain `st.cache_resource`), shared by every
browser tab. Each tab has its own identity, a token in the page URL (`?sid=...`), so a
reload or a dropped websocket keeps the tab's own current run, and Train in one tab never
stops another tab's run. Sessions keep only UI choices in `st.session_state`; runs
(threads, models) live in the Lab.
"""
from __future__ import annotations

import atexit
import gc
import secrets
import logging
import sys
import threading
import time

import streamlit as st

from vae_core.lab import Lab, RunHandle

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


SID = "sid"  # the URL parameter that names this browser session


def session_id() -> str:
    """This tab's identity: the URL's sid (kept across reloads and reconnects), or a new one put there."""
    sid = st.session_state.get("_sid")
    if sid is None:
        raw = st.query_params.get(SID, "")
        sid = raw if raw.isalnum() and 8 <= len(raw) <= 64 else secrets.token_hex(8)
        st.session_state["_sid"] = sid
    if st.query_params.get(SID) != sid:
        st.query_params[SID] = sid
    return sid


def current_run(lab: Lab) -> RunHandle | None:
    """The run this session's page shows (None before the first Train or Open)."""
    return lab.current(session_id())


def current_token(lab: Lab) -> str | None:
    """Changes whenever this session's page should show a different run."""
    return lab.current_name(session_id())


def can_steer(lab: Lab, run: RunHandle | None) -> bool:
    """Whether this session may pause, step, stop or change `run` (its owner, or a run with no owner)."""
    return run is not None and lab.can_steer(run.run_dir, session_id())


_frozen = False  # gc.freeze() once per process


def _warm_up(lab: Lab) -> None:
    """One-off costs of a process's first run (torch, the default dataset), paid before anyone presses Train."""
    global _frozen
    try:
        lab.warm_up(Lab.default_dataset())  # what the sidebar offers first (settings.DEFAULTS)
    except Exception:  # a warm-up only; the run reports any real problem itself
        log.exception("warm-up failed")
    if not _frozen and lab.training_count() == 0:
        # Torch, its compiler stack, Streamlit and Plotly leave ~600k long-lived objects that every full
        # garbage collection walks with the GIL held: 100-260 ms in which the training thread cannot
        # start a single torch call. Freezing them (gc.freeze) makes those collections ~2 ms. Only
        # before the first run: objects frozen are never collected, and a run's must be.
        gc.collect()
        gc.freeze()
        _frozen = True


@st.cache_resource(show_spinner=False)
def get_lab() -> Lab:
    """The one Lab of this server process (shared by all tabs and reloads)."""
    lab = Lab(shares_cpu_with_server=True)
    # The training thread and the page's script threads share the GIL. Python's default 5 ms switch
    # interval lets a script thread rendering a refresh hold it while the trainer waits at every
    # torch call, so training steps run ~5x slower for the length of each refresh; 0.5 ms cuts that
    # stall (measured: +7-10% training throughput with the live panel open).
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
    # On a clean server shutdown (Ctrl-C, SIGTERM) runs checkpoint and record "stopped", so nothing
    # trained since the last epoch is lost; atexit runs before daemon threads are abandoned.
    atexit.register(lab.shutdown)
    threading.Thread(target=_warm_up, args=(lab,), name="vae-warmup", daemon=True).start()
    return lab


@st.cache_resource(show_spinner=False)
def get_viewers() -> Viewers:
    """The sessions watching live panels, process-wide, so together they keep within REFRESH_BUDGET."""
    return Viewers()
