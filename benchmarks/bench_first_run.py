"""Does a first sprites run keep the shape? Reconstruction IoU after N seconds of training, per setting.

Each candidate trains on the built-in sprites (the full 20,000) with RunMath, the trainer's own step,
with 2 torch threads (the size of a class laptop); every few seconds the test set's mean
reconstructions from mu are thresholded at 0.5 and compared with the inputs thresholded the same way
(vae_core.data.shape_iou: 1 = every shape kept exactly, ~0.4 = a blob in the right place).
Candidates run one after another, so compare them at equal steps as well as equal seconds.

    python benchmarks/bench_first_run.py [--seconds 60] [--only baseline,default]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from vae_core.config import RunConfig
from vae_core.data import make_sprites, shape_iou
from vae_core.run_math import RunMath

CANDIDATES = {
    "baseline": dict(arch="mlp", latent_dim=2, hidden_dim=400, lr=1e-3, batch_size=128),
    "mlp-lr3e-3": dict(arch="mlp", latent_dim=2, hidden_dim=400, lr=3e-3, batch_size=128),
    "conv-z2": dict(arch="conv", latent_dim=2, hidden_dim=256, lr=1e-3, batch_size=128),
    "conv-z2-lr2e-3-b64": dict(arch="conv", latent_dim=2, hidden_dim=256, lr=2e-3, batch_size=64),
    "mlp-z8": dict(arch="mlp", latent_dim=8, hidden_dim=400, lr=1e-3, batch_size=128),
    "conv-z8": dict(arch="conv", latent_dim=8, hidden_dim=256, lr=1e-3, batch_size=128),
}


def run(name: str, changes: dict, data, seconds: float, every: float) -> list[tuple[float, int, float, float]]:
    cfg = RunConfig().replace(dataset="sprites", evidence_every=0, **changes)
    m = RunMath(cfg, data, torch.device("cpu"), lr=cfg.train.lr)
    x_test = data.test_x[:500]
    out, step, t_train, next_check = [], 0, 0.0, 0.0
    while t_train < seconds:
        for idx in m.batcher.epoch():
            t0 = time.perf_counter()
            m.train_step(m.batch(idx), beta=cfg.train.beta, free_bits=0.0, lr=cfg.train.lr)
            t_train += time.perf_counter() - t0
            step += 1
            if t_train >= next_check or t_train >= seconds:
                with torch.no_grad():
                    m.model.eval()
                    x_hat = m.model.decode(m.model.encode(x_test)[0])
                ev = m.evaluate()
                out.append((t_train, step, shape_iou(x_test.numpy(), x_hat.numpy()), ev["elbo"]))
                print(f"{name:>20} {t_train:6.1f}s step {step:5d}  IoU {out[-1][2]:.3f}  test ELBO {ev['elbo']:8.2f}",
                      flush=True)
                next_check += every
            if t_train >= seconds:
                break
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--every", type=float, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data = make_sprites()[0]
    names = a.only.split(",") if a.only else list(CANDIDATES)
    print(f"load average {os.getloadavg()[0]:.1f}, {a.threads} threads")
    for name in names:
        run(name, CANDIDATES[name], data, a.seconds, a.every)


if __name__ == "__main__":
    main()
