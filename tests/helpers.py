"""Small helpers the test modules share."""
from __future__ import annotations

from vae_core.trainer import Trainer


def train_to_end(trainer: Trainer, *, epochs: int | None = None, timeout: float = 60.0) -> Trainer:
    """Start `trainer` (for `epochs` more, if given), wait for its thread and check that the run finished."""
    trainer.start(epochs=epochs)
    trainer.join(timeout)
    assert trainer.status().state == "finished", trainer.status().message
    return trainer
