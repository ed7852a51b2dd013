"""Comparing saved runs: overlaid curves, final numbers, the same samples and reconstructions, rate–distortion.

Drawn by the Runs tab for the runs a person ticks. Everything comes through the Lab
(lab.open(name): a run trained here, or one followed from its directory), never from a live
model: its metric rows, and its samples and reconstructions rendered from the published
weights (once per weights version, so a training run's images follow it). The data helpers are
pure so tests can check the alignment.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.colors import qualitative

from dashboard.common import beta_set, downsample, reconstructions_mosaic, samples_mosaic, smooth, units
from dashboard.common import md_text, plotly_text
from vae_core.images import png_bytes
from vae_core.lab import ConfigError, DatasetUnavailable, Lab, RunConfig, RunFileError, UserError

log = logging.getLogger(__name__)

K = "runs_cmp_"  # every widget key starts with this
COLORS = qualitative.D3
MAX_IMAGE_RUNS = 8  # columns of samples and reconstructions; more runs would make each tiny
MISSING = "–"  # a number not measured yet (no test epoch, no evidence): never 'None' in the table
# How each column of the final-numbers table is written: a format for a number, None for text as it is.
CELLS = {"β": "g", "Latent D": "d", "Epochs": "g", "Steps": ",d", "Test ELBO": ".2f", "Reconstruction": ".2f",
         "KL": ".2f", "Best IWAE bound": ".2f", "IWAE k": "d"}
METRICS = (("elbo", "ELBO (higher is better)"), ("recon", "Reconstruction E[log p(x|z)]"), ("kl", "KL(q(z|x) ‖ p(z))"))


@dataclass(frozen=True)
class RunData:
    """What the comparison needs of one run: its name, settings and metric rows."""

    name: str
    path: str
    config: RunConfig
    rows: list[dict[str, Any]]

    def split(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("split") == name]

    @property
    def beta(self) -> float:
        """β at the end of training (a live change or a fork may differ from config.json's start value)."""
        for r in reversed(self.rows):
            if r.get("split") == "train" and isinstance(beta_set(r), (int, float)):
                return float(beta_set(r))
        return self.config.train.beta


def load(lab: Lab, run: str | Path) -> RunData:
    """A run's config and metric rows, by name (or path), through the Lab. Raises RunFileError or ConfigError."""
    handle = lab.open(run)
    return RunData(handle.name, str(handle.run_dir), handle.config, handle.metrics())


def images(lab: Lab, run: str | Path) -> dict[str, Any]:
    """Prior samples (64, from z drawn with seed 0) and reconstructions of the first 16 test images, uint8.

    The same z and test images for every run of a latent size and dataset, so the mosaics compare
    like with like. Rendered by the run's handle once per weights version; {} before any weights.
    """
    return lab.open(run).artifacts()


# ------------------------------------------------------------------ data for the figures and the table

def series(rows: list[dict[str, Any]], key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one metric over rows with a finite value; x is the step or the (fractional) epoch."""
    pts = [(float(r[x]), float(r[key])) for r in rows
           if isinstance(r.get(key), (int, float)) and isinstance(r.get(x), (int, float)) and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    xs, ys = zip(*pts)
    return np.asarray(xs), np.asarray(ys)


def best_iwae(rows: list[dict[str, Any]]) -> tuple[float, int] | None:
    """(bound, k) of the largest k in the last evidence row: the tightest lower bound on log p(x) recorded."""
    for r in reversed(rows):
        if r.get("split") != "evidence" or r.get("iwae") is None:
            continue
        iw = r["iwae"]
        pairs = (list(iw.items()) if isinstance(iw, dict) else list(zip(r.get("ks", []), iw)))
        pairs = [(int(k), float(v)) for k, v in pairs if isinstance(v, (int, float)) and math.isfinite(v)]
        if pairs:
            k, v = max(pairs)
            return v, k
    return None


def final_numbers(run: RunData) -> dict[str, Any]:
    """One row of the side-by-side table: the last test evaluation and the best IWAE bound."""
    test = run.split("test")
    last = test[-1] if test else {}
    iw = best_iwae(run.rows)
    return {"Run": run.name, "β": run.beta, "Latent D": run.config.model.latent_dim,
            "Epochs": last.get("epoch"), "Steps": last.get("step"),
            "Test ELBO": last.get("elbo"), "Reconstruction": last.get("recon"), "KL": last.get("kl"),
            "Active units": (f"{last['active_units']} / {run.config.model.latent_dim}"
                             if "active_units" in last else None),
            "Best IWAE bound": iw[0] if iw else None, "IWAE k": iw[1] if iw else None}


def table_cells(numbers: dict[str, Any]) -> dict[str, str]:
    """final_numbers as the table shows them: formatted text, MISSING where a number is not there (yet)."""
    out = {}
    for column, value in numbers.items():
        fmt = CELLS.get(column)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            out[column] = MISSING
        elif fmt is None or not isinstance(value, (int, float)):
            out[column] = str(value)
        else:
            out[column] = format(int(value) if fmt.endswith("d") else value, fmt)
    return out


def problem(e: Exception) -> str:
    """One line on why a run's files gave nothing, for the page: no exception text (it holds server paths)."""
    if isinstance(e, DatasetUnavailable):
        return "its dataset is not on this machine"
    if isinstance(e, ConfigError):
        return "its settings could not be read"
    if isinstance(e, (OSError, RunFileError)):
        return "its files could not be read yet (a new run or fork writes its first checkpoint after a moment)"
    return "they could not be made (the server's log says why)"


def rd_points(run: RunData) -> tuple[np.ndarray, np.ndarray]:
    """The run's trajectory on the rate–distortion plane: (rate = KL, distortion = −recon) per test epoch."""
    rate = [float(r["kl"]) for r in run.split("test") if _finite(r.get("kl")) and _finite(r.get("recon"))]
    dist = [-float(r["recon"]) for r in run.split("test") if _finite(r.get("kl")) and _finite(r.get("recon"))]
    return np.asarray(rate), np.asarray(dist)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# ------------------------------------------------------------------ figures

def curves_figure(data: list[RunData], *, x: str = "step", show_train: bool = True) -> go.Figure:
    """ELBO, reconstruction and KL side by side; one colour per run, test per epoch (markers) and train smoothed."""
    unit = units(data[0].config)[0] if data else "nats per example"
    fig = go.Figure()
    for i, run in enumerate(data):
        color = COLORS[i % len(COLORS)]
        for p, (key, _) in enumerate(METRICS, start=1):
            suffix = "" if p == 1 else str(p)
            if show_train:
                xs, ys = series(run.split("train"), key, x)
                if len(ys):
                    keep = downsample(len(ys))
                    fig.add_trace(go.Scatter(x=xs[keep], y=smooth(list(ys))[keep], mode="lines", name=plotly_text(run.name),
                                             legendgroup=run.name, showlegend=False, opacity=0.45,
                                             line={"color": color, "width": 1}, xaxis=f"x{suffix}",
                                             yaxis=f"y{suffix}", hovertemplate=f"{plotly_text(run.name)} train: %{{y:.2f}}<extra></extra>"))
            xs, ys = series(run.split("test"), key, x)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=plotly_text(run.name), legendgroup=run.name,
                                     showlegend=p == 1, line={"color": color, "width": 2}, marker={"size": 6},
                                     xaxis=f"x{suffix}", yaxis=f"y{suffix}",
                                     hovertemplate=f"{plotly_text(run.name)} test: %{{y:.2f}}<extra></extra>"))
    gap, width = 0.06, (1 - 2 * 0.06) / 3
    layout: dict[str, Any] = {}
    for p in range(3):
        suffix = "" if p == 0 else str(p + 1)
        layout[f"xaxis{suffix}"] = {"domain": [p * (width + gap), p * (width + gap) + width], "anchor": f"y{suffix}",
                                    "title": {"text": "training step" if x == "step" else "epoch"}}
        layout[f"yaxis{suffix}"] = {"anchor": f"x{suffix}", "title": {"text": unit}}
    annotations = [{"text": f"<b>{title}</b>", "x": p * (width + gap) + width / 2, "y": 1.0, "xref": "paper",
                    "yref": "paper", "xanchor": "center", "yanchor": "bottom", "showarrow": False}
                   for p, (_, title) in enumerate(METRICS)]
    fig.update_layout(**layout, annotations=annotations, height=360, margin={"l": 60, "r": 10, "t": 40, "b": 60},
                      legend={"orientation": "h", "y": -0.25, "x": 0}, hovermode="closest")
    return fig


def rd_figure(data: list[RunData]) -> go.Figure:
    """Rate (KL) against distortion (−E[log p(x|z)]): each run's path over epochs, its last epoch labelled with β.

    −ELBO = distortion + rate, so lines of slope −1 are lines of equal ELBO (Alemi et al. 2018).
    """
    unit = units(data[0].config)[0] if data else "nats per example"
    fig = go.Figure()
    finals = []
    for i, run in enumerate(data):
        rate, dist = rd_points(run)
        if not len(rate):
            continue
        color = COLORS[i % len(COLORS)]
        fig.add_trace(go.Scatter(x=rate, y=dist, mode="lines+markers", name=plotly_text(run.name), legendgroup=run.name,
                                 line={"color": color, "width": 1.5}, marker={"size": 5}, opacity=0.6,
                                 hovertemplate=f"{plotly_text(run.name)}<br>rate %{{x:.2f}}, distortion %{{y:.2f}}<extra></extra>",
                                 showlegend=False))
        fig.add_trace(go.Scatter(x=rate[-1:], y=dist[-1:], mode="markers+text", name=plotly_text(run.name), legendgroup=run.name,
                                 text=[f"β={run.beta:g}"], textposition="top right",
                                 marker={"color": color, "size": 13, "symbol": "star", "line": {"width": 1}},
                                 hovertemplate=(f"{plotly_text(run.name)} (last epoch)<br>rate %{{x:.2f}}, distortion %{{y:.2f}}"
                                                f"<br>ELBO {-(rate[-1] + dist[-1]):.2f}<extra></extra>")))
        finals.append((rate[-1], dist[-1]))
    if finals:
        r = np.array([p[0] for p in finals])
        d = np.array([p[1] for p in finals])
        all_r = np.concatenate([rd_points(run)[0] for run in data])
        all_d = np.concatenate([rd_points(run)[1] for run in data])
        xr = [max(0.0, all_r.min() - 0.1 * np.ptp(all_r) - 0.5), all_r.max() + 0.1 * np.ptp(all_r) + 0.5]
        yr = [all_d.min() - 0.1 * np.ptp(all_d) - 0.5, all_d.max() + 0.1 * np.ptp(all_d) + 0.5]
        c = float((r + d).min())  # the best final −ELBO
        fig.add_trace(go.Scatter(x=[xr[0], xr[1]], y=[c - xr[0], c - xr[1]], mode="lines", name="equal ELBO (best run)",
                                 line={"color": "#888", "dash": "dash", "width": 1}, hoverinfo="skip"))
        fig.update_xaxes(range=xr)
        fig.update_yaxes(range=yr)
    fig.update_layout(height=420, margin={"l": 60, "r": 10, "t": 20, "b": 50},
                      xaxis_title=f"rate: KL(q(z|x) ‖ p(z)), {unit}",
                      yaxis_title=f"distortion: −E[log p(x|z)], {unit}",
                      legend={"orientation": "h", "y": -0.18, "x": 0})
    return fig


# ------------------------------------------------------------------ drawing

def render(lab: Lab, names: list[str]) -> None:
    """The comparison of the named runs (in the order given)."""
    data, problems = [], []
    for name in names:
        try:
            data.append(load(lab, name))
        except UserError as e:
            log.warning("compare: %s left out: %s", name, e)
            problems.append(f"{name}: {problem(e)}")
    for msg in problems:
        st.error(f"Left out of the comparison: {md_text(msg)}")
    if not data:
        return
    st.subheader(f"Compare {len(data)} runs")
    if len({units(d.config)[0] for d in data}) > 1 or len({d.config.train.dataset for d in data}) > 1:
        st.warning("These runs differ in dataset or likelihood, so their numbers are on different scales: "
                   "compare them with care.")

    c1, c2 = st.columns([1, 3])
    x = c1.segmented_control("x-axis", ["step", "epoch"], default="step", key=K + "x", required=True,
                             help="Forks continue their parent's step count, so on the step axis a child starts "
                                  "where its parent was when it was forked.")
    show_train = c2.toggle("Train curves (smoothed)", value=True, key=K + "train")
    st.plotly_chart(curves_figure(data, x=x or "step", show_train=show_train), key=K + "curves",
                    config={"displaylogo": False})
    st.caption("Markers: the test set after each epoch. Thin lines: training batches, smoothed. "
               "All in nats per example unless the axis says otherwise.")

    st.markdown("##### Final numbers")
    # Text cells: Streamlit writes a missing number as 'None' (a fork before its first test epoch; any run
    # without evidence), so the numbers are formatted here and a missing one is MISSING.
    st.dataframe([table_cells(final_numbers(d)) for d in data], hide_index=True, key=K + "table", column_config={
        "Test ELBO": st.column_config.TextColumn(help="Nats per example; higher is better"),
        "Reconstruction": st.column_config.TextColumn(help="E[log p(x|z)], nats per example"),
        "KL": st.column_config.TextColumn(help="KL(q(z|x) ‖ p(z)), nats per example"),
        "Best IWAE bound": st.column_config.TextColumn(
            help="Importance-weighted bound log p_k(x) ≤ log p(x) with the largest k recorded "
                 "(on a fixed held-out batch)"),
    })
    st.caption(f"{MISSING}: not measured yet (a run shows test numbers after its first epoch) or never estimated "
               "(the IWAE bound needs the Evidence option while training).")

    st.markdown("##### Rate–distortion plane")
    st.plotly_chart(rd_figure(data), key=K + "rd", config={"displaylogo": False})
    st.caption("Each run's path over its epochs; ★ marks the last one. Rate is what the codes carry about x, "
               "distortion what the decoder loses. Lower-left is better; the dashed line holds every point with the "
               "best run's ELBO, since −ELBO = rate + distortion. A larger β buys a lower rate with more distortion.")

    _images(lab, data[:MAX_IMAGE_RUNS])
    if len(data) > MAX_IMAGE_RUNS:
        st.caption(f"Images are shown for the first {MAX_IMAGE_RUNS} ticked runs.")


def _images(lab: Lab, data: list[RunData]) -> None:
    st.markdown("##### Prior samples and reconstructions")
    st.caption("Samples decode the same 64 codes z ~ N(0, I) (seed 0) for every run of a latent size; "
               "reconstructions show the same 16 test images (rows 1 and 3) above their reconstructions (rows 2 "
               "and 4). All from each run's latest weights (its last checkpoint, for a run trained elsewhere).")
    per_row = 4  # always quarter-width columns: a 224-pixel mosaic stays the same size for 2 runs or 8
    for start in range(0, len(data), per_row):
        cols = st.columns(per_row)
        for col, run in zip(cols, data[start:start + per_row]):
            with col:
                st.markdown(f"**{md_text(run.name)}** · β={run.beta:g}, D={run.config.model.latent_dim}")
                try:
                    art = images(lab, run.name)
                except Exception as e:  # a missing dataset or unreadable checkpoint: say so in this column only
                    log.warning("compare: no images for %s", run.name, exc_info=True)
                    st.info(f"No images: {problem(e)}.")
                    continue
                if not art:
                    st.info("No weights yet.")
                    continue
                st.image(png_bytes(samples_mosaic(art)), caption="prior samples", output_format="PNG")
                st.image(png_bytes(reconstructions_mosaic(art)), caption="test images / reconstructions",
                         output_format="PNG")
