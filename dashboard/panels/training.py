"""The live training panel: status and progress, ELBO / reconstruction / KL curves, reconstructions.

One `st.fragment` per tab polls about once a second while a run is active and not at all
otherwise: on the Training tab it draws the whole live panel (one component, dashboard/live_panel,
fed the plain values built here), on the other tabs the status line only. It only reads the
run's published snapshot (status, metric rows, uint8 images) and draws, so a refresh costs a
few milliseconds of server time; when the run's state changes it triggers one full rerun so the
sidebar and the polling interval catch up.
"""
from __future__ import annotations

import collections
import math
import time
from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from dashboard.common import app_rerun, beta_effective, beta_set, downsample, poll_interval, smooth, units, viewer_id
from dashboard.common import display_scale, md_text
from dashboard.live_panel import live_panel, log_scale
from dashboard.state import current_run, current_token, get_viewers
from vae_core.images import png_bytes, tile, upscale
from vae_core.lab import Lab, RunConfig, RunHandle, Status

QUEUE_WATCH_S = 1.0  # a waiting page's watch reruns this often, and blocks in the Lab meanwhile until its run's
QUEUE_WAIT_S = 0.9  # place changes, so it shows its run starting as the scheduler launches it, not a poll later.
# A blocked thread costs no CPU; the session's widgets answer meanwhile (Streamlit's fast reruns start a new
# script thread), and a watch tick that arrives while the watch blocks waits its turn.
FLIP_HOLD_S = 0.5  # the line that says a waiting run started is sent to the browser before the page reruns
FIRST_POINT_POLL = 0.25  # seconds between looks while a new run has no metrics yet
# A refresh keeps a server thread, then the browser, busy for ~0.1-0.2 s; meanwhile the trainer trains
# on one thread instead of stalling its two lockstep threads whenever one loses its core
# (Trainer.make_room). Measured in 4 alternating pairs: +12% samples/s with 0.15 s vs none.
ROOM_S = 0.15
PANEL_KEY = "live_panel"  # the component's key; its value holds the Log scale switch
TRAIN_COLOR, TEST_COLOR, BETA_COLOR = "#4c78a8", "#e45756", "#54a24b"
CHANGE_COLOR = "rgba(136, 140, 150, 0.9)"  # the markers of live setting changes: a grey seen on light and dark
# The live settings each train row records, with the short name a change marker shows.
LIVE_SETTINGS = (("beta", "β"), ("lr", "lr"), ("free_bits", "free bits"))


# ------------------------------------------------------------------ the one polling fragment of a tab

def live(lab: Lab, panel: bool = False) -> None:
    """The status line (and, with `panel`, the Training tab's whole live panel) in one polling fragment.

    One fragment per tab, not one per section: each fragment run has a fixed cost on the server
    and in the browser. It polls every poll_interval while this session's run is active or queued,
    less often when more sessions watch than the refresh budget allows, and not at all when idle.
    When the run's state, the shown run or the polling interval changes it triggers one full
    rerun, so the sidebar buttons and the interval catch up. The panel is drawn before any run
    too, at the same place, so pressing Train updates the chart that is there instead of loading
    a new one.
    """
    run = current_run(lab)
    seen_token = current_token(lab)
    seen_state = run.status().state if run is not None else None
    viewers = get_viewers()
    viewer = viewer_id()
    base = poll_interval(seen_state)
    # Watchers of a training run share a refresh budget (their redraws cost the machine). A queued
    # page draws only its status line, and must show its run starting within a second or two: with
    # 20 waiting pages the shared budget had stretched their refreshes to 13 s (bench_class.py).
    budgeted = seen_state in ("running", "paused")
    interval = viewers.interval(base, viewer) if budgeted else base
    # Until a new run's first metrics arrive, look 4x as often, so the first point shows up to 0.75 s
    # sooner (measured: click to first point in the browser ~0.6 s on sprites, CPU).
    first_point = panel and seen_state == "running" and run.metrics_count() == 0
    run_every = FIRST_POINT_POLL if first_point else interval

    # A queued page draws its panel once and then only watches, with a fragment that draws nothing, for its
    # run to start: 20 waiting pages redrawing a whole panel every second kept a 2-core machine busy enough
    # that they showed their run starting 4-9 s late (bench_class.py).
    queued = seen_state == "queued"

    @st.fragment(run_every=None if queued else run_every)
    def fragment() -> None:
        t0 = time.perf_counter()
        r = current_run(lab)
        s = r.status() if r is not None else None
        if current_token(lab) != seen_token or (s.state if s else None) != seen_state:
            app_rerun()  # the run ended, paused, started from the queue or another run is shown
        if interval is not None and budgeted:
            viewers.seen(viewer, interval)
            if viewers.interval(base, viewer) != interval:
                app_rerun()  # a session came or went: share the refresh budget anew
        if s is not None and s.state == "running":
            r.make_room(ROOM_S)
        if not panel:
            if r is not None and not queued:  # a waiting run's line is the watch fragment's
                status_line(status_view(r, s))
            return
        view, rows = panel_view(r, s, log_scale(PANEL_KEY))
        if queued:
            view["status"] = None  # the watch fragment above shows the waiting line, and its end
        if first_point and rows:
            app_rerun()  # back to the normal interval
        ms = (time.perf_counter() - t0) * 1000
        shared = (f" ({viewers.count()} sessions are watching; together they refresh about "
                  f"{viewers.budget:g} times a second, so training keeps its speed)"
                  if interval and base and interval > base else "")
        footer = ((f"Refreshes every {interval:g} s while the run is active{shared}; " if interval else "")
                  + f"this view took {ms:.0f} ms on the server.") if r is not None else ""
        live_panel(key=PANEL_KEY, footer=footer, **view)

    if queued:
        # The waiting line is the watch fragment's own element, above the panel (which shows no status while its
        # run waits). When the run leaves the queue the watch turns that line into the run's new state and ends;
        # a later tick reruns the page, which draws the live panel. Rerunning the page at once lost the new line:
        # a new script run drops the messages not yet sent to the browser, so with 20 pages on a 2-core server,
        # pages kept showing "Waiting" until the full rerun reached them, 1-5 s later (bench_class.py). A tick
        # that waited its turn behind the flip would do the same, hence the FLIP_HOLD_S before that rerun.
        drawn, flipped = [False], [0.0]  # the page's own run draws the line at once; the watch's reruns wait first

        @st.fragment(run_every=QUEUE_WATCH_S)
        def watch() -> None:
            # The line is one element, replaced in place as the place changes (a placeholder from st.empty would
            # send an empty element first: a blink in every waiting page at every tick).
            line, shown = [None], [None]

            def draw(view: dict[str, Any]) -> None:
                if (view["kind"], view["text"]) != shown[0]:
                    shown[0] = (view["kind"], view["text"])
                    line[0] = getattr(line[0] if line[0] is not None else st, view["kind"])(view["text"])

            r = current_run(lab)
            same_run = current_token(lab) == seen_token
            s = r.status() if r is not None else None
            if r is not None and s is not None:
                draw(status_view(r, s))
            if drawn[0] and not flipped[0] and r is not None and s is not None and same_run:
                # Every run that starts moves every waiting run up: the new place is drawn in this same fragment
                # run, which goes on waiting (ending it would leave the page deaf until the next tick).
                end = time.monotonic() + QUEUE_WAIT_S
                while s.state == seen_state and s.queue_position is not None and (left := end - time.monotonic()) > 0:
                    r.wait_queue_moves(left, s.queue_position)
                    s = r.status()
                    draw(status_view(r, s))
            drawn[0] = True
            if not same_run or s is None or (flipped[0] and time.monotonic() - flipped[0] >= FLIP_HOLD_S):
                app_rerun()  # another run is shown, or the line has shown the run's new state: draw its panel
            if s.state != seen_state and not flipped[0]:
                flipped[0] = time.monotonic()

        watch()
    fragment()


def render_status(lab: Lab) -> None:
    """The status line at the top of a tab other than Training (which shows it in its live panel)."""
    live(lab)


def status_view(run: RunHandle, s: Status) -> dict[str, Any]:
    """What the status line says: a progress bar (or None) with its text, and a message of a kind."""
    name, message = (f"**{md_text(run.name)}** · " if run.name else ""), md_text(s.message)
    elsewhere = " (trained by another process; read from its run directory)" if s.followed and s.active else ""
    total = total_steps(s)
    bar = {"progress": min(1.0, s.step / total) if total else 0.0, "progress_text": progress_text(s)}
    if s.state == "running":
        return {**bar, "kind": "caption", "text": f"{name}▶ {message}{elsewhere}"}
    if s.state == "paused":
        return {**bar, "kind": "warning", "text": f"{name}Paused at step {s.step:,}{elsewhere}. **Resume** continues, "
                                                  "**Step** does one optimisation step."}
    if s.state == "queued":
        place = f": place {s.queue_position} in the queue" if s.queue_position else " in the queue"
        return {"progress": None, "kind": "info",
                "text": f"{name}Queued. Waiting for a free slot{place} (other runs are training on this server). "
                        "It starts by itself as soon as one ends."}
    if s.state == "finished":
        return {**bar, "progress": 1.0, "kind": "success", "text": f"{name}Finished: {message}."}
    if s.state == "stopped":
        return {**bar, "kind": "info",
                "text": f"{name}Stopped: {message}. **Resume** continues from the last checkpoint."}
    if s.state == "interrupted":
        return {**bar, "kind": "warning",
                "text": f"{name}Interrupted: the process that trained it ended ({message}). **Resume** continues "
                        "from the last checkpoint."}
    if s.state == "failed":
        return {"progress": None, "kind": "error", "text": f"{name}Training failed: {message}"}
    return {"progress": None, "kind": "caption", "text": f"{name}{message}"}


def status_line(view: dict[str, Any]) -> None:
    """The status line as Streamlit elements, on the tabs other than Training."""
    if view["progress"] is not None:
        st.progress(view["progress"], text=md_text(view["progress_text"]))
    getattr(st, view["kind"])(view["text"])


def total_steps(s: Status) -> int | None:
    """The run's planned steps, or None when unknown.

    A run opened here but not yet restarted does not know its steps per epoch (Status then
    says epochs_target steps in all): trust the total only when it agrees with step / epoch.
    """
    if s.epoch > 0 and s.step > 0:
        per_epoch = s.step / s.epoch
        if not s.total_steps or abs(s.total_steps - per_epoch * s.epochs_target) > per_epoch:
            return round(per_epoch * s.epochs_target)
        return s.total_steps
    return s.total_steps if s.total_steps >= s.step and s.total_steps > s.epochs_target else None


def progress_text(s: Status) -> str:
    total = total_steps(s)
    parts = [f"epoch {s.epoch:.2f} / {s.epochs_target}",
             f"step {s.step:,} / {total:,}" if total else f"step {s.step:,}"]
    if s.samples_per_s > 0:
        parts.append(f"{s.samples_per_s:,.0f} samples/s")
    if s.eta_s is not None:
        parts.append(f"ETA {format_duration(s.eta_s)}")
    parts.append(s.device)
    return " · ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# ------------------------------------------------------------------ curves and reconstructions (Training tab)

def render(lab: Lab) -> None:
    """The Training tab: explanation, then the live panel (status, test metrics, curves, reconstructions)."""
    st.markdown(
        "The VAE maximises the **ELBO** = E<sub>q(z|x)</sub>[log p(x|z)] − KL(q(z|x) ‖ p(z)), a lower bound on "
        "the log-likelihood: **ELBO ≤ log p(x)**, with equality only when q(z|x) is the true posterior. "
        "The first term (reconstruction) rewards decoding x back from its code; the KL keeps the codes close to "
        "the prior N(0, I). With β ≠ 1 the loss weights the KL by β, and the objective is no longer the ELBO.",
        unsafe_allow_html=True)
    live(lab, panel=True)


def panel_view(t: RunHandle | None, s: Status | None, log_y: bool) -> tuple[dict[str, Any], int]:
    """Everything the live panel shows, as live_panel's arguments, and how many metric rows the run has."""
    if t is None:  # empty axes show what will be plotted, and the browser has plotly.js before the first point
        return {"fig": curves_figure([], [], RunConfig()),
                "notice": "No run yet. Choose settings in the sidebar and press **Train** (the shapes show within "
                          "a minute on a CPU), or open a ready-made example in the **Runs** tab. The curves will "
                          "appear here."}, 0
    rows = t.metrics()
    train = [r for r in rows if r.get("split") == "train"]
    test = [r for r in rows if r.get("split") == "test"]
    recon, png = reconstructions_view(t)
    notice = ("" if train or test else "Its curves appear here once it starts." if s is not None and s.state == "queued"
              else "Waiting for the first metrics (loading data and building the model)…")
    config = t.config
    return {"status": status_view(t, s), "metrics": metrics_view(test, config), "notice": notice,
            "fig": curves_figure(train, test, config, log_y=log_y, revision=t.name), "log_y": log_y,
            "caveat": units(config)[1], "recon": recon, "png": png}, len(rows)


def metrics_view(test: list[dict[str, Any]], config: RunConfig) -> list[dict[str, Any]]:
    """The test metrics after the last epoch, each with its change since the epoch before."""
    if not test:
        return []
    last, prev = test[-1], test[-2] if len(test) > 1 else None

    def card(label: str, key: str | None, value: str, help: str = "", delta_color: str = "normal") -> dict[str, Any]:
        delta = None if prev is None or key is None else f"{last[key] - prev[key]:+.2f}"
        return {"label": label, "value": value, "delta": delta, "delta_color": delta_color, "help": help}

    bce = not config.binarized and config.model.likelihood == "bernoulli"
    return [
        card("Test −BCE − KL (not a bound)" if bce else "Test ELBO (nats)", "elbo", f"{last['elbo']:.2f}",
             help=f"Mean over the test set after epoch {last['epoch']}; higher is better. {units(config)[1]}".strip()),
        card("Reconstruction −BCE" if bce else "Reconstruction E[log p(x|z)]", "recon", f"{last['recon']:.2f}"),
        card("KL(q(z|x) ‖ p(z))", "kl", f"{last['kl']:.2f}", delta_color="off"),
        card("Active latent units", None, f"{last.get('active_units', '–')} / {config.model.latent_dim}",
             help="Dimensions whose code mean varies across test images (variance > 0.01); "
                  "the others have collapsed to the prior"),
    ]


def curves_figure(train: list[dict[str, Any]], test: list[dict[str, Any]], config: RunConfig, *,
                  log_y: bool = False, revision: str = "") -> go.Figure:
    """Three panels sharing the step axis: ELBO, reconstruction term, KL (and β·KL); train and test.

    `revision` names the run: Plotly keeps a person's zoom across refreshes of one run (uirevision),
    and a new run starts with fresh axes.

    Built as a plain Plotly spec and wrapped without validation: plotly's validating constructors
    took ~16 ms of server time per refresh for this figure, holding the GIL while the trainer
    waited at every torch call; the spec takes ~3 ms, mostly smoothing. tests/test_app.py renders it through Plotly's
    validator to keep it honest.
    """
    unit = units(config)[0]
    sign = -1.0 if log_y else 1.0  # a log axis needs the positive losses
    if not config.binarized and config.model.likelihood == "bernoulli":
        titles = ("BCE + KL (loss)" if log_y else "−BCE − KL (higher is better)",
                  "BCE (reconstruction loss)" if log_y else "Reconstruction term −BCE")
    else:
        titles = ("−ELBO (loss)" if log_y else "ELBO (higher is better)",
                  "−E[log p(x|z)] (loss)" if log_y else "Reconstruction E[log p(x|z)]")
    titles += ("KL(q‖p) and β·KL",)  # short: three titles share one row of a narrow chart
    traces: list[dict[str, Any]] = []
    steps = np.array([r["step"] for r in train], dtype=float)
    keep = downsample(len(train))
    if train:  # drawn first and wider, so it shows around the KL line it equals when β = 1
        y = smooth([beta_effective(r) * r["kl"] for r in train])[keep]
        traces.append(_line(steps[keep], y, "β·KL (as weighted in the loss)", BETA_COLOR, 3, log_y, show=True,
                            dash="dot", width=3.5, rank=3))
    for i, key in enumerate(("elbo", "recon", "kl"), start=1):
        s = 1.0 if key == "kl" else sign
        if train:
            y = smooth([s * r[key] for r in train])[keep]
            traces.append(_line(steps[keep], y, "train (smoothed)", TRAIN_COLOR, i, log_y, show=i == 1))
        if test:
            kept = [test[j] for j in downsample(len(test))]
            traces.append(_line([r["step"] for r in kept], [s * r[key] for r in kept], "test (per epoch)", TEST_COLOR,
                                i, log_y, show=i == 1, markers=True))
    for i in (1, 2, 3) if not traces else ():  # Plotly leaves out the axes of a panel without traces
        suffix = "" if i == 1 else str(i)
        traces.append({"type": "scatter", "x": [], "y": [], "xaxis": f"x{suffix}", "yaxis": f"y{suffix}",
                       "showlegend": False, "hoverinfo": "skip"})
    gap = 0.06
    width = (1 - 2 * gap) / 3
    layout: dict[str, Any] = {}
    for i in range(3):
        suffix = "" if i == 0 else str(i + 1)
        # ticklabeloverflow "allow" and fixed margins (autoexpand off, below) spare Plotly's re-measuring
        # of labels and margins on every refresh: ~30% of the browser's redraw time, profiled in Chromium.
        layout[f"xaxis{suffix}"] = {"domain": [i * (width + gap), i * (width + gap) + width], "anchor": f"y{suffix}",
                                    "title": {"text": "training step"}, "ticklabeloverflow": "allow"}
        layout[f"yaxis{suffix}"] = {"anchor": f"x{suffix}", "type": "log" if log_y else "linear",
                                    "title": {"text": unit}, "ticklabeloverflow": "allow"}
        # Autorange is always said outright. Left unsaid, Plotly.react treats its own earlier autorange
        # (the empty axes' [-1, 4]) as if the person had set it, and after a robust range had turned
        # autorange off, the next curves stayed on [-1, 4] until the robust range returned at 20 rows.
        if not log_y and len(train) >= 20:
            layout[f"yaxis{suffix}"].update(range=_robust_range(traces, i + 1), autorange=False)
        else:
            layout[f"yaxis{suffix}"]["autorange"] = True
    marks = change_marks(setting_changes(train), float(train[-1]["step"]) if train else 0.0)
    layout.update(
        annotations=[{"text": f"<b>{t}</b>", "x": i * (width + gap) + width / 2, "y": 1.0, "xref": "paper",
                      "yref": "paper", "xanchor": "center", "yanchor": "bottom", "showarrow": False}
                     for i, t in enumerate(titles)] + marks["annotations"],
        shapes=marks["shapes"],
        height=350, margin={"l": 70, "r": 10, "t": 40, "b": 80, "autoexpand": False},
        legend={"orientation": "h", "y": -0.24, "yanchor": "top", "x": 1, "xanchor": "right"},
        hovermode="x unified", uirevision=f"curves {revision}")
    return go.Figure({"data": traces, "layout": layout}, _validate=False)


def setting_changes(train: list[dict[str, Any]]) -> list[tuple[float, dict[str, tuple[float, float]]]]:
    """Where a live setting changed during the run, read off the train rows: [(step, {name: (old, new)})].

    Each row records the settings in force when it was logged, so a change shows at the first row
    that has the new value (within one log interval of the moment it was made). Rows without a
    setting (older runs) are skipped for it.
    """
    out: list[tuple[float, dict[str, tuple[float, float]]]] = []
    before: dict[str, float] = {}
    for r in train:
        changed = {}
        for key, name in LIVE_SETTINGS:
            v = beta_set(r) if key == "beta" else r.get(key)  # older rows' 'beta' was the warm-up's weight
            if not isinstance(v, (int, float)):
                continue
            old = before.get(key)
            if old is not None and not math.isclose(v, old, rel_tol=1e-9, abs_tol=1e-12):
                changed[name] = (old, float(v))
            before[key] = float(v)
        if changed:
            out.append((float(r["step"]), changed))
    return out


def change_marks(changes: list[tuple[float, dict[str, tuple[float, float]]]],
                 span: float) -> dict[str, list[dict[str, Any]]]:
    """A dotted vertical line per change on each of the three panels, and short labels on the ELBO panel.

    Changes closer than 1/15 of `span` (the steps drawn) share one label (first value → last), so a slider
    moved with a few key presses reads "β 1→4" instead of four labels on top of each other.
    """
    shapes: list[dict[str, Any]] = []
    groups: list[tuple[float, dict[str, tuple[float, float]]]] = []
    for step, changed in changes:
        for i in range(3):
            suffix = "" if i == 0 else str(i + 1)
            shapes.append({"type": "line", "xref": f"x{suffix}", "yref": f"y{suffix} domain", "x0": step, "x1": step,
                           "y0": 0, "y1": 1, "line": {"color": CHANGE_COLOR, "width": 1.5, "dash": "dot"},
                           "layer": "below", "name": "setting change"})
        if groups and step - groups[-1][0] < span / 15:
            merged = groups[-1][1]
            for name, (old, new) in changed.items():
                merged[name] = (merged[name][0] if name in merged else old, new)
        else:
            groups.append((step, dict(changed)))
    annotations = []
    for step, changed in groups:
        label = ", ".join(f"{name} {old:g}→{new:g}" for name, (old, new) in changed.items())
        side = "right" if step > 0.6 * span else "left"  # the label stays inside the ELBO panel
        annotations.append({"text": label, "x": step, "y": 0.98, "xref": "x", "yref": "y domain", "xanchor": side,
                            "yanchor": "top", "showarrow": False, "font": {"size": 11}, "name": "setting change",
                            "bgcolor": "rgba(136, 140, 150, 0.18)", "borderpad": 2,
                            "hovertext": f"changed live at step {step:,.0f}: {label}"})
    return {"shapes": shapes, "annotations": annotations}


def _robust_range(traces: list[dict[str, Any]], panel: int) -> list[float]:
    """A y-range that ignores the first tenth of the train curve, whose early values would flatten the rest.

    Double-clicking the plot still shows everything.
    """
    axis = "y" if panel == 1 else f"y{panel}"
    ys = []
    for trace in traces:
        if trace["yaxis"] != axis or not len(trace["y"]):
            continue
        y = np.asarray(trace["y"], dtype=float)
        ys.append(y[len(y) // 10:] if trace["mode"] == "lines" else y[1:] if len(y) > 1 else y)
    y = np.concatenate(ys) if ys else np.zeros(1)
    y = y[np.isfinite(y)]
    lo, hi = (float(y.min()), float(y.max())) if len(y) else (0.0, 1.0)
    pad = 0.08 * (hi - lo) if hi > lo else 1.0
    return [lo - pad, hi + pad]


def _line(x, y, name: str, color: str, panel: int, log_y: bool, *, show: bool, markers: bool = False,
          dash: str | None = None, width: float | None = None, rank: int = 1) -> dict[str, Any]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if log_y:  # points a log axis cannot show (a positive log-density) are left out, not clipped
        ok = y > 0
        x, y = x[ok], y[ok]
    suffix = "" if panel == 1 else str(panel)
    markers = markers or len(x) < 3  # a line through one point draws nothing
    line = {"color": color, "width": width or (2 if markers else 1.5)}
    if dash:
        line["dash"] = dash
    return {"type": "scatter", "x": x, "y": y, "name": name, "legendgroup": name, "showlegend": show,
            "legendrank": rank, "mode": "lines+markers" if markers else "lines", "line": line, "marker": {"size": 6},
            "xaxis": f"x{suffix}", "yaxis": f"y{suffix}", "hovertemplate": "%{y:.2f}"}


def reconstructions_view(run: RunHandle) -> tuple[dict[str, Any], bytes | None]:
    """The reconstructions' caption (and the weights' step) and their picture, or None before the model exists."""
    art = run.artifacts()
    if "originals" not in art:
        if art.get("missing"):  # the run's dataset is not on this machine (an example, a copied run)
            return {"caption": f"No reconstructions here: {art['missing']}", "step": None}, None
        return {"caption": "Reconstructions appear once the model is built.", "step": None}, None
    step = int(art.get("step", 0))
    return {"caption": "Top: fixed test images. Bottom: their reconstructions, the decoder's mean at z = μ(x), "
                       f"from the weights at step {step:,} (updated about once a second while training).",
            "step": step}, _reconstruction_png(run, art)


# The latest reconstruction PNG per run (by its weights token: handles are made afresh on each look),
# shared by the sessions watching it: one encode per update, whoever asks.
_PNG_CACHE: "collections.OrderedDict[int, tuple[int, bytes]]" = collections.OrderedDict()
_PNG_CACHE_SIZE = 64


def _reconstruction_png(run: RunHandle, art: dict[str, Any]) -> bytes:
    step = int(art.get("step", 0))
    cached = _PNG_CACHE.get(run.token)
    if cached is not None and cached[0] == step:
        return cached[1]
    mosaic = tile(np.concatenate([art["originals"], art["reconstructions"]]), ncols=len(art["originals"]), pad=2)
    png = png_bytes(upscale(mosaic, display_scale(art["originals"], 2)))
    _PNG_CACHE[run.token] = (step, png)
    _PNG_CACHE.move_to_end(run.token)
    while len(_PNG_CACHE) > _PNG_CACHE_SIZE:
        _PNG_CACHE.popitem(last=False)
    return png
