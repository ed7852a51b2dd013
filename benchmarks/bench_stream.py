"""Streamed vs in-memory training throughput on the same images: the conv VAE at 3x64x64.

A folder of JPEGs is written once (--images of them, 80x96, so each is resized and cropped) and
decoded into the uint8 cache (the first pass, timed, with DataLoader workers from 512 files on).
Then the same RunMath trains from the float tensors in memory and from the memmap, streamed
(StreamedImages: each batch gathered from the page cache, converted to floats), in alternating
rounds in one process, so machine noise hits both. The goal is streamed >= 90% of in-memory.

    python benchmarks/bench_stream.py [--images 2048] [--rounds 4] [--steps 20] [--batch 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from image_files import write_image  # noqa: E402
from vae_core import folder_data  # noqa: E402
from vae_core.config import RunConfig  # noqa: E402
from vae_core.run_math import RunMath  # noqa: E402


def conv_config(dataset: str, channels: int, size: int, batch: int) -> RunConfig:
    """The conv VAE these benchmarks train (also bench_costs.py's image-size row): logistic, hidden 256, z 32."""
    return RunConfig().replace(dataset=dataset, arch="conv", channels=channels, image_size=size,
                               likelihood="logistic", batch_size=batch, hidden_dim=256, latent_dim=32)


def stream_always() -> None:
    """Make load_folder / folder_data.image_data stream every set (a memory budget of 1 kB)."""
    os.environ[folder_data.MEMORY_ENV] = "0.001"


def steps_per_s(m: RunMath, steps: int) -> float:
    order = m.batcher.epoch()
    t0 = time.perf_counter()
    for i in range(steps):
        m.train_step(m.batch(order[i % len(order)]), beta=1.0, free_bits=0.0, lr=1e-3)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    os.environ["VAE_DATA_CACHE"] = str(work / "cache")
    t0 = time.perf_counter()
    for i in range(args.images):
        write_image(work / "imgs" / f"{i:05d}.jpg", (80, 96), "RGB", "JPEG", seed=i)
    print(f"wrote {args.images} JPEGs in {time.perf_counter() - t0:.1f} s")
    name = f"folder:{work / 'imgs'}"
    t0 = time.perf_counter()
    in_memory = folder_data.load_folder(name, 3, 64, warn=print)
    print(f"first pass (decode + cache, {folder_data.WORKERS_FROM}+ files use workers): "
          f"{time.perf_counter() - t0:.1f} s, {args.images / (time.perf_counter() - t0):.0f} images/s")
    stream_always()
    t0 = time.perf_counter()
    streamed = folder_data.load_folder(name, 3, 64, warn=print)
    print(f"second load (from the cache): {time.perf_counter() - t0:.2f} s")
    assert isinstance(streamed.train_x, folder_data.StreamedImages)
    cfg = conv_config(name, 3, 64, args.batch)
    dev = torch.device("cpu")
    runs = {"in memory": RunMath(cfg, in_memory, dev, lr=1e-3), "streamed": RunMath(cfg, streamed, dev, lr=1e-3)}
    for m in runs.values():
        steps_per_s(m, 3)  # warm-up: allocator, first page faults
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.rounds):
        for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            rates[k].append(steps_per_s(runs[k], args.steps))
    med = {k: float(np.median(v)) for k, v in rates.items()}
    for k, v in rates.items():
        print(f"{k:>10}: median {med[k] * args.batch:.0f} images/s  rounds {[round(x * args.batch) for x in v]}")
    print(f"streamed / in memory: {med['streamed'] / med['in memory']:.1%} (torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
