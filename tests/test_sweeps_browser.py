"""The Sweeps tab in headless Chromium: a finished 2×2 sweep's map, rate–distortion chart and a cell's run.

The sweep is trained before the server starts (fixtures are set up in order: the sweep first, then
the page and its server, over the same runs directory), so the page only reads it. It is the sweep
test_sweep's CLI test trains (conftest.grid_sweep, once per session), copied into this test's folder.
"""
from __future__ import annotations

import os
import shutil

import pytest

from test_browser import expect, page, server  # noqa: F401  (fixtures; skips this module where they skip)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def finished_sweep(grid_sweep, tmp_path):
    """The session's finished 2 x 2 sweep (conftest.grid_sweep), copied into the runs folder the server will use."""
    assert grid_sweep.code == 0, grid_sweep.err
    shutil.copytree(grid_sweep.runs_dir, tmp_path / "runs")
    return grid_sweep.sweep_id


def test_sweeps_tab_maps_a_finished_sweep_and_opens_a_cell(finished_sweep, page, tmp_path):  # noqa: F811
    page.get_by_role("tab", name="Sweeps").click()
    expect(page.get_by_text("4 of 4 runs finished")).to_be_visible()
    expect(page.locator('[data-testid="stPlotlyChart"]')).to_have_count(2)  # the map and the R–D plane
    expect(page.locator(".heatmaplayer")).to_have_count(1)
    expect(page.get_by_text("Rate–distortion plane")).to_be_visible()
    if os.environ.get("SWEEP_SHOT"):
        page.screenshot(path=os.environ["SWEEP_SHOT"], full_page=True)
    page.get_by_role("button", name="β=2 · D=4").first.click()
    expect(page.get_by_text("Opened grid-b2-z4")).to_be_visible()
