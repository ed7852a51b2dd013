"""The "Your own input" tab: draw (or upload) an image and see what the run's model makes of it.

The drawing canvas (dashboard/draw_canvas) and the uploader both hand image bytes to the core
(RunHandle.own_input), which downsizes them to 28 x 28 and returns q(z|x), the reconstruction,
draws from q, the ELBO and IWAE bound beside the test set's, and with two latents the true
posterior p(z|x). q(z|x) is drawn as its 2-sigma ellipse over the test codes, in the Explore
tab's view of the latent space: the codes themselves for 2 latents, their first two principal
components above.
"""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.colors import qualitative

from dashboard.common import md_text, run_token, units
from dashboard.draw_canvas import draw_canvas
from vae_core import latent
from vae_core.images import tile, to_uint8, upscale
from vae_core.lab import DatasetUnavailable, ImageInputError, RunHandle, png_from_data_url

TITLE = "Your own input"
K = "own_"  # every widget key starts with this
N_CODES = 2000  # the test codes behind the ellipse: the same first 2000 the Explore tab's scatter shows
SIGMAS = 2.0  # q's ellipse: the 2-sigma contour, which holds 1 - exp(-2) = 86.5% of a 2-D Gaussian's mass
MASS = 1.0 - math.exp(-SIGMAS ** 2 / 2)
SOURCES = ("Draw", "Upload")
FITS = {"whole": "Whole picture, scaled to 28 × 28", "mnist": "Ink framed as MNIST's digits (20 × 20, centred)"}
INK = {"light": "#1f2430", "dark": "#fafafa", None: "#8a8f98"}
POSTERIOR_COLOR = "#d62728"


@st.cache_data(max_entries=4, show_spinner=False)
def test_codes(_run: RunHandle, token: int, version: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Encoder means of the first N_CODES test images, their labels and the label names (once per weights)."""
    x, y, names = _run.test_set(N_CODES)
    mu, _ = _run.encode(x)
    return mu, y, tuple(names)


@st.cache_data(max_entries=8, show_spinner="Encoding your image…")
def encoded(_run: RunHandle, token: int, version: int, data: bytes, fit: str):
    """The core's OwnInput for these bytes under these weights: one computation per drawing and weights version."""
    return _run.own_input(data, fit=fit)


def render(run: RunHandle) -> None:
    st.markdown("Draw a digit or a shape (or upload a picture) and see how the model encodes it: where q(z|x) puts "
                "it among the test images' codes, what it reconstructs, and how its ELBO and importance-weighted "
                "bound compare with the test set's. Light ink on black, like the training images.")
    c, h, w = run.config.model.image_shape
    if (c, h, w) != (1, 28, 28):  # the canvas and the framing rules are for 28 x 28 grey digits and shapes
        st.info(f"Your own input works on runs over 28 × 28 grey images (MNIST, Fashion-MNIST, the sprites); "
                f"this run's images are {h} × {w} {'colour' if c == 3 else 'grey'}. Open or train such a run to "
                "draw on it.")
        return
    body(run)


@st.fragment
def body(run: RunHandle) -> None:
    d = run.config.model.latent_dim
    left, right = st.columns([2, 3], gap="large")
    with left:
        source = st.radio("Input", SOURCES, horizontal=True, key=K + "source", label_visibility="collapsed")
        default_fit = "mnist" if run.config.train.dataset == "mnist" else "whole"
        fit = st.selectbox("Framing", list(FITS), index=list(FITS).index(default_fit), format_func=FITS.get,
                           key=K + "fit", help="How the picture becomes the model's 28 × 28 input. MNIST's digits "
                           "sit in a 20 × 20 box centred by their centre of mass; the sprites and Fashion-MNIST "
                           "fill the frame.")
        data = input_bytes(source)
    if data is None:
        right.info("Draw on the canvas (each stroke encodes the drawing) or upload an image.")
        return
    try:
        out = encoded(run, run_token(run), run.weights_version(), data, fit)
    except ImageInputError as e:
        right.error(md_text(e))
        return
    with left:
        st.caption("What the model sees (28 × 28)" + (", and the Bernoulli draw of it that is scored" if
                                                       run.config.binarized else ""))
        shown = [out.image, out.evaluated] if run.config.binarized else [out.image]
        st.image(upscale(tile(to_uint8(np.stack(shown)), len(shown), pad=2), 4), output_format="PNG")
    with right:
        numbers(run, out)
        images(out)
    st.subheader("Where it lands in the latent space")
    fig, note = latent_figure(run, out, d)
    st.plotly_chart(fig, key=K + "latent", config={"displaylogo": False})
    st.caption(note)


def input_bytes(source: str) -> bytes | None:
    """The chosen source's image as bytes (a PNG from the canvas, or the uploaded file), or None for none yet."""
    if source == "Draw":
        value = draw_canvas(key=K + "canvas")
        if not value or not value.get("strokes"):
            return None
        try:
            return png_from_data_url(value.get("png", ""))
        except ImageInputError as e:
            st.error(md_text(e))
            return None
    up = st.file_uploader("Upload an image", type=["png", "jpg", "jpeg", "gif", "bmp", "webp"], key=K + "upload",
                          help="Dark ink on light paper is inverted automatically.")
    return up.getvalue() if up is not None else None


def numbers(run: RunHandle, out) -> None:
    unit, caveat = units(run.config)
    st.markdown(f"**Bounds on log p(x)** ({unit}) with the weights at step {out.step:,}:")
    se = f"{out.iwae_se:.1f}" if out.iwae_se >= 0.05 else f"{out.iwae_se:.2g}"
    rows = [("Your image", f"{out.elbo:.1f}", f"{out.iwae:.1f} ± {se}", f"{out.kl:.1f}")]
    if out.test is not None:
        t = out.test
        rows.append((f"Test set (first {t.n}, mean ± s.e.)", f"{t.elbo:.1f} ± {t.elbo_se:.1f}",
                     f"{t.iwae:.1f} ± {t.iwae_se:.1f}", ""))
    st.table({"": [r[0] for r in rows], "ELBO": [r[1] for r in rows], f"IWAE bound (k = {out.k})": [r[2] for r in rows],
              "KL(q ‖ p(z)) = rate": [r[3] for r in rows]})
    if out.grid is not None:
        st.markdown(f"With 2 latents the evidence itself is computed on a grid: **log p(x) = {out.grid.log_px:.1f}**, "
                    f"so the ELBO misses it by KL(q ‖ p(z|x)) = {out.grid.log_px - out.elbo:.2f} nats and the IWAE "
                    f"bound by {out.grid.log_px - out.iwae:.2f}.")
    if out.test is not None:
        gap = out.iwae - out.test.iwae
        verdict = ("above the test images' average. A high likelihood is not the same as looking like the data: "
                   "simple images with little ink often score high even when they resemble no training image"
                   if gap > 2 * max(out.test.iwae_se, out.iwae_se) else
                   "within the test images' range of the average" if gap > -3 * max(out.test.iwae_se, 1.0) else
                   "lower than the test images' average: to this model your image is unusual")
        st.caption(f"Your image's bound is {abs(gap):.1f} nats {'above' if gap >= 0 else 'below'} the test mean: "
                   f"{verdict}. The ± on your image is Monte Carlo error (10 independent estimates); on the test set "
                   "it is the spread across images.")
    else:
        st.caption(f"No test comparison: {md_text(out.test_missing)}")
    if caveat:
        st.caption(caveat)


def images(out) -> None:
    c1, c2 = st.columns([1, 2])
    c1.image(upscale(to_uint8(out.reconstruction), 4), caption="Reconstruction (decoder mean at z = mean of q)",
             output_format="PNG")
    c2.image(upscale(tile(to_uint8(out.samples), 8), 2), output_format="PNG",
             caption=f"{len(out.samples)} decodings of codes drawn from q(z|x): how sure the encoder is")


def ellipse(mean: np.ndarray, cov: np.ndarray, sigmas: float = SIGMAS, points: int = 90) -> np.ndarray:
    """The sigmas-contour of a 2-D Gaussian N(mean, cov): (points, 2) on its boundary."""
    vals, vecs = np.linalg.eigh(np.asarray(cov, np.float64))
    t = np.linspace(0, 2 * np.pi, points)
    circle = np.stack([np.cos(t), np.sin(t)])  # (2, points)
    return (np.asarray(mean)[:, None] + vecs @ (sigmas * np.sqrt(np.clip(vals, 0, None))[:, None] * circle)).T


def hpd_level(log_density: np.ndarray, mass: float) -> float:
    """The density above which the grid's cells hold `mass` of the posterior (cells have equal area)."""
    p = np.exp(log_density - log_density.max()).ravel()
    p_sorted = np.sort(p)[::-1]
    cum = np.cumsum(p_sorted) / p_sorted.sum()
    return float(p_sorted[min(np.searchsorted(cum, mass), len(p_sorted) - 1)])


def latent_figure(run: RunHandle, out, d: int) -> tuple[go.Figure, str]:
    """Test codes (Explore's view), q(z|x) as its 2-sigma ellipse and mean, and for 2 latents the true posterior."""
    ink = INK.get(st.context.theme.type, INK[None])
    fig = go.Figure()
    try:
        mu, y, names = test_codes(run, run_token(run), run.weights_version())
    except DatasetUnavailable:
        mu, y, names = None, None, ()
    cov = np.diag(np.exp(out.logvar))
    if d == 1:
        mean2, cov2, titles = np.array([out.mu[0], 0.0]), np.diag([cov[0, 0], 1e-12]), ("z1", "")
        project = None
    elif d == 2 or mu is None:
        mean2, cov2, titles, project = out.mu[:2], cov[:2, :2], ("z1", "z2"), (lambda p: p[:, :2])
    else:
        m, axes, ratio = latent.pca_basis(mu)
        mean2, cov2 = (out.mu - m) @ axes.T, axes @ cov @ axes.T  # q projected: N(A(mu - m), A Σ Aᵀ)
        titles, project = (f"PC1 ({ratio[0]:.0%} of variance)", f"PC2 ({ratio[1]:.0%})"), (lambda p: (p - m) @ axes.T)
    if mu is not None:
        xy = project(mu) if project is not None else np.stack([mu[:, 0], np.zeros(len(mu))], 1)
        colors = qualitative.D3 if len(names) <= 10 else qualitative.Alphabet
        for k, name in enumerate(names):
            sel = y == k
            if sel.any():
                fig.add_trace(go.Scatter(x=xy[sel, 0], y=xy[sel, 1], mode="markers", name=name, hoverinfo="skip",
                                         marker={"size": 4, "opacity": 0.45, "color": colors[k % len(colors)]}))
    if out.grid is not None:
        g = out.grid
        level = hpd_level(g.log_density, MASS)
        fig.add_trace(go.Contour(x=g.z1, y=g.z2, z=np.exp(g.log_density - g.log_density.max()), showscale=False,
                                 contours={"start": level, "end": level, "size": 1.0, "coloring": "lines"},
                                 colorscale=[[0, POSTERIOR_COLOR], [1, POSTERIOR_COLOR]],
                                 line={"color": POSTERIOR_COLOR, "width": 2.5}, name=f"true p(z|x), {MASS:.0%} region",
                                 showlegend=True, hoverinfo="skip"))
    e = ellipse(mean2, cov2)
    fig.add_trace(go.Scatter(x=e[:, 0], y=e[:, 1], mode="lines", name=f"q(z|x), {SIGMAS:g}σ ellipse",
                             line={"color": ink, "width": 2.5}, hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=[mean2[0]], y=[mean2[1]], mode="markers", name="mean of q(z|x)",
                             marker={"symbol": "x", "size": 12, "color": ink}, hoverinfo="skip"))
    fig.update_layout(height=520, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
                      xaxis_title=titles[0], yaxis_title=titles[1])
    if d > 1:
        fig.update_yaxes(scaleanchor="x", scaleratio=1)
    note = ("Each dot is a test image's code (mean of q), coloured by its label. "
            f"The ellipse is q(z|x)'s {SIGMAS:g}σ contour (it holds {MASS:.0%} of q's mass)")
    if d > 2:
        note += (f", projected on the test codes' first two principal components as in the Explore tab (a projection "
                 f"of the {d}-D Gaussian, so it shows q's spread along those two directions only)")
    if out.grid is not None:
        note += (f"; the red line encloses the true posterior's {MASS:.0%} highest-density region, computed on a grid. "
                 "Where the two differ, the encoder's Gaussian is an approximation")
    return fig, note + "."
