"""A Plotly chart that updates in place: the live curves' redraw, at a fraction of st.plotly_chart's cost.

st.plotly_chart derives its element id from the figure, so each refresh with new data mounts a new
chart and Plotly builds it from scratch (newPlot, new DOM): a person's zoom was lost every second,
and in Chromium while training that was ~85 of the browser's ~180 ms of CPU per second, taken
from the trainer's two cores (measured against leaving the chart out). This component keeps one
chart per key and hands each new figure to Plotly.react, which updates the existing one. It uses the plotly.js that ships with the Python plotly package, copied next to
index.html in a cache folder, because Streamlit serves a component's files only from its own folder.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import plotly
import plotly.graph_objects as go
import plotly.io as pio
import streamlit.components.v1 as components

HERE = Path(__file__).resolve().parent
PLOTLY_JS = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
CONFIG = {"displaylogo": False, "responsive": True}  # Plotly's config for every chart drawn here


def _component_dir(root: Path | None = None) -> Path:
    """A folder with index.html and plotly.min.js, built once per version of either and then reused.

    Built in a temporary folder and renamed into place, so a server starting beside another
    never sees half a folder. Where the shared cache cannot be written (another user's folder
    in /tmp), this process builds its own copy instead.
    """
    html = (HERE / "index.html").read_bytes()
    tag = hashlib.sha256(html + plotly.__version__.encode()).hexdigest()[:12]
    root = Path(root or os.environ.get("VAE_COMPONENT_CACHE") or Path(tempfile.gettempdir()) / "vae-dashboard-components")
    target = root / f"live_chart-{tag}"
    if (target / "plotly.min.js").is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(dir=root))
    except OSError:
        build = target = Path(tempfile.mkdtemp(prefix="vae-live-chart-"))
    (build / "index.html").write_bytes(html)
    shutil.copyfile(PLOTLY_JS, build / "plotly.min.js")
    if build != target:
        try:
            build.rename(target)
        except OSError:  # another process put it there first
            shutil.rmtree(build, ignore_errors=True)
    return target


_component = components.declare_component("live_chart", path=str(_component_dir()))


def live_chart(fig: go.Figure, *, key: str) -> None:
    """Draw `fig`; with the same key on the next run, update that chart in place."""
    _component(spec=pio.to_json(fig, validate=False), config=CONFIG, key=key, default=None)
