"""What a person sees: the real app in headless Chromium, trained live, every panel drawn.

Starts `streamlit run dashboard/app.py` on a free port with its own runs directory and
drives it with Playwright. Skips (with the reason) only where Playwright or Chromium is
missing; CI installs both, so there it always runs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from helpers import streamlit_server
from vae_core.config import ModelConfig

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("VAE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set VAE_CHROMIUM)", allow_module_level=True)
expect = sync_api.expect
expect.set_options(timeout=120_000)  # every expect waits for its state this long: the machine may be busy (3-30x slower)


@pytest.fixture
def server(tmp_path):
    with streamlit_server(tmp_path) as url:
        yield url


@pytest.fixture
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.set_default_timeout(120_000)  # a state to wait for, however loaded the machine is
        page.goto(server)
        page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=60_000)
        yield page
        browser.close()


def set_number(page, key: str, value: int) -> None:
    box = page.locator(f".st-key-{key} input")
    box.fill(str(value))
    box.press("Enter")
    expect(box).to_have_value(str(value))
    # Its rerun to the end before the next control moves: a run still in flight sends every other control's
    # value again (controls._reassert), which undid a slider press made meanwhile (Home lost: 8 -> 9, in CI).
    name = key.removeprefix("cfg_")
    page.wait_for_function(f"() => new URLSearchParams(location.search).get('{name}') === '{value}'",
                           timeout=120_000)  # sync_url mirrors a non-default value once the run has read it
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')


def test_train_live_and_every_panel_draws(page, tmp_path):
    # Latent size 2 from the keyboard, as a person would (Home = 1, one step right = 2).
    thumb = page.locator('.st-key-cfg_latent_dim input[type="range"]')
    thumb.focus()
    thumb.press("Home")
    expect(thumb).to_have_value("1")
    thumb.press("ArrowRight")
    expect(thumb).to_have_value("2")
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')
    set_number(page, "cfg_epochs", 40)  # long enough to watch, stopped below

    # The whole live panel is one component (dashboard/live_panel): status, metrics, chart, reconstructions.
    # It is there before any run, with empty axes, and Train updates it instead of loading a new one.
    panel = page.frame_locator('iframe[title*="live_panel"]')
    expect(panel.locator("#notice")).to_contain_text("No run yet", timeout=60_000)
    frame = page.locator('iframe[title*="live_panel"]').element_handle().content_frame()
    frame.evaluate("() => { window.__loaded_before_train = true; }")
    page.get_by_role("button", name="Train", exact=True).click()
    progress = panel.locator("#progress-text")
    expect(progress).to_contain_text("samples/s", timeout=120_000)
    expect(panel.locator("#metrics")).to_contain_text("Test ELBO", timeout=120_000)
    expect(panel.locator("#notice")).to_be_hidden()
    assert frame.evaluate("() => window.__loaded_before_train === true"), "Train reloaded the live panel"
    curves = panel.locator("#plot")
    expect(curves.locator(".scatterlayer .trace").first).to_be_visible()
    expect(panel.locator("#recon img")).to_be_visible()  # reconstructions
    assert panel.locator("#recon img").evaluate("img => img.naturalWidth") > 100

    # The live panel keeps updating by itself: the test ELBO card moves to a later epoch.
    # The curves are updated in place (Plotly.react on the same chart), not rebuilt on each refresh.
    points = curves.evaluate("gd => { gd.__kept = true; return gd._fullData[0]._length; }")
    # A person zooms into the ELBO panel while it trains: the zoom survives the refreshes.
    full = curves.evaluate("gd => gd._fullLayout.xaxis.range.slice()")
    box = curves.locator('.nsewdrag[data-subplot="xy"]').bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.8, steps=8)
    page.mouse.up()
    zoomed = curves.evaluate("gd => gd._fullLayout.xaxis.range.slice()")
    assert zoomed[1] - zoomed[0] < 0.7 * (full[1] - full[0]), (full, zoomed)
    before = progress.inner_text()
    expect(progress).not_to_have_text(before, timeout=120_000)
    epoch_of = lambda: float(re.search(r"epoch ([\d.]+)", progress.inner_text()).group(1))  # noqa: E731
    first_epoch = epoch_of()
    expect(panel.locator("#footer")).to_contain_text("Refreshes every 1 s")
    frame.wait_for_function(
        "e => { const m = document.getElementById('progress-text').innerText.match(/epoch ([\\d.]+)/);"
        " return m && parseFloat(m[1]) >= e + 1; }", arg=first_epoch, timeout=120_000)
    kept, later_points, later_range = curves.evaluate(
        "gd => [gd.__kept === true, gd._fullData[0]._length, gd._fullLayout.xaxis.range.slice()]")
    assert kept and later_points > points, (kept, points, later_points)
    assert later_range == pytest.approx(zoomed), (zoomed, later_range)
    page.mouse.dblclick(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)  # back to the whole run
    frame.wait_for_function(f"() => {{ const r = document.getElementById('plot')._fullLayout.xaxis.range;"
                            f" return r[1] - r[0] > {zoomed[1] - zoomed[0]}; }}", timeout=120_000)
    # Log scale: the switch in the panel redraws the same chart with the positive losses on log axes.
    panel.get_by_label("Log scale").check()
    expect(curves.locator(".g-ytitle").first).to_be_visible()
    frame.wait_for_function("() => document.getElementById('plot')._fullLayout.yaxis.type === 'log'", timeout=120_000)
    expect(panel.locator(".annotation-text").first).to_contain_text("−ELBO (loss)")
    assert curves.evaluate("gd => gd.__kept === true")
    panel.get_by_label("Log scale").uncheck()
    frame.wait_for_function("() => document.getElementById('plot')._fullLayout.yaxis.type === 'linear'",
                            timeout=120_000)
    expect(panel.locator(".plotly-notifier .notifier-note")).to_have_count(0, timeout=120_000)  # zoom tips gone
    page.mouse.move(700, 5)  # no tooltip over the picture
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.screenshot(path=str(tmp_path / "training.png"), full_page=True)
    if os.environ.get("VAE_SCREENSHOT"):  # e.g. the README's picture: VAE_SCREENSHOT=docs/dashboard.png
        shutil.copyfile(tmp_path / "training.png", os.environ["VAE_SCREENSHOT"])

    page.get_by_role("tab", name="Explore latent space").click()
    for heading in ("Sampling", "Interpolation", "manifold", "scatter"):
        expect(page.get_by_text(re.compile(heading, re.I)).first).to_be_visible(timeout=120_000)
    expect(page.locator('[data-testid="stImage"] img').first).to_be_visible()
    expect(page.locator('[data-testid="stPlotlyChart"]').first).to_be_visible()
    page.screenshot(path=str(tmp_path / "explore.png"), full_page=True)

    page.get_by_role("button", name="Stop", exact=True).click()
    expect(page.get_by_text(re.compile(r"Stopped"))).to_be_visible(timeout=120_000)  # this tab's status line
    page.get_by_role("tab", name="Training").click()
    expect(panel.locator("#message")).to_contain_text("Stopped", timeout=120_000)
    assert page.locator('[data-testid="stException"]').count() == 0
    assert (tmp_path / "training.png").stat().st_size > 10_000


def test_dark_preference_gives_a_dark_page_and_live_panel(server):
    # .streamlit/config.toml has a light and a dark palette and no fixed base: a browser that prefers
    # dark gets the dark one, and the live panel (its own frame) follows the theme Streamlit hands it.
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100}, color_scheme="dark")
        page.goto(server)
        page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=60_000)
        assert page.evaluate("() => getComputedStyle(document.querySelector('[data-testid=stApp]')).backgroundColor"
                             ) == "rgb(14, 17, 23)"
        panel = page.frame_locator('iframe[title*="live_panel"]')
        expect(panel.locator("#notice")).to_contain_text("No run yet", timeout=60_000)
        expect(panel.locator("#plot .main-svg").first).to_be_attached()
        frame = page.locator('iframe[title*="live_panel"]').element_handle().content_frame()
        frame.wait_for_function("() => document.getElementById('plot')._fullLayout.font.color === '#fafafa'")
        assert frame.evaluate("() => getComputedStyle(document.body).color") == "rgb(250, 250, 250)"
        browser.close()


def test_settings_survive_widget_code_that_loads_late(server):
    # Each widget type's code is a separate script the page fetches on demand. On a busy machine
    # (CI once) the Advanced expander's checkbox and number boxes arrived after the first rerun and
    # started from their widget defaults, which the next rerun sent back: binarize became false,
    # hidden units 16. Hold those scripts back until a rerun has happened, then check nothing moved.
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.set_default_timeout(120_000)  # a state to wait for, however loaded the machine is
        held = []
        page.route(re.compile(r"/static/js/(Checkbox|NumberInput)\.[^/]*\.js$"), lambda route: held.append(route))
        page.goto(server)
        idle = '[data-testid="stApp"][data-test-script-state="notRunning"]'
        page.wait_for_selector(idle, timeout=60_000)
        thumb = page.locator('.st-key-cfg_latent_dim input[type="range"]')
        thumb.focus()
        thumb.press("ArrowRight")  # 8 -> 9 (the default + 1): a rerun while the held widgets have no code yet
        expect(thumb).to_have_value(str(ModelConfig().latent_dim + 1))
        page.wait_for_selector(idle)
        assert held, "the widget scripts were not requested: the test no longer holds anything back"
        for route in held:
            route.continue_()
        page.route(re.compile(r"/static/js/(Checkbox|NumberInput)\.[^/]*\.js$"), lambda r: r.continue_())
        expect(page.locator(".st-key-cfg_binarize input")).to_be_attached()
        expect(page.locator(".st-key-cfg_hidden_dim input")).to_have_value("400")
        thumb.focus()
        thumb.press("ArrowLeft")  # another rerun: it sends whatever the late widgets now hold
        expect(thumb).to_have_value(str(ModelConfig().latent_dim))
        # The URL follows the run's settings: once it has dropped latent_dim (back at its default), any
        # parameter left is a setting that changed by itself. (The idle selector can match before the
        # slider's rerun begins, so a fixed wait after it was too short on a loaded machine.)
        page.wait_for_function("() => !location.search.includes('latent_dim')", timeout=120_000)
        params = [k for k in parse_qs(urlparse(page.url).query) if k != "sid"]  # sid: the tab's identity
        assert not params, f"settings changed by themselves: {page.url}"
        assert page.locator(".st-key-cfg_binarize input").is_checked()
        expect(page.locator(".st-key-cfg_hidden_dim input")).to_have_value("400")
        browser.close()


IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
# Small runs from URL parameters (settings.query_from_values): 512 sprites, batch 64, 8 steps an epoch.
SMALL = "train_size=512&batch_size=64&hidden_dim=64&evidence_every=0&epochs=400"


def _steps(panel) -> int:
    return int(re.search(r"step ([\d,]+)", panel.locator("#progress-text").inner_text()).group(1).replace(",", ""))


@pytest.mark.slow
def test_sessions_train_side_by_side_and_a_third_waits_in_the_queue(tmp_path):
    """Two tabs on one server (2 slots) each train their own run; neither stops the other; a third queues."""
    runs_dir = tmp_path / "runs"
    with streamlit_server(tmp_path, VAE_MAX_RUNS="2") as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        pages = {}
        for beta in ("0.5", "2.0", "4.0"):  # one browser context each: separate tabs, separate sessions
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{url}/?{SMALL}&beta={beta}")
            page.wait_for_selector(IDLE, timeout=120_000)
            expect(page.locator(".st-key-cfg_beta")).to_contain_text(beta.rstrip("0").rstrip("."))
            pages[beta] = page
        panel = {b: pg.frame_locator('iframe[title*="live_panel"]') for b, pg in pages.items()}

        names = {}
        for beta in ("0.5", "2.0"):
            pages[beta].get_by_role("button", name="Train", exact=True).click()
            expect(panel[beta].locator("#progress-text")).to_contain_text("samples/s", timeout=120_000)
            names[beta] = panel[beta].locator("#message b").first.inner_text()
        assert names["0.5"] != names["2.0"]
        for beta, name in names.items():  # each run has its own β, and each page shows its own run
            assert json.loads((runs_dir / name / "config.json").read_text())["train"]["beta"] == float(beta)
            expect(panel[beta].locator("#message")).to_contain_text(name)
        # Both keep training: each page's step count moves on while the other trains too.
        for _ in range(2):
            for beta in names:
                before = _steps(panel[beta])
                frame = pages[beta].locator('iframe[title*="live_panel"]').element_handle().content_frame()
                frame.wait_for_function(
                    "n => { const m = document.getElementById('progress-text').innerText.match(/step ([\\d,]+)/);"
                    " return m && parseInt(m[1].replace(/,/g, '')) > n; }", arg=before, timeout=120_000)
        for beta, name in names.items():
            status = json.loads((runs_dir / name / "status.json").read_text())
            assert status["state"] == "running", (name, status)
            expect(panel[beta].locator("#message")).not_to_contain_text("Stopped")

        # A third tab: both slots are taken, so its run waits in the queue, and its page says so.
        pages["4.0"].get_by_role("button", name="Train", exact=True).click()
        waiting = pages["4.0"].get_by_text(re.compile(r"Queued\. Waiting for a free slot: place 1 in the queue"))
        expect(waiting).to_be_visible(timeout=120_000)  # the queue watch's line, above the panel
        for beta, name in names.items():
            assert json.loads((runs_dir / name / "status.json").read_text())["state"] == "running"
            expect(panel[beta].locator("#message")).to_contain_text(name)  # still showing their own runs

        # The first tab stops its run: the queued one starts by itself and its page follows.
        pages["0.5"].get_by_role("button", name="Stop", exact=True).click()
        expect(panel["0.5"].locator("#message")).to_contain_text("Stopped", timeout=120_000)
        expect(panel["4.0"].locator("#progress-text")).to_contain_text("samples/s", timeout=120_000)
        expect(panel["4.0"].locator("#message")).not_to_contain_text("Queued")
        expect(waiting).to_have_count(0)
        assert json.loads((runs_dir / names["2.0"] / "status.json").read_text())["state"] == "running"
        for page in pages.values():
            assert page.locator('[data-testid="stException"]').count() == 0
        browser.close()


def test_leaving_explore_while_training_raises_nothing(page):
    """Leaving Explore unmounts its scatter, whose cleared selection once asked for a rerun of fragments the
    next tab does not draw: "No fragment found for target 'explore_scatter_fragment'" at the top of the page."""
    set_number(page, "cfg_epochs", 200)
    thumb = page.locator('.st-key-cfg_latent_dim input[type="range"]')
    thumb.focus()
    thumb.press("Home")
    thumb.press("ArrowRight")
    expect(thumb).to_have_value("2")
    # The slider's rerun first: a click that lands while the sidebar is redrawn can be lost (seen once under load).
    page.wait_for_function("() => /[?&]latent_dim=2(&|$)/.test(location.search)", timeout=120_000)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')
    page.get_by_role("button", name="Train", exact=True).click()
    panel = page.frame_locator('iframe[title*="live_panel"]')
    expect(panel.locator("#metrics")).to_contain_text("Test ELBO", timeout=120_000)
    for other in (re.compile("Evidence"), "Runs", "Training"):
        page.get_by_role("tab", name="Explore latent space").click()
        expect(page.locator('[data-testid="stPlotlyChart"]').first).to_be_visible()
        page.wait_for_timeout(1500)  # the scatter mounts and reports its (empty) selection
        page.get_by_role("tab", name=other).click()
        page.wait_for_timeout(1500)
        page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')
        assert page.locator('[data-testid="stException"]').all_inner_texts() == [], other
    page.get_by_role("button", name="Stop", exact=True).click()


# ------------------------------------------------------------------ untrusted strings (issue 21, item 14)

HOSTILE = "![t](http://attacker.invalid/x.png) :red[**Session expired, sign in again**]"
HOSTILE_DIR = "![n](x.png) :blue[**Named**]"  # a run folder's name: anything but '/'

# Every text node that holds one of the hostile strings' words, with what styles it: a tag other than a
# paragraph or heading around it, or a colour other than its paragraph's, is the attacker's styling.
STYLED = """(words) => {
  const out = [];
  for (const root of document.querySelectorAll('[data-testid="stMarkdownContainer"]')) {
    const walk = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let n = walk.nextNode(); n; n = walk.nextNode()) {
      if (!words.some((w) => n.textContent.includes(w))) continue;
      const el = n.parentElement, block = el.closest('p, h1, h2, h3, h4, h5, h6, li') || root;
      if (!['P', 'H1', 'H2', 'H3', 'H4', 'H5', 'H6'].includes(el.tagName) && !(el.tagName === 'SPAN' &&
          getComputedStyle(el).color === getComputedStyle(block).color && !el.closest('strong, em, a')))
        out.push(el.tagName + ': ' + n.textContent);
    }
    for (const bad of root.querySelectorAll('img, a[href*="attacker"], .katex'))
      out.push(bad.outerHTML.slice(0, 120));
  }
  return out;
}"""


def text(locator) -> str:
    """What a person reads (the page puts an invisible word joiner into untrusted http:// to keep it a text)."""
    return locator.inner_text().replace("\u2060", "")


def _hostile_run(runs_dir: Path) -> None:
    """A finished tiny run whose status.json message and config.json parent are hostile, and a copy of it
    in a folder with a hostile name."""
    from vae_core import runs
    from vae_core.lab import Lab, RunConfig

    lab = Lab(runs_dir, num_threads=1)
    try:
        run = lab.start(RunConfig().replace(epochs=1, train_size=256, hidden_dim=32, batch_size=64,
                                            evidence_every=0), name="evil_run")
        run.join(120)
        assert run.status().state == "finished", run.status().message
    finally:
        lab.shutdown()
    d = runs_dir / "evil_run"
    status = json.loads((d / runs.STATUS).read_text())
    (d / runs.STATUS).write_text(json.dumps({**status, "message": HOSTILE}))
    config = json.loads((d / runs.CONFIG).read_text())
    (d / runs.CONFIG).write_text(json.dumps({**config, "parent": {"run": HOSTILE, "step": 3}}))
    shutil.copytree(d, runs_dir / HOSTILE_DIR)


def test_hostile_url_run_files_and_file_name_render_as_text(tmp_path):
    """The attack of issue 21: `/?beta=![t](http://attacker/x.png) :red[**…**]` made the page fetch from the
    attacker's host and show their styled text. URL values, a run's status message and parent, a run folder's
    name and an uploaded file's name must all show as the text they are, and nothing may leave for outside."""
    from urllib.parse import quote

    _hostile_run(tmp_path / "runs")
    words = ["Session expired", "Named", "attacker"]
    with streamlit_server(tmp_path) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.set_default_timeout(120_000)
        outside: list[str] = []
        page.on("request", lambda r: outside.append(r.url)  # blob: and data: URLs are the page's own
                if not r.url.startswith("data:") and urlparse(r.url.removeprefix("blob:")).hostname != "127.0.0.1"
                else None)
        page.goto(f"{url}/?beta={quote(HOSTILE)}&dataset={quote(HOSTILE_DIR)}")
        page.wait_for_selector(IDLE, timeout=60_000)
        warning = page.locator('[data-testid="stAlert"]', has_text="Ignored invalid settings")
        expect(warning).to_contain_text("Session expired")
        for shown in ("beta=" + HOSTILE, "dataset=" + HOSTILE_DIR):  # the very characters, brackets and stars
            assert shown in text(warning), text(warning)
        assert page.evaluate(STYLED, words) == []

        page.get_by_role("tab", name="Runs").click()
        expect(page.get_by_text("2 runs in")).to_be_visible()
        grid = page.locator('[data-testid="stDataFrame"]').first.bounding_box()
        for row in (1, 2):  # tick both: the actions of the first, the comparison of both
            page.mouse.click(grid["x"] + 15, grid["y"] + 35 * row + 17)
            page.wait_for_timeout(300)
            page.wait_for_selector(IDLE)
        expect(page.get_by_text("Left out of the comparison")).to_be_visible()  # the hostile folder: unreadable
        assert "forked from " + HOSTILE in text(page.locator("body"))
        assert page.get_by_text(HOSTILE_DIR).count() >= 2
        assert page.evaluate(STYLED, words) == []

        upload = page.get_by_text("Import a run (.zip)")
        upload.click()
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
            files=[{"name": HOSTILE_DIR + ".zip", "mimeType": "application/zip", "buffer": b"not a zip"}])
        expect(page.get_by_text("Could not import " + HOSTILE_DIR + ".zip")).to_be_visible()
        assert page.evaluate(STYLED, words) == []

        grid = page.locator('[data-testid="stDataFrame"]').first.bounding_box()  # moved down by the message
        page.mouse.click(grid["x"] + 15, grid["y"] + 35 + 17)  # untick the hostile folder (row 1: no Open)
        page.wait_for_timeout(300)
        page.wait_for_selector(IDLE)
        page.locator(".st-key-runs_open button").first.click()
        page.wait_for_timeout(300)
        page.wait_for_selector(IDLE)
        page.get_by_role("tab", name="Training").click()
        panel = page.frame_locator('iframe[title*="live_panel"]')
        expect(panel.locator("#message")).to_contain_text("Session expired")
        assert "Finished: " + HOSTILE in text(panel.locator("#message"))  # as text, stars and all
        assert panel.locator("#message b").all_inner_texts() == ["evil_run"]
        assert page.evaluate(STYLED, words) == []
        assert not outside, outside
        assert page.locator('[data-testid="stException"]').count() == 0
        browser.close()


def test_only_the_sidebar_stop_shows_while_the_page_reruns(server):
    """Issue 16 bug 11: while a script run lasts over 0.5 s Streamlit shows its own running man with a Stop
    button beside the sidebar's Stop: two Stops, one of which stops only the page's script. The server's
    answers after the one that says a rerun's script runs are held back here, as from a busy server, so the
    page stays in its rerun long enough to show it."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.set_default_timeout(120_000)
        held: list = []
        hold = {"on": False, "running": False}

        def relay(ws) -> None:
            upstream = ws.connect_to_server()
            ws.on_message(upstream.send)
            def down(m) -> None:
                if hold["on"] and hold["running"]:
                    held.append(m)
                    return
                # ForwardMsg field 9, session_status_changed (b"J..."): "the script runs". Hold what follows.
                hold["running"] = hold["on"] and isinstance(m, bytes) and m[:1] == b"J"
                ws.send(m)

            upstream.on_message(down)

        page.route_web_socket(re.compile(r"/_stcore/stream"), relay)
        page.goto(server)
        page.wait_for_selector(IDLE, timeout=60_000)
        stop = page.get_by_role("button", name="Stop", exact=True)
        expect(stop).to_have_count(1)
        hold["on"] = True
        thumb = page.locator('.st-key-cfg_latent_dim input[type="range"]')
        thumb.focus()
        thumb.press("ArrowRight")  # a rerun the server will not seem to finish while its answers are held
        expect(page.locator('[data-testid="stStatusWidget"]')).to_be_visible()
        expect(page.get_by_test_id("stStatusWidgetRunningIcon")).to_be_visible()  # the page says it is busy
        visible = [b for b in stop.all() if b.is_visible()]
        assert len(visible) == 1, f"{len(visible)} Stop buttons visible"
        assert visible[0].locator("xpath=ancestor::*[@data-testid='stSidebar']").count() == 1
        assert held, "no server message was held back: the page never waited"
        browser.close()


def test_quick_arrow_presses_on_beta_all_count_while_training(tmp_path):
    """Issue 16 bug 12: arrow presses on the β slider a fraction of a second apart, while a run trained, were
    partly lost (4 → 1.15 instead of 1): the server sent each applied β back to the browser, and the echo
    arrived after the next presses, moving the slider back under them. 14 presses 0.15 s apart lost 5."""
    from dashboard.settings import BETAS

    runs_dir = tmp_path / "runs"
    presses = BETAS.index(4.0) - BETAS.index(1.0)
    with streamlit_server(tmp_path) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.set_default_timeout(120_000)
        page.goto(f"{url}/?{SMALL}&beta=4.0")
        page.wait_for_selector(IDLE, timeout=60_000)
        thumb = page.locator('.st-key-cfg_beta input[type="range"]')
        expect(thumb).to_have_attribute("aria-valuetext", "4")
        page.get_by_role("button", name="Train", exact=True).click()
        panel = page.frame_locator('iframe[title*="live_panel"]')
        expect(panel.locator("#progress-text")).to_contain_text("samples/s", timeout=120_000)
        name = panel.locator("#message b").first.inner_text()

        thumb.focus()
        for _ in range(presses):  # a person tapping the key: each press's rerun is still on its way
            page.keyboard.press("ArrowLeft")
            page.wait_for_timeout(150)
        expect(thumb).to_have_attribute("aria-valuetext", "1")

        def live_beta() -> float | None:
            status = json.loads((runs_dir / name / "status.json").read_text())
            return status.get("beta") if status.get("state") == "running" else -1.0

        deadline = time.monotonic() + 120
        while live_beta() != 1.0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert live_beta() == 1.0, "the run's β did not follow the slider"
        expect(thumb).to_have_attribute("aria-valuetext", "1")  # and nothing moved it back since
        page.get_by_role("button", name="Stop", exact=True).click()
        browser.close()
