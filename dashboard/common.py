"""Helpers more than one panel uses: polling intervals, units, curve smoothing, cache keys, reruns.

Panels never import each other; what they share lives here (and in dashboard/state.py).
"""
from __future__ import annotations

import html
import re
import uuid
from typing import NoReturn

import numpy as np
import streamlit as st

from vae_core.lab import RunConfig, RunHandle

MAIN_TAB_KEY = "main_tab"  # app.py's st.tabs key: its value is the open tab's title
MAX_POINTS = 300  # per train curve; Plotly redraws the whole figure on every refresh
SMOOTHING = 0.6  # EMA weight of the past for train curves (rows are already 20-step averages)


# What Markdown or Streamlit could read as markup anywhere in a line: emphasis, code, links and images, HTML
# and entities, maths ($), strikethrough (~), Streamlit's :red[...] and :material/...:; an underscore only
# where it could open or close emphasis (not in my_run_2).
_MD_INLINE = re.compile(r"[\\`*\[\]<&$~]|:(?=[^\W\d_])|(?<![^\W_])_|_(?![^\W_])")
# ...and at the start of a line: headings, quotes, lists, rules.
_MD_BLOCK = re.compile(r"^(?:([#>+=-])|(\d+)([.)]))")
# Bare http://, www. and e-mail addresses become links after the escapes are read (GFM's autolinks), so a
# backslash cannot stop them: an invisible word joiner inside breaks the pattern and shows nothing.
_AUTOLINK = re.compile(r"(?<=:)(?=//)|(?i:(?<=www))(?=\.)|(?<=@)")


_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\"]+/)+([^\s/'\"]+)")


def md_text(value: object) -> str:
    """An untrusted string (a run or file name, a message read from a file, a URL value, an error) for an
    element that renders Markdown: it shows as the text itself, on one line, with no links, images or styling."""
    text = re.sub(r"[\r\n\t]+", " ", str(value))
    if isinstance(value, BaseException):  # an error names files by their last part: no server paths in the page
        text = _ABS_PATH.sub(lambda m: m.group(1), text)
    text = _MD_INLINE.sub(lambda m: "\\" + m.group(0), text)
    text = _AUTOLINK.sub("\u2060", text)
    return _MD_BLOCK.sub(lambda m: f"\\{m.group(1)}" if m.group(1) else f"{m.group(2)}\\{m.group(3)}", text.lstrip())


def md_code(value: object) -> str:
    """An untrusted string as a Markdown code span (backslashes do not escape inside one: the fence outgrows
    any run of backticks in the text instead)."""
    text = re.sub(r"[\r\n\t]+", " ", str(value))
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def plotly_text(value: object) -> str:
    """An untrusted string for a Plotly label, legend or hover text: Plotly reads <b>, <span style=...> and
    <a href=...> in them, and shows &lt; as <."""
    return html.escape(str(value), quote=False)


def poll_interval(state: str | None) -> float | None:
    """Seconds between refreshes: every second while training or waiting in the queue, slower while paused,
    never when idle."""
    return {"running": 1.0, "queued": 1.0, "paused": 2.0}.get(state or "")


def viewer_id() -> str:
    """This browser session's id in the registry's count of sessions watching the run."""
    if "viewer_id" not in st.session_state:
        st.session_state["viewer_id"] = uuid.uuid4().hex
    return st.session_state["viewer_id"]


def units(config: RunConfig) -> tuple[str, str]:
    """(axis label, one-line caveat) for the numbers this config reports."""
    if config.binarized:
        return "nats per example", ""
    if config.model.likelihood == "bernoulli":
        return ("BCE-based, per example", "Pixels are not binarized, so the reconstruction term is a binary "
                "cross-entropy against grey levels: not a log-likelihood, and the 'ELBO' is no bound on log p(x).")
    if config.model.likelihood == "logistic":  # a probability of the 8-bit images, not a density
        return "nats per image", ""
    return ("nats per example (density)", "Gaussian likelihood on continuous pixels: these are log-densities, "
            "not comparable with log-likelihoods of binarized images.")


def smooth(values: list[float], weight: float = SMOOTHING) -> np.ndarray:
    """Bias-corrected exponential moving average (TensorBoard's smoothing)."""
    out, acc = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def downsample(n: int, max_points: int = MAX_POINTS) -> np.ndarray:
    """Indices of at most max_points evenly spread points, always keeping the last one."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(int))


def run_token(run: RunHandle) -> int:
    """A number unique to this run's weights view in this process: a cache key that, unlike id(), is never reused."""
    return run.token


def weights_step(run: RunHandle) -> int:
    """Training step of the published weights."""
    return run.weights_step()


def app_rerun() -> NoReturn:
    """st.rerun() for a rerun the app starts itself (the live panel catching up): messages stay."""
    st.session_state["_app_rerun"] = True
    st.rerun()


# ------------------------------------------------------------------ run images (Runs tab: compare and exports)

def samples_mosaic(art: dict, scale: int = 2) -> np.ndarray:
    """A run's 64 prior samples (artifacts()["samples"], uint8) as one 8-wide mosaic."""
    from vae_core.images import tile, upscale

    return upscale(tile(art["samples"], ncols=8), display_scale(art["samples"], scale))


def reconstructions_mosaic(art: dict, scale: int = 2) -> np.ndarray:
    """Rows alternate: 8 test images, their 8 reconstructions, the next 8, theirs."""
    from vae_core.images import tile, upscale

    o, r = art["originals"], art["reconstructions"]
    rows = [block for i in range(0, len(o), 8) for block in (o[i:i + 8], r[i:i + 8])]
    return upscale(tile(np.concatenate(rows), ncols=8), display_scale(o, scale))


def display_scale(images: np.ndarray, scale: int) -> int:
    """The upscale factor for a mosaic: as asked for 28 x 28 images, less for larger ones (64 x 64 needs none)."""
    return max(1, round(scale * 28 / max(28, np.asarray(images).shape[1])))


def beta_effective(row: dict) -> float:
    """The KL's weight in a metrics row (after warm-up). Rows from before beta_effective existed: their 'beta'."""
    return row.get("beta_effective", row.get("beta", 1.0))


def beta_set(row: dict) -> float | None:
    """The β a row's run was set to (older rows kept it in 'beta_set', newer ones in 'beta')."""
    return row.get("beta_set", row.get("beta")) if "beta_effective" not in row else row.get("beta")
