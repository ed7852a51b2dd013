"""Training throughput with the dashboard open in a browser vs the headless CLI, same config.

Alternates: CLI run, dashboard run (Chromium open on the live panel, refreshing every second),
CLI, dashboard... and compares samples/s per epoch (epoch 1 excluded as warm-up). A sprites
epoch lasts under a second, so a round measures --epochs - 1 of them (default 11, ~10 s);
this shared machine drifts by +-15% over tens of seconds, so each round's dashboard speed is
also divided by the CLI round just before it and the median of those paired ratios is shown. Also
reports the time from clicking Train to the first curve point in the browser. With --tabs N
it also compares N sessions polling one run against one: only epochs begun after every page
has loaded count, so it measures the polling, not the pages' one-off loading.

    python benchmarks/bench_dashboard.py [--rounds 3] [--epochs 12] [--tabs 5]

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


def epoch_speeds(runs_dir: Path, after: float | None = None) -> list[float]:
    """Training samples/s of each epoch after the first (warm-up), or of each epoch begun after `after`."""
    rows = []
    for d in runs_dir.iterdir():
        for line in (d / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("split") == "test":
                rows.append(r)
    if after is None:
        return [r["samples_per_s"] for r in rows[1:]]
    return [r["samples_per_s"] for prev, r in zip(rows, rows[1:]) if prev["wall_time"] >= after]


def cli_round(epochs: int) -> list[float]:
    runs_dir = Path(tempfile.mkdtemp()) / "runs"
    subprocess.run([sys.executable, "-m", "vae_core", "train", "--epochs", str(epochs), "--quiet",
                    "--runs-dir", str(runs_dir)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return epoch_speeds(runs_dir)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def dashboard_round(epochs: int, tabs: int = 1) -> tuple[list[float], float]:
    from playwright.sync_api import sync_playwright

    runs_dir = Path(tempfile.mkdtemp()) / "runs"
    port = free_port()
    env = {**os.environ, "VAE_RUNS_DIR": str(runs_dir)}
    srv = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port),
                            "--server.headless", "true"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=BROWSER_ARGS)
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/?epochs=30")  # long enough to outlast loading the extra tabs
            page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=60_000)
            time.sleep(3)  # let the sprites warm-up finish, as a person reading the page would
            clicked = time.time()
            page.get_by_role("button", name="Train").first.click()
            first_curve = float("nan")
            while time.time() - clicked < 30:  # the first train row is the first point the live panel draws
                files = list(runs_dir.glob("*/metrics.jsonl")) if runs_dir.exists() else []
                if files and files[0].read_text().strip():
                    first_curve = json.loads(files[0].read_text().splitlines()[0])["wall_time"] - clicked
                    break
                time.sleep(0.05)
            after = None
            if tabs > 1:  # more sessions on the same server: they reattach to the run and poll it
                for _ in range(tabs - 1):
                    extra = b.new_page(viewport={"width": 1400, "height": 1000})
                    extra.goto(f"http://127.0.0.1:{port}/")
                    extra.wait_for_selector('[data-testid="stProgress"]', timeout=60_000)
                after = time.time() + 1.0  # count epochs begun once every page has loaded and polls
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                speeds = epoch_speeds(runs_dir, after) if runs_dir.exists() and any(runs_dir.iterdir()) else []
                if len(speeds) >= epochs - 1:
                    break
                time.sleep(0.5)
            b.close()
        return speeds[: epochs - 1], first_curve
    finally:
        os.killpg(srv.pid, 15)
        srv.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--tabs", type=int, default=0, help="also compare N browser tabs polling against one (0: skip)")
    args = ap.parse_args()
    cli, dash, firsts, pairs = [], [], [], []
    for _ in range(args.rounds):
        c_round = cli_round(args.epochs)
        speeds, first = dashboard_round(args.epochs)
        cli += c_round
        dash += speeds
        firsts.append(first)
        pairs.append(statistics.median(speeds) / statistics.median(c_round))
        print(f"round {len(pairs)}: CLI {statistics.median(c_round):,.0f}, dashboard {statistics.median(speeds):,.0f} "
              f"samples/s: {pairs[-1]:.0%}", flush=True)
    c, d = statistics.median(cli), statistics.median(dash)
    print(f"headless CLI : median {c:,.0f} samples/s over {len(cli)} epochs")
    print(f"dashboard    : median {d:,.0f} samples/s over {len(dash)} epochs (browser open, live panel refreshing)")
    print(f"ratio dashboard/CLI: {d / c:.0%} of the medians; paired rounds {', '.join(f'{r:.0%}' for r in pairs)} "
          f"(median {statistics.median(pairs):.0%}; target >= 85%)")
    if args.tabs > 1:
        one, many = [], []
        for _ in range(args.rounds):
            one += dashboard_round(args.epochs, 1)[0]
            many += dashboard_round(args.epochs, args.tabs)[0]
        o, m = statistics.median(one), statistics.median(many)
        print(f"{args.tabs} tabs: median {m:,.0f} samples/s vs 1 tab {o:,.0f}: {m / o:.0%} (target >= 75%)")
    print(f"click Train -> first curve point logged: {', '.join(f'{f:.1f} s' for f in firsts)} "
          f"(the live panel draws it within its 1 s refresh; target < 3 s)")


if __name__ == "__main__":
    main()
