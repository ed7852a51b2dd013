"""Evidence tab, last sections: the true posterior of one test image (2 latents), the derivation, the course note.

The posterior is integrated on a grid by the core (run.posterior: the grid, its checks and the
image's own IWAE bounds, as numpy and plain values) only after a click on "Compute", with the
weights of that moment: the grid costs n² decoder passes (and its grid-free checks as many
again), which a run training beside it would feel. Results are cached per (run, pinned weights,
image, grid size); another image or grid size computes at once, newer weights only on another
click. Both sections share one fragment, so choosing another image re-fills the derivation with
that image's exact numbers. The derivation and the note on the course notes' inequality are
folded in expanders.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from dashboard.common import run_token
from dashboard.panels.evidence_series import K, best_bound, caveat, finished_job, live_interval, split_rows
from vae_core.images import to_uint8, upscale
from vae_core.config import unit_label
from vae_core.lab import IWAE_FAR_NATS, DatasetUnavailable, JobSnapshot, RunHandle

GRID_N = {"min_value": 40, "max_value": 300, "step": 20}
# Default points per axis. n = 200 takes ~0.5 s for the MLP on 2 idle CPU cores, but the conv net's
# decoder is ~18x slower per point (~7 s), so it starts coarser; either can be moved.
GRID_DEFAULT = {"mlp": 200, "conv": 100}
LOG_FLOOR = 20.0  # the log-density view shows 20 nats below the peak


@dataclass(frozen=True)
class Evidence:
    """The three terms of log p(x) = ELBO + KL(q || p(z|x)) and where they come from."""

    log_px: float
    elbo: float
    kl: float
    exact: bool  # True: one image by quadrature; False: log p(x) ≈ the best IWAE bound on a batch
    source: str


@st.cache_data(max_entries=48, show_spinner=False)
def posterior(_run: RunHandle, token: int, version: int, index: int, n: int) -> Any:
    """Held-out image `index`'s grid posterior and its own IWAE bounds: a vae_core PosteriorResult
    (grid, curve, seconds, step, image; numpy and plain values only).

    The IWAE curve is over several independent estimates for this one image (their mean and
    standard error): one estimate is noisy where q is narrower than p(z|x) and may land above
    log p(x); their mean estimates E[log p̂ₖ(x)] ≤ log p(x).

    token and version key the cache: a new run or new weights compute afresh.
    """
    return _run.posterior(index, n)


def batch_evidence(run: RunHandle, job: JobSnapshot | None) -> Evidence | None:
    """The newest batch estimate: the latest evidence row or a finished on-demand job, whichever is later."""
    rows = split_rows(run.metrics()).evidence
    best: tuple[int, dict[str, Any], str] | None = None
    if rows:
        r = rows[-1]
        best = (r["step"], r, f"{r['n']} held-out images after epoch {r['epoch']}")
    if job is not None and (best is None or job.step >= best[0]):
        best = (job.step, job.result, f"{job.n} held-out images, on demand at step {job.step:,}")
    if best is None:
        return None
    k, bound, _ = best_bound(best[1])
    return Evidence(bound, best[1]["elbo"], bound - best[1]["elbo"], False, f"mean over {best[2]}; log p(x) ≈ "
                                                                          f"log p̂ₖ(x) at k = {k:,}")


# ------------------------------------------------------------------ the section

def _next_image(size: int) -> None:
    st.session_state[K + "image"] = (st.session_state.get(K + "image", 0) + 1) % size


def _test_size(run: RunHandle) -> int | None:
    try:
        return run.test_size()
    except DatasetUnavailable:
        return None


def _ask(run: RunHandle) -> None:
    """Callback of 'Compute': pin the grid to the weights of now; only another click moves it on."""
    st.session_state[K + "grid_for"] = (run_token(run), run.weights_version())


def render(run: RunHandle) -> None:
    """The posterior section and the expanders. With 2 latents the derivation shows the chosen image's exact numbers
    (one fragment, redrawn when the image changes); otherwise the latest batch estimate, refreshed while the run is
    active."""
    st.subheader("The true posterior p(z|x)")
    if run.config.model.latent_dim == 2:
        with_grid(run)
    else:
        st.info(f"This run has {run.config.model.latent_dim} latent dimensions. The true posterior can be "
                "integrated on a grid only in 2 (a 200-point grid in D dimensions needs 200^D decoder passes); train "
                "with latent size 2 to see it. The importance-weighted bounds above are lower bounds at any size, "
                "but with no grid to compare they can understate log p(x) unseen: where q(z|x) sits far from a "
                "posterior with several modes, even k = 5000 samples from q can stay many nats below (2-latent "
                "runs show this per image).")

        @st.fragment(run_every=live_interval(run))
        def live() -> None:
            derivation(batch_evidence(run, finished_job(run)), run)

        live()
    course_note()


@st.fragment
def with_grid(run: RunHandle) -> None:
    grid = posterior_section(run)
    derivation(grid if grid is not None else batch_evidence(run, finished_job(run)), run)


def posterior_section(run: RunHandle) -> Evidence | None:
    st.markdown("For one held-out image x, the decoder gives log p(x|z) + log p(z) at every z. On a grid over z "
                "(placed where the mass is) this is normalised numerically: the normaliser is **log p(x)**, and "
                "the heatmap is the **true posterior p(z|x)**. The encoder's Gaussian q(z|x) is drawn on top as "
                "its 1σ and 2σ ellipses. The better q covers p(z|x), the smaller KL(q(z|x) ‖ p(z|x)).")
    size = _test_size(run)
    if size is None:
        st.info("The run's test set is not available on this machine, so there is no image to evaluate.")
        return None
    if not 0 <= st.session_state.get(K + "image", 0) < size:  # first visit, or a run with fewer test images
        st.session_state[K + "image"] = 0
    c1, c2, c3, c4 = st.columns([2, 1, 3, 2], vertical_alignment="bottom")
    index = c1.number_input("Test image", 0, size - 1, step=1, key=K + "image")
    c2.button("Next", key=K + "image_next", on_click=_next_image, args=(size,), help="The next test image")
    st.session_state.setdefault(K + "grid_n", GRID_DEFAULT.get(run.config.model.arch, 100))
    n = c3.slider("Grid points per axis", **GRID_N, key=K + "grid_n",
                  help="n × n decoder passes; 200 resolves a trained model's posterior to ~1e-6 nats")
    view = c4.radio("Show", ("p(z|x)", "log p(z|x)"), key=K + "grid_view", horizontal=True)
    pinned = st.session_state.get(K + "grid_for")
    if pinned is None or pinned[0] != run_token(run):
        st.button("Compute the true posterior", key=K + "grid_go", on_click=_ask, args=(run,), type="primary",
                  help="Integrates p(x|z) p(z) on the grid and checks the result against grid-free estimates: "
                       "about a second for the default model, longer while training shares the CPU")
        st.caption("Computed only when asked: a grid costs n² decoder passes (plus as many again for its checks), "
                   "which a training run beside it would feel. After the first, another image or grid size is "
                   "computed as you choose it.")
        return None
    version = pinned[1]
    with st.spinner(f"Integrating the posterior on a {n} × {n} grid…"):
        result = posterior(run, run_token(run), version, int(index), int(n))
    g = result.grid
    left, right = st.columns([3, 2])
    left.plotly_chart(posterior_figure(g, log_scale=view != "p(z|x)"), key=K + "posterior",
                      config={"displaylogo": False})
    with right:
        image_pair(run, int(index), result.image)
        grid_numbers(g, result.curve, run)
    st.caption(f"Weights from step {result.step:,} · {n} × {n} grid over z1 ∈ [{g.z1[0]:.2f}, {g.z1[-1]:.2f}], "
               f"z2 ∈ [{g.z2[0]:.2f}, {g.z2[-1]:.2f}] · computed in {result.seconds:.2f} s "
               "(cached for these weights).")
    if run.weights_step() > result.step:
        st.button(f"Recompute with the weights of step {run.weights_step():,}", key=K + "grid_again",
                  on_click=_ask, args=(run,), help="The run has trained on since this grid was computed")
    return Evidence(g.log_px, g.elbo, g.kl_to_posterior, True, f"test image {int(index)}, by quadrature on the grid")


def image_pair(run: RunHandle, index: int, evaluated: np.ndarray) -> None:
    """The test image and `evaluated`, the draw x the numbers are for (binarized when the run is)."""
    grey = run.test_set(index + 1)[0][index]
    grey = to_uint8(grey)
    pair = np.hstack([grey, np.full((grey.shape[0], 4, *grey.shape[2:]), 255, np.uint8), to_uint8(evaluated)])
    st.image(upscale(pair, 3), output_format="PNG",
             caption="The test image and the binarized draw x that is evaluated" if run.config.binarized
             else "The test image x")


CHECK_MARK = {"pass": "✓ pass", "fail": "✗ FAIL", "inconclusive": "? inconclusive"}


def grid_numbers(g: Any, curve: dict[str, Any], run: RunHandle) -> None:
    """The grid's three terms (g: a vae_core PosteriorGrid, numpy and floats), the image's IWAE bound, the checks."""
    c1, c2 = st.columns(2)
    c1.metric("log p(x) by quadrature", f"{g.log_px:.3f}")
    c2.metric("ELBO", f"{g.elbo:.3f}", help="E_q[log p(x,z) − log q(z|x)] on the same grid")
    c1.metric("KL(q(z|x) ‖ p(z|x))", f"{g.kl_to_posterior:.3f}", help="On the same grid; ≥ 0")
    iw, se, k, repeats = curve["iwae"][-1], curve["iwae_se"][-1], curve["ks"][-1], curve["n"]
    c2.metric(f"log p̂ₖ(x), k = {k}", f"{iw:.3f}", delta=f"± {se:.3f}", delta_color="off",
              help=f"Importance sampling with q as the proposal: the mean of {repeats} independent estimates "
                   "for this image, ± its standard error. In expectation ELBO ≤ log p̂ₖ(x) ≤ log p(x); one "
                   "estimate can land above log p(x) when q is narrower than p(z|x).")
    st.markdown("**Checks that can fail.** log p(x) = ELBO + KL holds on the grid by construction, so it proves "
                "nothing; instead the grid's numbers are compared with estimates that do not use the grid:")
    for c in g.checks():
        line = (f"{CHECK_MARK[c.verdict]} · {c.name}: grid {c.grid:.4f} vs {c.reference:.4f} by {c.method}; "
                f"{c.why}.")
        (st.error if c.verdict == "fail" else st.caption)(line)
    if iw < g.log_px - IWAE_FAR_NATS:
        st.warning(f"This image's IWAE bound at k = {k:,} is {g.log_px - iw:.2f} nats below log p(x): {k:,} samples "
                   "from q(z|x) did not find the posterior's mass (compare q's ellipses with the heatmap), so the "
                   "bound understates log p(x) here. With more than 2 latents there is no grid to reveal this.")
    elif iw > g.log_px + 3 * se:
        st.warning(f"The IWAE estimate is {iw - g.log_px:.2f} above log p(x), more than 3 of its standard errors. "
                   "Either the importance weights are heavy-tailed (q much narrower than p(z|x), so the standard "
                   "error is itself unreliable) or the grid misses mass (raise the grid points).")
    unit = unit_label(run.config)
    st.caption(f"In {unit}. Coverage: q has {g.q_grid_mass:.4f} of its mass on the grid; the posterior has "
               f"{g.posterior_edge_mass:.1e} in the edge cells; the narrower of q and p(z|x) spans "
               f"{g.cells_per_std:.1f} cells per std.")
    if g.cells_per_std < 2:
        st.warning("The grid is coarse for this posterior (under 2 cells per standard deviation): raise the grid "
                   "points for exact numbers.")
    if g.posterior_edge_mass > 1e-4 or g.q_grid_mass < 0.999:
        st.warning("Part of the mass lies at or beyond the grid's edge, so the quadrature misses some of it.")
    if caveat(run):
        st.caption("⚠ " + caveat(run))


def posterior_figure(g: Any, *, log_scale: bool = False) -> go.Figure:
    """Heatmap of p(z|x) (rows z2, columns z1) with q(z|x)'s 1σ and 2σ ellipses and both means."""
    if log_scale:
        z, title = np.maximum(g.log_density, g.log_density.max() - LOG_FLOOR), "log p(z|x)"
    else:
        z, title = np.exp(g.log_density), "p(z|x)"
    fig = go.Figure(go.Heatmap(x=g.z1, y=g.z2, z=z.astype(np.float32), colorscale="Viridis",
                               colorbar={"title": {"text": title}},
                               hovertemplate="z1 %{x:.2f}, z2 %{y:.2f}<br>" + title + " %{z:.3g}<extra></extra>"))
    sd = np.sqrt(np.diag(g.q_cov))  # q is diagonal: axis-aligned ellipses
    t = np.linspace(0, 2 * math.pi, 121)
    for k, dash, mass in ((1, "solid", 1 - math.exp(-0.5)), (2, "dash", 1 - math.exp(-2))):
        fig.add_trace(go.Scatter(x=g.q_mu[0] + k * sd[0] * np.cos(t), y=g.q_mu[1] + k * sd[1] * np.sin(t),
                                 mode="lines", name=f"q(z|x) {k}σ ({mass:.0%} of q)", hoverinfo="skip",
                                 line={"color": "white", "dash": dash, "width": 2}))
    p = np.exp(g.log_density) * g.cell_area  # cell masses
    post_mean = (float((p.sum(0) * g.z1).sum()), float((p.sum(1) * g.z2).sum()))
    fig.add_trace(go.Scatter(x=[g.q_mu[0]], y=[g.q_mu[1]], mode="markers", name="mean of q",
                             marker={"symbol": "x", "size": 10, "color": "white"},
                             hovertemplate="mean of q: (%{x:.2f}, %{y:.2f})<extra></extra>"))
    fig.add_trace(go.Scatter(x=[post_mean[0]], y=[post_mean[1]], mode="markers", name="mean of p(z|x)",
                             marker={"symbol": "cross", "size": 10, "color": "#e45756"},
                             hovertemplate="mean of p(z|x): (%{x:.2f}, %{y:.2f})<extra></extra>"))
    aspect = (g.z2[-1] - g.z2[0]) / (g.z1[-1] - g.z1[0])
    plot_h = int(min(560, max(260, 560 * aspect)))  # equal scales on both axes, without a tall empty margin
    fig.update_layout(height=plot_h + 130, margin={"l": 50, "r": 10, "t": 10, "b": 50},
                      xaxis={"title": {"text": "z1"}, "range": [g.z1[0], g.z1[-1]], "constrain": "domain"},
                      yaxis={"title": {"text": "z2"}, "range": [g.z2[0], g.z2[-1]], "scaleanchor": "x",
                             "constrain": "domain"},
                      legend={"orientation": "h", "yanchor": "top", "y": -60 / plot_h - 0.05, "x": 0,
                              "bgcolor": "#2b2d42", "font": {"color": "white"}})
    return fig


# ------------------------------------------------------------------ the derivation

STEPS_P1 = [
    (r"\log p_\theta(x) = \mathbb{E}_{q_\phi(z|x)}\big[\log p_\theta(x)\big]",
     "log p(x) does not depend on z, so its average under any distribution q(z|x) is itself"),
    (r"= \mathbb{E}_{q_\phi(z|x)}\Big[\log \frac{p_\theta(x,z)}{p_\theta(z|x)}\Big]",
     "Bayes' rule: p(x) = p(x, z) / p(z|x) for every z"),
    (r"= \mathbb{E}_{q_\phi(z|x)}\Big[\log \frac{p_\theta(x,z)}{q_\phi(z|x)}\,\frac{q_\phi(z|x)}{p_\theta(z|x)}\Big]",
     "multiply and divide by q(z|x)"),
    (r"= \underbrace{\mathbb{E}_{q_\phi(z|x)}\Big[\log \frac{p_\theta(x,z)}{q_\phi(z|x)}\Big]}_"
     r"{\mathcal{L}_{\theta,\phi}(x)"
     r"\;=\;\text{ELBO}} + \underbrace{\mathbb{E}_{q_\phi(z|x)}\Big[\log \frac{q_\phi(z|x)}{p_\theta(z|x)}\Big]}_"
     r"{\mathrm{KL}(q_\phi(z|x)\,\|\,p_\theta(z|x))}", "the log of a product is a sum; the second term is the "
     "KL divergence from q(z|x) to the true posterior p(z|x)"),
]


def derivation(ev: Evidence | None, run: RunHandle) -> None:
    """The derivation of ELBO ≤ log p(x), folded in an expander, with this model's numbers when there are some."""
    with st.expander("Why the ELBO is a lower bound: the derivation, with this model's numbers"):
        st.markdown("Here p_θ is the model (a prior p(z) over codes and the decoder p(x|z)), q_φ(z|x) the encoder, "
                    "and 𝓛, the ELBO, the objective training maximises. The first step splits log p(x) into the "
                    "ELBO and a KL divergence, for any encoder q(z|x):")
        for tex, why in STEPS_P1:
            left, right = st.columns([3, 2], vertical_alignment="center")
            left.latex(tex)
            right.caption(why)
        if ev is not None:
            approx = "=" if ev.exact else r"\approx"
            st.latex(rf"{ev.log_px:.3f} \;{approx}\; ({ev.elbo:.3f}) + {ev.kl:.3f}")
        st.markdown("A KL divergence is never negative, so the ELBO is a *lower* bound. Rearranged:")
        st.latex(r"\mathcal{L}_{\theta,\phi}(x) = \log p_\theta(x) - \mathrm{KL}(q_\phi(z|x)\,\|\,p_\theta(z|x))"
                 r"\;\le\; \log p_\theta(x), \quad\text{since } \mathrm{KL} \ge 0.")
        if ev is None:
            st.info("The numbers appear here after the first estimate of log p(x) (above).")
        elif ev.exact:
            st.latex(rf"{ev.elbo:.3f} = {ev.log_px:.3f} - {ev.kl:.3f} \;\le\; {ev.log_px:.3f}")
            st.caption(f"Numbers: {ev.source}, in {unit_label(run.config)}. All three terms are integrals on the "
                       "same grid, so this sum holds by construction; the checks beside the heatmap are what can "
                       "fail.")
        else:
            st.latex(rf"{ev.elbo:.3f} \;\le\; {ev.log_px:.3f} \;\le\; \log p_\theta(x), \qquad "
                     rf"\mathrm{{KL}}(q\,\|\,p(z|x)) \;\ge\; {ev.kl:.3f}")
            st.caption(f"Numbers: {ev.source}, in {unit_label(run.config)}. The IWAE bound is itself below "
                       "log p(x), so the gap it shows is a lower estimate of the KL.")
        st.caption("The Training tab's ELBO is the same quantity written the other way: "
                   "E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)), reconstruction minus the KL to the prior.")


def course_note() -> None:
    """The note on the course notes' inequality, for a reader who never saw them."""
    with st.expander("A note on the course notes: they state ELBO ≥ log p(x), which is wrong"):
        st.markdown(
            "This tab was written alongside a set of course notes on VAEs. You do not need them; this note is for "
            "anyone who reads them, or any text that makes the same slip.\n\n"
            "The notes derive the decomposition above and then conclude **𝓛 ≥ log p(x)**. The inequality is the "
            "other way round. The decomposition says log p(x) = 𝓛 + KL(q(z|x) ‖ p(z|x)), and a KL divergence is "
            "never negative, so **𝓛 ≤ log p(x)**. That is what the name *evidence lower bound* means (log p(x) is "
            "called the evidence), and it is why training that pushes 𝓛 up also pushes up log p(x), or closes "
            "the gap between them. Every number on this page agrees: each ELBO lies below the estimates of "
            "log p(x) beside it.\n\n"
            "Three smaller slips in the same notes: the first step writes E_q[log q_θ(x)] where E_q[log p_θ(x)] is "
            "meant; the second term is named KL(q(z|x) ‖ p(z)), the KL to the prior, where the derivation "
            "(rightly) reaches KL(q(z|x) ‖ p_θ(z|x)), the KL to the true posterior (the KL to the prior belongs "
            "to the other way of writing the ELBO, the one in the expander above); and equation 8 is printed "
            "twice while equation 6 is empty.")
