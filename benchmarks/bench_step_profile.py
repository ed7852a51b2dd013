"""Where the default MLP's CPU step spends its time: matrix products, the optimiser, the rest.

    PYTHONPATH=. python benchmarks/bench_step_profile.py [--steps 200] [--threads 2]

Runs vae_core's eager step (bench_train.OurLoop: MLP 784-400-20, batch 128, grey Fashion-MNIST) under
torch.profiler and splits the self CPU time into matmuls (mm, addmm, bmm), the optimiser (Adam, zero_grad)
and everything else; then says how long a step may take at 80% of the matmul limit and how much of that
the non-matmul work already uses (docs/performance.md, "Why >= 80% of the limit is out of reach").
"""
from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_train import FWD_FLOPS, OurLoop, matmul_gflops  # noqa: E402  (the script's folder is on sys.path)

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dataset", default="fashion-mnist")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loop = OurLoop(args.dataset, compiled=False)
    loop.steps(100)  # warm
    gflops = max(matmul_gflops() for _ in range(3))
    t = time.perf_counter()
    loop.steps(args.steps)
    step_ms = (time.perf_counter() - t) / args.steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loop.steps(args.steps)
    parts: collections.Counter[str] = collections.Counter()
    for e in prof.key_averages():
        name = e.key
        part = ("matmul" if name in MATMUL else
                "optimizer" if "adam" in name.lower() or "zero_grad" in name.lower() or "_foreach" in name else "rest")
        parts[part] += e.self_cpu_time_total
    total = sum(parts.values())
    limit = gflops * 1e9 / (3 * FWD_FLOPS)
    print(f"{args.threads} threads; eager step {step_ms:.2f} ms ({128 / step_ms * 1e3:,.0f} samples/s, "
          f"{128 / step_ms * 1e3 / limit:.0%} of the matmul limit {limit:,.0f} samples/s at {gflops:.0f} GFLOP/s)")
    for part in ("matmul", "optimizer", "rest"):
        share = parts[part] / total
        print(f"  {part:9s} {share:5.0%} of self CPU time, ~{share * step_ms:.2f} ms of an unprofiled step")
    budget = 128 / (0.8 * limit) * 1e3
    matmul_floor = 128 / limit * 1e3
    print(f"at 80% of the limit a step takes {budget:.2f} ms; matmuls at the probe's speed take {matmul_floor:.2f} ms, "
          f"leaving {budget - matmul_floor:.2f} ms for the rest, which now takes "
          f"{(1 - parts['matmul'] / total) * step_ms:.2f} ms")


if __name__ == "__main__":
    main()
