"""The Time-lapse tab: scrub a slider through training and see the model as it was at that step.

A run keeps small float16 snapshots of its weights at geometrically spaced steps (vae_core/snapshots.py:
0, 1, 2, 3, 4, 5, 6, 8, 10, 13, ... about 30 over a default run, plus its last step). For the step the
slider picks, this tab decodes prior samples, reconstructions, the latent manifold and the test codes'
scatter from that snapshot (a read-only Lab view, never the trained model), and marks the moment on the
training curves. The scatter and the manifold keep the axes of the run's latest weights (their principal
components, their two most used dimensions), so scrubbing shows the codes move rather than the axes.

Its own tab, not a section of Explore: one slider drives all four views, and Explore's sections follow
the newest weights with their own controls; a second set here would be two meanings of "the model" on one page.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.colors import qualitative

from dashboard.common import md_text, plotly_text, run_token, smooth, units
from vae_core import latent
from vae_core.images import tile, to_uint8, upscale
from vae_core.lab import DatasetUnavailable, Lab, RunHandle, UserError

TITLE = "Time-lapse"
K = "timelapse_"  # every widget key starts with this
N_CODES = 500  # test images in the scatter
GRID = 10  # manifold grid side
SPAN = (0.05, 0.95)  # the prior's central 90%, as Explore's default
PAD = 64
TRAIN_COLOR, TEST_COLOR, MARK_COLOR = "#1f77b4", "#d62728", "#ff7f0e"


def render(lab: Lab, run: RunHandle) -> None:
    """The slider and the four views for `run`; an info line when it kept no snapshots."""
    st.caption("The model as it was during training: the run kept a small copy of its weights at steps spaced "
               "evenly on a log scale (more early on, when it learns fastest). Pick a step; everything below is "
               "decoded from that copy.")
    section(lab, run)


@st.fragment
def section(lab: Lab, run: RunHandle) -> None:
    steps = lab.snapshots(run.run_dir)
    if not steps:
        st.info("This run kept no snapshots of its weights: the ready-made examples ship without them (to keep "
                "them small), and runs trained before the time-lapse existed or with a snapshot budget of 0 have "
                "none. New runs keep them, and a resumed run records them from where it resumes.")
        return
    key = K + "step"
    if st.session_state.get(key) not in steps:  # first visit, another run, or a snapshot thinned away
        st.session_state[key] = steps[-1]
    left, mid, right = st.columns([1, 10, 1], vertical_alignment="bottom")
    left.button("◀", key=K + "prev", on_click=_move, args=(steps, -1), disabled=st.session_state[key] == steps[0],
                help="The previous snapshot")
    step = mid.select_slider("Training step", steps, key=key, format_func=lambda s: f"{s:,}")
    right.button("▶", key=K + "next", on_click=_move, args=(steps, 1), disabled=step == steps[-1],
                 help="The next snapshot")
    try:
        view = lab.snapshot(run.run_dir, step)
    except UserError as e:
        st.warning(f"The snapshot at step {step:,} cannot be read: {md_text(e)}")
        return
    st.plotly_chart(curves_figure(run.metrics(), run.config, step, steps), key=K + "curves",
                    config={"displaylogo": False})
    ref = reference(run, run_token(run), run.weights_version())
    frame = frame_of(view, run_token(view), ref["dims"])
    cols = st.columns(2)
    with cols[0]:
        st.markdown(f"**Samples** at step {step:,}: the decoder's output for 36 fixed codes z ~ N(0, I).")
        _show(frame["samples"][:36], 6, 300, already_uint8=True)
        st.markdown("**Reconstructions**: test images (odd rows) and their reconstructions (even rows).")
        if "missing" in frame:
            st.info(f"No reconstructions: {md_text(frame['missing'])}")
        else:
            o, r = frame["originals"], frame["reconstructions"]
            _show(np.concatenate([o[:8], r[:8], o[8:16], r[8:16]]), 8, 460, already_uint8=True)
    with cols[1]:
        d = run.config.model.latent_dim
        dims = ref["dims"]
        what = ("along the single latent" if d == 1 else f"over z{dims[0] + 1} (across) and z{dims[1] + 1} (up)"
                + (", the others at 0" if d > 2 else ""))
        st.markdown(f"**Manifold** at step {step:,}: decoded at the prior's quantiles {what}.")
        _show(frame["manifold"], GRID, 300)
        st.markdown("**Latent scatter**: the test codes (means of q(z|x)) at this step, on "
                    f"{'the latest weights’ principal components' if d > 2 else 'the latent axes'}.")
        if ref["codes"] is None or frame["codes"] is None:
            st.info("The test set is not available on this machine, so there are no codes to show.")
        else:
            st.plotly_chart(scatter_figure(frame["codes"], ref), key=K + "scatter", config={"displaylogo": False})


def _move(steps: list[int], by: int) -> None:
    key = K + "step"
    i = steps.index(st.session_state[key]) if st.session_state.get(key) in steps else len(steps) - 1
    st.session_state[key] = steps[min(max(i + by, 0), len(steps) - 1)]


def _show(images: np.ndarray, ncols: int, target_px: int, *, already_uint8: bool = False) -> None:
    mosaic = tile(images if already_uint8 else to_uint8(images), ncols, pad_value=PAD)
    st.image(upscale(mosaic, max(1, round(target_px / mosaic.shape[1]))), output_format="PNG")


# ------------------------------------------------------------------ what is computed (cached per snapshot)

@st.cache_data(max_entries=2, show_spinner=False)
def reference(_run: RunHandle, token: int, version: int) -> dict[str, Any]:
    """The latest weights' view of the latent space: the two most used dimensions, the scatter's axes."""
    d = _run.config.model.latent_dim
    try:
        x, y, names = _run.test_set(N_CODES)
        mu, _ = _run.encode(x)
    except DatasetUnavailable:
        return {"dims": (0, min(1, d - 1)), "codes": None, "labels": None, "names": ()}
    order = np.argsort(-mu.var(0), kind="stable")
    ref: dict[str, Any] = {"dims": (int(order[0]), int(order[min(1, d - 1)])), "codes": mu, "labels": y,
                           "names": tuple(names)}
    if d > 2:
        mean, axes, ratio = latent.pca_basis(mu)
        ref.update(mean=mean, axes=axes, ratio=ratio)
    return ref


@st.cache_data(max_entries=16, show_spinner=False)
def frame_of(_view: RunHandle, token: int, dims: tuple[int, int]) -> dict[str, Any]:
    """Samples, reconstructions, the manifold and the test codes decoded from one snapshot (~0.1 s on a CPU)."""
    d = _view.config.model.latent_dim
    art = _view.artifacts()  # 64 samples from the Training tab's fixed z; originals and reconstructions
    if d == 1:
        z = latent.prior_quantiles(GRID * GRID, SPAN)[:, None]
    else:
        z = latent.slice_grid(GRID, dims, np.zeros(d, np.float32), SPAN)
    out = {**art, "manifold": _view.decode(z)}
    try:
        out["codes"] = _view.encode(_view.test_set(N_CODES)[0])[0]
    except DatasetUnavailable:
        out["codes"] = None
    return out


# ------------------------------------------------------------------ figures

def curves_figure(rows: list[dict[str, Any]], config: Any, step: int, steps: list[int]) -> go.Figure:
    """ELBO over training (train smoothed, test per epoch) on a log step axis, with the chosen step marked
    and a tick at every snapshot. Step 0 (the initial weights) sits at the axis' left end."""
    unit = units(config)[0]
    train = [r for r in rows if r.get("split") == "train" and r.get("step", 0) > 0]
    test = [r for r in rows if r.get("split") == "test" and r.get("step", 0) > 0]
    left = 0.8  # where step 0 is drawn on the log axis
    fig = go.Figure()
    if train:
        fig.add_trace(go.Scatter(x=[r["step"] for r in train], y=smooth([r["elbo"] for r in train]), mode="lines",
                                 name="train ELBO (smoothed)", line={"color": TRAIN_COLOR}))
    if test:
        fig.add_trace(go.Scatter(x=[r["step"] for r in test], y=[r["elbo"] for r in test], mode="markers+lines",
                                 name="test ELBO", line={"color": TEST_COLOR}))
    fig.add_trace(go.Scatter(x=[max(s, left) for s in steps], y=[0] * len(steps), yaxis="y2", mode="markers",
                             name="snapshots", marker={"symbol": "line-ns-open", "size": 8, "color": "#888"},
                             hovertemplate="snapshot at step %{customdata:,}<extra></extra>", customdata=steps))
    x = max(step, left)
    fig.add_vline(x=x, line={"color": MARK_COLOR, "width": 2})
    fig.add_annotation(x=np.log10(x), y=1, yref="paper", text=f"step {step:,}" + (" (initial weights)" if step == 0
                       else ""), showarrow=False, yanchor="bottom", font={"color": MARK_COLOR})
    top = max(steps[-1], max((r["step"] for r in train), default=1))
    decades = [10 ** k for k in range(int(np.log10(max(top, 1))) + 1)]
    fig.update_layout(height=260, margin={"l": 60, "r": 10, "t": 30, "b": 40}, hovermode="closest",
                      xaxis={"type": "log", "title": "training step (log scale; 0 at the left end)",
                             "range": [np.log10(left * 0.9), np.log10(top * 1.15)],
                             "tickvals": [left] + decades, "ticktext": ["0"] + [f"{v:,}" for v in decades]},
                      yaxis={"title": unit},
                      yaxis2={"overlaying": "y", "range": [0, 10], "visible": False, "fixedrange": True},
                      legend={"orientation": "h", "y": -0.35, "x": 1, "xanchor": "right"})
    return fig


def scatter_figure(codes: np.ndarray, ref: dict[str, Any]) -> go.Figure:
    """The snapshot's codes on the latest weights' axes (fixed while scrubbing), coloured by label."""
    d = codes.shape[1]
    if d == 1:
        jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(codes))
        xy, titles = np.stack([codes[:, 0], ref["labels"] + jitter], axis=1), ("z1", "label")
        final = np.stack([ref["codes"][:, 0], ref["labels"] + jitter], axis=1)
    elif d == 2:
        xy, final, titles = codes, ref["codes"], ("z1", "z2")
    else:
        xy, final = (codes - ref["mean"]) @ ref["axes"].T, (ref["codes"] - ref["mean"]) @ ref["axes"].T
        titles = ("PC1 of the latest codes", "PC2 of the latest codes")
    lo = np.minimum(xy.min(0), final.min(0))
    hi = np.maximum(xy.max(0), final.max(0))
    pad = 0.05 * (hi - lo) + 1e-3
    fig = go.Figure()
    names, y = ref["names"], ref["labels"]
    colors = qualitative.D3 if len(names) <= 10 else qualitative.Alphabet
    for k, name in enumerate(names):
        m = y == k
        if m.any():
            fig.add_trace(go.Scatter(x=xy[m, 0], y=xy[m, 1], mode="markers", name=plotly_text(name),
                                     marker={"size": 4, "opacity": 0.7, "color": colors[k % len(colors)]},
                                     hoverinfo="skip"))
    fig.update_layout(height=340, margin={"l": 10, "r": 10, "t": 10, "b": 10}, showlegend=len(names) <= 10,
                      xaxis={"title": titles[0], "range": [lo[0] - pad[0], hi[0] + pad[0]]},
                      yaxis={"title": titles[1], "range": [lo[1] - pad[1], hi[1] + pad[1]]},
                      legend={"orientation": "h", "y": 1.02, "yanchor": "bottom"})
    return fig
