"""The dashboard's front door: `streamlit run dashboard/app.py`.

A router only: page config, the server's one Lab, the sidebar controls, then the panels,
each a `render(...)` in dashboard/panels/. Training never runs in the script: the Lab's
runs train in their own threads and the panels read their snapshots.

Panel contracts: training.render(lab), explore.render(run), evidence.render(run) (both only
once the run has published weights), runs.render(lab) (it opens, resumes, forks and shows runs
through the Lab). `run` is this session's current run, a vae_core.lab.RunHandle.
"""
from __future__ import annotations

import os

# An idle OpenMP thread polls for 300,000 rounds by default; beside a web server that burns the trainer's
# own share of the CPU (docs/performance.md). It must be set before torch loads, so before any vae_core import.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run` puts dashboard/ on the path, not the repository root
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboard.common import MAIN_TAB_KEY, md_text  # noqa: E402
from dashboard.panels import controls, evidence, explore, runs, training  # noqa: E402
from dashboard.panels import experiments, latents, own_input, sweeps, timelapse  # noqa: E402
from dashboard.state import current_run, get_lab  # noqa: E402
from vae_core.lab import Lab, RunHandle  # noqa: E402

log = logging.getLogger(__name__)

# Nearest-neighbour scaling in the browser too, so pixel images stay crisp at any width.
# The progress bar's slide animation on every refresh made the browser composite frames for much
# of each second: without it Chromium used 0.155 instead of 0.19 cores and training beside it ran
# at 29.0k instead of 23.0k samples/s (3 alternating pairs, 2-core machine).
# Streamlit's own Stop (top right, shown while a script runs past 0.5 s) was a second Stop beside the
# sidebar's, and it stops only the page's script, never the run: only the sidebar's shows.
CSS = """<style>
[data-testid="stImage"] img, [data-testid="stFullScreenFrame"] img { image-rendering: pixelated; }
[data-testid="stProgress"] * { transition: none !important; }
[data-testid="stStatusWidget"] button { display: none; }
</style>"""


def guarded(title: str, draw: Callable[[], None]) -> None:
    """One panel's failure shows as a message in its tab instead of blanking the rest of the page."""
    try:
        draw()
    except Exception as e:  # st.rerun/st.stop are BaseExceptions and pass through
        log.exception("panel %s failed", title)
        st.error(f"The {title} panel failed: {type(e).__name__}: {md_text(e)}")


def needs_model(lab: Lab, draw: Callable[[RunHandle], None]) -> Callable[[], None]:
    """Explore and evidence panels need published weights: say what to do until there are some."""
    def inner() -> None:
        run = current_run(lab)
        if run is None:
            st.info("Train a model (sidebar), or open a saved run or a ready-made example (Runs tab), to use "
                    "this panel.")
        elif run.weights_version() == 0:
            st.info("Waiting for the model's first weights…")
        else:
            draw(run)
    return inner


def main() -> None:
    st.set_page_config(page_title="VAE dashboard", page_icon="🧪", layout="wide")
    st.html(CSS)
    lab = get_lab()
    with st.sidebar:
        st.title("VAE dashboard")
        controls.render(lab)

    st.markdown("Train a variational autoencoder and watch, live, what its objective is doing.")

    pages: list[tuple[str, Callable[[], None]]] = [
        ("Training", lambda: training.render(lab)),
        (explore.TITLE, needs_model(lab, explore.render)),
        (latents.TITLE, needs_model(lab, latents.render)),
        (own_input.TITLE, needs_model(lab, own_input.render)),
        (timelapse.TITLE, needs_model(lab, lambda run: timelapse.render(lab, run))),
        ("Evidence: ELBO ≤ log p(x)", needs_model(lab, evidence.render)),
        (experiments.TITLE, lambda: experiments.render(lab)),
        ("Runs", lambda: runs.render(lab)),
        (sweeps.TITLE, lambda: sweeps.render(lab)),
    ]
    # Lazy tabs: only the open tab's code runs, so a slider move does not recompute hidden panels.
    tabs = st.tabs([title for title, _ in pages], key=MAIN_TAB_KEY, on_change="rerun")
    for tab, (title, draw) in zip(tabs, pages):
        with tab:
            if tab.open:
                if title != "Training":  # the Training tab shows the status in its own live fragment
                    training.render_status(lab)
                guarded(title, draw)


main()
