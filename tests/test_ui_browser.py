"""What a person sees in the Training and Explore tabs: narrow pages, the dark theme, live changes, hover.

Each test starts the real app (tests/test_browser.py's server) with a small run from URL
parameters and looks at the page in headless Chromium, measuring what was wrong before:
overlapping chart titles and a 120 px scatter at 800 px, black paths on the dark page, no
sign on the curves of a live β change, and a scatter whose points showed only a label.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, IDLE, SMALL, expect, streamlit_server, sync_api

pytestmark = pytest.mark.browser

SCATTER = ".st-key-explore_scatter .js-plotly-plot"


def open_page(p, url: str, *, width: int, scheme: str = "light"):
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": width, "height": 1000}, color_scheme=scheme)
    page.set_default_timeout(120_000)  # a state to wait for, however loaded the machine is
    page.goto(f"{url}/?{SMALL}&latent_dim=2")
    page.wait_for_selector(IDLE, timeout=120_000)
    return browser, page


def train(page):
    """Press Train and wait for the first test metrics: curves, cards and weights are all there."""
    page.get_by_role("button", name="Train", exact=True).click()
    panel = page.frame_locator('iframe[title*="live_panel"]')
    expect(panel.locator("#metrics")).to_contain_text("Test", timeout=120_000)
    return panel


def open_explore(page):
    page.get_by_role("tab", name="Explore latent space").click()
    page.wait_for_function(f"() => {{ const gd = document.querySelector({SCATTER!r});"
                           " return gd && gd._fullData && gd._fullData.length > 3; }", timeout=120_000)


def scatter_traces(page) -> dict[str, dict]:
    """The drawn scatter's traces by name: their line and marker colours as Plotly resolved them."""
    return page.evaluate(f"""() => Object.fromEntries(document.querySelector({SCATTER!r})._fullData.map(t =>
        [t.name, {{line: t.line && t.line.color, ring: t.marker && t.marker.line && t.marker.line.color}}]))""")


def luminance(color: str) -> float:
    """WCAG relative luminance of '#rrggbb' or 'rgb(r, g, b)'."""
    if color.startswith("#"):
        rgb = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    else:
        rgb = [int(float(v)) for v in re.findall(r"[\d.]+", color)[:3]]
    lin = [(c / 255) / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: str, b: str) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def overlaps(a: dict, b: dict) -> bool:
    return (a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
            and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"])


def assert_paths_and_rings_stand_out(page) -> None:
    """The interpolation paths and the A/B rings contrast with the page behind them (WCAG's 3:1 for graphics)."""
    background = page.evaluate("() => getComputedStyle(document.querySelector('[data-testid=stApp]')).backgroundColor")
    traces = scatter_traces(page)
    drawn = {"linear path": traces["linear path"]["line"], "spherical path": traces["spherical path"]["line"],
             "A/B rings": traces["ends"]["ring"]}
    for what, color in drawn.items():
        assert contrast(color, background) >= 3, (what, color, background)


def test_at_800px_with_the_sidebar_open_charts_keep_their_room(tmp_path):
    """At 800 px (sidebar open, ~470 px left for the page) the three chart titles ran into each other, the
    cards' labels were cut, and the latent scatter had ~120 px of plot beside its legend and text."""
    with streamlit_server(tmp_path) as url, sync_api.sync_playwright() as p:
        browser, page = open_page(p, url, width=800, scheme="dark")
        sidebar = page.locator('[data-testid="stSidebar"]')
        expect(sidebar).to_be_visible()
        assert sidebar.bounding_box()["width"] > 250  # open, as a person first sees the page
        panel = train(page)
        titles = panel.locator("#plot .annotation")
        expect(titles.nth(2)).to_be_visible()
        frame = page.locator('iframe[title*="live_panel"]').element_handle().content_frame()
        frame.wait_for_function("() => document.getElementById('plot')._fullData.length >= 4")  # curves drawn
        boxes = [titles.nth(i).bounding_box() for i in range(3)]  # the subplot titles (no live change yet)
        for i in range(3):
            for j in range(i + 1, 3):
                assert not overlaps(boxes[i], boxes[j]), (i, j, boxes)
        plot_width = frame.evaluate("() => document.getElementById('plot')._fullLayout.xaxis._length")
        assert plot_width >= 300, plot_width  # each curve panel keeps a usable width
        cut = panel.locator("#metrics .label span:first-child").evaluate_all(
            "els => els.filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)")
        assert cut == [], cut  # every card's label shows whole
        page.screenshot(path=str(tmp_path / "training-800.png"))

        open_explore(page)
        plot = page.locator(f"{SCATTER} .nsewdrag").first  # the plot area, without legend and margins
        expect(plot).to_be_visible()
        assert plot.bounding_box()["width"] >= 300, plot.bounding_box()
        assert_paths_and_rings_stand_out(page)  # the page is dark
        # The rows of controls wrap instead of squeezing: the Resample button shows its whole label.
        resample = page.locator(".st-key-explore_sample_resample button").first  # (help= draws it twice)
        assert resample.evaluate("b => [b, ...b.querySelectorAll('*')].every(e => e.scrollWidth <= e.clientWidth + 1)"
                                 ), resample.bounding_box()
        page.screenshot(path=str(tmp_path / "explore-800.png"))
        page.get_by_role("button", name="Stop", exact=True).click()
        assert page.locator('[data-testid="stException"]').count() == 0
        browser.close()


def test_hovering_a_scatter_point_shows_its_test_image(tmp_path):
    """Plotly's hover label holds text only: the preview beside the scatter draws the hovered point's image."""
    from vae_core.images import to_uint8
    from vae_core.lab import Lab

    with streamlit_server(tmp_path) as url, sync_api.sync_playwright() as p:
        browser, page = open_page(p, url, width=1500)
        panel = train(page)
        name = panel.locator("#message b").first.inner_text()
        page.get_by_role("button", name="Stop", exact=True).click()
        expect(panel.locator("#message")).to_contain_text("Stopped")
        open_explore(page)
        assert_paths_and_rings_stand_out(page)  # the page is light: the paths must not be white
        preview = page.frame_locator('iframe[title*="scatter_preview"]')
        expect(preview.locator("#caption")).to_contain_text("Hover a point")
        frame = page.locator('iframe[title*="scatter_preview"]').element_handle().content_frame()
        x = Lab(tmp_path / "runs").open(name).test_set(2000)[0]  # the images the scatter's points stand for

        page.locator(SCATTER).scroll_into_view_if_needed()
        shown = []
        for trace in (0, 1):  # a point of two labels (one trace per label)
            point = page.locator(f"{SCATTER} .scatterlayer .trace").nth(trace).locator("path.point").nth(3)
            box = point.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            hover = page.locator(f"{SCATTER} .hoverlayer")
            expect(hover).to_contain_text("test image")
            index = int(re.search(r"test image (\d+)", hover.text_content()).group(1))
            frame.wait_for_function("i => document.body.dataset.shown === String(i)", arg=index)
            expect(preview.locator("#caption")).to_contain_text(f"test image {index}")
            pixels = np.array(frame.evaluate("""() => Array.from(document.getElementById('thumb').getContext('2d')
                .getImageData(0, 0, 112, 112).data)"""), dtype=np.uint8).reshape(112, 112, 4)
            drawn = pixels[::4, ::4, 0]  # 4x nearest-neighbour: every 4th pixel is one of the image's 28
            assert np.array_equal(drawn, to_uint8(x[index])), index
            shown.append(index)
            page.mouse.move(5, 5)  # off the chart: its label goes, so the next one read is the next point's
            expect(hover).to_have_text("")
        assert shown[0] != shown[1]
        page.screenshot(path=str(tmp_path / "hover.png"))
        assert page.locator('[data-testid="stException"]').count() == 0
        browser.close()


def test_a_live_beta_change_is_marked_on_the_curves(tmp_path):
    """The sidebar's β moves a running run; the curves then show where, with a dotted line and 'β 1→10'."""
    with streamlit_server(tmp_path) as url, sync_api.sync_playwright() as p:
        browser, page = open_page(p, url, width=1500)
        panel = train(page)
        frame = page.locator('iframe[title*="live_panel"]').element_handle().content_frame()
        assert frame.evaluate("() => (document.getElementById('plot').layout.shapes || []).length") == 0
        thumb = page.locator('.st-key-cfg_beta input[type="range"]')
        thumb.focus()
        thumb.press("End")  # β 1 -> 10, the slider's last value
        expect(page.locator(".st-key-cfg_beta")).to_contain_text("10")
        label = panel.locator("#plot .annotation-text", has_text="β 1→10")
        expect(label).to_be_visible(timeout=120_000)
        lines = frame.evaluate("""() => document.getElementById('plot')._fullLayout.shapes
            .filter(s => s.type === 'line').map(s => [s.xref, s.x0])""")
        assert sorted(ref for ref, _ in lines) == ["x", "x2", "x3"], lines  # one line in each of the three panels
        step = lines[0][1]
        assert step > 0 and all(x0 == step for _, x0 in lines), lines
        assert panel.locator("#plot .shapelayer path").count() >= 3  # drawn, not only in the layout
        page.screenshot(path=str(tmp_path / "marker.png"))
        page.get_by_role("button", name="Stop", exact=True).click()
        assert page.locator('[data-testid="stException"]').count() == 0
        browser.close()
