"""Listing 200 runs (what the runs table needs) should take well under a second.

    python benchmarks/bench_runs.py [--runs 200] [--epochs 50]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from vae_core import runs
from vae_core.config import RunConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=50, help="epochs of metrics per run (train rows dominate)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp()) / "runs"
    cfg = RunConfig()
    for i in range(args.runs):
        d = runs.create_run_dir(root, cfg, f"run-{i:03d}")
        runs.write_config(d, cfg, created=time.time())
        runs.write_status(d, "finished", epochs_done=args.epochs)
        w = runs.MetricsWriter(d)
        for e in range(args.epochs):
            for s in range(8):  # 8 train rows per epoch, like sprites with log_every=20
                w.write({"step": e * 160 + s * 20, "epoch": e + s / 8, "split": "train", "elbo": -100.0, "recon": -90.0,
                         "kl": 10.0, "beta": 1.0, "wall_time": 0.0})
            w.write({"step": (e + 1) * 160, "epoch": e + 1, "split": "test", "elbo": -99.0, "recon": -90.0, "kl": 9.0,
                     "kl_per_dim": [4.5, 4.5], "beta": 1.0, "samples_per_s": 1.0, "wall_time": 0.0})
        w.close()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        rows = runs.list_runs(root)
        times.append(time.perf_counter() - t)
    assert len(rows) == args.runs
    print(f"listing {args.runs} runs x {args.epochs} epochs of metrics: best {min(times) * 1000:.0f} ms, "
          f"median {sorted(times)[2] * 1000:.0f} ms (target < 1000 ms)")
    shutil.rmtree(root.parent)


if __name__ == "__main__":
    main()
