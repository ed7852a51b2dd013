"""The live panel component's files: built once, reused, and never half-built."""
from __future__ import annotations

import re
from pathlib import Path

import plotly.io as pio
import pytest

from dashboard import live_panel
from dashboard.panels import training
from vae_core.lab import RunConfig

CHROMIUM = "/usr/bin/chromium"


def test_component_folder_holds_the_page_and_plotly_and_is_reused(tmp_path):
    d = live_panel._component_dir(tmp_path / "cache")
    assert (d / "index.html").read_bytes() == (live_panel.HERE / "index.html").read_bytes()
    assert (d / "plotly.min.js").stat().st_size == live_panel.PLOTLY_JS.stat().st_size
    assert 'src="plotly.min.js"' in (d / "index.html").read_text()  # the page loads the copy beside it
    stamp = (d / "plotly.min.js").stat().st_mtime_ns
    assert live_panel._component_dir(tmp_path / "cache") == d
    assert (d / "plotly.min.js").stat().st_mtime_ns == stamp  # reused, not copied again
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [d.name]  # no build folders left behind


def test_unwritable_cache_falls_back_to_a_private_copy(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")  # mkdir under a file fails, as an unwritable shared folder would
    d = live_panel._component_dir(blocked / "cache")
    assert (d / "index.html").is_file() and (d / "plotly.min.js").is_file()
    assert blocked not in d.parents


def _rows(n: int, base: float) -> list[dict]:
    return [{"step": 20 * i, "epoch": i / 8, "split": "train", "elbo": base + i, "recon": base + 10 + i,
             "kl": 10.0 + 0.1 * i, "beta": 1.0} for i in range(1, n + 1)]


@pytest.mark.browser
def test_a_new_runs_curves_autorange_after_a_long_run_on_the_same_chart(tmp_path):
    """The chart is updated in place across runs (Plotly.react). After a run long enough for its robust
    y-range (20+ rows), a new run's first curves stayed on the empty axes' [-1, 4] with autorange off
    until it too had 20 rows: Plotly took its own earlier autorange for a person's choice and kept it."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    page_dir = live_panel._component_dir(tmp_path / "cache")
    steps = [(None, []), ("run-a", _rows(3, -200.0)), ("run-a", _rows(30, -200.0)),  # the first run, drawn
             ("run-b", []), ("run-b", _rows(5, -300.0)), ("run-b", _rows(12, -300.0))]  # a new one after it
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto((page_dir / "index.html").as_uri())
            for name, rows in steps:
                fig = training.curves_figure(rows, [], RunConfig(), revision=name or "")
                # What Streamlit posts to the component on each refresh of the live fragment.
                page.evaluate("spec => window.postMessage({type: 'streamlit:render', args: {spec, config: {}, "
                              "metrics: [], notice: ''}}, '*')", pio.to_json(fig, validate=False))
                page.wait_for_function("n => { const gd = document.getElementById('plot');"
                                       " return gd._fullData && gd._fullData.length && gd._fullData[0]._length === n"
                                       " && gd._fullData.length === (n ? 4 : 3); }", arg=len(rows), timeout=30_000)
                if 0 < len(rows) < 20:  # autoranged: every point of the ELBO panel in view
                    (lo, hi), ys = page.evaluate("""() => { const gd = document.getElementById('plot');
                        return [gd._fullLayout.yaxis.range.slice(),
                                gd._fullData.filter(t => t.yaxis === 'y').flatMap(t => Array.from(t.y))]; }""")
                    assert lo <= min(ys) and hi >= max(ys), (name, len(rows), [lo, hi], (min(ys), max(ys)))
        finally:
            browser.close()


def test_live_setting_changes_are_read_off_the_rows_and_marked_on_each_panel():
    """A run moved live (β 1→4 at step 100, free bits 0→0.5 at 380): a dotted line in each panel and a label."""
    import plotly.graph_objects as go

    rows = [{**r, "beta": 1.0 if r["step"] < 100 else 4.0, "lr": 1e-3,
             "free_bits": 0.0 if r["step"] < 380 else 0.5} for r in _rows(30, -200.0)]
    rows[0].pop("free_bits")  # rows of older runs lack some settings: no change is read from a missing value
    assert training.setting_changes(rows) == [(100.0, {"β": (1.0, 4.0)}), (380.0, {"free bits": (0.0, 0.5)})]
    assert training.setting_changes(_rows(30, -200.0)) == []  # nothing moved, nothing marked
    # Rows written before beta_effective existed kept the set value in beta_set and the warm-up's weight in beta.
    warming = [{"step": 20 * i, "split": "train", "beta": i / 10, "beta_set": 1.0} for i in range(1, 11)]
    assert training.setting_changes(warming) == []
    spec = training.curves_figure(rows, [], RunConfig()).to_dict()
    go.Figure(spec)  # Plotly accepts every property of the marks (the live figure skips its validators)
    lines = [(s["xref"], s["x0"]) for s in spec["layout"]["shapes"]]
    assert sorted(lines) == [("x", 100.0), ("x", 380.0), ("x2", 100.0), ("x2", 380.0), ("x3", 100.0), ("x3", 380.0)]
    labels = [a["text"] for a in spec["layout"]["annotations"] if a["xref"] == "x"]
    assert labels == ["β 1→4", "free bits 0→0.5"]


def test_changes_close_together_share_one_label():
    """Three arrow-key presses on the β slider land in three log rows: three lines, one label, first→last."""
    rows = _rows(60, -200.0)
    for r in rows:
        r["beta"] = 1.0 if r["step"] < 600 else 1.05 if r["step"] < 620 else 1.1 if r["step"] < 640 else 1.15
    spec = training.curves_figure(rows, [], RunConfig()).to_dict()["layout"]
    assert len(spec["shapes"]) == 3 * 3
    assert [a["text"] for a in spec["annotations"] if a["xref"] == "x"] == ["β 1→1.15"]


def test_the_status_line_and_the_progress_bar_name_one_thread_count(tmp_path):
    """The bar said 'cpu (1 thread)' (the count the CPU-sharing tuner chose) while the message beside it said
    'training on cpu (2 threads)' (torch's count when training began). Watched through the first epoch."""
    import time

    from vae_core.lab import Lab

    lab = Lab(tmp_path / "runs", shares_cpu_with_server=True)  # as the dashboard's Lab: the tuner picks the count
    cfg = RunConfig().replace(epochs=1, train_size=4096, batch_size=16, hidden_dim=64, latent_dim=2, evidence_every=0,
                              device="cpu")  # threads are a CPU run's (a GPU machine would pick CUDA)
    run = lab.start(cfg, name="threads")
    seen = []
    try:
        deadline = time.monotonic() + 120
        while run.status().state in ("queued", "running") and time.monotonic() < deadline:
            s = run.status()
            view = training.status_view(run, s)
            counts = {m for text in (view["text"], view["progress_text"])
                      for m in re.findall(r"\((\d+) threads?", text)}
            seen.append((view["text"], view["progress_text"]))
            assert len(counts) <= 1, seen[-1]
            time.sleep(0.005)
    finally:
        lab.stop("threads", wait=10)
        lab.shutdown()
    assert any("thread" in bar for _, bar in seen)  # the bar did name a count while it trained
