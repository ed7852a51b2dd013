"""Training speed on a CUDA GPU: samples/s and the fraction of the device's limit, per model and batch size.

For each model (the default MLP 784-400-20, the conv net at 28x28, and bench_stream.py's conv VAE on
colour 64x64 images), precision (fp32; bf16: mixed precision, TrainConfig.precision) and batch size, RunMath's
step is timed as the trainer runs it (data resident on the GPU, binarization and batching on the
GPU, one host sync per 50-step log interval), eager and compiled (torch.compile
mode="reduce-overhead": CUDA graphs), the two alternated. The work per example is counted by
torch's FlopCounterMode on one real step (forward + backward), and the device's limits are
measured here with large matmuls: FP32 (TF32 off), TF32 and BF16. Then: one Fashion-MNIST epoch's
wall time at batch 1024; the test ELBO with TF32 matmuls against full FP32 from the same seed (the
tolerance: 0.1 nat per example); and, where playwright and Chromium exist, bench_dashboard.py for
the dashboard-open vs CLI ratio on this GPU.

    PYTHONPATH=. python benchmarks/bench_gpu.py [--steps 200] [--rounds 3] [--batches 128,1024,4096]

Without a CUDA GPU it says so and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_train import flops_per_example, trainer_steps  # noqa: E402  (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
TF32_TOLERANCE = 0.1  # nats per example: TF32 may change the test ELBO after an epoch by at most this


def device_limits() -> dict[str, float]:
    """Measured matmul TFLOP/s of this GPU: FP32 (no TF32), TF32 and BF16, 8192^3 products."""
    out = {}
    n = 8192
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        reps = 20
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        out[name] = 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


_CONV64: list = []  # (folder name, data), written once


def make_math(arch: str, batch: int, dataset: str, *, compiled: bool, epochs: int = 10_000, precision: str = "fp32"):
    """RunMath for `arch`: mlp or conv on the 28x28 dataset, or conv64 (colour 64x64 JPEGs, bench_stream's model)."""
    from vae_core.compiled_step import CompiledStep
    from vae_core.config import RunConfig
    from vae_core.inference import get_dataset
    from vae_core.run_math import RunMath

    os.environ["VAE_COMPILE"] = "0"  # compiled by hand below, joined before timing
    if arch == "conv64":
        from bench_stream import conv_config
        from bench_train import conv64_data

        if not _CONV64:
            _CONV64.append(conv64_data(4096))
        name, data = _CONV64[0]
        cfg = conv_config(name, 3, 64, batch).replace(epochs=epochs, evidence_every=0, device="cuda",
                                                      precision=precision)
    else:
        cfg = RunConfig().replace(dataset=dataset, arch=arch, latent_dim=20, hidden_dim=400, batch_size=batch,
                                  lr=1e-3, binarize=True, epochs=epochs, seed=0, evidence_every=0, device="cuda",
                                  precision=precision)
        data = get_dataset(dataset).subset_train(None)
    m = RunMath(cfg, data, torch.device("cuda"), lr=1e-3)
    if compiled:
        m.compiled = CompiledStep(m.device)
        m.compiled.start(m.model, m.batch(torch.arange(batch, device="cuda")))
        if not m.compiled.join(600):
            raise RuntimeError(f"compile failed: {m.compiled.error}")
    return m


class Loop:
    def __init__(self, m) -> None:
        self.m, self.order, self.step = m, iter(()), 0

    def steps(self, n: int) -> float:
        """n steps as the trainer takes them; samples/s with the GPU's work included (synced at both ends)."""
        torch.cuda.synchronize()
        t = time.perf_counter()
        trainer_steps(self, n, "cuda")
        torch.cuda.synchronize()
        return n * self.m.config.train.batch_size / (time.perf_counter() - t)


def test_elbo_after_epoch(dataset: str, *, tf32: bool) -> tuple[float, float]:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    m = make_math("mlp", 1024, dataset, compiled=False, epochs=1)
    loop = Loop(m)
    t = time.perf_counter()
    loop.steps(m.steps_per_epoch)
    seconds = time.perf_counter() - t
    elbo = m.evaluate()["elbo"]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return elbo, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="128,1024,4096")
    ap.add_argument("--archs", default="mlp,conv,conv64", help="mlp, conv (28x28), conv64 (colour 64x64)")
    ap.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (mixed precision)")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--no-dashboard", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to measure.")
        sys.exit(2)
    from vae_core.sources import find_local

    dataset = args.dataset if find_local(args.dataset) else "sprites"
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, dataset {dataset}")
    lim = device_limits()
    print("measured matmul limits: " + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in lim.items()))
    for arch, precision in ((a, p) for a in args.archs.split(",") for p in args.precisions.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            loops = {"eager": Loop(make_math(arch, batch, dataset, compiled=False, precision=precision))}
            t = time.perf_counter()
            loops["compiled"] = Loop(make_math(arch, batch, dataset, compiled=True, precision=precision))
            compile_s = time.perf_counter() - t
            fl = flops_per_example(loops["eager"].m)
            for loop in loops.values():
                loop.steps(20)  # warm-up (the compiled one records its CUDA graphs here)
            rates = {k: [] for k in loops}
            for _ in range(args.rounds):
                for k, loop in loops.items():
                    rates[k].append(loop.steps(args.steps))
            for k, r in rates.items():
                best = max(r)
                print(f"{arch:6s} {precision} batch {batch:5d} {k:8s}: {best:12,.0f} samples/s  "
                      f"{best * fl / 1e12:7.2f} TFLOP/s = {best * fl / 1e12 / lim['fp32']:6.1%} of FP32, "
                      f"{best * fl / 1e12 / lim['tf32']:6.1%} of TF32, {best * fl / 1e12 / lim['bf16']:6.1%} of BF16 "
                      f"(rounds: {', '.join(f'{x:,.0f}' for x in r)})"
                      + (f"; compile {compile_s:.1f} s" if k == "compiled" else ""))
    fp32, s32 = test_elbo_after_epoch(dataset, tf32=False)
    tf32, s_tf = test_elbo_after_epoch(dataset, tf32=True)
    verdict = "within" if abs(fp32 - tf32) <= TF32_TOLERANCE else "OUTSIDE"
    print(f"MLP batch 1024, one epoch: {s32 * 1000:.0f} ms (FP32) / {s_tf * 1000:.0f} ms (TF32); test ELBO "
          f"{fp32:.3f} vs {tf32:.3f} nats per example (difference {abs(fp32 - tf32):.3f}, {verdict} the "
          f"{TF32_TOLERANCE} tolerance)")
    if args.no_dashboard:
        return
    import importlib.util

    have_browser = importlib.util.find_spec("playwright") is not None and \
        (shutil.which("chromium") or Path("/usr/bin/chromium").exists())
    if not have_browser:
        print("dashboard-open vs CLI: skipped (needs playwright and Chromium on this machine)")
        return
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_dashboard.py"), "--rounds", "3"], check=False)


if __name__ == "__main__":
    main()
