"""The dashboard's front door: `streamlit run dashboard/app.py`.

A router only: page config, the process-wide run registry, the sidebar controls, then the
panels, each a `render(...)` in dashboard/panels/. Training never runs in the script:
the registry's trainers train in their own threads and the panels read their snapshots.

Panel contracts: training.render(registry), explore.render(trainer), evidence.render(trainer)
(both only once the run has published weights), runs.render(registry) (it opens, resumes
and shows runs through the registry). A panel module that does not exist yet has no tab.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run` puts dashboard/ on the path, not the repository root
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboard.panels import controls, training  # noqa: E402
from dashboard.state import Registry, get_registry  # noqa: E402

log = logging.getLogger(__name__)

# Nearest-neighbour scaling in the browser too, so pixel images stay crisp at any width.
# The progress bar's slide animation on every refresh made the browser composite frames for much
# of each second: without it Chromium used 0.155 instead of 0.19 cores and training beside it ran
# at 29.0k instead of 23.0k samples/s (3 alternating pairs, 2-core machine).
CSS = """<style>
[data-testid="stImage"] img, [data-testid="stFullScreenFrame"] img { image-rendering: pixelated; }
[data-testid="stProgress"] * { transition: none !important; }
</style>"""


def optional_panel(name: str) -> ModuleType | None:
    """A panel module that may not be written yet: its tab is left out until it exists."""
    if importlib.util.find_spec(f"dashboard.panels.{name}") is None:
        return None
    return importlib.import_module(f"dashboard.panels.{name}")


def guarded(title: str, draw: Callable[[], None]) -> None:
    """One panel's failure shows as a message in its tab instead of blanking the rest of the page."""
    try:
        draw()
    except Exception as e:  # st.rerun/st.stop are BaseExceptions and pass through
        log.exception("panel %s failed", title)
        st.error(f"The {title} panel failed: {type(e).__name__}: {e}")


def needs_model(registry: Registry, draw: Callable[[object], None]) -> Callable[[], None]:
    """Explore and evidence panels need published weights: say what to do until there are some."""
    def inner() -> None:
        t = registry.current()
        if t is None:
            st.info("Train a model (sidebar) or open a saved run to use this panel.")
        elif t.weights_version() == 0:
            st.info("Waiting for the model's first weights…")
        else:
            draw(t)
    return inner


def main() -> None:
    st.set_page_config(page_title="VAE dashboard", page_icon="🧪", layout="wide")
    st.html(CSS)
    registry = get_registry()
    with st.sidebar:
        st.title("VAE dashboard")
        controls.render(registry)

    st.markdown("Train a variational autoencoder and watch, live, what its objective is doing.")

    explore = optional_panel("explore")
    evidence = optional_panel("evidence")
    runs_panel = optional_panel("runs")
    pages: list[tuple[str, Callable[[], None]]] = [("Training", lambda: training.render(registry))]
    if explore is not None:
        pages.append(("Explore latent space", needs_model(registry, explore.render)))
    if evidence is not None:
        pages.append(("Evidence: ELBO ≤ log p(x)", needs_model(registry, evidence.render)))
    if runs_panel is not None:
        pages.append(("Runs", lambda: runs_panel.render(registry)))
    # Lazy tabs: only the open tab's code runs, so a slider move does not recompute hidden panels.
    tabs = st.tabs([title for title, _ in pages], key="main_tab", on_change="rerun")
    for tab, (title, draw) in zip(tabs, pages):
        with tab:
            if tab.open:
                if title != "Training":  # the Training tab shows the status in its own live fragment
                    training.render_status(registry)
                guarded(title, draw)


main()
