"""Training throughput of vae_core vs a loop written the way the classic PyTorch VAE example does it.

Same model (MLP 784-400-20), batch 128, Adam 1e-3, BCE on grey levels (--no-binarize), on
Fashion-MNIST (or sprites with --dataset sprites). The two are timed alternately in one
process, so machine noise hits both; the result is a ratio, plus each as a fraction of
this CPU's matmul limit. Then both train the same number of epochs from the same seed and
their test losses are compared (quality must not pay for speed).

    python benchmarks/bench_train.py [--dataset fashion-mnist] [--rounds 3] [--steps 150] [--epochs 1]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from vae_core.config import RunConfig
from vae_core.trainer import Trainer, get_dataset

FWD_FLOPS = 2 * (784 * 400 + 400 * 20 * 2 + 20 * 400 + 400 * 784)  # multiply-adds x2, per example


class ClassicVAE(nn.Module):
    """github.com/pytorch/examples vae/main.py, as written there."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        return mu + torch.randn_like(std) * std

    def decode(self, z):
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def classic_loss(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def classic_loader(dataset: str, train: bool):
    from torchvision import datasets, transforms

    from vae_core.data import _materialise, find_local

    if dataset == "sprites":
        d = get_dataset("sprites")
        x, y = (d.train_x, d.train_y) if train else (d.test_x, d.test_y)
        ds = torch.utils.data.TensorDataset(x, y)
    else:
        root = _materialise(dataset, find_local(dataset))
        cls = datasets.FashionMNIST if dataset == "fashion-mnist" else datasets.MNIST
        ds = cls(str(root), train=train, transform=transforms.ToTensor())
    return torch.utils.data.DataLoader(ds, batch_size=128, shuffle=train)


class ClassicRun:
    def __init__(self, dataset: str, device: torch.device, seed: int = 0):
        torch.manual_seed(seed)
        self.device = device
        self.model = ClassicVAE().to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.loader = classic_loader(dataset, True)
        self.test_loader = classic_loader(dataset, False)
        self.it = iter(self.loader)

    def steps(self, n: int) -> int:
        """n training steps exactly as the example's train() does them; returns samples seen."""
        self.model.train()
        seen = 0
        for _ in range(n):
            try:
                data, _ = next(self.it)
            except StopIteration:
                self.it = iter(self.loader)
                data, _ = next(self.it)
            data = data.to(self.device)
            self.opt.zero_grad()
            recon, mu, logvar = self.model(data)
            loss = classic_loss(recon, data, mu, logvar)
            loss.backward()
            _ = loss.item()  # the example accumulates train_loss += loss.item() every batch
            self.opt.step()
            seen += len(data)
        return seen

    def test_loss(self) -> float:
        self.model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for data, _ in self.test_loader:
                data = data.to(self.device)
                recon, mu, logvar = self.model(data)
                total += classic_loss(recon, data, mu, logvar).item()
                n += len(data)
        return total / n


def matmul_gflops(reps: int = 2000) -> float:
    a, b = torch.randn(128, 784), torch.randn(784, 400)
    for _ in range(50):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * 128 * 784 * 400 * reps / (time.perf_counter() - t) / 1e9


def ours(dataset: str, epochs: int, seed: int = 0) -> Trainer:
    cfg = RunConfig().replace(dataset=dataset, latent_dim=20, hidden_dim=400, batch_size=128, lr=1e-3,
                              binarize=False, epochs=epochs, seed=seed, evidence_every=0)
    return Trainer(cfg, persist=False, log_every=50)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--epochs", type=int, default=1, help="epochs for the quality comparison (0: skip)")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    device = torch.device("cpu")

    # Throughput: alternate fixed numbers of steps of each, same thread count.
    ref = ClassicRun(args.dataset, device)
    t = ours(args.dataset, epochs=10_000)
    t._prepare()
    spe = t.batcher.steps_per_epoch
    order = iter(())

    def our_steps(n):
        nonlocal order
        acc = torch.zeros(4)
        for _ in range(n):
            idx = next(order, None)
            if idx is None:
                order = iter(t.batcher.epoch())
                idx = next(order)
            acc += t.train_step(t.train_x[idx])
            t._step += 1
            if t._step % t.log_every == 0:
                acc.tolist()  # the trainer's one sync per log interval
        return n * 128

    ref.steps(10), our_steps(10)  # warm-up
    r_ref, r_ours, gf = [], [], []
    for _ in range(args.rounds):
        gf.append(matmul_gflops())
        s = time.perf_counter(); n = ref.steps(args.steps); r_ref.append(n / (time.perf_counter() - s))
        s = time.perf_counter(); n = our_steps(args.steps); r_ours.append(n / (time.perf_counter() - s))
    ratios = [o / r for o, r in zip(r_ours, r_ref)]
    limit = max(gf) * 1e9 / (3 * FWD_FLOPS)  # samples/s if a step ran at matmul speed
    best_o, best_r = max(r_ours), max(r_ref)
    print(f"dataset {args.dataset}, {threads} threads, {spe} steps/epoch")
    print(f"matmul (128x784)@(784x400): {max(gf):.1f} GFLOP/s -> limit {limit:,.0f} samples/s for this model")
    print(f"reference (DataLoader) : {best_r:,.0f} samples/s  ({best_r / limit:.1%} of matmul limit)")
    print(f"vae_core               : {best_o:,.0f} samples/s  ({best_o / limit:.1%} of matmul limit)")
    print(f"speed ratio vae_core/reference per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {sorted(ratios)[len(ratios) // 2]:.2f}x (target >= 1.8x)")

    if args.epochs:
        ref = ClassicRun(args.dataset, device, seed=1)
        s = time.perf_counter()
        ref.steps(args.epochs * len(ref.loader))
        t_ref = time.perf_counter() - s
        ref_loss = ref.test_loss()
        tr = ours(args.dataset, args.epochs, seed=1)
        s = time.perf_counter()
        tr.start(); tr.join()
        t_ours = time.perf_counter() - s
        test = [m for m in tr.metrics() if m["split"] == "test"][-1]
        print(f"after {args.epochs} epoch(s): reference test loss {ref_loss:.2f}, vae_core test -ELBO {-test['elbo']:.2f} "
              f"(BCE+KL nats per example; difference {abs(ref_loss + test['elbo']):.2f}, target < 1); "
              f"wall {t_ref:.1f} s vs {t_ours:.1f} s")


if __name__ == "__main__":
    main()
