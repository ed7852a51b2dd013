"""What the Evidence tab reads from a run: its metric rows split by kind, as plain series, and shared names.

The tab's sections (evidence_bounds, evidence_posterior, evidence_kl) share these instead of
importing each other. Mostly pure functions over the run's metric rows (copies), so they can be
tested without Streamlit and every section reads the same numbers the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dashboard.common import poll_interval, units, viewer_id
from dashboard.state import get_lab, get_viewers
from vae_core.lab import ACTIVE_THRESHOLD, JobSnapshot, RunHandle, active_mask

K = "evidence_"  # every widget key of the tab starts with this
GAP_FILL = "rgba(228, 87, 86, 0.18)"
ELBO_COLOR, IWAE_COLOR, GRID_COLOR, JOB_COLOR = "#4c78a8", "#e45756", "#54a24b", "#b279a2"
COLLAPSE_KL_NATS = 0.5  # total KL below this: the code says almost nothing about x
RECENT_TRAIN_ROWS = 60  # train rows drawn on the rate-distortion plane (about the last minute)


@dataclass(frozen=True)
class Rows:
    """A run's metric rows by split: 'train' (every ~20 steps), 'test' (per epoch), 'evidence' (every few epochs)."""

    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    evidence: list[dict[str, Any]]


def split_rows(rows: list[dict[str, Any]]) -> Rows:
    by: dict[str, list[dict[str, Any]]] = {"train": [], "test": [], "evidence": []}
    for r in rows:
        if r.get("split") in by:
            by[r["split"]].append(r)
    return Rows(by["train"], by["test"], by["evidence"])


def live_interval(run: RunHandle) -> float | None:
    """Seconds between refreshes of the live sections: the Training tab's rhythm, None when idle.

    Longer when many sessions watch, as for the status line (the server's shared refresh budget).
    """
    return get_viewers().interval(poll_interval(run.status().state), viewer_id())


def finished_job(run: RunHandle) -> JobSnapshot | None:
    """The run's latest on-demand bounds (the Lab's background job), if one finished."""
    snap = get_lab().bounds_job(run.name)
    return snap if snap is not None and snap.state == "done" else None


def axis_unit(run: RunHandle) -> str:
    return units(run.config)[0]


def caveat(run: RunHandle) -> str:
    """Why the numbers are not log-likelihoods (grey-level BCE, Gaussian densities), or ''."""
    return units(run.config)[1]


def elbo_name(run: RunHandle) -> str:
    """'ELBO', or what the same number is when grey-level pixels make it a cross-entropy (as the Training tab says)."""
    config = run.config
    return "−BCE − KL (not a bound)" if not config.binarized and config.model.likelihood == "bernoulli" else "ELBO"


def best_bound(row: dict[str, Any]) -> tuple[int, float, float]:
    """(k, log p_k(x), standard error) for the largest k of an evidence row or job result."""
    return int(row["ks"][-1]), float(row["iwae"][-1]), float(row["iwae_se"][-1])


def kl_matrix(test: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension KL over epochs: (epochs (E,), KL (D, E) nats); rows without kl_per_dim are skipped."""
    kept = [r for r in test if isinstance(r.get("kl_per_dim"), list) and r["kl_per_dim"]]
    if not kept:
        return np.zeros(0), np.zeros((0, 0))
    d = max(len(r["kl_per_dim"]) for r in kept)
    z = np.full((d, len(kept)), np.nan)
    for j, r in enumerate(kept):
        z[: len(r["kl_per_dim"]), j] = r["kl_per_dim"]
    return np.array([r["epoch"] for r in kept], dtype=float), z


def active_count(row: dict[str, Any]) -> int | None:
    """A test row's active units by the one rule (records.active_mask) on the per-dimension KL the heatmap draws;
    rows logged without kl_per_dim keep their own count (None when they have neither)."""
    if isinstance(row.get("kl_per_dim"), list) and row["kl_per_dim"]:
        return sum(active_mask(row["kl_per_dim"]))
    return row.get("active_units")


def collapse_signs(test: list[dict[str, Any]], train: list[dict[str, Any]], latent_dim: int) -> list[str]:
    """Reasons to suspect posterior collapse, worded for a person; empty when there are none.

    Three signs: the total KL near 0 (on the latest test evaluation, or on the last few train
    rows, which react within seconds); most dimensions collapsed (under ACTIVE_THRESHOLD nats
    each, the cells the heatmap shows as empty), however much the others carry; and active units
    that fell below their earlier best.
    """
    signs = []
    recent = [r["kl"] for r in train[-5:]]
    latest_test = test[-1] if test else None
    if latest_test is not None and latest_test["kl"] < COLLAPSE_KL_NATS:
        signs.append(f"the total KL on the test set is {latest_test['kl']:.2f} nats (below {COLLAPSE_KL_NATS:g}) "
                     f"after epoch {latest_test['epoch']}: the codes carry almost no information about the images")
    elif recent and len(train) >= 5 and float(np.mean(recent)) < COLLAPSE_KL_NATS:
        signs.append(f"the total KL over the last training steps averages {np.mean(recent):.2f} nats "
                     f"(below {COLLAPSE_KL_NATS:g}): the codes are collapsing onto the prior")
    counts = [(r["epoch"], c) for r in test if (c := active_count(r)) is not None]
    if counts and latent_dim > 1 and counts[-1][1] < latent_dim / 2:
        now_epoch, now = counts[-1]
        signs.append(f"{latent_dim - now} of {latent_dim} dimensions are collapsed after epoch {now_epoch}: each "
                     f"carries under {ACTIVE_THRESHOLD:g} nats (the pale rows of the heatmap), so only {now} "
                     "encode anything")
    if len(counts) >= 2:
        best_epoch, best = max(counts, key=lambda c: c[1])
        now_epoch, now = counts[-1]
        if now < best:
            signs.append(f"active units fell from {best} of {latent_dim} (epoch {best_epoch}) to {now} "
                         f"(epoch {now_epoch})")
    return signs
