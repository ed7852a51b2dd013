"""How fast is the importance-weighted bound? k = 1000 on 500 test images, against this CPU's matmul speed.

Model: the default MLP (ModelConfig() with latent_dim=20: 784-400-20-400-784, Bernoulli), untrained
weights (the cost does not depend on them), on 500 binarized sprites test images. It times
evidence.iwae_curve (one set of samples serves every k) and, for comparison, objectives.iwae_bound
at a few chunk sizes. The limit: a (128x784)@(784x400) float32 matmul, repeated, gives this
machine's GFLOP/s; the evaluation's matmul FLOPs over that speed is the time it could take if
nothing else cost anything. The rest (log p(x|z) over 784 pixels per sample, exp/log1p per
pixel, sampling) is not counted as useful work, so the fraction shows how much it costs.

    python benchmarks/bench_iwae.py [--k 1000] [--n 500] [--threads N]
"""
from __future__ import annotations

import argparse
import time

import torch

from bench_train import matmul_gflops  # benchmarks/ is on sys.path when run as a script
from vae_core.config import ModelConfig
from vae_core.data import make_sprites
from vae_core.evidence import CHUNK_ELEMS, iwae_curve
from vae_core.models import VAE
from vae_core.objectives import iwae_bound, log_px_given_z


def iwae_flops(cfg: ModelConfig, n: int, k: int) -> float:
    """Matmul FLOPs of n * k decoder passes (z -> hidden -> 784) plus the n encoder passes."""
    d, h, p = cfg.latent_dim, cfg.hidden_dim, 28 * 28
    decode = 2 * (d * h + h * p)
    encode = 2 * (p * h + 2 * h * d)
    return n * k * decode + n * encode


def best_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--n", type=int, default=500, help="test images")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(latent_dim=20)
    model = VAE(cfg).eval()
    data, _ = make_sprites(n_train=16, n_test=args.n)
    x = torch.bernoulli(data.test_x, generator=torch.Generator().manual_seed(0))  # (n, 1, 28, 28)

    gflops = max(matmul_gflops() for _ in range(3))
    flops = iwae_flops(cfg, args.n, args.k)
    limit_s = flops / (gflops * 1e9)
    print(f"model: MLP 784-{cfg.hidden_dim}-{cfg.latent_dim}, Bernoulli; {args.n} images, k = {args.k}; "
          f"{torch.get_num_threads()} threads")
    print(f"matmul (128x784)@(784x400): {gflops:.1f} GFLOP/s; IWAE matmul work {flops / 1e9:.0f} GFLOP "
          f"-> limit {limit_s:.2f} s")

    curve = None

    def run_curve():
        nonlocal curve
        curve = iwae_curve(model, x, ks=(1, 10, 100, args.k), generator=torch.Generator().manual_seed(1))

    t = best_time(run_curve, args.rounds)
    print(f"evidence.iwae_curve (k = 1, 10, 100, {args.k}; chunk {CHUNK_ELEMS:,} pixels): {t:.2f} s "
          f"({limit_s / t:.0%} of the matmul limit)")
    print("   bounds, nats per example: " + ", ".join(f"k={k}: {b:.2f}" for k, b in zip(curve["ks"], curve["iwae"]))
          + f"; ELBO {curve['elbo']:.2f}")
    # Where the time goes: the decoder's matmuls alone, then log p(x|z) (BCE with logits) alone.
    z = torch.randn(args.n, cfg.latent_dim)
    with torch.no_grad():
        logits = model.decode_logits(z)
        t_dec = best_time(lambda: [model.decode_logits(z) for _ in range(args.k // 10)], args.rounds) * 10
        t_lik = best_time(lambda: [log_px_given_z(model, x, logits) for _ in range(args.k // 10)], args.rounds) * 10
    print(f"   of which, per {args.k} decoder batches of {args.n}: decoder {t_dec:.2f} s, "
          f"log p(x|z) {t_lik:.2f} s (elementwise log1p/exp over 784 pixels, not counted as matmul work)")
    for chunk in (CHUNK_ELEMS, 2_000_000, 8_000_000):
        t = best_time(lambda: iwae_bound(model, x, args.k, generator=torch.Generator().manual_seed(1),
                                         max_chunk_elems=chunk), args.rounds)
        print(f"objectives.iwae_bound k = {args.k}, chunk {chunk:>9,} pixels: {t:.2f} s ({limit_s / t:.0%} of the limit)")
    print("target: under 30 s")


if __name__ == "__main__":
    main()
