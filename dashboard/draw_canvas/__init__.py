"""A small drawing canvas as a bidirectional Streamlit component (no build step).

streamlit-drawable-canvas fails to declare its component under Streamlit 1.67, so this is
one index.html speaking the component protocol (componentReady, setFrameHeight,
setComponentValue; the page's render events) through postMessage, like scatter_preview.
The person draws light strokes on black; each finished stroke sends the whole canvas as a
PNG data URL, which the core downsizes to the model's 28 x 28 (vae_core.drawn), the same
path an uploaded file takes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit.components.v1 as components

HERE = Path(__file__).resolve().parent
SIZE = 280  # canvas pixels per side: 10 per model pixel

_component = components.declare_component("draw_canvas", path=str(HERE))


def draw_canvas(*, key: str, brush: int = 22, size: int = SIZE) -> dict[str, Any] | None:
    """The drawing so far: {"png": data URL, "strokes": n, "seq": changes sent}, or None before the first stroke.

    A new dict arrives after every finished stroke and after Clear (strokes 0).
    """
    value = _component(key=key, default=None, brush=brush, size=size)
    return value if isinstance(value, dict) else None
