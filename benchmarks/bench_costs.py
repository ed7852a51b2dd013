"""Costs that grow as they should: time and peak memory as the work grows, one knob at a time.

Each row times one piece of work at growing sizes and reports the peak growth of this process's
resident memory while it ran (sampled every 2 ms from /proc/self/statm, so it counts torch's
allocations too, which tracemalloc does not see). The last column is the growth exponent between
the smallest and largest size (time ~ size^e): 1 is linear, 0 flat.

- dataset size (images in memory, synthetic 28x28): building the run's math, one epoch's shuffle
  of indices, 50 training steps (should stay flat);
- latent size 2 -> 128 (MLP, batch 128): 50 steps;
- batch size 32 -> 1024: 20 steps, per sample;
- IWAE k 1 -> 5000 on 64 images (chunked decoding: memory should stay flat);
- runs listed 200 -> 20,000 run directories, through the Lab's list_runs.

Image size (28 -> 128) is not measured: the models take 28x28 only today. Streamed datasets are not
measured: the streaming loader does not exist in this tree yet. Sessions watching: bench_class.py.

    PYTHONPATH=. python benchmarks/bench_costs.py [--quick] [--max-images 1000000] [--max-runs 20000]
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def measure(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(seconds, peak RSS growth in MB, result) of fn()."""
    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    done.set()
    th.join()
    peak[0] = max(peak[0], rss())
    return dt, (peak[0] - base) / 2 ** 20, out


def exponent(sizes: list[float], values: list[float]) -> str:
    if values[0] <= 0 or values[-1] <= 0:
        return "-"
    return f"{math.log(values[-1] / values[0]) / math.log(sizes[-1] / sizes[0]):.2f}"


def row(what: str, unit: str, sizes: list[int], times: list[float], mems: list[float]) -> None:
    cells = "  ".join(f"{s:,}: {t * 1000:,.0f} ms / {m:,.0f} MB" for s, t, m in zip(sizes, times, mems))
    print(f"| {what} | {cells} | {exponent(sizes, times)} | {unit}")


def synthetic_data(n: int, test: int = 1000):
    from vae_core.data import ImageData

    g = torch.Generator().manual_seed(0)
    x = torch.rand((n, 1, 28, 28), generator=g)
    return ImageData("fashion-mnist", x, torch.zeros(n, dtype=torch.long), x[:test].clone(),
                     torch.zeros(test, dtype=torch.long), tuple(str(i) for i in range(10)), "synthetic")


def run_math(data, **changes):
    from vae_core.config import RunConfig
    from vae_core.run_math import RunMath

    cfg = RunConfig().replace(dataset="fashion-mnist", epochs=1, evidence_every=0, device="cpu", **changes)
    return RunMath(cfg, data, torch.device("cpu"), lr=1e-3)


def steps(m, n: int) -> None:
    order = m.batcher.epoch()
    acc = torch.zeros(5)
    for i in range(n):
        acc += m.train_step(m.batch(order[i % len(order)]), beta=1.0, free_bits=0.0, lr=1e-3)
    acc.tolist()


def dataset_size(sizes: list[int]) -> None:
    build, shuffle, train, mem = [], [], [], []
    run_math(synthetic_data(1000))  # one-off costs (imports, first allocations) outside the rows
    for n in sizes:
        dt, mb, data = measure(lambda: synthetic_data(n))
        mem.append(mb)
        dt, _, m = measure(lambda: run_math(data))
        build.append(dt)
        dt, _, _ = measure(m.batcher.epoch)
        shuffle.append(dt)
        steps(m, 5)
        dt, _, _ = measure(lambda: steps(m, 50))
        train.append(dt)
        m = data = None  # freed before the next size
    row("dataset size: building the run's math (time) / images in memory (MB)", "images", sizes, build, mem)
    row("dataset size: one epoch's shuffle of indices", "images", sizes, shuffle, [0] * len(sizes))
    row("dataset size: 50 training steps (should be flat)", "images", sizes, train, [0] * len(sizes))


def latent_size(sizes: list[int]) -> None:
    data = synthetic_data(10_000)
    times, mems = [], []
    for d in sizes:
        m = run_math(data, latent_dim=d)
        steps(m, 5)
        dt, mb, _ = measure(lambda: steps(m, 50))
        times.append(dt), mems.append(mb)
    row("latent size: 50 steps, MLP 784-400-D, batch 128", "latents", sizes, times, mems)


def batch_size(sizes: list[int]) -> None:
    data = synthetic_data(10_000)
    times, mems = [], []
    for b in sizes:
        m = run_math(data, batch_size=b, latent_dim=20)
        steps(m, 3)
        dt, mb, _ = measure(lambda: steps(m, 20))
        times.append(dt), mems.append(mb)
    row("batch size: 20 steps (time per step; linear in the batch)", "batch", sizes, times, mems)


def iwae_k(sizes: list[int]) -> None:
    from vae_core.config import ModelConfig
    from vae_core.models import build_model
    from vae_core.objectives import iwae_bound

    model = build_model(ModelConfig(latent_dim=20, hidden_dim=400))
    x = torch.bernoulli(torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    times, mems = [], []
    for k in sizes:
        with torch.no_grad():
            dt, mb, _ = measure(lambda: iwae_bound(model, x, k, generator=torch.Generator().manual_seed(1)))
        times.append(dt), mems.append(mb)
    row("IWAE k on 64 images, MLP z=20 (memory: chunked decoding)", "k", sizes, times, mems)


def runs_listed(sizes: list[int], epochs: int = 5) -> None:
    from vae_core import runs
    from vae_core.config import RunConfig
    from vae_core.lab import Lab

    tmp = Path(tempfile.mkdtemp())
    template = runs.create_run_dir(tmp / "template", RunConfig(), "run")
    runs.write_config(template, RunConfig(), created=time.time())
    runs.write_status(template, "finished", epochs_done=epochs)
    w = runs.MetricsWriter(template)
    for e in range(epochs):
        for s in range(8):
            w.write({"step": e * 160 + s * 20, "epoch": e + s / 8, "split": "train", "elbo": -100.0, "recon": -90.0,
                     "kl": 10.0, "beta": 1.0, "wall_time": 0.0})
        w.write({"step": (e + 1) * 160, "epoch": e + 1, "split": "test", "elbo": -99.0, "recon": -90.0, "kl": 9.0,
                 "kl_per_dim": [4.5, 4.5], "beta": 1.0, "samples_per_s": 1.0, "wall_time": 0.0})
    w.close()
    root = tmp / "runs"
    root.mkdir()
    have = 0
    times, mems = [], []
    for n in sizes:
        for i in range(have, n):
            shutil.copytree(template, root / f"run-{i:05d}")
        have = n
        lab = Lab(root)
        lab.list_runs()  # the first read warms the OS's file cache, as a table that refreshes
        dt, mb, rows = measure(lab.list_runs)
        assert len(rows) == n, (len(rows), n)
        times.append(dt), mems.append(mb)
    row(f"runs listed (Lab.list_runs, {epochs} epochs of metrics each)", "runs", sizes, times, mems)
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes only (a check that it runs)")
    ap.add_argument("--max-images", type=int, default=1_000_000)
    ap.add_argument("--max-runs", type=int, default=20_000)
    ap.add_argument("--only", default="", help="comma-separated: dataset,latent,batch,iwae,runs")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else {"dataset", "latent", "batch", "iwae", "runs"}
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; cells: size: time / peak RSS growth; "
          f"e = growth exponent of the time")
    print("| work | size: time / memory | e | size is |")
    print("| --- | --- | --- | --- |")
    if "dataset" in only:
        dataset_size([10_000, 30_000] if args.quick else
                     [s for s in (10_000, 100_000, 1_000_000) if s <= args.max_images])
    if "latent" in only:
        latent_size([2, 128] if args.quick else [2, 8, 32, 128])
    if "batch" in only:
        batch_size([32, 128] if args.quick else [32, 128, 512, 1024])
    if "iwae" in only:
        iwae_k([1, 100] if args.quick else [1, 10, 100, 1000, 5000])
    if "runs" in only:
        runs_listed([20, 40] if args.quick else [s for s in (200, 2_000, 20_000) if s <= args.max_runs])


if __name__ == "__main__":
    main()
