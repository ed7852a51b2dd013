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
- runs listed 200 -> 20,000 run directories, through the Lab's list_runs;
- image size 28 -> 64 -> 128 (the conv VAE of bench_stream.py, RGB, logistic, batch 32): 10 steps,
  best of 3 rounds, against the side and against the pixels;
- streamed dataset 10k -> 1M (28x28 grey, the MLP as in the dataset row): the uint8 cache a folder
  decodes into (images.u8 + meta.json) is written with numpy into a temp dir, then opened through
  folder_data (open_cache, image_data, streamed at any size) and trained from: opening it with the
  run's math, one epoch's shuffle, 50 steps (best of 3). Memory: the process's own (anonymous) growth,
  and the RSS with the cache's pages mapped in (page cache, shared and reclaimable, not the process's).
  It should stay flat where the in-memory row grows.

Sessions watching: bench_class.py.

    PYTHONPATH=. python benchmarks/bench_costs.py [--quick] [--only image,stream] [--max-images 1000000]
        [--max-runs 20000]
"""
from __future__ import annotations

import argparse
import ctypes
import math
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench_stream import conv_config, stream_always  # benchmarks/ is on the path as the script's folder

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def rss_both() -> tuple[int, int]:
    """(resident, resident less shared) bytes: the second leaves out mapped file pages (a memmap's page cache)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return int(fields[1]) * PAGE, (int(fields[1]) - int(fields[2])) * PAGE


def trim_heap() -> None:
    """Hand the heap's free memory back to the OS (glibc), so a growth is measured from a true base."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def measure_both(fn: Callable[[], object]) -> tuple[float, float, float, object]:
    """(seconds, peak RSS growth in MB, peak growth of the process's own (anonymous) memory in MB, result)."""
    base, peak, done = rss_both(), list(rss_both()), threading.Event()

    def sample():
        while not done.is_set():
            now = rss_both()
            peak[0], peak[1] = max(peak[0], now[0]), max(peak[1], now[1])
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    done.set()
    th.join()
    now = rss_both()
    peak[0], peak[1] = max(peak[0], now[0]), max(peak[1], now[1])
    return dt, (peak[0] - base[0]) / 2 ** 20, (peak[1] - base[1]) / 2 ** 20, out


def measure(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(seconds, peak RSS growth in MB, result) of fn()."""
    dt, mb, _, out = measure_both(fn)
    return dt, mb, out


def exponent(sizes: list[float], values: list[float]) -> str:
    if values[0] <= 0 or values[-1] <= 0:
        return "-"
    return f"{math.log(values[-1] / values[0]) / math.log(sizes[-1] / sizes[0]):.2f}"


def row(what: str, unit: str, sizes: list[int], times: list[float], mems: list[float],
        rss_too: list[float] | None = None) -> None:
    """rss_too: the RSS growth with mapped file pages, when mems is the anonymous memory only."""
    cells = "  ".join(f"{s:,}: {t * 1000:,.0f} ms / {m:,.0f} MB" + (f" (RSS {rss_too[i]:,.0f} MB)" if rss_too else "")
                      for i, (s, t, m) in enumerate(zip(sizes, times, mems)))
    print(f"| {what} | {cells} | {exponent(sizes, times)} | {unit}")


def synthetic_data(n: int, test: int = 1000, shape: tuple[int, int, int] = (1, 28, 28)):
    from vae_core.data import ImageData

    g = torch.Generator().manual_seed(0)
    x = torch.rand((n, *shape), generator=g)
    return ImageData("fashion-mnist", x, torch.zeros(n, dtype=torch.long), x[:test].clone(),
                     torch.zeros(test, dtype=torch.long), tuple(str(i) for i in range(10)), "synthetic")


def run_math(data, **changes):
    from vae_core.config import RunConfig
    from vae_core.run_math import RunMath

    cfg = RunConfig().replace(dataset="fashion-mnist", epochs=1, evidence_every=0, device="cpu", **changes)
    return RunMath(cfg, data, torch.device("cpu"), lr=1e-3)


def steps(m, n: int, order: list | None = None) -> None:
    """n training steps; order: the epoch's batches of indices (None: shuffled here, inside the time)."""
    order = m.batcher.epoch() if order is None else order
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


def image_size(sizes: list[int], n_steps: int = 10, batch: int = 32, channels: int = 3) -> None:
    from vae_core.run_math import RunMath

    times, mems = [], []
    for s in sizes:
        data = synthetic_data(8 * batch, test=batch, shape=(channels, s, s))
        for x in (data.train_x, data.test_x):
            x.mul_(255).round_().div_(255)  # 8-bit levels, as decoded (the discretized logistic's)
        cfg = conv_config("fashion-mnist", channels, s, batch).replace(epochs=1, evidence_every=0, device="cpu")
        m = RunMath(cfg, data, torch.device("cpu"), lr=1e-3)
        steps(m, 3)  # warm-up: first calls at a new shape set up their kernels
        # Best of 3 rounds: on a shared machine a 2-thread step stalls whenever a thread is descheduled
        # (seen: 10 steps at 64x64 took 0.5 to 9.8 s under load 4-5); the fastest round is the work's own cost.
        rounds = [(trim_heap(), measure(lambda: steps(m, n_steps)))[1] for _ in range(3)]
        times.append(min(r[0] for r in rounds)), mems.append(max(r[1] for r in rounds))
        m = data = None
    what = f"image size: {n_steps} steps (best of 3), conv RGB logistic, batch {batch}"
    row(f"{what} (by the side)", "side", sizes, times, mems)
    row(f"{what} (by the pixels)", "pixels", [s * s for s in sizes], times, mems)


def write_cache(where: Path, n: int, shape: tuple[int, int, int] = (1, 28, 28), chunk: int = 50_000) -> None:
    """The cache a folder of n images decodes into (folder_data's images.u8 + meta.json), with numpy.

    Random 8-bit pixels, chunk by chunk: 1M 28x28 images are 784 MB on disk and never in memory at once.
    """
    from vae_core import folder_data

    where.mkdir(parents=True)
    rng = np.random.default_rng(0)
    raw = np.memmap(where / "images.u8", dtype=np.uint8, mode="w+", shape=(n, *shape))
    for i in range(0, n, chunk):
        raw[i:i + chunk] = rng.integers(0, 256, size=(min(chunk, n - i), *shape), dtype=np.uint8)
    raw.flush()
    del raw
    folder_data.write_meta(where, (n, *shape), np.zeros(n, dtype=np.int64), ("all",), [], np.ones(n, dtype=bool),
                           where)


def streamed(sizes: list[int]) -> None:
    from vae_core import folder_data

    stream_always()
    # Not compiled at any N: 1 epoch of 1M images plans 7,812 steps, past compiled_step's threshold, and
    # the compiler then runs in a background thread through the timed steps (seen: 3.9 s instead of 0.5 s).
    os.environ["VAE_COMPILE"] = "0"
    tmp = Path(tempfile.mkdtemp(prefix="bench-costs-stream-"))
    opened, shuffle, train = ([], [], []), ([], [], []), ([], [], [])

    def open_and_build(d: Path):
        data = folder_data.image_data(f"folder:{d}", d, folder_data.open_cache(d))
        assert isinstance(data.train_x, folder_data.StreamedImages), data.source
        return run_math(data)

    try:
        run_math(synthetic_data(1000))  # one-off costs outside the row, as in dataset_size
        for n in sizes:
            d = tmp / f"n{n}"
            # Setup, not timed, in another process: its chunk buffers, freed here, would leave heap this
            # process reuses, and hide the opening's own memory. The file is then in the page cache.
            proc = multiprocessing.get_context("spawn").Process(target=write_cache, args=(d, n))
            proc.start()
            proc.join()
            assert proc.exitcode == 0, proc.exitcode
            # Freed memory kept by the allocator (the image row's activations, the last size's run) would
            # otherwise be reused here and hide this size's own growth (seen: 0 MB at 1M instead of ~50 MB).
            trim_heap()
            dt, mb, anon, m = measure_both(lambda: open_and_build(d))
            opened[0].append(dt), opened[1].append(anon), opened[2].append(mb)
            trim_heap()
            dt, mb, anon, order = measure_both(m.batcher.epoch)
            shuffle[0].append(dt), shuffle[1].append(anon), shuffle[2].append(mb)
            steps(m, 5, order)
            rounds = [(trim_heap(), measure_both(lambda: steps(m, 50, order)))[1] for _ in range(3)]
            train[0].append(min(r[0] for r in rounds))  # best of 3, as in image_size
            train[1].append(max(r[2] for r in rounds)), train[2].append(max(r[1] for r in rounds))
            m = None
            shutil.rmtree(d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    what = "streamed dataset (uint8 memmap, 28x28 grey, MLP)"
    what += "; memory: own (anonymous) / RSS with the mapped cache pages"
    row(f"{what}: opening it + building the run's math", "images", sizes, *opened)
    row(f"{what}: one epoch's shuffle of indices", "images", sizes, *shuffle)
    row(f"{what}: 50 training steps, best of 3, shuffle apart (should be flat)", "images", sizes, *train)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes only (a check that it runs)")
    ap.add_argument("--max-images", type=int, default=1_000_000)
    ap.add_argument("--max-runs", type=int, default=20_000)
    ap.add_argument("--only", default="", help="comma-separated: dataset,latent,batch,iwae,runs,image,stream")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else {"dataset", "latent", "batch", "iwae", "runs", "image",
                                                        "stream"}
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
    if "image" in only:
        image_size([28, 64] if args.quick else [28, 64, 128], n_steps=2 if args.quick else 10)
    if "stream" in only:
        streamed([10_000, 30_000] if args.quick else
                 [s for s in (10_000, 100_000, 1_000_000) if s <= args.max_images])


if __name__ == "__main__":
    main()
