"""Typed records where the core and a reader (the dashboard, the CLI) meet: plain values only, no torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

# The Evidence tab's on-demand bounds (vae_core.jobs): the k slider, the held-out image counts, defaults.
K_CHOICES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
EXAMPLE_CHOICES = (8, 16, 32, 64, 128, 256, 500, 1000)
DEFAULT_K, DEFAULT_EXAMPLES = 1000, 64
# Dimension d is active when its KL(q(z_d|x) || p(z_d)), averaged over the test set, exceeds this many
# nats. That average bounds the information z_d carries about x from above (Hoffman & Johnson 2016),
# so below it the dimension is collapsed (Lucas et al. 2019's epsilon-collapse) and white in the
# Evidence tab's heatmap, which draws the same numbers. Burda et al. 2016's rule, Var_x(E_q[z_d|x])
# > 0.01, counted 16 of 16 active at beta = 8 where 12 carried under 0.03 nats each.
ACTIVE_THRESHOLD = 0.1
# An example whose largest-k IWAE bound lies this many nats below the grid's log p(x) is flagged: q's
# samples did not find the posterior's mass, so the bound understates log p(x) (vae_core.evidence).
IWAE_FAR_NATS = 1.0


def active_mask(kl_per_dim: list[float], threshold: float = ACTIVE_THRESHOLD) -> list[bool]:
    """Which dimensions are active: the one rule, for the trainer's count and the dashboard's heatmap alike."""
    return [float(v) > threshold for v in kl_per_dim]


class DatasetUnavailable(RuntimeError):
    """The dataset is not on this machine and could not be downloaded; the message says how to provide it."""


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

    queue_position: int | None = None  # 1-based place in the Lab's queue while state is "queued"
    owner: str | None = None  # the session that steers it (None: anyone, e.g. a CLI run)
    followed: bool = False  # trained by another process; read from its run directory

    @property
    def active(self) -> bool:
        return self.state in ("running", "paused")

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


@dataclass(frozen=True)
class JobSnapshot:
    """Where a job stands: plain values only. result has iwae_curve's keys once state is 'done'."""

    state: str
    progress: float  # 0..1, examples done / examples
    done: int
    n: int
    k: int
    ks: tuple[int, ...]
    elapsed_s: float
    weights_version: int
    step: int
    result: dict[str, Any] | None
    error: str | None

    @property
    def running(self) -> bool:
        return self.state == "running"




class TrainRow(TypedDict):
    """One line of metrics.jsonl per log interval: means over its steps, nats per example.

    beta is the set value (as Status.beta); beta_effective the KL's mean weight over the interval
    (after warm-up), as Status.beta_effective. Rows written before this naming have beta = the
    effective weight and beta_set = the set value (dashboard.common reads both).
    """

    step: int
    epoch: float
    split: str  # "train"
    elbo: float
    recon: float
    kl: float
    loss: float
    beta: float
    beta_effective: float
    lr: float
    free_bits: float
    wall_time: float


class TestRow(TypedDict, total=False):
    """One line per epoch: the test set's ELBO and its terms, per-dimension KL and active units."""

    step: int
    epoch: int
    split: str  # "test"
    elbo: float
    recon: float
    kl: float
    kl_per_dim: list[float]
    active_units: int
    mu_variance: list[float]
    beta: float
    beta_effective: float
    samples_per_s: float
    wall_time: float
