"""DDP scaling: one run on 1 and on N torchrun processes, alternated, in training samples per second.

Each round trains the same run (same global batch, seed and data) once per process count with
`python -m torch.distributed.run --standalone --nproc_per_node N -m vae_core train`, and reads the
samples/s that rank 0 records per epoch (training only: evaluation and checkpoints are not in
it; the first epoch, which pays the start-up, is left out). Alternating puts machine noise on
both counts alike. On a CPU each process gets cores / N threads, so on 2 cores the comparison
is 1 process x 2 threads against 2 processes x 1 thread (gloo all-reduce between them).

    PYTHONPATH=. python benchmarks/bench_ddp.py [--procs 1,2] [--rounds 3] [--epochs 4] [--train-size 8192]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(n: int, runs_dir: Path, name: str, args: argparse.Namespace) -> list[float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "vae_core", "train", "--dataset", args.dataset, "--epochs", str(args.epochs),
           "--train-size", str(args.train_size), "--batch-size", str(args.batch_size), "--evidence-every", "0",
           "--device", args.device, "--runs-dir", str(runs_dir), "--name", name, "--quiet"]
    r = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{n} processes failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    rows = [json.loads(line) for line in (runs_dir / name / "metrics.jsonl").read_text().splitlines()]
    return [row["samples_per_s"] for row in rows if row["split"] == "test"][1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", default="1,2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-size", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dataset", default="sprites")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    procs = [int(x) for x in args.procs.split(",")]
    results: dict[int, list[float]] = {n: [] for n in procs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for n in procs if r % 2 == 0 else procs[::-1]:  # alternate the order too
                t = time.perf_counter()
                sps = one_run(n, Path(tmp), f"r{r}-n{n}", args)
                results[n].extend(sps)
                print(f"round {r + 1}, {n} process(es): {statistics.median(sps):,.0f} samples/s "
                      f"(epochs {', '.join(f'{s:,.0f}' for s in sps)}; {time.perf_counter() - t:.0f} s with start-up)",
                      flush=True)
    base = statistics.median(results[procs[0]])
    print(f"\nload average now {os.getloadavg()[0]:.1f}; medians over {args.rounds} rounds:")
    for n in procs:
        med = statistics.median(results[n])
        print(f"  {n} process(es): {med:,.0f} samples/s  ({med / base:.2f}x of {procs[0]})")


if __name__ == "__main__":
    main()
