"""The Latents tab: what each latent does (traversals), and how disentangled the code is, over training.

Everything is computed in the core (vae_core.disentangle, through the RunHandle): the traversal
grid from the run's latest published weights, refreshed while it trains; MIG, DCI and the β-TCVAE
terms of the KL from the metrics rows the trainer writes after each epoch (split "disentangle");
the factor-by-latent heatmap from the current weights, once per epoch or on demand.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from dashboard.common import beta_effective, md_text, poll_interval, run_token, viewer_id
from dashboard.state import get_viewers
from vae_core.images import tile, to_uint8, upscale
from vae_core.lab import ACTIVE_THRESHOLD, DatasetUnavailable, RunHandle

TITLE = "Latents"
K = "latents_"
TOP_ROWS = 8  # traversal rows shown at once; the rest in an expander
STEPS = {"min_value": 5, "max_value": 15, "value": 9, "step": 2}
N_IMAGES = 500  # held-out images a row can be anchored at
CHART = {"displaylogo": False}
SCALE = 2  # pixels per image pixel in the grid and the GIF (for 28 x 28 images; larger ones get fewer)


def scale_for(images: np.ndarray) -> int:
    """Screen pixels per image pixel: 28 x 28 images at SCALE, 64 x 64 at 1 (a row of 9 stays on screen)."""
    return max(1, SCALE * 28 // int(images.shape[-2] if images.shape[-1] != 3 else images.shape[-3]))
GIF_FRAME_MS = 160


def live_interval(run: RunHandle) -> float | None:
    return get_viewers().interval(poll_interval(run.status().state), viewer_id())


@st.cache_data(max_entries=8, show_spinner=False)
def traversal(_run: RunHandle, token: int, version: int, index: int | None, steps: int) -> Any:
    """One traversal per (weights version, anchor, steps): D x steps decodes, ~10-50 ms for the MLP."""
    return _run.traversal(index, steps)


@st.cache_data(max_entries=4, show_spinner=False)
def measured(_run: RunHandle, token: int, epochs: int, nonce: int) -> dict[str, Any]:
    """The current weights' MIG/DCI/TC and MI matrix: once per finished epoch, or when Recompute is pressed."""
    return _run.disentanglement()


def render(run: RunHandle) -> None:
    st.markdown("Which latent does what. Each row of the grid decodes a code in which **one** latent walks through "
                "the prior's quantiles (equal prior mass between columns) while the others stay put; rows are "
                "ordered by that latent's KL(q(z_d|x) ‖ p(z_d)), the nats it carries, most first. Rows under "
                f"{ACTIVE_THRESHOLD:g} nats are **collapsed**: greyed, since the decoder has learned to ignore them.")
    traversal_section(run)
    st.subheader("Disentanglement over training")
    metrics_section(run)
    st.subheader("Which latent encodes which factor")
    heatmap_section(run)


# ------------------------------------------------------------------ traversals

def traversal_section(run: RunHandle) -> None:
    left, mid, right = st.columns([2, 2, 2])
    anchor = left.radio("Hold the other latents at", ["a test image's code", "zero (the prior's mean)"],
                        key=K + "anchor", horizontal=False)
    try:
        n_images = min(N_IMAGES, run.test_size())
    except DatasetUnavailable:  # said once, by the grid below
        n_images = 1
    index = mid.number_input("Test image", min_value=0, max_value=n_images - 1, value=0, step=1, key=K + "index",
                             disabled=anchor != "a test image's code",
                             help="Its posterior mean E[z|x] holds the other latents")
    steps = right.slider("Steps per row", key=K + "steps", **STEPS)
    chosen = int(index) if anchor == "a test image's code" else None

    @st.fragment(run_every=live_interval(run))
    def grid() -> None:
        try:
            tr = traversal(run, run_token(run), run.weights_version(), chosen, int(steps))
        except DatasetUnavailable as e:
            st.info(f"Traversals order the latents by their KL on held-out images, and this run's data are not "
                    f"on this machine: {md_text(e)}")
            return
        held = "zero" if chosen is None else f"test image {chosen}'s code"
        st.caption(f"Weights of step {tr.step:,}; others held at {held}; columns at the N(0, 1) quantiles "
                   + ", ".join(f"{v:+.2f}" for v in tr.values) + ".")
        draw_rows(tr, range(min(TOP_ROWS, len(tr.dims))))
        if len(tr.dims) > TOP_ROWS:
            n_collapsed = int(tr.collapsed[TOP_ROWS:].sum())
            with st.expander(f"The other {len(tr.dims) - TOP_ROWS} latents ({n_collapsed} of them collapsed)"):
                draw_rows(tr, range(TOP_ROWS, len(tr.dims)))
        st.download_button("Download as animated GIF", data=traversal_gif(tr), file_name=f"traversal-step{tr.step}.gif",
                           mime="image/gif", key=K + "gif",
                           help="Every row's image at once, the swept latent moving back and forth")

    grid()


def draw_rows(tr: Any, rows: range) -> None:
    for r in rows:
        label, strip = st.columns([1, 4], vertical_alignment="center")
        collapsed = bool(tr.collapsed[r])
        label.markdown(f"**z{int(tr.dims[r])}** · KL {tr.kl[r]:.2f} nats" + (" · *collapsed*" if collapsed else ""))
        images = tr.images[r]
        if collapsed:  # greyed: pulled halfway toward mid-grey
            images = 0.35 + 0.3 * images
        mosaic = upscale(tile(to_uint8(images), len(images), pad_value=255 if collapsed else 64), scale_for(images))
        strip.image(mosaic, output_format="PNG", width=int(mosaic.shape[1]))


def traversal_gif(tr: Any) -> bytes:
    """All rows' images tiled (row-major, most informative first), swept forth and back: one frame per step."""
    from PIL import Image

    s = tr.images.shape[1]
    order = list(range(s)) + list(range(s - 2, 0, -1))
    ncols = min(8, len(tr.dims))
    greyed = tr.collapsed.reshape(-1, *[1] * (tr.images.ndim - 1))  # (D, 1, 1, 1[, 1]): grey or colour
    images = np.where(greyed, 0.35 + 0.3 * tr.images, tr.images)
    frames = [Image.fromarray(upscale(tile(to_uint8(images[:, i]), ncols), scale_for(images))) for i in order]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
    return buf.getvalue()


# ------------------------------------------------------------------ metrics over training

def metrics_section(run: RunHandle) -> None:
    st.markdown("After every epoch the trainer measures the code on a fixed held-out sample. **MIG** (Chen et al. "
                "2018): for each true factor, the gap in mutual information between the latent that knows it best "
                "and the runner-up, over the factor's entropy. **DCI** (Eastwood & Williams 2018), from a lasso "
                "predicting each factor from the codes: *disentanglement* (does each latent serve one factor), "
                "*completeness* (is each factor held by one latent), *informativeness* (the lasso's held-out R²). "
                "All are 0 to 1, higher is more disentangled; they need the true factors, so only sprites have them.")

    @st.fragment(run_every=live_interval(run))
    def charts() -> None:
        rows = run.metrics()
        dis = [r for r in rows if r.get("split") == "disentangle"]
        train = [r for r in rows if r.get("split") == "train"]
        if not dis:
            st.info("The first measurement arrives at the end of epoch 1.")
            return
        if any("mig" in r for r in dis):
            st.plotly_chart(scores_figure(dis, train), key=K + "scores", config=CHART)
        else:
            st.info("No MIG or DCI for this run: its dataset has no known generating factors (sprites have them).")
        st.markdown("The average KL splits into three (Chen et al. 2018, eq. 2): **index-code MI** I(x; z), what "
                    "the code says about which image it came from; **total correlation** KL(q(z) ‖ ∏ q(z_d)), "
                    "how much the latents depend on each other (low is disentangled); **dimension-wise KL**, how "
                    "far each latent's marginal is from N(0, 1). q(z) is estimated with minibatch weights on a "
                    "fixed held-out batch.")
        st.plotly_chart(kl_terms_figure(dis), key=K + "kl_terms", config=CHART)
        last = dis[-1]
        if "tc_kl" in last:
            total = last["tc_mi"] + last["tc_tc"] + last["tc_dwkl"]
            se = last.get("tc_kl_sum_se", 0.0)
            ok = abs(total - last["tc_kl"]) <= 3 * se
            st.markdown(f"Epoch {last['epoch']}: MI {last['tc_mi']:.2f} + TC {last['tc_tc']:.2f} + dimension-wise "
                        f"KL {last['tc_dwkl']:.2f} = **{total:.2f} ± {2 * se:.2f}** nats (one sample per image); "
                        f"the closed-form average KL on the same images is **{last['tc_kl']:.2f}** nats — "
                        + ("they agree within Monte-Carlo error." if ok else
                           "**they differ by more than three standard errors.**"))

    charts()


def scores_figure(dis: list[dict], train: list[dict]) -> go.Figure:
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    x = [r["epoch"] for r in dis]
    for key, name in (("mig", "MIG"), ("dci_disentanglement", "DCI disentanglement"),
                      ("dci_completeness", "DCI completeness"), ("dci_informativeness", "DCI informativeness")):
        fig.add_trace(go.Scatter(x=x, y=[r.get(key) for r in dis], name=name, mode="lines+markers"))
    if train:
        fig.add_trace(go.Scatter(x=[r["epoch"] for r in train], y=[beta_effective(r) for r in train], name="β",
                                 line={"color": "grey", "dash": "dot"}), secondary_y=True)
    fig.update_layout(height=320, margin={"l": 10, "r": 10, "t": 30, "b": 10}, title="Scores (0 to 1)",
                      legend={"orientation": "h", "y": -0.25})
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(range=[0, 1.02], title_text="score", secondary_y=False)
    fig.update_yaxes(title_text="β (effective)", secondary_y=True, rangemode="tozero")
    return fig


def kl_terms_figure(dis: list[dict]) -> go.Figure:
    fig = go.Figure()
    x = [r["epoch"] for r in dis]
    for key, name in (("tc_mi", "index-code MI"), ("tc_tc", "total correlation"), ("tc_dwkl", "dimension-wise KL")):
        fig.add_trace(go.Scatter(x=x, y=[r.get(key) for r in dis], name=name, mode="lines+markers", stackgroup="kl"))
    fig.add_trace(go.Scatter(x=x, y=[r.get("tc_kl") for r in dis], name="average KL (closed form)", mode="markers",
                             marker={"symbol": "x", "size": 10, "color": "black"}))
    fig.update_layout(height=320, margin={"l": 10, "r": 10, "t": 30, "b": 10}, title="KL(q(z|x) ‖ p(z)), split",
                      legend={"orientation": "h", "y": -0.25}, xaxis_title="epoch", yaxis_title="nats per example")
    return fig


# ------------------------------------------------------------------ heatmap

def heatmap_section(run: RunHandle) -> None:
    st.markdown("Mutual information between each true factor and each latent (the latent's mean, 20 bins), as a "
                "fraction of the factor's entropy: one bright cell per row is a disentangled factor. Rotation is "
                "measured within each shape's symmetry (a square repeats every quarter turn).")
    left, right = st.columns([4, 1])
    if right.button("Recompute", key=K + "recompute", help="Measure the newest weights now"):
        st.session_state[K + "nonce"] = st.session_state.get(K + "nonce", 0) + 1
    epochs = sum(1 for r in run.metrics() if r.get("split") == "disentangle")
    try:
        res = measured(run, run_token(run), epochs, st.session_state.get(K + "nonce", 0))
    except DatasetUnavailable as e:
        left.info(f"This run's data are not on this machine: {md_text(e)}")
        return
    if "mi_matrix" not in res:
        left.info("This dataset has no known generating factors; the heatmap needs them (train on sprites).")
        return
    mi = np.array(res["mi_matrix"])
    fig = go.Figure(go.Heatmap(z=mi, x=[f"z{j}" for j in range(mi.shape[1])], y=res["factors"], zmin=0, zmax=1,
                               colorscale="Viridis", colorbar={"title": "I / H"},
                               hovertemplate="%{y} · %{x}: %{z:.2f}<extra></extra>"))
    fig.update_layout(height=260, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      title=f"Weights of step {res['step']:,}: MIG {res['mig']:.2f}, DCI disentanglement "
                            f"{res['dci_disentanglement']:.2f}")
    left.plotly_chart(fig, key=K + "heatmap", config=CHART)
