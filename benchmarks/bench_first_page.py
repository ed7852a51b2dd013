"""The first page after a fresh start: how long a newcomer looks at a blank window.

For each of --rounds fresh servers (`streamlit run dashboard/app.py` over an empty runs directory,
started the way the README says), once /_stcore/health answers: a fresh headless Chromium opens the
page and the browser's own clock records, from the moment navigation starts,

* skeleton: Streamlit's page frame is drawn (`[data-testid="stApp"]`: its header and spinner);
* first element: the app's own first element (the sidebar's title) is shown, i.e. the script ran;
* controls: the Train button is shown (the whole sidebar is drawn);
* idle: the script run finished (`data-test-script-state="notRunning"`).

Then it presses Train and records the first curve point drawn in the live chart (the live panel's
iframe reports its first data point). The heavy imports (torch, the dataset) happen in the warm-up
thread after the first render, so they must not enter the first three numbers.

Goal (issue 16): something within 2 s (the skeleton; the app's first element is reported beside it).

    python benchmarks/bench_first_page.py [--rounds 3] [--read-s 5] [--json PATH]

Exits 1 when a goal failed, 2 when the benchmark could not run. Needs playwright and /usr/bin/chromium.
Run nothing else beside it: it measures a cold start.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_class import BROWSER_ARGS, IDLE, TRAIN, start_server, stop_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SKELETON = '[data-testid="stApp"]'
FIRST = '[data-testid="stSidebar"] h1, [data-testid="stSidebar"] h2, [data-testid="stSidebar"] h3'
# The live panel's iframe draws its chart with Plotly; a first point is a trace with data in it.
POINT_JS = """() => {
  for (const f of document.querySelectorAll('iframe')) {
    try {
      const d = f.contentDocument; if (!d) continue;
      for (const g of d.querySelectorAll('.js-plotly-plot')) {
        // Plotly's own count of points per trace (g.data holds the base64 arrays as sent)
        if ((g._fullData || []).some(t => (t._length || (t.y && t.y.length) || 0) > 0)) return true;
      }
    } catch (e) {}
  }
  return false;
}"""


def one_round(pw, read_s: float) -> dict[str, float]:
    runs_dir = Path(tempfile.mkdtemp(prefix="bench-first-"))
    log = runs_dir / "server.log"
    t_launch = time.monotonic()
    srv, port = start_server(runs_dir / "runs", None, log)
    out = {"server_ready_s": time.monotonic() - t_launch}
    try:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            t0 = time.monotonic()
            page.goto(f"http://localhost:{port}/", wait_until="commit")
            page.wait_for_selector(SKELETON, state="attached", timeout=120_000)
            out["skeleton_s"] = time.monotonic() - t0
            page.wait_for_selector(FIRST, state="visible", timeout=120_000)
            out["first_element_s"] = time.monotonic() - t0
            page.locator(TRAIN).first.wait_for(state="visible", timeout=120_000)
            out["controls_s"] = time.monotonic() - t0
            page.wait_for_selector(IDLE, timeout=120_000)
            out["idle_s"] = time.monotonic() - t0
            page.wait_for_timeout(read_s * 1000)  # a person reads the page; the warm-up loads torch meanwhile
            page.locator(TRAIN).first.click()
            t1 = time.monotonic()
            deadline = t1 + 120
            while time.monotonic() < deadline and not page.evaluate(POINT_JS):
                page.wait_for_timeout(20)
            out["train_to_first_point_s"] = time.monotonic() - t1 if time.monotonic() < deadline else float("nan")
        finally:
            browser.close()
    finally:
        stop_server(srv)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--read-s", type=float, default=5.0, help="seconds between the idle page and the Train click")
    ap.add_argument("--goal", type=float, default=2.0, help="seconds to the skeleton")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("needs playwright (pip install -e '.[dev]')", file=sys.stderr)
        return 2
    if not Path("/usr/bin/chromium").exists():
        print("needs Debian's chromium at /usr/bin/chromium", file=sys.stderr)
        return 2
    rounds = []
    with sync_playwright() as pw:
        for i in range(args.rounds):
            r = one_round(pw, args.read_s)
            rounds.append(r)
            print(f"round {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
    keys = list(rounds[0])
    print(f"\n{platform.node()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'':28s}" + "".join(f"{'round ' + str(i + 1):>10s}" for i in range(len(rounds))) + f"{'median':>10s}")
    for k in keys:
        vals = [r[k] for r in rounds]
        print(f"{k:28s}" + "".join(f"{v:10.2f}" for v in vals) + f"{statistics.median(vals):10.2f}")
    ok = all(r["skeleton_s"] <= args.goal for r in rounds)
    print(f"\nskeleton within {args.goal:g} s in every round: {'PASS' if ok else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "goal_s": args.goal, "pass": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
