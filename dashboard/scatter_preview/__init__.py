"""A small picture beside the latent scatter: the test image under the mouse.

Plotly's hover labels hold text only, and st.plotly_chart reports clicks, not hovers. This
component (one iframe, served from the same server, like Streamlit's own components) is handed
the scatter's test images as one PNG sheet and listens to the chart's `plotly_hover` events in
the page around it; it draws the hovered point's image from the sheet, so a hover costs no
round trip to the server.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit.components.v1 as components

from vae_core.images import png_bytes, tile

HERE = Path(__file__).resolve().parent
SHEET_COLS = 50  # images per row of the sheet: 2000 test images make a 50 x 40 grid of 28 px cells
SHEET_CELL_MAX = 32  # larger images are shrunk to this for the sheet (a thumbnail; 2000 at 64 px colour is 24 MB)

_component = components.declare_component("scatter_preview", path=str(HERE))


def sheet(images: np.ndarray) -> bytes:
    """(N, H, W[, 3]) uint8 images as one PNG, SHEET_COLS to a row with no gaps (cell i at row i // cols)."""
    return png_bytes(tile(images, SHEET_COLS, pad=0))


def scatter_preview(*, key: str, chart_key: str, png: bytes, n: int, labels: list[str], kind: str,
                    version: str) -> None:
    """The preview for the st.plotly_chart whose key is `chart_key`; its points' customdata are image indices.

    labels[i] names image i's label; `version` changes whenever the sheet does, so the browser
    decodes a new sheet only then.
    """
    _component(key=key, default=None, target=f"st-key-{chart_key}", png=png, n=n, cols=SHEET_COLS, labels=labels,
               kind=kind, version=version)
