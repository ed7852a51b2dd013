"""The Explore tab: prior samples, the latent manifold, the test codes and interpolation between two of them.

Everything decodes and encodes through the run's published CPU copy of the weights (a
RunHandle: trained here or followed from another process's files), so it works while a run
trains and after it ends. Nothing polls: each section is a
fragment without `run_every`, so a control reruns only its own section, with the weights
published at that moment. The scatter's figure therefore changes only when the user acts
(point picking needs a figure that stays put); changing an interpolation end reruns the
scatter and the strips together, the Steps slider only the strips, since every remount
of the 2000-point figure costs the browser a few hundred ms.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.colors import qualitative

from dashboard.common import MAIN_TAB_KEY, run_token, weights_step
from dashboard.common import md_text
from dashboard.scatter_preview import SHEET_CELL_MAX, scatter_preview, sheet
from vae_core import latent
from vae_core.images import shrink, tile, to_uint8, upscale
from vae_core.lab import DatasetUnavailable, RunHandle

N_CODES = 2000  # first test images encoded for the scatter and offered as interpolation ends
SAMPLE_COUNTS = (16, 36, 64)
TEMPERATURE = {"min_value": 0.0, "max_value": 2.0, "value": 1.0, "step": 0.05}
GRID = {"min_value": 3, "max_value": 30, "value": 12, "step": 1}
COVERAGE = (0.5, 0.68, 0.8, 0.9, 0.95, 0.98, 0.99, 0.998)  # central prior mass the grid spans
STEPS = {"min_value": 3, "max_value": 20, "value": 10, "step": 1}
LABEL_KIND = {"sprites": "shape", "mnist": "digit", "fashion-mnist": "class"}
PAD = 64  # grey of the gaps between tiles (vae_core.images.tile's default)
K = "explore_"  # every widget key starts with this
PATH_POINTS = 41  # resolution of the paths drawn on the scatter
FRAGMENT_SCATTER, FRAGMENT_INTERP = K + "scatter_fragment", K + "interp_fragment"
TITLE = "Explore latent space"  # this tab's title in app.py's st.tabs
# Paths and A/B rings on the scatter in the theme's text colour: black vanished on the dark page.
INK = {"light": "#1f2430", "dark": "#fafafa", None: "#8a8f98"}  # None: theme not known yet, a grey seen on both
# At 800 px with the sidebar open the main column is ~470 px: rows of controls wrap instead of squeezing their
# labels, and the scatter's column keeps a usable width (it stood at ~120 px of plot beside its text).
CSS = """<style>
.st-key-explore_body [data-testid="stHorizontalBlock"] { flex-wrap: wrap; }
.st-key-explore_body [data-testid="stColumn"] { min-width: min(100%, 8.5rem); }
.st-key-explore_scatter_row [data-testid="stColumn"]:first-child { min-width: min(100%, 22rem); }
</style>"""


@st.cache_data(max_entries=4, show_spinner=False)
def image_sheet(_run: RunHandle, token: int) -> bytes:
    """The first N_CODES test images as one PNG sheet for the scatter's hover preview (once per run)."""
    return sheet(shrink(to_uint8(_run.test_set(N_CODES)[0]), SHEET_CELL_MAX))


@st.cache_data(max_entries=4, show_spinner=False)
def test_codes(_run: RunHandle, token: int, version: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Encoder means of the first N_CODES test images (N, D), their labels (N,) and the label names.

    Keyed by (run token, weights version): one encode per published version (~50-100 ms on CPU).
    """
    x, y, names = _run.test_set(N_CODES)
    mu, _ = _run.encode(x)
    return mu, y, tuple(names)


def codes(run: RunHandle) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    return test_codes(run, run_token(run), run.weights_version())


def show(images: np.ndarray, ncols: int, target_px: int, caption: str | None = None) -> None:
    """Float images ((N, H, W) grey or (N, H, W, 3) colour) as one crisp PNG mosaic about target_px wide.

    Small images are upscaled (integer nearest-neighbour); large ones are shrunk first, so a 12 x 12
    manifold of 64 x 64 colour images stays a few hundred kB, not megabytes, in the page.
    """
    images = shrink(to_uint8(images), max(8, target_px // max(1, ncols) - 1))
    mosaic = tile(images, ncols, pad_value=PAD)
    st.image(upscale(mosaic, max(1, round(target_px / mosaic.shape[1]))), caption=caption, output_format="PNG")


def span_of(coverage: float) -> tuple[float, float]:
    return (1 - coverage) / 2, (1 + coverage) / 2


# ------------------------------------------------------------------ the tab

def render(run: RunHandle) -> None:
    """The four explore sections for `run`; an info line until it has published weights."""
    if run.weights_version() == 0:
        st.info("This run has no weights yet: they appear a moment after training starts.")
        return
    st.html(CSS)
    with st.container(key=K + "body"):
        sections(run)


def sections(run: RunHandle) -> None:
    d = run.config.model.latent_dim
    left, right = st.columns([5, 1], vertical_alignment="center")
    left.caption(f"Latent size {d}. Everything here is decoded with the run's latest published weights (a copy "
                 "made about once a second while it trains): each section takes the newest when you change one of "
                 "its controls; Refresh redraws them all.")
    right.button("Refresh", key=K + "refresh", help="Redraw every section with the newest weights")

    st.subheader("Sampling from the prior")
    st.markdown("Each image is the decoder's output for a code **z ~ N(0, T²·I)** drawn from the prior. At "
                "temperature T = 1 this is how the model generates; smaller T keeps to typical codes (cleaner, less "
                "varied), larger T reaches into the prior's tails, where the decoder saw few training codes.")
    sampling_section(run)

    st.subheader("2D latent manifold" if d > 1 else "Latent manifold (one dimension)")
    st.markdown(manifold_intro(d))
    manifold_section(run)

    st.subheader("Latent scatter")
    st.markdown("Each point is a test image's code: the mean of q(z|x). Colours are the labels, which the VAE "
                "never saw; clusters mean it found that structure on its own.")
    scatter_section(run)

    st.subheader("Interpolation")
    st.markdown("The decoded path between the codes of two test images, A and B (pick them by clicking the scatter, "
                "by index or by label), along a straight line and along an arc (slerp).")
    interpolation_section(run)


# ------------------------------------------------------------------ sampling

def _resample() -> None:
    st.session_state[K + "sample_seed"] = st.session_state.get(K + "sample_seed", 0) + 1


@st.fragment
def sampling_section(run: RunHandle) -> None:
    cols = st.columns([2, 3, 2, 1], vertical_alignment="bottom")
    n = cols[0].select_slider("Images", SAMPLE_COUNTS, value=36, key=K + "sample_n")
    temp = cols[1].slider("Temperature T", **TEMPERATURE, key=K + "sample_temp",
                          help="Standard deviation of the codes: z = T·ε with ε ~ N(0, I)")
    st.session_state.setdefault(K + "sample_seed", 0)  # set here, not by value=: Resample writes it too
    seed = cols[2].number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key=K + "sample_seed")
    cols[3].button("Resample", key=K + "sample_resample", on_click=_resample, help="Draw new codes (seed + 1)")
    z = latent.prior_samples(n, run.config.model.latent_dim, temp, int(seed))  # (n, D)
    show(run.decode(z), int(math.sqrt(n)), 460,
         caption=f"{n} draws at T = {temp:.2f}, seed {seed} · weights from step {weights_step(run):,}")


# ------------------------------------------------------------------ manifold

def manifold_intro(d: int) -> str:
    grid = ("codes laid on a grid of the prior's quantiles (Kingma & Welling 2014, fig. 4): equal steps in "
            "probability, so the grid is denser where the prior has more mass")
    if d == 1:
        return f"The decoder's output along the single latent axis, at {grid}."
    if d == 2:
        return f"The decoder's output for {grid}. Right is +z1, up is +z2, as in the scatter below."
    return (f"A 2D slice through the {d}-dimensional latent space: two chosen dimensions move over {grid}, the "
            "others stay fixed at 0 (the prior's mean) or at one test image's code.")


@st.fragment
def manifold_section(run: RunHandle) -> None:
    d = run.config.model.latent_dim
    cols = st.columns(2)
    n = cols[0].slider("Grid size" if d > 1 else "Points", **GRID, key=K + "manifold_n")
    coverage = cols[1].select_slider("Prior mass covered", COVERAGE, value=0.9, key=K + "manifold_span",
                                     help="The grid runs over the central quantiles holding this probability")
    span = span_of(coverage)
    q = latent.prior_quantiles(2, span)
    if d == 1:
        show(run.decode(latent.prior_quantiles(n, span)[:, None]), n, 800,
             caption=f"z1 from {q[0]:.2f} (left) to {q[1]:.2f} (right) · weights from step {weights_step(run):,}")
        return
    if d == 2:
        dims, base = (0, 1), np.zeros(2, np.float32)
    else:
        picked = slice_controls(run, d)
        if picked is None:
            return
        dims, base = picked
    z = latent.slice_grid(n, dims, base, span)  # (n*n, D)
    i, j = dims
    show(run.decode(z), n, 700, caption=f"across: z{i + 1}, up: z{j + 1}, each from {q[0]:.2f} to {q[1]:.2f} · "
                                            f"weights from step {weights_step(run):,}")


def slice_controls(run: RunHandle, d: int) -> tuple[tuple[int, int], np.ndarray] | None:
    """Dimension pickers (labelled with each one's spread over the test codes) and the fixed base code.

    None when the choice is unusable (the same dimension twice); the warning is already shown.
    """
    try:
        mu, _, _ = codes(run)
    except DatasetUnavailable:
        mu = None
    spread = mu.var(0) if mu is not None else np.zeros(d)
    # Default to the two most used dimensions: a slice through collapsed ones shows one image.
    order = np.argsort(-spread, kind="stable")
    for key, default in ((K + "manifold_dim_x", int(order[0])), (K + "manifold_dim_y", int(order[1]))):
        if st.session_state.get(key) not in range(d):  # first visit, or a run with fewer dimensions
            st.session_state[key] = default

    def label(k: int) -> str:
        return f"z{k + 1} (variance {spread[k]:.2f} over test codes)" if mu is not None else f"z{k + 1}"

    cols = st.columns(3)
    i = cols[0].selectbox("Across", range(d), format_func=label, key=K + "manifold_dim_x")
    j = cols[1].selectbox("Up", range(d), format_func=label, key=K + "manifold_dim_y")
    held = cols[2].radio("Other dimensions at", ("0", "a test image's code"), key=K + "manifold_base",
                         disabled=mu is None, horizontal=True)
    if i == j:
        st.warning("Pick two different dimensions.")
        return None
    base = np.zeros(d, np.float32)
    if held != "0" and mu is not None:
        c1, c2 = st.columns([1, 5], vertical_alignment="center")
        clamp_index(K + "manifold_base_idx", len(mu), 0)
        idx = c1.number_input("Test image", 0, len(mu) - 1, key=K + "manifold_base_idx")
        with c2:
            show(run.test_set(idx + 1)[0][idx:], 1, 56)
        base = mu[idx].copy()
    return (i, j), base


def clamp_index(key: str, n: int, default: int) -> int:
    """Store a valid index for a test set of n images under key (first visit, or another run with fewer)."""
    value = st.session_state.get(key, default)
    if not 0 <= value < n:
        value = min(max(default, 0), n - 1)
    st.session_state[key] = value = int(value)
    return value


# ------------------------------------------------------------------ scatter and interpolation

def picked_indices(event: Mapping[str, Any] | None) -> list[int]:
    """Test-set indices of the points in a Plotly selection event, in order; points with no index are skipped."""
    points = ((event or {}).get("selection") or {}).get("points") or []
    out = []
    for p in points:
        c = p.get("customdata")
        if isinstance(c, (list, tuple)):
            c = c[0] if c else None
        if c is not None:
            out.append(int(c))
    return out


def pick_ends(ends: tuple[int, int], picked: list[int]) -> tuple[int, int]:
    """The ends after a pick: the last two points picked; one new point becomes B and the old B becomes A."""
    if len(picked) >= 2:
        return picked[-2], picked[-1]
    if len(picked) == 1 and picked[0] != ends[1]:
        return ends[1], picked[0]
    return ends


def _rerun_codes() -> None:
    """From a callback: redraw the scatter (its A/B marks) and the strips, not the rest of the page.

    Only while this tab is open: leaving it unmounts the scatter, whose cleared selection calls _on_pick in
    the very rerun that draws another tab, where these fragments do not exist ("No fragment found").
    """
    if st.session_state.get(MAIN_TAB_KEY, TITLE) == TITLE:
        st.rerun([FRAGMENT_SCATTER, FRAGMENT_INTERP])


def _on_pick() -> None:
    ends = (st.session_state.get(K + "interp_a", 0), st.session_state.get(K + "interp_b", 0))
    a, b = pick_ends(ends, picked_indices(st.session_state.get(K + "scatter")))
    st.session_state[K + "interp_a"], st.session_state[K + "interp_b"] = a, b
    _rerun_codes()


def _jump_to_label(end: str, labels: np.ndarray, names: tuple[str, ...]) -> None:
    """A label picked for an end: move that end to the next test image with the label, then clear the picker."""
    name = st.session_state.get(K + f"interp_label_{end}")
    if name is None:
        return
    hits = np.flatnonzero(labels == names.index(name))
    current = st.session_state.get(K + f"interp_{end}", -1)
    if len(hits):
        later = hits[hits > current]
        st.session_state[K + f"interp_{end}"] = int(later[0] if len(later) else hits[0])
    st.session_state[K + f"interp_label_{end}"] = None
    _rerun_codes()


def codes_or_none(run: RunHandle, say_why: bool) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]] | None:
    """The test codes, or None where the run's dataset is not on this machine (an opened run)."""
    try:
        return codes(run)
    except DatasetUnavailable as e:
        if say_why:
            st.info(f"The test set is not available on this machine, so there are no codes to show: {md_text(e)}")
        return None


def default_ends(y: np.ndarray) -> tuple[int, int]:
    """The first test image, and the first one with another label."""
    return 0, int(np.argmax(y != y[0]))


def stored_ends(y: np.ndarray, *, store: bool) -> tuple[int, int]:
    """The interpolation ends in session state, made valid for these len(y) test images.

    Only the interpolation section stores them (before drawing its number inputs, which take
    no value= argument): writing a widget's state after it is drawn in the same run is an error.
    """
    ends = []
    for end, default in zip("ab", default_ends(y)):
        value = st.session_state.get(K + f"interp_{end}", default)
        value = int(value) if 0 <= value < len(y) else default  # a run with a smaller test set
        if store:
            st.session_state[K + f"interp_{end}"] = value
        ends.append(value)
    return ends[0], ends[1]


@st.fragment(key=FRAGMENT_SCATTER)
def scatter_section(run: RunHandle) -> None:
    found = codes_or_none(run, say_why=True)
    if found is None:
        return
    mu, y, names = found
    a, b = stored_ends(y, store=False)
    # Drawn at a fixed resolution, so the Steps slider below need not redraw (and remount) the figure.
    paths = {"linear": latent.lerp(mu[a], mu[b], PATH_POINTS), "spherical": latent.slerp(mu[a], mu[b], PATH_POINTS)}
    kind = LABEL_KIND.get(run.config.train.dataset, "label")
    fig, note = scatter_figure(mu, y, names, kind, (a, b), paths, ink=INK.get(st.context.theme.type, INK[None]))
    left, right = st.container(key=K + "scatter_row").columns([3, 1])
    left.plotly_chart(fig, on_select=_on_pick, selection_mode="points", key=K + "scatter",
                      config={"displaylogo": False})
    with right:
        token = run_token(run)
        scatter_preview(key=K + "preview", chart_key=K + "scatter", png=image_sheet(run, token), n=len(y),
                        labels=[names[k] for k in y], kind=kind, version=str(token))
        st.markdown(f"{note} Codes from the weights at step {weights_step(run):,}.\n\n**Click a point** to make "
                    "it the end **B** of the interpolation below; the previous B becomes A. The lines are the two "
                    "paths between them: dashed straight, solid spherical.")


@st.fragment(key=FRAGMENT_INTERP)
def interpolation_section(run: RunHandle) -> None:
    found = codes_or_none(run, say_why=False)
    if found is None:
        return
    mu, y, names = found
    n = len(y)
    stored_ends(y, store=True)
    cols = st.columns([2, 2, 2, 2, 3], vertical_alignment="bottom")  # wide enough for the +/- steppers
    a = cols[0].number_input("Start A", 0, n - 1, key=K + "interp_a", on_change=_rerun_codes,
                             help="Index of a test image")
    cols[1].selectbox("…or jump A to the next", names, index=None, placeholder="label", key=K + "interp_label_a",
                      on_change=_jump_to_label, args=("a", y, names))
    b = cols[2].number_input("End B", 0, n - 1, key=K + "interp_b", on_change=_rerun_codes,
                             help="Index of a test image")
    cols[3].selectbox("…or jump B to the next", names, index=None, placeholder="label", key=K + "interp_label_b",
                      on_change=_jump_to_label, args=("b", y, names))
    steps = cols[4].slider("Steps along the path", **STEPS, key=K + "interp_steps")
    interpolation(run, mu, y, names, (a, b), steps)


def interpolation(run: RunHandle, mu: np.ndarray, y: np.ndarray, names: tuple[str, ...], ends: tuple[int, int],
                  steps: int) -> None:
    """Both paths decoded, each strip framed by the two original test images."""
    a, b = ends
    lin, sph = latent.lerp(mu[a], mu[b], steps), latent.slerp(mu[a], mu[b], steps)  # (steps, D) each
    mid_lin, mid_sph = (np.linalg.norm(f(mu[a], mu[b], 3)[1]) for f in (latent.lerp, latent.slerp))  # t = 1/2
    decoded = run.decode(np.concatenate([lin, sph]))
    x = run.test_set(max(a, b) + 1)[0]
    na, nb = np.linalg.norm(mu[a]), np.linalg.norm(mu[b])
    st.markdown(f"From **A** = test image {a} ({names[y[a]]}) to **B** = test image {b} ({names[y[b]]}). Each strip "
                "starts and ends with the original images; between them, the decoded codes along the path.")
    st.image(strip(x[a], decoded[:steps], x[b]), output_format="PNG",
             caption=f"Linear: z(t) = (1 − t)·z_A + t·z_B. ‖z‖ at the middle: {mid_lin:.2f}")
    st.image(strip(x[a], decoded[steps:], x[b]), output_format="PNG",
             caption=f"Spherical (slerp): along the arc between the directions of z_A and z_B. ‖z‖ at the middle: "
                     f"{mid_sph:.2f}")
    if mu.shape[1] == 1:
        st.caption("With one latent dimension the two paths coincide: there is no arc to follow.")
    else:
        st.caption(f"The ends have ‖z_A‖ = {na:.2f} and ‖z_B‖ = {nb:.2f}. A straight line cuts through the "
                   "middle, where codes are shorter than typical prior draws (whose norm is about √D in D "
                   "dimensions); slerp keeps the norm between the two ends (White 2016).")


def strip(first: np.ndarray, path: np.ndarray, last: np.ndarray, target_px: int = 900) -> np.ndarray:
    """One row: original | decoded path | original, with wider gaps around the originals. uint8, upscaled."""
    row = tile(to_uint8(path), len(path), pad_value=PAD)
    first, last = to_uint8(first), to_uint8(last)
    gap = np.full((first.shape[0], 6, *first.shape[2:]), PAD, np.uint8)
    out = np.hstack([first, gap, row, gap, last])
    return upscale(out, max(1, min(4, target_px // out.shape[1])))


def scatter_figure(mu: np.ndarray, y: np.ndarray, names: tuple[str, ...], kind: str, ends: tuple[int, int],
                   paths: dict[str, np.ndarray], *, ink: str = INK["light"]) -> tuple[go.Figure, str]:
    """Codes coloured by label: the codes themselves for D <= 2, their first two principal components above.

    `ink` colours the paths and the A/B rings: the theme's text colour, so they show on a light or dark page.

    Returns the figure and a one-line note on what the axes are.
    """
    d = mu.shape[1]
    if d == 1:
        # A strip: the code across, one row per label, jittered so overlapping points stay visible.
        jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(mu))
        xy = np.stack([mu[:, 0], y + jitter], axis=1)
        titles, note = ("z1", kind), "One latent dimension: each row holds one label's codes (jittered vertically)."
        project = None
    elif d == 2:
        xy, titles, project = mu, ("z1", "z2"), (lambda p: p)
        note = "The axes are the two latent dimensions."
    else:
        mean, axes, ratio = latent.pca_basis(mu)
        xy = (mu - mean) @ axes.T
        titles = (f"PC1 ({ratio[0]:.0%} of variance)", f"PC2 ({ratio[1]:.0%})")
        project = (lambda p: (p - mean) @ axes.T)
        note = (f"{d} latent dimensions, projected on their first two principal components, which hold "
                f"{ratio[0]:.0%} and {ratio[1]:.0%} of the codes' variance ({ratio.sum():.0%} together).")
    hover = f"{kind} %{{meta}}<br>test image %{{customdata}}<extra></extra>"
    fig = go.Figure()
    colors = qualitative.D3 if len(names) <= 10 else qualitative.Alphabet
    for k, name in enumerate(names):
        m = y == k
        if m.any():
            # SVG, not WebGL: remounting 2000 SVG points measured ~40% faster in headless Chromium.
            fig.add_trace(go.Scatter(x=xy[m, 0], y=xy[m, 1], mode="markers", name=name, meta=name,
                                     customdata=np.flatnonzero(m), hovertemplate=hover,
                                     marker={"size": 5, "opacity": 0.7, "color": colors[k % len(colors)]}))
    if project is not None:
        for label, dash in (("linear", "dash"), ("spherical", "solid")):
            p = project(paths[label])
            fig.add_trace(go.Scatter(x=p[:, 0], y=p[:, 1], mode="lines", name=f"{label} path", hoverinfo="skip",
                                     line={"color": ink, "dash": dash, "width": 1.5}))
    fig.add_trace(go.Scatter(x=xy[list(ends), 0], y=xy[list(ends), 1], mode="markers+text", text=["A", "B"],
                             textposition="top center", name="ends", hoverinfo="skip",
                             textfont={"color": ink},
                             marker={"size": 13, "color": "rgba(0,0,0,0)", "line": {"color": ink, "width": 2}}))
    # The legend above the plot, not beside it: beside, it took a third of a narrow column's width.
    fig.update_layout(height=520, margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend_title_text=kind,
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
                      xaxis_title=titles[0], yaxis_title=titles[1], clickmode="event+select")
    if d == 1:
        fig.update_yaxes(tickvals=list(range(len(names))), ticktext=list(names))
    else:
        fig.update_yaxes(scaleanchor="x", scaleratio=1)  # equal scales: slerp's arc looks like an arc
    return fig, note
