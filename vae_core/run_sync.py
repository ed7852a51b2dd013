"""A training run's side of the run directory protocol: status.json heartbeats and control.json requests.

Other processes follow a run through its files (lab.FollowedRun) and steer it by writing
control.json (runs.write_control). RunSync is what the training process does about it: a
small thread beside the training loop that rewrites status.json every HEARTBEAT_S (so a long
evaluation never looks like a dead process) and applies a newer control.json within half a
second, acknowledging its sequence number in status.json.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import TYPE_CHECKING

from . import runs
from .config import LIVE_FIELDS, ConfigError

if TYPE_CHECKING:
    from .trainer import Trainer

POLL_S = 0.5


class RunSync:
    """Heartbeats and steering for one Trainer; it uses only the trainer's public control and status calls."""

    def __init__(self, trainer: "Trainer") -> None:
        self.trainer = trainer
        self.applied = 0  # the last control.json seq applied (acknowledged in status.json)
        self._seen: tuple[int, int] | None = None
        self._write = threading.Lock()  # one status.json writer at a time (the loop or this thread)

    def skip_old_requests(self) -> None:
        """Requests written before this process took the run are not for it."""
        self.applied = _seq(runs.read_control(self.trainer.run_dir)) or 0

    def follow(self, thread: threading.Thread) -> None:
        """Beat and poll in a daemon thread for as long as `thread` trains."""
        threading.Thread(target=self._loop, args=(thread,), name=f"vae-sync-{self.trainer.name}", daemon=True).start()

    def write_status(self) -> None:
        """status.json from the trainer's in-memory status (state, step, live settings, host, heartbeat)."""
        t = self.trainer
        if not (t.persist and t.run_dir is not None):
            return
        with self._write:
            s = t.status()
            fields = {k: v for k, v in dataclasses.asdict(s).items()
                      if k not in ("state", "message", "run_dir", "queue_position", "owner", "followed")}
            runs.write_status(t.run_dir, s.state, s.message, **fields, epochs_done=int(s.epoch),
                              steps_per_epoch=round(s.total_steps / s.epochs_target) if s.epochs_target else 0,
                              control_seq=self.applied)

    def _loop(self, thread: threading.Thread) -> None:
        last_beat = time.monotonic()
        while thread.is_alive():
            try:
                self.poll_control()
                if time.monotonic() - last_beat >= runs.HEARTBEAT_S:
                    self.write_status()
                    last_beat = time.monotonic()
            except OSError:  # a full disk or a removed directory must not end the process's training
                pass
            thread.join(POLL_S)

    def poll_control(self) -> None:
        """Apply control.json if it changed and holds a newer request."""
        t = self.trainer
        key = runs.file_version(t.run_dir / runs.CONTROL)
        if key is None or key == self._seen:
            return
        self._seen = key
        ctl = runs.read_control(t.run_dir)
        seq = _seq(ctl)
        if seq is None or seq <= self.applied:  # a hand-made or corrupt control.json asks nothing
            return
        live = {k: ctl[k] for k in LIVE_FIELDS if isinstance(ctl.get(k), (int, float)) and not isinstance(ctl[k], bool)}
        note = None
        try:
            if live:
                t.update(**live)
                note = "applied " + ", ".join(f"{k}={v:g}" for k, v in live.items()) + " from control.json"
        except ConfigError as e:
            note = f"ignored a control.json request: {e}"
        command = ctl.get("command")
        if command == "pause":
            t.pause()
        elif command == "resume":
            t.resume()
        elif command == "stop":
            t.request_stop()
        self.applied = seq
        if note:
            t.note(note)
        self.write_status()


def _seq(ctl: dict) -> int | None:
    """control.json's sequence number: a whole number, else None (it was not written by write_control)."""
    seq = ctl.get("seq", 0)
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**53:
        return None
    return seq
