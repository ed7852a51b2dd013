"""The Latents tab in headless Chromium after a short sprites run: traversal rows, GIF, scores, KL split, heatmap.

Reuses test_browser's server and page fixtures; the run's settings come from the page URL, as a shared link's do.
"""
from __future__ import annotations

import re

import pytest

from test_browser import expect, page, server  # noqa: F401  (fixtures; skip where they skip)

pytestmark = pytest.mark.browser


def test_latents_tab_after_a_short_run(page, server):  # noqa: F811
    page.goto(server + "/?dataset=sprites&epochs=2&train_size=2048&latent_dim=6")
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')
    live = page.frame_locator('iframe[title*="live_panel"]')  # the Training tab's live panel: loaded, then Train
    expect(live.locator("#notice")).to_contain_text("No run yet", timeout=60_000)
    page.get_by_role("button", name="Train", exact=True).click()
    expect(live.locator("#progress-text")).to_contain_text("samples/s", timeout=120_000)
    page.get_by_role("tab", name="Latents").click()
    # .first throughout: while a fragment reruns, Streamlit can briefly show its stale copy beside the new one.
    expect(page.get_by_text(re.compile(r"^z\d · KL \d+\.\d\d nats")).first).to_be_visible(timeout=120_000)
    for j in range(6):  # every latent has its row (the grid streams in row by row)
        expect(page.get_by_text(re.compile(rf"^z{j} · KL")).first).to_be_visible()
    expect(page.get_by_text(re.compile(r"they (agree within Monte-Carlo error|differ by)")).first).to_be_visible(
        timeout=180_000)
    expect(page.get_by_text("Scores (0 to 1)").first).to_be_attached()
    expect(page.get_by_text(re.compile(r"Weights of step [\d,]+: MIG \d\.\d\d")).first).to_be_attached(
        timeout=120_000)
    with page.expect_download() as info:
        page.get_by_role("button", name="Download as animated GIF").first.click()
    with open(info.value.path(), "rb") as f:
        assert f.read(6) == b"GIF89a"
    exceptions = page.locator('[data-testid="stException"]').all_inner_texts()
    assert not exceptions, exceptions
