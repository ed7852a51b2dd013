"""Evidence tab, section 1: the ELBO against log p(x) over training, the bound against k, and "Estimate now".

The curves come from the run's 'evidence' rows (every few epochs, on a fixed held-out
batch) and refresh while the run is active. "Estimate now" asks the Lab for a background job
(lab.submit_bounds) on a copy of the published weights; the job lives in the server's one Lab,
keyed by run name, so a reload or a second tab finds it, and only its progress line polls while
it runs.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from dashboard.panels.evidence_series import (ELBO_COLOR, GAP_FILL, GRID_COLOR, IWAE_COLOR, JOB_COLOR, K, axis_unit,
                                              best_bound, caveat, elbo_name, finished_job, live_interval, split_rows)
from dashboard.common import md_text
from dashboard.state import get_lab
from vae_core.config import unit_label
from vae_core.lab import (DEFAULT_EXAMPLES, DEFAULT_K, EXAMPLE_CHOICES, IWAE_FAR_NATS, K_CHOICES, DatasetUnavailable,
                          JobSnapshot, RunHandle, UserError)

JOB_POLL = 1.0  # seconds between progress looks while a job runs
X_AXES = {"epoch": "epoch", "step": "training step"}
CHART = {"displaylogo": False}


# ------------------------------------------------------------------ over training

def render(run: RunHandle) -> None:
    st.markdown("Every few epochs training estimates, on a fixed batch of held-out images, the ELBO and the "
                "importance-weighted bounds log p̂ₖ(x) (Burda et al. 2016). They are lower bounds on log p(x) that "
                "rise with k, but only as fast as k samples from q(z|x) find the posterior's mass: where q sits far "
                "from the posterior, even k = 5000 can leave most of the gap. The shaded band between the ELBO and "
                "the best bound is therefore a *lower* estimate of KL(q(z|x) ‖ p(z|x)), the **inference gap**: how "
                "far the encoder's Gaussian is from the true posterior.")

    @st.fragment(run_every=live_interval(run))
    def live() -> None:
        rows = split_rows(run.metrics())
        if not rows.evidence:
            every = run.config.train.evidence_every
            st.info("No log p(x) estimates yet: " + (
                f"training makes one after epoch 1 and then every {every} epochs." if every else
                "this run was started with them off (Advanced → “log p(x) estimate every N epochs” = 0).")
                + " **Estimate now** below makes one from the current weights.")
            job = finished_job(run)
            if job is not None:
                st.plotly_chart(k_figure(None, job, axis_unit(run)), key=K + "vs_k", config=CHART)
        else:
            headline(rows.evidence[-1], run)
            left, right = st.columns([3, 2])
            with left:
                x_key = st.radio("Horizontal axis", list(X_AXES), key=K + "x_axis", horizontal=True,
                                 format_func=X_AXES.get)
                st.plotly_chart(over_training_figure(rows.evidence, run, x_key), key=K + "over_training",
                                config=CHART)
            with right:
                job = finished_job(run)
                st.plotly_chart(k_figure(rows.evidence[-1], job, axis_unit(run)), key=K + "vs_k", config=CHART)
                st.caption(k_caption(rows.evidence[-1], job))
            per_image(rows.evidence[-1], run)
        if caveat(run):
            st.caption("⚠ " + caveat(run))

    live()
    st.markdown("##### Estimate now")
    estimate_section(run)


def headline(row: dict[str, Any], run: RunHandle) -> None:
    k, bound, se = best_bound(row)
    cols = st.columns(4)
    cols[0].metric(elbo_name(run), f"{row['elbo']:.2f}",
                   help=f"Mean over {row['n']} held-out images ± {row['elbo_se']:.2f} (standard error), after epoch "
                        f"{row['epoch']}")
    cols[1].metric(f"log p̂ₖ(x), k = {k}", f"{bound:.2f}", help=f"± {se:.2f} standard error over images; a lower "
                                                                 "bound on log p(x) that rises with k, but can stay "
                                                                 "far below it where q misses the posterior's mass")
    cols[2].metric("Gap ≈ KL(q(z|x) ‖ p(z|x))", f"{bound - row['elbo']:.2f}",
                   help="Best bound minus the ELBO: a lower estimate of the KL to the true posterior")
    if "log_px_grid" in row:
        same = f" (log p̂ₖ(x) on the same 8: {row['iwae_grid_examples']:.2f})" if "iwae_grid_examples" in row else ""
        cols[3].metric("log p(x) of the first 8, by quadrature", f"{row['log_px_grid']:.2f}",
                       help="Exact up to grid error, on the first 8 of these images only (2 latents), so compare "
                            "it with the right-hand panel below, not with the 64-image numbers" + same)
    st.caption(f"In {unit_label(run.config)}; after epoch {row['epoch']} (step {row['step']:,}), on {row['n']} "
               "held-out images.")


def _x(rows: list[dict[str, Any]], x_key: str) -> np.ndarray:
    return np.array([r[x_key] for r in rows], dtype=float)


def _band(fig: go.Figure, x: np.ndarray, low: np.ndarray, high: np.ndarray, name: str, col: int) -> None:
    """A shaded band between two curves, with its own legend entry and the width on hover."""
    fig.add_trace(go.Scatter(x=x, y=low, mode="lines", line={"width": 0}, showlegend=False, hoverinfo="skip"),
                  row=1, col=col)
    fig.add_trace(go.Scatter(x=x, y=high, mode="lines", line={"width": 0}, fill="tonexty", fillcolor=GAP_FILL,
                             name=name, customdata=high - low, hovertemplate="gap %{customdata:.2f}<extra></extra>",
                             legendgroup=name), row=1, col=col)


def _curve(fig: go.Figure, x, y, se, name: str, color: str, col: int, dash: str | None = None,
           show: bool = True) -> None:
    fig.add_trace(go.Scatter(x=x, y=y, name=name, mode="lines+markers", legendgroup=name, showlegend=show,
                             line={"color": color, "dash": dash}, marker={"size": 6},
                             error_y=None if se is None else {"type": "data", "array": se, "thickness": 1},
                             hovertemplate="%{y:.2f}"), row=1, col=col)


def over_training_figure(evidence: list[dict[str, Any]], run: RunHandle, x_key: str = "epoch") -> go.Figure:
    """ELBO and the best IWAE bound over training with the gap shaded; with 2 latents, a second panel
    for the grid examples: ELBO, IWAE and log p(x) by quadrature on the same images."""
    grid = [r for r in evidence if "log_px_grid" in r]
    cols = 2 if grid else 1
    titles = (f"{evidence[-1]['n']} held-out images",) + ((f"first {8} of them, by quadrature",) if grid else ())
    fig = make_subplots(1, cols, subplot_titles=titles, horizontal_spacing=0.12)
    x = _x(evidence, x_key)
    elbo = np.array([r["elbo"] for r in evidence])
    best = np.array([best_bound(r)[1] for r in evidence])
    ks = sorted({best_bound(r)[0] for r in evidence})
    _band(fig, x, elbo, best, "gap ≈ KL(q(z|x) ‖ p(z|x))", 1)
    _curve(fig, x, elbo, [r["elbo_se"] for r in evidence], "ELBO", ELBO_COLOR, 1)
    _curve(fig, x, best, [best_bound(r)[2] for r in evidence], "log p̂ₖ(x), k = " + "/".join(map(str, ks)),
           IWAE_COLOR, 1)
    if grid:
        gx = _x(grid, x_key)
        g_elbo, g_px = np.array([r["elbo_grid"] for r in grid]), np.array([r["log_px_grid"] for r in grid])
        _band(fig, gx, g_elbo, g_px, "KL(q ‖ p(z|x)) by quadrature", 2)
        _curve(fig, gx, g_elbo, None, "ELBO", ELBO_COLOR, 2, show=False)
        if all("iwae_grid_examples" in r for r in grid):
            _curve(fig, gx, [r["iwae_grid_examples"] for r in grid], None, "log p̂ₖ(x)", IWAE_COLOR, 2, show=False)
        _curve(fig, gx, g_px, None, "log p(x) by quadrature", GRID_COLOR, 2, dash="dash")
    unit = axis_unit(run)
    for c in range(1, cols + 1):
        fig.update_xaxes(title_text=X_AXES[x_key], row=1, col=c)
        fig.update_yaxes(title_text=unit, row=1, col=c)
    fig.update_layout(height=380, margin={"l": 60, "r": 10, "t": 40, "b": 60}, hovermode="x unified",
                      legend={"orientation": "h", "y": -0.25, "x": 0}, uirevision="over_training")
    return fig


def step_errors(r: dict[str, Any]) -> tuple[list[float], bool]:
    """The error bars of the bound-against-k chart and whether they are paired: the standard error of each rise
    (from the previous k, or from the ELBO at the first), paired by image; for rows logged before that existed,
    the spread across images."""
    if "iwae_step_se" in r:
        return list(r["iwae_step_se"]), True
    return list(r["iwae_se"]), False


def k_figure(row: dict[str, Any] | None, job: JobSnapshot | None, unit: str) -> go.Figure:
    """log p̂ₖ(x) against k (log axis) for the latest evaluation, and the latest on-demand one, with error bars."""
    fig = go.Figure()
    series = [] if row is None else [(row, f"epoch {row['epoch']} ({row['n']} images)", IWAE_COLOR)]
    if job is not None:
        series.append((job.result, f"on demand, step {job.step:,} ({job.n} images)", JOB_COLOR))
    for r, name, color in series:
        err, paired = step_errors(r)
        rise = np.diff([r["elbo"], *r["iwae"]])
        hover = ("k = %{x}: %{y:.2f}<br>rise %{customdata[0]:+.2f} ± %{customdata[1]:.2f} (paired SE)" if paired
                 else "k = %{x}: %{y:.2f} ± %{customdata[1]:.2f} (spread across images)")
        fig.add_trace(go.Scatter(x=r["ks"], y=r["iwae"], error_y={"type": "data", "array": err},
                                 mode="lines+markers", name=name, line={"color": color},
                                 customdata=np.stack([rise, err], -1), hovertemplate=hover + "<extra></extra>"))
        fig.add_hline(y=r["elbo"], line={"color": color, "dash": "dot", "width": 1})
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="ELBO of each (dotted line)",
                             line={"color": "grey", "dash": "dot", "width": 1}))
    fig.update_layout(title={"text": "Bound against k", "font": {"size": 14}}, height=380,
                      xaxis={"type": "log", "title": {"text": "k (importance samples per image)"}},
                      yaxis={"title": {"text": unit}}, margin={"l": 60, "r": 10, "t": 40, "b": 60},
                      legend={"orientation": "h", "y": -0.25, "x": 0})
    return fig


def k_caption(row: dict[str, Any], job: JobSnapshot | None) -> str:
    """What the error bars of the k chart are, with the spread across images they are not."""
    r = job.result if job is not None else row
    _, paired = step_errors(r)
    spread = f"{min(r['iwae_se']):.2f}–{max(r['iwae_se']):.2f}"
    if paired:
        return ("Error bars: the Monte Carlo standard error of each rise (from the previous k, or from the ELBO at "
                "the first k), paired by image, so they say how sure each step up is. The spread of the mean across "
                f"images (± {spread}) is far larger, but every k shares it: it moves all points together.")
    return (f"Error bars: standard errors of the mean across images (± {spread}), logged before paired errors "
            "existed. Every k is evaluated on the same images, so most of that spread is shared: the rise with k "
            "is far surer than these bars suggest.")


def per_image(row: dict[str, Any], run: RunHandle) -> None:
    """Each grid image's gap between log p(x) and its bounds, so a bound far below on a few images is not hidden
    in the mean; images whose best bound is more than IWAE_FAR_NATS below log p(x) are flagged."""
    if not all(key in row for key in ("log_px_grid_each", "elbo_grid_each", "iwae_each")):
        return
    log_px = np.array(row["log_px_grid_each"])
    n = len(log_px)
    bound = np.array(row["iwae_each"][:n])  # the grid images are the batch's first n
    elbo = np.array(row["elbo_grid_each"])
    k = best_bound(row)[0]
    gap = log_px - bound
    far = gap > IWAE_FAR_NATS
    fig = go.Figure()
    labels = [f"image {i}" for i in range(n)]
    fig.add_trace(go.Bar(x=labels, y=log_px - elbo, name="log p(x) − ELBO = KL(q ‖ p(z|x))", marker_color=GAP_FILL,
                         hovertemplate="%{x}: %{y:.2f}<extra></extra>"))
    fig.add_trace(go.Bar(x=labels, y=gap, name=f"log p(x) − log p̂ₖ(x), k = {k:,} (red: over {IWAE_FAR_NATS:g})",
                         marker_color=[IWAE_COLOR if f else ELBO_COLOR for f in far],
                         hovertemplate="%{x}: %{y:.2f}<extra></extra>"))
    fig.update_layout(title={"text": f"Per image: how far each bound is below log p(x) (after epoch {row['epoch']})",
                             "font": {"size": 14}}, height=300, barmode="group",
                      yaxis={"title": {"text": f"gap, {axis_unit(run)}"}},
                      margin={"l": 60, "r": 10, "t": 40, "b": 40}, legend={"orientation": "h", "y": -0.2, "x": 0})
    st.plotly_chart(fig, key=K + "per_image", config=CHART)
    if far.any():
        which = ", ".join(f"image {i} ({gap[i]:.1f} nats)" for i in np.flatnonzero(far))
        st.warning(f"On {int(far.sum())} of {n} images the k = {k:,} bound is far below log p(x): {which}. There q's "
                   "samples miss most of the posterior's mass, so more samples close little of the gap: the "
                   "IWAE bound understates log p(x) on these images, and the mean hides it. With more than 2 "
                   "latents there is no grid to reveal this.")
    else:
        st.caption(f"On each of these {n} images the k = {k:,} bound is within {IWAE_FAR_NATS:g} nats of log p(x).")


# ------------------------------------------------------------------ on demand

def _test_size(run: RunHandle) -> int | None:
    try:
        return run.test_size()
    except DatasetUnavailable:
        return None


def _start(run: RunHandle) -> None:
    k, n = st.session_state[K + "job_k"], st.session_state[K + "job_n"]
    try:
        get_lab().submit_bounds(run.name, k=int(k), n=int(n))
    except (*UserError, RuntimeError, ValueError) as e:
        st.session_state[K + "job_notice"] = f"Could not start the estimate: {md_text(e)}"


def _cancel(run: RunHandle) -> None:
    get_lab().cancel_bounds(run.name)


def estimate_section(run: RunHandle) -> None:
    size = _test_size(run)
    if size is None:
        st.info("The run's test set is not available on this machine, so it cannot be evaluated here.")
        return
    job = get_lab().bounds_job(run.name)
    running = job is not None and job.running
    counts = [c for c in EXAMPLE_CHOICES if c <= size] or [size]
    c1, c2, c3 = st.columns([3, 3, 2], vertical_alignment="bottom")
    c1.select_slider("k, importance samples per image", K_CHOICES, value=DEFAULT_K, key=K + "job_k",
                     help="The bounds for every power of ten up to k are reported too")
    c2.select_slider("Held-out images", counts, value=min(DEFAULT_EXAMPLES, counts[-1]), key=K + "job_n",
                     help="The first images of the test set, binarized with the run's fixed seed")
    if running:
        c3.button("Cancel", key=K + "job_cancel", on_click=_cancel, args=(run,), width="stretch")
    else:
        c3.button("Estimate now", key=K + "job_start", on_click=_start, args=(run,), type="primary",
                  width="stretch", help="Runs in the background on a copy of the current weights; training "
                                        "goes on (both share the CPU)")
    notice = st.session_state.pop(K + "job_notice", None)
    if notice:
        st.error(notice)

    @st.fragment(run_every=JOB_POLL if running else None)
    def progress() -> None:
        snap = get_lab().bounds_job(run.name)
        if snap is None:
            st.caption("Evaluates the current weights on the held-out images with up to 5000 samples each "
                       "(k = 5000 on 64 images takes a few seconds for the default MLP).")
            return
        if snap.running:
            st.progress(snap.progress, text=f"{snap.done} of {snap.n} images · k = {snap.k:,} · "
                                            f"{snap.elapsed_s:.1f} s · weights from step {snap.step:,}")
            return
        if running:  # it just ended: one full rerun draws the result in the k chart and stops this polling
            st.rerun()
        job_summary(snap, axis_unit(run))

    progress()


def job_summary(snap: JobSnapshot, unit: str) -> None:
    if snap.state == "cancelled":
        st.caption(f"Cancelled after {snap.done} of {snap.n} images.")
        return
    if snap.state == "failed":
        st.error(f"The estimate failed: {md_text(snap.error)}")
        return
    r = snap.result
    k, bound, se = best_bound(r)
    parts = " · ".join(f"k = {kk:,}: {v:.2f}" for kk, v in zip(r["ks"], r["iwae"]))
    st.success(f"On {snap.n} held-out images, weights from step {snap.step:,}: ELBO {r['elbo']:.2f} ± "
               f"{r['elbo_se']:.2f}, log p̂ₖ(x) at k = {k:,}: {bound:.2f} ± {se:.2f}, gap {bound - r['elbo']:.2f} "
               f"({unit}). Took {snap.elapsed_s:.1f} s.")
    st.caption(f"All bounds: {parts} (purple in the k chart above).")
