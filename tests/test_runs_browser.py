"""The Runs tab in headless Chromium: tick two saved runs, compare them, download one as a zip.

Reuses test_browser's server and page fixtures; the runs are trained in this process (a Lab over
the directory the server will use) before the server starts (arguments are set up in order: runs
first, then the page and its server), so the server lists them as runs trained elsewhere.
"""
from __future__ import annotations

import io
import zipfile

import pytest

from test_browser import expect, page, server  # noqa: F401  (fixtures; skips this module where they skip)
from vae_core.lab import Lab, RunConfig

pytestmark = pytest.mark.browser
ROW_PX = 35  # the table's header and row height


@pytest.fixture
def two_runs(tmp_path):
    """Two tiny runs in the runs directory the server fixture will use (tmp_path / 'runs')."""
    cfg = RunConfig().replace(epochs=2, train_size=256, hidden_dim=32, batch_size=64, evidence_every=0)
    lab = Lab(tmp_path / "runs", num_threads=1)
    names = []
    try:
        for beta in (0.5, 4.0):
            run = lab.start(cfg.replace(beta=beta), name=f"beta-{beta:g}")
            run.join(120)
            assert run.status().state == "finished", run.status().message
            names.append(run.name)
    finally:
        lab.shutdown()
    return names


def idle(page) -> None:  # noqa: F811
    page.wait_for_timeout(300)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')


def test_compare_two_runs_and_download_one(two_runs, page, tmp_path):  # noqa: F811
    page.get_by_role("tab", name="Runs").click()
    expect(page.get_by_text("2 runs in")).to_be_visible()
    grid = page.locator('[data-testid="stDataFrame"]').first.bounding_box()
    for row in (1, 2):  # the tick boxes at the rows' left edge
        page.mouse.click(grid["x"] + 15, grid["y"] + ROW_PX * row + ROW_PX / 2)
        idle(page)
    expect(page.get_by_text("Compare 2 runs")).to_be_visible()
    charts = page.locator('[data-testid="stPlotlyChart"]')
    expect(charts).to_have_count(2)
    expect(charts.first.locator(".scatterlayer .trace").first).to_be_visible()
    expect(charts.nth(1).get_by_text("β=0.5")).to_be_visible()  # the rate–distortion plane's labels
    expect(charts.nth(1).get_by_text("β=4")).to_be_visible()
    # samples and reconstructions, each run (a fresh server first loads torch and the sprites to render them)
    expect(page.locator('[data-testid="stImage"] img')).to_have_count(4, timeout=60_000)
    page.screenshot(path=str(tmp_path / "runs-compare.png"), full_page=True)

    page.get_by_text("Export", exact=True).click()
    idle(page)  # a click that lands while the page reruns can be lost (seen once under load)
    expect(page.get_by_role("button", name="Whole run (.zip)")).to_be_enabled()
    with page.expect_download() as download:
        page.get_by_role("button", name="Whole run (.zip)").click()
    data = (tmp_path / "run.zip")
    download.value.save_as(data)
    names = zipfile.ZipFile(io.BytesIO(data.read_bytes())).namelist()
    assert f"{two_runs[1]}/checkpoint.pt" in names and download.value.suggested_filename == f"{two_runs[1]}.zip"

    # Both runs were trained by another process, so this tab owns neither: "Only mine" hides them.
    mine = page.locator(".st-key-runs_mine").get_by_text("Only mine")
    mine.click()
    expect(page.get_by_text("You have started no runs in this tab yet")).to_be_visible()
    mine.click()
    expect(page.get_by_text("2 runs in")).to_be_visible()
    assert page.locator('[data-testid="stException"]').count() == 0
