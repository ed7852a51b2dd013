"""On-demand evaluations in the background: importance-weighted bounds on a held-out batch, with progress.

An IwaeJob runs evidence.iwae_curve in its own daemon thread on a private CPU model built
from a copy of a run's published weights, never the model the optimiser updates. It works
through the batch a few examples at a time, so it can report progress (0..1) and stop within
one chunk of being cancelled, and pools the chunks' means and standard errors exactly into
the numbers one call over the whole batch would report. JobBoard keeps at most one job per
key (a run) for a whole process; the dashboard holds one in st.cache_resource.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from .config import ModelConfig, RunConfig
from .inference import Weights, held_out
from .records import DEFAULT_EXAMPLES, DEFAULT_K, EXAMPLE_CHOICES, K_CHOICES, JobSnapshot  # noqa: F401 (re-exported)
from .evidence import iwae_curve
from .models import build_model

JOB_STATES = ("running", "done", "cancelled", "failed")
# Chunks of ~0.2 s on 2 CPU cores, so progress moves often and a cancel lands well within a second
# even with training beside it. Cost of one decoded sample in microseconds, a + b * hidden units,
# fitted to iwae_curve timings here (MLP: 6.4 at 32 hidden, 9.6 at 400, 13.8 at 1024; conv net:
# 48 at 64, 176 at 400). A cost model rather than a timer, so a seed always gives the same numbers.
CHUNK_SECONDS = 0.2
SAMPLE_COST_US = {"mlp": (6.0, 0.0075), "conv": (24.0, 0.38)}
POOLED = ("iwae", "elbo", "elbo_mc")  # quantities reported with a standard error


def bound_ks(k: int) -> list[int]:
    """The k values evaluated for a largest k: the powers of ten below it, and k itself."""
    if k < 1:
        raise ValueError(f"k must be a whole number >= 1; got {k!r}")
    return sorted({10 ** i for i in range(int(math.log10(k)) + 1) if 10 ** i <= k} | {int(k)})


def chunk_size(model_config: ModelConfig, k: int) -> int:
    """Examples per chunk for k samples each (at least one)."""
    a, b = SAMPLE_COST_US.get(model_config.arch, SAMPLE_COST_US["conv"])
    samples = CHUNK_SECONDS * 1e6 / (a + b * model_config.hidden_dim)
    return max(1, int(samples // k))


@dataclass
class _Pool:
    """Running count, mean and sum of squared deviations (Chan et al. 1979's parallel update)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, n: int, mean: float, se: float) -> None:
        # A chunk's unbiased std is se * sqrt(n) (iwae_curve's se = std / sqrt(n)); one example has none.
        m2 = (n - 1) * se * se * n if n > 1 else 0.0
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    @property
    def se(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1) / self.n) if self.n > 1 else float("nan")


class IwaeJob:
    """iwae_curve over a batch in a daemon thread, chunk by chunk, on its own CPU copy of the weights."""

    def __init__(self, model_config: ModelConfig, state_dict: dict[str, torch.Tensor], x: torch.Tensor, *,
                 k: int, seed: int = 0, chunk_examples: int | None = None, weights_version: int = 0,
                 step: int = 0) -> None:
        if len(x) < 1:
            raise ValueError("an evaluation needs at least one example")
        self.ks = tuple(bound_ks(k))
        self.k = self.ks[-1]
        # A private model: loading copies the tensors, so nothing here aliases the caller's weights.
        self.model = build_model(model_config).eval()
        self.model.load_state_dict(state_dict)
        self.x = x.detach().to("cpu", copy=True)
        self.seed = seed
        self.chunk = int(chunk_examples) if chunk_examples else chunk_size(model_config, self.k)
        if self.chunk < 1:
            raise ValueError(f"chunk_examples must be >= 1; got {chunk_examples!r}")
        self.weights_version, self.step = weights_version, step
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._state, self._done, self._error = "running", 0, None
        self._result: dict[str, Any] | None = None
        self._t0 = self._t1 = 0.0
        self._thread = threading.Thread(target=self._run, name="vae-iwae-job", daemon=True)

    @classmethod
    def from_weights(cls, weights: Weights, *, k: int, n: int, seed: int = 0,
                     chunk_examples: int | None = None) -> "IwaeJob":
        """A job over a run's first n held-out test images with its latest published weights."""
        version, step = weights.version(), weights.step()
        state = weights.state_copy()
        if state is None:
            raise RuntimeError("the run has no published weights yet")
        x = held_out(weights.dataset(), weights.config, n)
        return cls(weights.config.model, state, x, k=k, seed=seed, chunk_examples=chunk_examples,
                   weights_version=version, step=step)

    @classmethod
    def from_trainer(cls, trainer: Any, **kwargs: Any) -> "IwaeJob":
        return cls.from_weights(trainer.weights, **kwargs)

    # ------------------------------------------------------------ control (any thread)

    def start(self) -> "IwaeJob":
        with self._lock:
            if not self._thread.is_alive() and self._t0 == 0.0:
                self._t0 = time.monotonic()
                self._thread.start()
        return self

    def cancel(self) -> None:
        """Stop after the chunk in progress (each is a fraction of a second)."""
        self._cancel.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            end = self._t1 or time.monotonic()
            return JobSnapshot(self._state, self._done / len(self.x), self._done, len(self.x), self.k, self.ks,
                               end - self._t0 if self._t0 else 0.0, self.weights_version, self.step,
                               dict(self._result) if self._result else None, self._error)

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            result = self._evaluate()
            with self._lock:
                if result is None:
                    self._state = "cancelled"
                else:
                    self._state, self._result = "done", result
        except Exception as e:  # reported in the snapshot, never raised into a dead thread
            with self._lock:
                self._state, self._error = "failed", f"{type(e).__name__}: {e}"
        finally:
            with self._lock:
                self._t1 = time.monotonic()

    def _evaluate(self) -> dict[str, Any] | None:
        gen = torch.Generator().manual_seed(self.seed)  # consumed chunk after chunk, so a seed fixes the numbers
        pools = {name: [_Pool() for _ in self.ks] if name == "iwae" else _Pool() for name in POOLED}
        steps = [_Pool() for _ in self.ks]  # each rise in k, paired by image: pooled like any mean
        iwae_each: list[float] = []
        elbo_each: list[float] = []
        kl_sum, first = 0.0, None
        for start in range(0, len(self.x), self.chunk):
            if self._cancel.is_set():
                return None
            r = iwae_curve(self.model, self.x[start:start + self.chunk], self.ks, generator=gen)
            b = r["n"]
            first = first or r
            for pool, m, s in zip(pools["iwae"], r["iwae"], r["iwae_se"]):
                pool.add(b, m, s)
            previous = r["elbo"]
            for pool, m, s in zip(steps, r["iwae"], r["iwae_step_se"]):
                pool.add(b, m - previous, s)
                previous = m
            iwae_each += r["iwae_each"]
            elbo_each += r["elbo_each"]
            pools["elbo"].add(b, r["elbo"], r["elbo_se"])
            pools["elbo_mc"].add(b, r["elbo_mc"], r["elbo_mc_se"])
            kl_sum += r["kl"] * b
            with self._lock:
                self._done = start + b
        if self._cancel.is_set():
            return None
        n = len(self.x)
        if first is not None and first["n"] == n:  # one chunk: iwae_curve's own numbers, no pooling rounding
            return first
        iw, el, mc = pools["iwae"], pools["elbo"], pools["elbo_mc"]
        return {"ks": list(self.ks), "iwae": [p.mean for p in iw], "iwae_se": [p.se for p in iw],
                "iwae_step_se": [p.se for p in steps], "iwae_each": iwae_each, "elbo_each": elbo_each,
                "elbo": el.mean, "elbo_se": el.se, "elbo_mc": mc.mean, "elbo_mc_se": mc.se, "kl": kl_sum / n,
                "n": n, "samples": self.k}


class JobBoard:
    """At most one job per key (e.g. per run), process-wide; submitting a new one cancels the old one."""

    def __init__(self, max_keys: int = 16) -> None:
        self._lock = threading.Lock()
        self._jobs: OrderedDict[Any, IwaeJob] = OrderedDict()
        self.max_keys = max_keys

    def get(self, key: Any) -> IwaeJob | None:
        with self._lock:
            return self._jobs.get(key)

    def submit(self, key: Any, job: IwaeJob) -> IwaeJob:
        """Start `job` as the one for `key`."""
        with self._lock:
            old = self._jobs.pop(key, None)
            self._jobs[key] = job
            while len(self._jobs) > self.max_keys:  # the oldest runs' finished results go first
                _, dropped = self._jobs.popitem(last=False)
                dropped.cancel()
        if old is not None:
            old.cancel()
        return job.start()

    def cancel(self, key: Any) -> None:
        job = self.get(key)
        if job is not None:
            job.cancel()

    def cancel_all(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for j in jobs:
            j.cancel()
