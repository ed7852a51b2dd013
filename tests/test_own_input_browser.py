"""The "Your own input" tab in headless Chromium: strokes drawn with the mouse on the canvas are encoded.

Reuses test_browser's server and page fixtures. Only a browser can check the canvas itself:
its frame must speak the component protocol so that the drawing reaches the server.
"""
from __future__ import annotations

import os
import re

import pytest

from test_browser import expect, page, server, set_number  # noqa: F401  (fixtures; skip where they skip)

pytestmark = pytest.mark.browser


def test_drawn_strokes_are_encoded(page, tmp_path):  # noqa: F811
    thumb = page.locator('.st-key-cfg_latent_dim input[type="range"]')
    thumb.focus()
    thumb.press("Home")
    thumb.press("ArrowRight")
    expect(thumb).to_have_value("2")
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')
    set_number(page, "cfg_epochs", 2)
    page.get_by_role("button", name="Train", exact=True).click()
    live = page.frame_locator('iframe[title*="live_panel"]')
    expect(live.locator("#progress-text")).to_contain_text("samples/s", timeout=120_000)

    page.get_by_role("tab", name="Your own input").click()
    canvas_frame = page.locator('iframe[title*="draw_canvas"]')
    expect(canvas_frame).to_be_visible(timeout=120_000)
    expect(page.get_by_text("Draw on the canvas").first).to_be_visible()
    pad = page.frame_locator('iframe[title*="draw_canvas"]').locator("#pad")
    expect(pad).to_be_visible()
    box = pad.bounding_box()
    # A vertical bar, then a horizontal one across it: two strokes, as a person draws a plus.
    for (x0, y0), (x1, y1) in (((0.5, 0.2), (0.5, 0.8)), ((0.2, 0.5), (0.8, 0.5))):
        page.mouse.move(box["x"] + box["width"] * x0, box["y"] + box["height"] * y0)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * x1, box["y"] + box["height"] * y1, steps=12)
        page.mouse.up()

    expect(page.get_by_text("Reconstruction (decoder mean").first).to_be_visible(timeout=120_000)
    table = page.locator('[data-testid="stTable"]').first
    expect(table).to_contain_text("Your image", timeout=120_000)
    expect(table).to_contain_text("Test set")
    elbo = float(re.search(r"Your image\s*(-?[\d.]+)", table.inner_text()).group(1))
    assert -2000 < elbo < 0, table.inner_text()
    expect(page.get_by_text(re.compile(r"log p\(x\) = -?[\d.]+")).first).to_be_visible()  # 2 latents: the grid
    chart = page.locator('.st-key-own_latent').first
    expect(chart.locator(".scatterlayer .trace").first).to_be_attached()
    expect(chart).to_contain_text("q(z|x), 2σ ellipse")
    expect(chart).to_contain_text("true p(z|x)")
    if os.environ.get("VAE_SCREENSHOT_DIR"):
        page.screenshot(path=os.path.join(os.environ["VAE_SCREENSHOT_DIR"], "own_input.png"), full_page=True)
        chart.screenshot(path=os.path.join(os.environ["VAE_SCREENSHOT_DIR"], "own_input_latent.png"))

    # Clear empties the canvas; the page goes back to asking for a drawing.
    page.frame_locator('iframe[title*="draw_canvas"]').get_by_role("button", name="Clear").click()
    expect(page.get_by_text("Draw on the canvas").first).to_be_visible(timeout=120_000)
    if os.environ.get("VAE_SCREENSHOT_DIR"):
        page.screenshot(path=os.path.join(os.environ["VAE_SCREENSHOT_DIR"], "own_input_clear.png"), full_page=True)

    page.get_by_role("button", name="Stop", exact=True).click()
    exceptions = page.locator('[data-testid="stException"]').all_inner_texts()
    assert not exceptions, exceptions
