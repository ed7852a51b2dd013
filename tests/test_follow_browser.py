"""A run started from the CLI, watched live in the browser and paused from the page.

The CLI trains in its own process; the dashboard follows it through its run directory (metrics
tailed, weights reloaded) and steers it through control.json.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from test_browser import ROOT, expect, page, server  # noqa: F401  (fixtures; skips this module where they skip)

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ROW_PX = 35  # the runs table's header and row height


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def status(run_dir) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def test_a_cli_run_is_watched_live_and_paused_from_the_page(page, tmp_path):  # noqa: F811
    runs_dir = tmp_path / "runs"  # the server fixture's runs directory
    cli = subprocess.Popen(
        [sys.executable, "-m", "vae_core", "train", "--name", "from-cli", "--epochs", "400", "--dataset", "sprites",
         "--train-size", "1024", "--batch-size", "64", "--hidden-dim", "64", "--latent-dim", "2",
         "--evidence-every", "0", "--threads", "1", "--quiet", "--runs-dir", str(runs_dir)],
        cwd=ROOT, env={**os.environ, "VAE_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = runs_dir / "from-cli"
    try:
        wait_for(lambda: status(run_dir).get("state") == "running" and status(run_dir).get("step", 0) > 0,
                 what="the CLI run to train")

        page.get_by_role("tab", name="Runs").click()
        expect(page.get_by_text("1 run in")).to_be_visible(timeout=120_000)
        grid = page.locator('[data-testid="stDataFrame"]').first.bounding_box()
        page.mouse.click(grid["x"] + 15, grid["y"] + ROW_PX + ROW_PX / 2)  # tick its row
        open_button = page.locator(".st-key-runs_open button").first  # (a button with help is in the page twice)
        expect(open_button).to_be_enabled(timeout=120_000)
        open_button.click()

        page.get_by_role("tab", name="Training").click()
        panel = page.frame_locator('iframe[title*="live_panel"]')
        progress = panel.locator("#progress-text")
        expect(progress).to_contain_text("step", timeout=60_000)
        expect(panel.locator("#status")).to_contain_text("another process", timeout=60_000)
        curves = panel.locator("#plot")
        expect(curves.locator(".scatterlayer .trace").first).to_be_visible(timeout=60_000)

        # The curves grow by themselves as the other process logs rows.
        step_of = lambda: int(re.search(r"step ([\d,]+)", progress.inner_text()).group(1).replace(",", ""))  # noqa: E731
        first = step_of()
        points = curves.evaluate("gd => gd._fullData[0]._length")
        wait_for(lambda: step_of() > first and curves.evaluate("gd => gd._fullData[0]._length") > points,
                 what="the followed curves to grow")

        # Pause from the page: the CLI process applies it and says so in its status.
        page.locator(".st-key-btn_pause button").first.click()
        wait_for(lambda: status(run_dir).get("state") == "paused", what="the CLI run to pause")
        expect(panel.locator("#status")).to_contain_text("Paused", timeout=60_000)
        # Once parked (the step in flight at the click done) the run says at which step it stays, and stays.
        parked = wait_for(lambda: (st := status(run_dir)).get("message") == f"paused at step {st.get('step')}" and st,
                          what="the run to park")
        paused_at = parked["step"]
        time.sleep(3)  # not a timing assertion: a paused run must not move at all
        assert status(run_dir)["step"] == paused_at
        assert cli.poll() is None  # still alive, only paused

        page.locator(".st-key-btn_stop button").first.click()
        cli.wait(timeout=120)
        assert cli.returncode == 0, cli.stderr.read()
        assert status(run_dir)["state"] == "stopped" and (run_dir / "checkpoint.pt").exists()
        assert page.locator('[data-testid="stException"]').count() == 0
    finally:
        if cli.poll() is None:
            cli.kill()
