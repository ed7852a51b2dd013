"""Evidence tab, section 4: what the KL term is doing — per-dimension KL, active units, collapse, rate and distortion.

Read from the run's test rows (per epoch) and recent train rows (every ~20 steps), in two
fragments that refresh while the run is active (the charts with the collapse warning, and the
rate-distortion plane). The remedies between them are plain buttons for a session that may
steer the run: they call lab.update, which applies from the run's next step (in this process or,
through its control file, in the one that trains it), and mirror the new value into the
sidebar's control so a later Resume keeps it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from dashboard.panels.evidence_series import (COLLAPSE_KL_NATS, ELBO_COLOR, IWAE_COLOR, K, RECENT_TRAIN_ROWS,
                                              active_count, axis_unit, collapse_signs, kl_matrix, live_interval,
                                              split_rows)
from dashboard.common import md_text
from dashboard.settings import LABELS
from dashboard.state import can_steer, get_lab, session_id
from vae_core.lab import ACTIVE_THRESHOLD, RunHandle, Status, UserError, active_mask

FREE_BITS_REMEDY = 0.5  # nats per dimension (Kingma et al. 2016 used 0.125-2 per group)
WARMUP_REMEDY_EPOCHS = 5  # the ramp back to full β takes this many epochs from now
CHART = {"displaylogo": False}


def render(run: RunHandle) -> None:
    st.markdown("The KL(q(z|x) ‖ p(z)) term is the **rate**: an upper bound on how many nats the code carries about "
                "x. A dimension whose KL, averaged over the test images, stays under "
                f"{ACTIVE_THRESHOLD:g} nats carries next to nothing: it is **collapsed** (pale in the heatmap), and "
                "the others are **active**; the count and the heatmap use that one rule. When the total KL falls "
                "to 0 the decoder ignores z altogether: **posterior collapse**.")

    interval = live_interval(run)

    @st.fragment(run_every=interval)
    def usage() -> None:
        rows = split_rows(run.metrics())
        if not rows.test:
            st.info("Per-dimension KL and active units come from the test evaluation at the end of each epoch; "
                    "the first arrives after epoch 1.")
        else:
            left, right = st.columns(2)
            left.plotly_chart(kl_heatmap(rows.test), key=K + "kl_dims", config=CHART)
            right.plotly_chart(active_figure(rows.test, run.config.model.latent_dim), key=K + "active",
                               config=CHART)
        collapse_warning(run, rows.test, rows.train)

    usage()
    # The remedy buttons sit outside the polling fragments on purpose: a click reruns the whole page, so the
    # sidebar's β / warm-up / free-bits controls show the new value at once. Clicked inside a fragment, the
    # sidebar would keep its old value in the browser and send it back on the next rerun, undoing the remedy.
    remedy_buttons(run)

    st.markdown("##### The rate–distortion plane")
    st.markdown("Rate R = KL(q(z|x) ‖ p(z)) across, distortion D = −E_q[log p(x|z)] up; both are costs, so "
                "lower-left is better. The negative ELBO is R + D: points on a grey line have the same ELBO. "
                "β-weighted training minimises D + βR instead, so its iso-lines are steeper for β > 1 and the "
                "run slides along them toward lower rate. Move β in the sidebar while the run trains and the "
                "current point moves within seconds.")

    @st.fragment(run_every=interval)
    def plane() -> None:
        rows = split_rows(run.metrics())
        status = run.status()
        if not (rows.test or rows.train):
            st.info("The first point appears with the first logged training steps.")
            return
        st.plotly_chart(rd_figure(rows.test, rows.train, status, axis_unit(run)), key=K + "rd", config=CHART)
        st.caption("The view follows the run's recent points; double-click the plot to see its whole trajectory.")
        if status.free_bits > 0:
            st.caption(f"With free bits ({status.free_bits:g} nats per dimension) the loss counts each "
                       "dimension's rate as at least that, so the β line is exact only where every dimension "
                       "is above the floor.")

    plane()


# ------------------------------------------------------------------ figures

def kl_heatmap(test: list[dict[str, Any]]) -> go.Figure:
    epochs, z = kl_matrix(test)
    d = z.shape[0]
    latest = z[:, -1] if z.size else np.zeros(0)
    off = [not a for a in active_mask(np.nan_to_num(latest).tolist())]
    labels = [f"z{i + 1}" + (" (off)" if off[i] else "") for i in range(d)]
    top = max(float(np.nanmax(z)) if np.isfinite(z).any() else 0.0, 2 * ACTIVE_THRESHOLD)
    cut = ACTIVE_THRESHOLD / top
    # Pinned at 0 (zmin needs zmax too); below the active threshold one pale grey, so the collapsed cells are the
    # ones the active count leaves out, whatever scale the busiest dimension sets.
    scale = [[0.0, "#f2f2f2"], [cut, "#f2f2f2"], [cut, "#c6dbef"], [1.0, "#08306b"]]
    fig = go.Figure(go.Heatmap(x=epochs, y=labels, z=z, colorscale=scale, zmin=0, zmax=top,
                               colorbar={"title": {"text": "nats"}, "tickvals": [0, ACTIVE_THRESHOLD, top],
                                         "ticktext": ["0", f"{ACTIVE_THRESHOLD:g} (active above)", f"{top:.2g}"]},
                               hovertemplate="epoch %{x}, %{y}: %{z:.3f} nats<extra></extra>"))
    fig.update_layout(title={"text": f"KL(q(z_d|x) ‖ p(z_d)) per dimension; grey: under {ACTIVE_THRESHOLD:g} nats, "
                                     "collapsed", "font": {"size": 14}}, height=320,
                      xaxis={"title": {"text": "epoch"}}, yaxis={"title": {"text": "latent dimension"},
                                                                 "autorange": "reversed"},
                      margin={"l": 60, "r": 10, "t": 40, "b": 50})
    return fig


def active_figure(test: list[dict[str, Any]], latent_dim: int) -> go.Figure:
    rows = [(r, c) for r in test if (c := active_count(r)) is not None]
    epochs = [r["epoch"] for r, _ in rows]
    fig = go.Figure(go.Scatter(x=epochs, y=[c for _, c in rows], mode="lines+markers",
                               name=f"active units (KL > {ACTIVE_THRESHOLD:g} nats)",
                               line={"color": ELBO_COLOR, "shape": "hv"},
                               hovertemplate="epoch %{x}: %{y} active<extra></extra>"))
    fig.add_trace(go.Scatter(x=epochs, y=[r["kl"] for r, _ in rows], mode="lines+markers", name="total KL (nats)",
                             yaxis="y2", line={"color": IWAE_COLOR, "dash": "dot"},
                             hovertemplate="epoch %{x}: KL %{y:.2f} nats<extra></extra>"))
    fig.add_hline(y=latent_dim, line={"color": "grey", "dash": "dash", "width": 1},
                  annotation_text=f"all {latent_dim} dimensions", annotation_position="bottom left")
    fig.update_layout(title={"text": "Active units and total KL", "font": {"size": 14}}, height=320,
                      xaxis={"title": {"text": "epoch"}},
                      yaxis={"title": {"text": "active units"}, "range": [-0.3, latent_dim + 0.7]},
                      yaxis2={"title": {"text": "KL, nats per example"}, "overlaying": "y", "side": "right",
                              "range": [0, max([r["kl"] for r, _ in rows] + [COLLAPSE_KL_NATS]) * 1.1],
                              "showgrid": False, "tickmode": "auto"},
                      legend={"orientation": "h", "y": -0.3, "x": 0}, margin={"l": 60, "r": 60, "t": 40, "b": 50})
    return fig


def rd_figure(test: list[dict[str, Any]], train: list[dict[str, Any]], status: Status, unit: str) -> go.Figure:
    """The run's (rate, distortion) points: per epoch on the test set and the latest train rows; iso-lines
    of the ELBO and of the β-weighted objective through the latest point."""
    fig = go.Figure()
    recent = train[-RECENT_TRAIN_ROWS:]
    if test:
        fig.add_trace(go.Scatter(x=[r["kl"] for r in test], y=[-r["recon"] for r in test], mode="lines+markers",
                                 name="test, per epoch", customdata=[r["epoch"] for r in test],
                                 line={"color": ELBO_COLOR}, marker={"size": 7},
                                 hovertemplate="epoch %{customdata}: R %{x:.2f}, D %{y:.2f}<extra></extra>"))
    if recent:
        fig.add_trace(go.Scatter(x=[r["kl"] for r in recent], y=[-r["recon"] for r in recent], mode="lines+markers",
                                 name=f"train, last {len(recent)} log points", customdata=[r["step"] for r in recent],
                                 line={"color": "rgba(120,120,120,0.5)", "width": 1}, marker={"size": 4},
                                 hovertemplate="step %{customdata}: R %{x:.2f}, D %{y:.2f}<extra></extra>"))
    latest = recent[-1] if recent else test[-1]
    r0, d0 = latest["kl"], -latest["recon"]
    beta = status.beta_effective  # what the loss weights the KL by now (β after any warm-up)
    # The view follows where the run is now: the later half of the test points, the recent train points
    # and both iso-lines' ends at R = 0. Early epochs (far higher distortion) would flatten everything;
    # double-clicking the plot shows the whole trajectory.
    late = test[len(test) // 2:]
    xs = np.array([r["kl"] for r in late + recent] + [r0])
    ys = np.array([-r["recon"] for r in late + recent] + [d0, d0 + r0, d0 + beta * r0])
    x_hi = max(float(xs.max()) * 1.15, 1.0)
    y_lo, y_hi = float(ys.min()), float(ys.max())
    pad = max(0.08 * (y_hi - y_lo), 1.0)
    rr = np.linspace(0, x_hi, 50)
    fig.add_trace(go.Scatter(x=rr, y=r0 + d0 - rr, mode="lines", name=f"ELBO iso-line: R + D = {r0 + d0:.1f}",
                             line={"color": "grey", "dash": "dash"}, hoverinfo="skip"))
    same = math.isclose(beta, 1.0)
    fig.add_trace(go.Scatter(x=rr, y=d0 + beta * (r0 - rr), mode="lines", hoverinfo="skip",
                             name=f"β-objective iso-line: D + {beta:.2f}·R = {d0 + beta * r0:.1f}"
                                  + (" (= ELBO at β = 1)" if same else ""),
                             line={"color": IWAE_COLOR, "dash": "dot", "width": 3 if same else 2}))
    where = f"step {latest['step']:,}" if recent else f"epoch {latest['epoch']}"
    fig.add_trace(go.Scatter(x=[r0], y=[d0], mode="markers", name=f"now ({where}, β = {beta:.2f})",
                             marker={"symbol": "star", "size": 16, "color": IWAE_COLOR,
                                     "line": {"color": "black", "width": 1}},
                             hovertemplate="R %{x:.2f}, D %{y:.2f}<extra></extra>"))
    fig.update_layout(height=500, margin={"l": 60, "r": 10, "t": 20, "b": 50},
                      xaxis={"title": {"text": f"rate R = KL(q(z|x) ‖ p(z)), {unit}"}, "range": [0, x_hi]},
                      yaxis={"title": {"text": f"distortion D = −E[log p(x|z)], {unit}"},
                             "range": [y_lo - pad, y_hi + pad]},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.16, "x": 0})
    return fig


# ------------------------------------------------------------------ collapse and remedies

@dataclass(frozen=True)
class Remedy:
    label: str
    changes: dict[str, float]  # for lab.update
    effect: str  # what it does, with this status's numbers
    unavailable: str | None  # why it cannot apply now, or None


def remedies(status: Status) -> dict[str, Remedy]:
    """The three remedies for a run in this state. The click recomputes them, so they act on the run as it is then."""
    e, beta = status.epoch, status.beta
    w = float(math.ceil(e) + WARMUP_REMEDY_EPOCHS)
    # Warm-up scales β by min(1, epoch / w) counted from the run's start, so w = ceil(e) + 5 ramps from now.
    warm = (f"β's weight drops now to {beta * min(1.0, e / w):.2f} (β·{e:.1f}/{w:g}) and climbs back to {beta:g} "
            f"by epoch {w:g}: the code gets room to carry information before the KL pushes back.")
    if status.epochs_target < w:
        warm += f" The run ends at epoch {status.epochs_target}, before the ramp does."
    return {
        "warmup": Remedy(f"KL warm-up: ramp β over {WARMUP_REMEDY_EPOCHS} epochs", {"warmup_epochs": w}, warm,
                         f"warm-up already runs to epoch {status.warmup_epochs:g}"
                         if status.warmup_epochs >= w else None),
        "free_bits": Remedy(f"Free bits: {FREE_BITS_REMEDY:g} nats per dimension", {"free_bits": FREE_BITS_REMEDY},
                            f"Each dimension's KL counts as at least {FREE_BITS_REMEDY:g} nats in the loss, so the "
                            "optimiser gains nothing by pushing it lower (Kingma et al. 2016).",
                            f"free bits are already {status.free_bits:g}"
                            if status.free_bits >= FREE_BITS_REMEDY else None),
        "beta": Remedy("Halve β", {"beta": beta / 2}, f"β = {beta:g} → {beta / 2:g}: the KL costs half as much, so "
                       "the run moves toward higher rate and lower distortion.",
                       "β is already 0" if beta <= 0 else None),
    }


TARGETS = {"more": "this run, trained on", "fork": "a fork of this run (a new run from its checkpoint)"}


def _apply(run: RunHandle, name: str) -> None:
    """Callback: apply to the running job (the sidebar's controls follow the run's new values by themselves); on a
    run that has ended, train it on with the remedy (when this session may) or fork it with the remedy."""
    status = run.status()
    r = remedies(status)[name]
    if r.unavailable:
        st.session_state[K + "remedy_notice"] = ("warning", f"Not applied: {r.unavailable}.")
        return
    lab, sid = get_lab(), session_id()
    target = "live" if status.active else st.session_state.get(K + "remedy_target", "fork")
    try:
        if target == "live":
            lab.update(run.name, owner=sid, **r.changes)
            done = "Applied from the next step"
        elif target == "more":
            lab.resume(run.name, owner=sid, live=r.changes)
            done = f"Training {run.name} on from its checkpoint with"
        else:
            child = lab.fork(run.name, owner=sid, **r.changes)
            lab.show(sid, child.name)  # the page follows the fork, as the Runs tab's Fork does
            done = f"Forked as {child.name} from step {status.step:,} with"
    except (*UserError, RuntimeError) as e:
        st.session_state[K + "remedy_notice"] = ("error", f"Not applied: {md_text(e)}")
        return
    st.session_state[K + "remedy_notice"] = ("success", done + ": " + ", ".join(
        f"{LABELS[f]} = {v:g}" for f, v in r.changes.items()) + ". " + r.effect)


def collapse_warning(run: RunHandle, test: list[dict[str, Any]], train: list[dict[str, Any]]) -> None:
    d = run.config.model.latent_dim
    signs = collapse_signs(test, train, d)
    if signs:
        st.warning("**Posterior collapse?** " + "; ".join(signs) + ". The remedies below act on the run.")
    elif test:
        active = active_count(test[-1])
        unused = (f"; {d - active} of {d} dimensions are unused (grey in the heatmap), fewer than half"
                  if active is not None and active < d else "")
        st.caption(f"No sign of posterior collapse: total KL {test[-1]['kl']:.2f} nats (warning below "
                   f"{COLLAPSE_KL_NATS:g}), {active} of {d} dimensions active{unused}, and the count has not "
                   "fallen. The remedies act anyway, if you want to see what they do.")


def remedy_buttons(run: RunHandle) -> None:
    status = run.status()
    steer = can_steer(get_lab(), run)
    ended = not status.active
    if ended:
        options = ["more", "fork"] if steer else ["fork"]
        if st.session_state.get(K + "remedy_target") not in options:
            st.session_state[K + "remedy_target"] = options[0]
        st.radio(f"This run is {status.state}: apply a remedy to", options, format_func=TARGETS.get,
                 key=K + "remedy_target", horizontal=True,
                 help="Train on: the run continues from its checkpoint (a stopped run to its planned epochs, a "
                      "finished one for its configured number of epochs more). Fork: a new run starts from this "
                      "one's checkpoint, and this one stays as it is.")
    cols = st.columns(3)
    for col, (name, r) in zip(cols, remedies(status).items()):
        col.button(r.label, key=K + "remedy_" + name, on_click=_apply, args=(run, name),
                   disabled=(status.active and not steer) or r.unavailable is not None, width="stretch",
                   help=r.effect + (f" Not now: {r.unavailable}." if r.unavailable else ""))
    if ended and not steer:
        st.caption("This run belongs to another session: only its owner trains it on, but a fork is yours.")
    elif status.active and not steer:
        st.caption("The remedies change a running job, and this one belongs to another session: you can watch it "
                   "here, or fork it (Runs tab) to try them on your own copy.")
    notice = st.session_state.pop(K + "remedy_notice", None)
    if notice:
        getattr(st, notice[0])(notice[1])
