"""The Training tab's live panel as one component: status, test metrics, curves and reconstructions.

Each refresh used to send ~14 Streamlit elements (progress bar, messages, four metrics, a toggle,
the chart, image, captions) that the page re-rendered with React every second, while the browser's
work took CPU from the trainer's two threads. This component is one element: index.html updates
its text in place, sets a new image only when the weights changed, and hands each new figure to
Plotly.react on the same chart (which keeps a person's zoom; st.plotly_chart gave a changed figure
a new element and rebuilt it). It uses the plotly.js that ships with the Python plotly package,
copied next to index.html in a cache folder, because Streamlit serves a component's files only
from its own folder.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import plotly
import plotly.graph_objects as go
import plotly.io as pio
import streamlit as st
import streamlit.components.v1 as components

HERE = Path(__file__).resolve().parent
PLOTLY_JS = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
CONFIG = {"displaylogo": False, "responsive": True}  # Plotly's config for the chart


def _component_dir(root: Path | None = None) -> Path:
    """A folder with index.html and plotly.min.js, built once per version of either and then reused.

    Built in a temporary folder and renamed into place, so a server starting beside another
    never sees half a folder. Where the shared cache cannot be written (another user's folder
    in /tmp), this process builds its own copy instead.
    """
    html = (HERE / "index.html").read_bytes()
    tag = hashlib.sha256(html + plotly.__version__.encode()).hexdigest()[:12]
    root = Path(root or os.environ.get("VAE_COMPONENT_CACHE") or Path(tempfile.gettempdir()) / "vae-dashboard-components")
    target = root / f"live_panel-{tag}"
    if (target / "plotly.min.js").is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(dir=root))
    except OSError:
        build = target = Path(tempfile.mkdtemp(prefix="vae-live-panel-"))
    (build / "index.html").write_bytes(html)
    shutil.copyfile(PLOTLY_JS, build / "plotly.min.js")
    if build != target:
        try:
            build.rename(target)
        except OSError:  # another process put it there first
            shutil.rmtree(build, ignore_errors=True)
    return target


_component = components.declare_component("live_panel", path=str(_component_dir()))


def log_scale(key: str) -> bool:
    """Whether the person turned on the panel's Log scale switch (a change reruns the fragment)."""
    value = st.session_state.get(key)
    return bool(value.get("log_y")) if isinstance(value, dict) else False


def live_panel(*, key: str, status: dict[str, Any] | None = None, metrics: list[dict[str, Any]] | None = None,
               notice: str = "", fig: go.Figure | None = None, log_y: bool = False, caveat: str = "",
               recon: dict[str, Any] | None = None, png: bytes | None = None, footer: str = "") -> None:
    """Draw the panel; with the same key on the next run, update it in place.

    status: {"progress": float | None, "progress_text": str, "kind": "caption" | "success" | "info" |
    "warning" | "error", "text": str}; metrics: [{"label", "value", "delta", "delta_color", "help"}];
    recon: {"caption", "step"} with its picture in png. Texts may hold **bold**.
    """
    _component(key=key, default=None, status=status, metrics=metrics or [], notice=notice,
               spec=pio.to_json(fig, validate=False) if fig is not None else None, config=CONFIG, log_y=log_y,
               caveat=caveat, recon=recon, png=png, footer=footer)
