"""Training throughput with the dashboard open in a browser vs the headless CLI, same config.

One dashboard server and one Chromium page stay open for the whole benchmark, as for a person
who presses Train again; each round runs a CLI training and a dashboard training (Train clicked
in the page, the live panel refreshing every second) back to back, in alternating order (CLI
first in odd rounds, dashboard first in even ones), and compares samples/s per epoch (epoch 1
excluded as warm-up). Between trainings the page is idle (no polling), so each CLI run shares the
machine with an idle browser. A sprites epoch lasts under a second, so a training measures
--epochs - 1 of them (default 11, ~10 s); this shared machine drifts by +-15% over tens of
seconds, so each round's dashboard speed is divided by the CLI speed of the same round (about
15 s apart) and the median of those paired ratios is the result. Also reports the time from
clicking Train to the first curve point. With --tabs N it also compares N sessions polling one
run against one (a fresh server per training): only epochs begun after every page has loaded
count, so it measures the polling, not the pages' one-off loading.

    python benchmarks/bench_dashboard.py [--rounds 6] [--epochs 12] [--tabs 5]

Needs playwright and /usr/bin/chromium.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]


def cli_round(epochs: int) -> list[float]:
    runs_dir = Path(tempfile.mkdtemp()) / "runs"
    subprocess.run([sys.executable, "-m", "vae_core", "train", "--epochs", str(epochs), "--quiet",
                    "--runs-dir", str(runs_dir)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return run_speeds(next(runs_dir.iterdir()))


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(runs_dir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "VAE_RUNS_DIR": str(runs_dir)}
    srv = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port),
                            "--server.headless", "true"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(120):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    return srv, port


def stop_server(srv: subprocess.Popen) -> None:
    os.killpg(srv.pid, 15)
    srv.wait(10)


def open_page(browser, port: int, epochs: int):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"http://127.0.0.1:{port}/?epochs={epochs}")
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=60_000)
    time.sleep(3)  # let the sprites warm-up finish, as a person reading the page would
    return page


def new_run(runs_dir: Path, before: set[Path], clicked: float, timeout: float = 30) -> tuple[Path | None, float]:
    """The run directory Train created, and the time from the click to its first metrics row."""
    while time.time() - clicked < timeout:  # the first train row is the first point the live panel draws
        for d in (set(runs_dir.iterdir()) if runs_dir.exists() else set()) - before:
            text = (d / "metrics.jsonl").read_text() if (d / "metrics.jsonl").exists() else ""
            if text.strip():
                return d, json.loads(text.splitlines()[0])["wall_time"] - clicked
        time.sleep(0.05)
    return None, float("nan")


def run_speeds(run_dir: Path, after: float | None = None) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") == "test"]
    if after is None:
        return [r["samples_per_s"] for r in rows[1:]]
    return [r["samples_per_s"] for prev, r in zip(rows, rows[1:]) if prev["wall_time"] >= after]


class OpenDashboard:
    """A dashboard server with one Chromium page on it, kept open across trainings."""

    def __init__(self, epochs: int) -> None:
        from playwright.sync_api import sync_playwright

        self.epochs = epochs
        self.runs_dir = Path(tempfile.mkdtemp()) / "runs"
        self.srv, port = start_server(self.runs_dir)
        self.pw = sync_playwright().start()
        self.browser = self.pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=BROWSER_ARGS)
        self.page = open_page(self.browser, port, epochs)

    def train(self) -> tuple[list[float], float]:
        """Click Train, wait for the run to finish; samples/s of its epochs after the first, and the first-point time."""
        before = set(self.runs_dir.iterdir()) if self.runs_dir.exists() else set()
        clicked = time.time()
        self.page.get_by_role("button", name="Train").first.click()
        run_dir, first = new_run(self.runs_dir, before, clicked)
        if run_dir is None:
            raise RuntimeError("Train produced no metrics within 30 s")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # finished: the page stops polling before the next training
            status = run_dir / "status.json"
            if status.exists() and json.loads(status.read_text() or "{}").get("state") == "finished":
                break
            time.sleep(0.5)
        self.page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=60_000)
        return run_speeds(run_dir)[: self.epochs - 1], first

    def close(self) -> None:
        try:
            self.browser.close()
            self.pw.stop()
        finally:
            stop_server(self.srv)


def tabs_round(epochs: int, tabs: int) -> list[float]:
    """A fresh server and `tabs` pages on one run; speeds of the epochs begun once every page polls."""
    from playwright.sync_api import sync_playwright

    runs_dir = Path(tempfile.mkdtemp()) / "runs"
    srv, port = start_server(runs_dir)
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=BROWSER_ARGS)
            page = open_page(b, port, 30)  # long enough to outlast loading the extra tabs
            clicked = time.time()
            page.get_by_role("button", name="Train").first.click()
            run_dir, _ = new_run(runs_dir, set(), clicked)
            for _ in range(tabs - 1):  # more sessions on the same server: they reattach to the run and poll it
                extra = b.new_page(viewport={"width": 1400, "height": 1000})
                extra.goto(f"http://127.0.0.1:{port}/")
                extra.frame_locator('iframe[title*="live_panel"]').locator("#progress-text").wait_for(timeout=60_000)
            after = time.time() + 1.0  # count epochs begun once every page has loaded and polls
            deadline = time.monotonic() + 300
            speeds: list[float] = []
            while time.monotonic() < deadline and run_dir is not None:
                speeds = run_speeds(run_dir, after)
                if len(speeds) >= epochs - 1:
                    break
                time.sleep(0.5)
            b.close()
        return speeds[: epochs - 1]
    finally:
        stop_server(srv)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--tabs", type=int, default=0, help="also compare N browser tabs polling against one (0: skip)")
    args = ap.parse_args()
    cli, dash, firsts, pairs = [], [], [], []
    board = OpenDashboard(args.epochs)
    try:
        for i in range(args.rounds):
            order = ("cli", "dashboard") if i % 2 == 0 else ("dashboard", "cli")
            for which in order:
                if which == "cli":
                    c_round = cli_round(args.epochs)
                else:
                    speeds, first = board.train()
            cli += c_round
            dash += speeds
            firsts.append(first)
            pairs.append(statistics.median(speeds) / statistics.median(c_round))
            print(f"round {len(pairs)} ({' then '.join(order)}): CLI {statistics.median(c_round):,.0f}, dashboard "
                  f"{statistics.median(speeds):,.0f} samples/s: {pairs[-1]:.0%}", flush=True)
    finally:
        board.close()
    c, d = statistics.median(cli), statistics.median(dash)
    print(f"headless CLI : median {c:,.0f} samples/s over {len(cli)} epochs")
    print(f"dashboard    : median {d:,.0f} samples/s over {len(dash)} epochs (browser open, live panel refreshing)")
    print(f"ratio dashboard/CLI: {d / c:.0%} of the medians; paired rounds {', '.join(f'{r:.0%}' for r in pairs)} "
          f"(median {statistics.median(pairs):.0%}; target >= 85%)")
    if args.tabs > 1:
        one, many = [], []
        for _ in range(args.rounds):
            one += tabs_round(args.epochs, 1)
            many += tabs_round(args.epochs, args.tabs)
        o, m = statistics.median(one), statistics.median(many)
        print(f"{args.tabs} tabs: median {m:,.0f} samples/s vs 1 tab {o:,.0f}: {m / o:.0%} (target >= 75%)")
    print(f"click Train -> first curve point logged: {', '.join(f'{f:.1f} s' for f in firsts)} "
          f"(the live panel draws it within its 1 s refresh; target < 3 s)")


if __name__ == "__main__":
    main()
