"""Small helpers the test modules share."""
from __future__ import annotations

import time

from vae_core.trainer import Trainer


def train_to_end(trainer: Trainer, *, epochs: int | None = None, timeout: float = 60.0) -> Trainer:
    """Start `trainer` (for `epochs` more, if given), wait for its thread and check that the run finished."""
    trainer.start(epochs=epochs)
    trainer.join(timeout)
    assert trainer.status().state == "finished", trainer.status().message
    return trainer


def poll_until(predicate, timeout: float = 120.0, what: str = "condition", every: float = 0.1):
    """Wait for a state, however slow the machine is today; return the predicate's value, or fail with what
    was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
