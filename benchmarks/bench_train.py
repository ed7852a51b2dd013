"""Training throughput of vae_core vs a loop written the way the classic PyTorch VAE example does it.

Same model (MLP 784-400-20), batch 128, Adam 1e-3, BCE on grey levels (--no-binarize), on
Fashion-MNIST (or sprites with --dataset sprites). The two are timed alternately in one
process, so machine noise hits both; the result is a ratio, plus each as a fraction of
this CPU's matmul limit. Then both train the same number of epochs from the same seed and
their test losses are compared (quality must not pay for speed).

    PYTHONPATH=. python benchmarks/bench_train.py [--dataset fashion-mnist] [--rounds 3] [--steps 150] [--epochs 1]
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

    import tempfile
    from pathlib import Path

    from vae_core.sources import TORCHVISION_NAMES, find_local

    if dataset == "sprites":
        d = get_dataset("sprites")
        x, y = (d.train_x, d.train_y) if train else (d.test_x, d.test_y)
        ds = torch.utils.data.TensorDataset(x, y)
    else:
        # torchvision wants ROOT/FashionMNIST/raw/<uncompressed IDX files>: write the local files so.
        import gzip
        import shutil

        root = Path(tempfile.mkdtemp(prefix="bench-train-"))
        raw = root / TORCHVISION_NAMES[dataset] / "raw"
        raw.mkdir(parents=True)
        for f in find_local(dataset).iterdir():
            with (gzip.open(f) if f.suffix == ".gz" else open(f, "rb")) as src, open(raw / f.name.removesuffix(".gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)
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


class OurLoop:
    """vae_core's step (RunMath) as the trainer runs it: one sync per log interval of 50 steps."""

    def __init__(self, dataset: str, *, compiled: bool, conv: bool = False, channels_last: bool = False) -> None:
        import os

        from vae_core.compiled_step import CompiledStep
        from vae_core.run_math import RunMath

        os.environ["VAE_COMPILE"] = "0"  # built by hand below, so the two loops differ only in that
        cfg = RunConfig().replace(dataset=dataset, latent_dim=20, hidden_dim=400, batch_size=128, lr=1e-3,
                                  binarize=False, epochs=10_000, seed=0, evidence_every=0,
                                  arch="conv" if conv else "mlp")
        data = get_dataset(dataset).subset_train(cfg.train.train_size)
        self.m = RunMath(cfg, data, torch.device("cpu"), lr=1e-3)
        if channels_last:
            self.m.model = self.m.model.to(memory_format=torch.channels_last)
            self.m.train_x = self.m.train_x.contiguous(memory_format=torch.channels_last)
        self.order, self.step = iter(()), 0
        if compiled:
            self.m.compiled = CompiledStep(self.m.device)
            t = time.perf_counter()
            self.m.compiled.start(self.m.model, self.m.batch(torch.arange(128)))
            ok = self.m.compiled.join()
            self.compile_s = time.perf_counter() - t
            if not ok:
                raise SystemExit(f"compile failed: {self.m.compiled.error}")

    def steps(self, n: int) -> int:
        trainer_steps(self, n)
        return n * 128


def trainer_steps(loop, n: int, device: str = "cpu") -> None:
    """n steps of `loop.m` (a RunMath) as the trainer takes them: one sync per log interval of 50 steps.
    `loop` keeps the epoch's batch order (`order`) and the step count (`step`) between calls."""
    acc = torch.zeros(5, device=device)
    for _ in range(n):
        idx = next(loop.order, None)
        if idx is None:
            loop.order = iter(loop.m.batcher.epoch())
            idx = next(loop.order)
        acc += loop.m.train_step(loop.m.batch(idx), beta=1.0, free_bits=0.0, lr=1e-3)
        loop.step += 1
        if loop.step % 50 == 0:
            acc.tolist()  # the trainer's one sync per log interval


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--epochs", type=int, default=1, help="epochs for the quality comparison (0: skip)")
    ap.add_argument("--conv", action="store_true", help="the conv model (28x28) instead of the MLP, vs the same limit")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    device = torch.device("cpu")

    # Throughput: alternate fixed numbers of steps of each loop, same thread count.
    loops: dict[str, object] = {"reference (DataLoader)": ClassicRun(args.dataset, device)}
    loops["vae_core eager"] = OurLoop(args.dataset, compiled=False, conv=args.conv)
    compiled = OurLoop(args.dataset, compiled=True, conv=args.conv)
    print(f"compiling the step took {compiled.compile_s:.1f} s (in the background in a real run)")
    loops["vae_core compiled"] = compiled
    if args.conv:
        loops["vae_core eager, channels-last"] = OurLoop(args.dataset, compiled=False, conv=True, channels_last=True)
    for loop in loops.values():
        loop.steps(10)  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in loops}
    gf = []
    for _ in range(args.rounds):
        gf.append(matmul_gflops())
        for name, loop in loops.items():
            s = time.perf_counter()
            n = loop.steps(args.steps)
            rates[name].append(n / (time.perf_counter() - s))
    limit = max(gf) * 1e9 / (3 * FWD_FLOPS)  # samples/s if an MLP step ran at matmul speed
    ref = rates["reference (DataLoader)"]
    print(f"dataset {args.dataset}, {threads} threads, model {'conv' if args.conv else 'MLP 784-400-20'}")
    print(f"matmul (128x784)@(784x400): {max(gf):.1f} GFLOP/s (rounds: {', '.join(f'{g:.0f}' for g in gf)}) "
          f"-> limit {limit:,.0f} samples/s for the MLP")
    for name, r in rates.items():
        ratios = sorted(o / b for o, b in zip(r, ref))
        print(f"{name:30s}: best {max(r):,.0f} samples/s ({max(r) / limit:.1%} of the matmul limit); "
              f"vs reference per round {', '.join(f'{o / b:.2f}' for o, b in zip(r, ref))}, "
              f"median {ratios[len(ratios) // 2]:.2f}x")

    if args.epochs:
        import os

        ref = ClassicRun(args.dataset, device, seed=1)
        s = time.perf_counter()
        ref.steps(args.epochs * len(ref.loader))
        t_ref = time.perf_counter() - s
        ref_loss = ref.test_loss()
        line = f"after {args.epochs} epoch(s): reference test loss {ref_loss:.2f} (wall {t_ref:.1f} s)"
        for flag in ("0", "1"):
            os.environ["VAE_COMPILE"] = flag
            tr = ours(args.dataset, args.epochs, seed=1)
            s = time.perf_counter()
            tr.start(); tr.join()
            test = [m for m in tr.metrics() if m["split"] == "test"][-1]
            line += (f"; vae_core {'compiled' if flag == '1' else 'eager'} test -ELBO {-test['elbo']:.2f} "
                     f"(difference {abs(ref_loss + test['elbo']):.2f}, wall {time.perf_counter() - s:.1f} s)")
        print(line + " [BCE+KL nats per example; target: difference < 1]")


if __name__ == "__main__":
    main()
