"""Does a first sprites run keep the shape? Reconstruction IoU after N seconds of training, per setting.

Each candidate trains on the built-in sprites (the full 20,000) with RunMath, the trainer's own step,
with 2 torch threads (the size of a class laptop); every few seconds the test set's mean
reconstructions from mu are thresholded at 0.5 and compared with the inputs thresholded the same way
(vae_core.data.shape_iou: 1 = every shape kept exactly), and shape_kept says how often the
reconstruction is closer to its own shape than to the other two drawn in the same place (chance 1/3).
Candidates run one after another, so compare them at equal steps as well as equal seconds.

    PYTHONPATH=. python benchmarks/bench_first_run.py [--seconds 60] [--only baseline,default]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from vae_core.config import RunConfig
from vae_core.data import make_sprites, shape_iou, shape_kept
from vae_core.run_math import RunMath

CANDIDATES = {
    "baseline": dict(arch="mlp", latent_dim=2, hidden_dim=400, lr=1e-3, batch_size=128),  # the defaults until Dec 2026
    "default": dict(arch="mlp", latent_dim=8, hidden_dim=400, lr=3e-3, batch_size=128),  # the defaults now
    "mlp-lr3e-3": dict(arch="mlp", latent_dim=2, hidden_dim=400, lr=3e-3, batch_size=128),
    "conv-z2": dict(arch="conv", latent_dim=2, hidden_dim=256, lr=1e-3, batch_size=128),
    "conv-z2-lr2e-3-b64": dict(arch="conv", latent_dim=2, hidden_dim=256, lr=2e-3, batch_size=64),
    "mlp-z4-lr3e-3": dict(arch="mlp", latent_dim=4, hidden_dim=400, lr=3e-3, batch_size=128),
    "mlp-z8": dict(arch="mlp", latent_dim=8, hidden_dim=400, lr=1e-3, batch_size=128),
    "conv-z8": dict(arch="conv", latent_dim=8, hidden_dim=256, lr=1e-3, batch_size=128),
}


def run(name: str, changes: dict, data, f_test, seconds: float, every: float,
        at_steps: tuple[int, ...] = ()) -> list[tuple[float, int, float, float]]:
    """Train and measure every `every` seconds up to `seconds`, or at the given steps when at_steps is set."""
    cfg = RunConfig().replace(dataset="sprites", evidence_every=0, **changes)
    m = RunMath(cfg, data, torch.device("cpu"), lr=cfg.train.lr)
    x_test, f_test = data.test_x[:500], f_test[:500]
    out, step, t_train, next_check = [], 0, 0.0, 0.0
    done = (lambda: step >= max(at_steps)) if at_steps else (lambda: t_train >= seconds)
    while not done():
        for idx in m.batcher.epoch():
            t0 = time.perf_counter()
            m.train_step(m.batch(idx), beta=cfg.train.beta, free_bits=0.0, lr=cfg.train.lr)
            t_train += time.perf_counter() - t0
            step += 1
            if (step in at_steps) if at_steps else (t_train >= next_check or t_train >= seconds):
                with torch.no_grad():
                    m.model.eval()
                    x_hat = m.model.decode(m.model.encode(x_test)[0])
                ev = m.evaluate()
                out.append((t_train, step, shape_iou(x_test.numpy(), x_hat.numpy()), ev["elbo"]))
                print(f"{name:>20} {t_train:6.1f}s step {step:5d}  IoU {out[-1][2]:.3f}  "
                      f"shape {shape_kept(f_test, x_hat.numpy()):.2f}  test ELBO {ev['elbo']:8.2f}", flush=True)
                next_check += every
            if done():
                break
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--every", type=float, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="")
    p.add_argument("--at-steps", default="", help="e.g. 300,1000,2000: measure at these steps instead of seconds")
    p.add_argument("--train-size", type=int, default=None, help="sprites to train on (default all 20,000)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data, f_test = make_sprites(n_train=a.train_size or 20_000, n_test=500)
    names = a.only.split(",") if a.only else list(CANDIDATES)
    print(f"load average {os.getloadavg()[0]:.1f}, {a.threads} threads")
    for name in names:
        run(name, CANDIDATES[name], data, f_test, a.seconds, a.every,
            tuple(int(s) for s in a.at_steps.split(",")) if a.at_steps else ())


if __name__ == "__main__":
    main()
