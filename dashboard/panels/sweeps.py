"""The Sweeps tab: launch a β × latent-size grid from the sidebar's settings and watch what it finds.

A sweep trains in its own `python -m vae_core sweep` process (lab.start_sweep), each run in its
own train process, so the page only reads: lab.sweep_status (small files) once a second while the
sweep runs. The β × latent-size maps of final test ELBO, IWAE bound, KL and active units show where
posterior collapse sets in; the buttons laid out like the map open a cell's run (Plotly heatmaps emit
no selections); the rate–distortion plane is the Compare chart's (compare.rd_figure) for the sweep's
runs. Only UI choices live in st.session_state.
"""
from __future__ import annotations

import datetime as dt
import math
from typing import Any

import plotly.graph_objects as go
import streamlit as st

from dashboard.common import md_text
from dashboard.panels import compare
from dashboard.settings import BETAS, DEFAULTS, PREFIX, config_from_values
from dashboard.state import session_id
from vae_core.lab import UI_LIMITS, Lab, RunBusy, UserError

K = "sweeps_"
TITLE = "Sweeps"
LATENTS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_BETAS = (0.25, 1.0, 4.0)
DEFAULT_LATENTS = (2, 8, 32)
# What a map can show: (label, PointStatus field, number format). Nats per example, as every number here.
MAPS = {"Test ELBO": ("test_elbo", ".1f"), "IWAE bound": ("iwae", ".1f"), "KL": ("kl", ".2f"),
        "Active units": ("active_units", "d")}
STATE_WORDS = {"running": "running", "finished": "finished", "failed": "failed (some runs)",
               "cancelled": "cancelled", "interrupted": "interrupted"}
MISSING = "–"


# ------------------------------------------------------------------ data for the map (pure, tested)

def cell_values(status: Any, field: str) -> tuple[list[list[float | None]], list[list[str]]]:
    """(values, texts): rows by latent size (as status.latent_dims), columns by β; the mean over seeds of
    the runs that have the number (None and MISSING where none has it yet)."""
    z, text = [], []
    for d in status.latent_dims:
        row_z, row_t = [], []
        for b in status.betas:
            vals = [getattr(p, field) for p in status.points
                    if p.beta == b and p.latent_dim == d and isinstance(getattr(p, field), (int, float))
                    and math.isfinite(getattr(p, field))]
            v = sum(vals) / len(vals) if vals else None
            row_z.append(v)
            row_t.append(MISSING if v is None else
                         (f"{round(v, 1):g} / {d}" if field == "active_units" else f"{v:.2f}"))
        z.append(row_z)
        text.append(row_t)
    return z, text


def cell_run(status: Any, beta: float, latent_dim: int) -> str | None:
    """The run a map cell opens: its first seed's run, once that run exists."""
    for p in status.points:
        if p.beta == beta and p.latent_dim == latent_dim and p.state != "pending":
            return p.name
    return None


def map_figure(status: Any, label: str) -> go.Figure:
    field, _ = MAPS[label]
    z, text = cell_values(status, field)
    scale = "Viridis" if field != "kl" else "Magma"
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"β={b:g}" for b in status.betas], y=[f"D={d}" for d in status.latent_dims], text=text,
        texttemplate="%{text}", colorscale=scale, hoverongaps=False, colorbar={"title": {"text": label}},
        hovertemplate="%{x}, %{y}: %{text}<extra></extra>"))
    fig.update_layout(height=120 + 60 * len(status.latent_dims), margin={"l": 60, "r": 10, "t": 10, "b": 40},
                      xaxis={"type": "category", "title": {"text": "β (KL weight)"}},
                      yaxis={"type": "category", "title": {"text": "latent size"}})
    return fig


def points_table(status: Any) -> list[dict[str, Any]]:
    def num(v: Any, fmt: str) -> str:
        return MISSING if v is None else format(v, fmt)

    return [{"Run": p.name, "β": f"{p.beta:g}", "D": p.latent_dim, "Seed": p.seed, "State": p.state,
             "Epochs": f"{p.epochs_done} / {p.epochs_planned}" if p.epochs_planned else MISSING,
             "Test ELBO": num(p.test_elbo, ".2f"), "KL": num(p.kl, ".2f"),
             "Active units": MISSING if p.active_units is None else f"{p.active_units} / {p.latent_dim}",
             "IWAE bound": MISSING if p.iwae is None else f"{p.iwae:.2f} (k={p.iwae_k})"}
            for p in status.points]


# ------------------------------------------------------------------ actions (callbacks)

def _notice(kind: str, text: str) -> None:
    st.session_state[K + "notice"] = (kind, text)


def _sidebar_values() -> dict[str, Any]:
    """The sidebar's settings as they stand (the controls' own keys: one writer, read here)."""
    return {k: st.session_state.get(PREFIX + k, d) for k, d in DEFAULTS.items()}


def _on_launch(lab: Lab) -> None:
    betas = st.session_state.get(K + "betas") or []
    latents = st.session_state.get(K + "latents") or []
    try:
        base = config_from_values(_sidebar_values())
        sid = lab.start_sweep(base, betas=sorted(betas), latent_dims=sorted(latents),
                              seeds=int(st.session_state.get(K + "seeds") or 1), owner=session_id())
    except UserError as e:
        _notice("error", f"Could not start the sweep: {md_text(e)}")
        return
    st.session_state[K + "pick"] = sid
    _notice("success", f"Started sweep **{md_text(sid)}**: {len(betas) * len(latents)} grid points. Its runs "
                       "appear below as they start.")


def _on_cancel(lab: Lab, sid: str) -> None:
    try:
        lab.cancel_sweep(sid, owner=session_id())
    except RunBusy:
        _notice("error", "This sweep belongs to another session: only it can cancel it.")
        return
    except UserError as e:
        _notice("error", f"Could not cancel: {md_text(e)}")
        return
    _notice("info", f"Cancelling **{md_text(sid)}**: its runs stop at their next step and checkpoint; "
                    f"`python -m vae_core sweep --resume {sid}` finishes it later.")


def _on_open(lab: Lab, name: str) -> None:
    lab.show(session_id(), name)  # the sidebar follows the shown run by itself (controls.reconcile)
    _notice("success", f"Opened **{md_text(name)}**: the Training, Explore and Evidence tabs show it.")


# ------------------------------------------------------------------ drawing

def render(lab: Lab) -> None:
    """The Sweeps tab."""
    st.markdown("A **sweep** trains one run per point of a β × latent-size grid, with the sidebar's other "
                "settings, and maps what each found: where the KL falls to zero and latent units go unused, the "
                "posterior has collapsed. The same as `python -m vae_core sweep --beta … --latent-dim …`.")
    message = st.session_state.pop(K + "notice", None)
    if message:
        getattr(st, message[0])(message[1])
    sweeps = lab.list_sweeps()
    _launch(lab, first=not sweeps)
    if not sweeps:
        st.info("No sweeps yet: choose a grid above and press **Start sweep**.")
        return
    ids = [s.id for s in sweeps]
    if st.session_state.get(K + "pick") not in ids:
        st.session_state[K + "pick"] = ids[0]
    sid = st.selectbox("Sweep", ids, key=K + "pick", format_func=lambda i: _label(sweeps[ids.index(i)]))
    status = sweeps[ids.index(sid)]
    c1, c2 = st.columns([3, 1])
    label = c1.segmented_control("Map", list(MAPS), default="Test ELBO", key=K + "map", required=True)
    if status.state == "running":
        c2.button("Cancel sweep", key=K + "cancel", on_click=_on_cancel, args=(lab, sid), width="stretch",
                  icon=":material/stop:", help="Stop its runs (each checkpoints); runs not started yet never start")
    _live(lab, sid, label or "Test ELBO", status.state == "running")
    _open_buttons(lab, status)


def _label(s: Any) -> str:
    when = dt.datetime.fromtimestamp(s.created).strftime("%Y-%m-%d %H:%M") if s.created else "?"
    return (f"{s.id} · {len(s.betas)} β × {len(s.latent_dims)} D" + (f" × {len(s.seeds)} seeds" if len(s.seeds) > 1
                                                                    else "")
            + f" · {STATE_WORDS.get(s.state, s.state)} · {when}")


def _launch(lab: Lab, *, first: bool) -> None:
    with st.expander("Start a sweep", expanded=first):
        lo, hi = UI_LIMITS["beta"]
        betas = sorted(set(BETAS) | set(DEFAULT_BETAS))
        c1, c2, c3 = st.columns([3, 3, 1])
        c1.multiselect("β values", [b for b in betas if lo <= b <= hi], default=list(DEFAULT_BETAS), key=K + "betas",
                       format_func=lambda b: f"{b:g}")
        c2.multiselect("Latent sizes D", [d for d in LATENTS if UI_LIMITS["latent_dim"][0] <= d
                                          <= UI_LIMITS["latent_dim"][1]],
                       default=list(DEFAULT_LATENTS), key=K + "latents")
        c3.number_input("Seeds", min_value=1, max_value=5, value=1, step=1, key=K + "seeds")
        v = _sidebar_values()
        n = len(st.session_state.get(K + "betas") or []) * len(st.session_state.get(K + "latents") or []) * \
            int(st.session_state.get(K + "seeds") or 1)
        st.caption(f"{n} runs, each with the sidebar's other settings ({md_text(v['dataset'])}, {md_text(v['arch'])}, "
                   f"{v['epochs']} epochs, batch {v['batch_size']}). They train in separate processes on this "
                   "server, as many at once as it has cores; the command line's `--executor ray` spreads a sweep "
                   "over a Ray cluster.")
        st.button("Start sweep", key=K + "start", on_click=_on_launch, args=(lab,), type="primary",
                  disabled=n == 0, icon=":material/grid_view:")


def _live(lab: Lab, sid: str, label: str, running: bool) -> None:
    @st.fragment(run_every=1.0 if running else None)
    def live() -> None:
        try:
            status = lab.sweep_status(sid)
        except UserError as e:
            st.error(f"This sweep cannot be read: {md_text(e)}")
            return
        n = len(status.points)
        st.progress(status.count("finished") / max(1, n),
                    text=f"{status.count('finished')} of {n} runs finished · "
                         f"{status.count('running', 'starting')} training · {status.count('pending', 'queued')} "
                         f"waiting · {STATE_WORDS.get(status.state, status.state)}"
                         + (f": {status.message}" if status.message and status.state != "running" else ""))
        if status.state in ("cancelled", "interrupted", "failed"):
            st.caption(f"Finish its missing runs with `python -m vae_core sweep --resume {status.id}`.")
        st.plotly_chart(map_figure(status, label), key=K + "heatmap", config={"displaylogo": False})
        st.caption(f"{label} after each run's last epoch, nats per example (mean over seeds); {MISSING}: not "
                   "measured yet" + (" or never (the IWAE bound needs 'log p(x) estimate every N epochs')"
                                     if label == "IWAE bound" else "") + ".")
        data = []
        for p in status.points:
            if p.test_elbo is not None:
                try:
                    data.append(compare.load(lab, p.name))
                except UserError:
                    continue
        if data:
            st.markdown("##### Rate–distortion plane")
            st.plotly_chart(compare.rd_figure(data), key=K + "rd", config={"displaylogo": False})
            st.caption("Each run's path over its epochs; ★ its last, labelled with β. −ELBO = rate + distortion.")
        st.dataframe(points_table(status), hide_index=True, key=K + "table")
        if running and status.state != "running":
            st.rerun()  # the sweep ended: one full rerun redraws the tab without polling
    live()


def _open_buttons(lab: Lab, status: Any) -> None:
    st.markdown("##### Open a run")
    st.caption("Laid out like the map: a button opens that cell's run (its first seed) in the other tabs.")
    for d in status.latent_dims:
        cols = st.columns(len(status.betas))
        for col, b in zip(cols, status.betas):
            name = cell_run(status, b, d)
            col.button(f"β={b:g} · D={d}", key=f"{K}open_{b:g}_{d}", on_click=_on_open, args=(lab, name or ""),
                       disabled=name is None, width="stretch",
                       help=md_text(name) if name else "not started yet")
