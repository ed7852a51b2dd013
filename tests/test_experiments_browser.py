"""One guided experiment in headless Chromium, end to end: predict, run, see the measured outcome and why.

Reuses test_browser's server fixture, with 1,024 training images per run (VAE_EXPERIMENT_TRAIN_SIZE).
"""
from __future__ import annotations

import os
import re

import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, expect, streamlit_server, sync_api

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_latents_experiment_end_to_end(tmp_path):
    with streamlit_server(tmp_path, VAE_EXPERIMENT_TRAIN_SIZE="1024") as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=60_000)
        page.get_by_role("tab", name="Experiments").click()
        page.get_by_text("B. 2 latents against 16").first.click()
        run = page.get_by_role("button", name="Run the experiment").first
        expect(run).to_be_disabled()
        page.get_by_text("16 latents reach a clearly higher (better) ELBO").first.click()
        expect(run).to_be_enabled()
        run.click()
        expect(page.get_by_text(re.compile(r"16 latents · exp-latents-16-latents")).first).to_be_visible()
        # The sidebar took the first run's settings: latent size 2.
        expect(page.locator('.st-key-cfg_latent_dim input[type="range"]')).to_have_value("2", timeout=60_000)
        expect(page.get_by_role("heading", name="What your runs measured").first).to_be_visible(timeout=300_000)
        table = page.locator('[data-testid="stTable"]').first
        expect(table).to_contain_text("16 latents")
        expect(table).to_contain_text(re.compile(r"\d+ of 16"))
        expect(page.get_by_text(re.compile(r"You predicted")).first).to_be_visible()
        expect(page.locator('.st-key-exp_latents_curves .scatterlayer .trace').first).to_be_attached()
        assert page.locator('[data-testid="stImage"] img').count() >= 2  # both runs' reconstructions
        if os.environ.get("VAE_SCREENSHOT_DIR"):
            page.screenshot(path=os.path.join(os.environ["VAE_SCREENSHOT_DIR"], "experiments.png"), full_page=True)
        exceptions = page.locator('[data-testid="stException"]').all_inner_texts()
        assert not exceptions, exceptions
        browser.close()
