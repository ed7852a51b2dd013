"""Training throughput of vae_core vs a loop written the way the classic PyTorch VAE example does it.

Same model (MLP 784-400-20), batch 128, Adam 1e-3, BCE on grey levels (--no-binarize), on
Fashion-MNIST (or sprites with --dataset sprites). The two are timed alternately in one
process, so machine noise hits both; the result is a ratio, plus each as a fraction of
this CPU's matmul limit. Then both train the same number of epochs from the same seed and
their test losses are compared (quality must not pay for speed).

    PYTHONPATH=. python benchmarks/bench_train.py [--dataset fashion-mnist] [--rounds 3] [--steps 150] [--epochs 1]
        [--precision fp32,bf16] [--conv [--size 64]]

Each precision (fp32; bf16: mixed precision, TrainConfig.precision) is timed eager and compiled in the
same rounds. --conv times the conv model (also channels-last) and reports its FLOPs, counted by torch
on a real step, against the same float32 matmul probe; --size 64 uses colour 64x64 JPEGs written here.
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


def ours(dataset: str, epochs: int, seed: int = 0, precision: str = "fp32", arch: str = "mlp") -> Trainer:
    cfg = RunConfig().replace(dataset=dataset, latent_dim=20, hidden_dim=400, batch_size=128, lr=1e-3,
                              binarize=False, epochs=epochs, seed=seed, evidence_every=0, precision=precision,
                              arch=arch)
    return Trainer(cfg, persist=False, log_every=50)


def conv64_data(images: int = 1024):
    """A folder of RGB JPEGs (bench_stream.py's), loaded at 64x64 for the conv model, and its name."""
    import os
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from image_files import write_image

    from vae_core import folder_data

    work = Path(tempfile.mkdtemp(prefix="bench-conv64-"))
    os.environ["VAE_DATA_CACHE"] = str(work / "cache")
    for i in range(images):
        write_image(work / "imgs" / f"{i:05d}.jpg", (80, 96), "RGB", "JPEG", seed=i)
    name = f"folder:{work / 'imgs'}"
    return name, folder_data.load_folder(name, 3, 64, warn=print)


class OurLoop:
    """vae_core's step (RunMath) as the trainer runs it: one sync per log interval of 50 steps."""

    def __init__(self, dataset: str, *, compiled: bool, conv: bool = False, channels_last: bool = False,
                 precision: str = "fp32", size: int = 28, data=None, onednn: bool = True) -> None:
        import os

        from vae_core.compiled_step import CompiledStep
        from vae_core.run_math import RunMath

        os.environ["VAE_COMPILE"] = "0"  # built by hand below, so the two loops differ only in that
        cfg = RunConfig().replace(dataset=dataset, latent_dim=20, hidden_dim=400, batch_size=128, lr=1e-3,
                                  binarize=False, epochs=10_000, seed=0, evidence_every=0,
                                  arch="conv" if conv else "mlp", precision=precision)
        if size == 64:  # bench_stream.py's conv VAE on colour 64x64 images (logistic, hidden 256, z 32, batch 32)
            from bench_stream import conv_config

            cfg = conv_config(dataset, 3, 64, 32).replace(epochs=10_000, evidence_every=0, precision=precision)
        self.batch_size = cfg.train.batch_size
        self.onednn = onednn  # False: torch's own CPU convolutions instead of oneDNN's (mkldnn), for comparison
        data = data if data is not None else get_dataset(dataset).subset_train(cfg.train.train_size)
        self.m = RunMath(cfg, data, torch.device("cpu"), lr=1e-3)
        if channels_last:
            self.m.model = self.m.model.to(memory_format=torch.channels_last)
            self.m.opt = self.m.make_optimizer(1e-3)
            self.m.train_x = self.m.train_x.contiguous(memory_format=torch.channels_last)
        self.order, self.step = iter(()), 0
        if compiled:
            self.m.compiled = CompiledStep(self.m.device)
            t = time.perf_counter()
            self.m.compiled.start(self.m.model, self.m.batch(torch.arange(self.batch_size)))
            ok = self.m.compiled.join()
            self.compile_s = time.perf_counter() - t
            if not ok:
                raise SystemExit(f"compile failed: {self.m.compiled.error}")

    def steps(self, n: int) -> int:
        with torch.backends.mkldnn.flags(enabled=self.onednn):
            trainer_steps(self, n)
        return n * self.batch_size


def flops_per_example(m) -> float:
    """Forward + backward FLOPs of one training step of RunMath `m`, per example, counted by torch (no weight change)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vae_core.objectives import elbo_loss, elbo_terms

    x = m.batch(torch.arange(m.config.train.batch_size, device=m.device))
    with FlopCounterMode(display=False) as fc:
        elbo_loss(elbo_terms(m.model, x, m.gen), beta=1.0).backward()
    m.opt.zero_grad(set_to_none=True)
    return fc.get_total_flops() / len(x)


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
    ap.add_argument("--conv", action="store_true", help="the conv model instead of the MLP, vs the same limit")
    ap.add_argument("--size", type=int, choices=(28, 64), default=28,
                    help="with --conv: 28 (the grey dataset) or 64 (colour JPEGs written here, bench_stream's model)")
    ap.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (mixed), each timed")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    device = torch.device("cpu")
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    wide = args.conv and args.size == 64
    dataset, data = conv64_data() if wide else (args.dataset, None)

    # Throughput: alternate fixed numbers of steps of each loop, same thread count.
    loops: dict[str, OurLoop | ClassicRun] = {}
    if not wide:  # the classic example's MLP on 28x28: the reference for the ratios
        loops["reference (DataLoader)"] = ClassicRun(args.dataset, device)
    for p in precisions:
        kw = dict(conv=args.conv, precision=p, size=args.size, data=data)
        loops[f"vae_core eager {p}"] = OurLoop(dataset, compiled=False, **kw)
        compiled = OurLoop(dataset, compiled=True, **kw)
        print(f"compiling the {p} step took {compiled.compile_s:.1f} s (in the background in a real run)")
        loops[f"vae_core compiled {p}"] = compiled
        if args.conv:
            loops[f"vae_core eager {p}, channels-last"] = OurLoop(dataset, compiled=False, channels_last=True, **kw)
            if p == "fp32":
                loops[f"vae_core eager {p}, no oneDNN"] = OurLoop(dataset, compiled=False, onednn=False, **kw)
    for loop in loops.values():
        loop.steps(10)  # warm-up
    flops = {name: flops_per_example(loop.m) for name, loop in loops.items() if isinstance(loop, OurLoop)}
    rates: dict[str, list[float]] = {k: [] for k in loops}
    gf = []
    for _ in range(args.rounds):
        gf.append(matmul_gflops())
        for name, loop in loops.items():
            s = time.perf_counter()
            n = loop.steps(args.steps)
            rates[name].append(n / (time.perf_counter() - s))
    limit = max(gf) * 1e9 / (3 * FWD_FLOPS)  # samples/s if an MLP step ran at matmul speed
    model = "MLP 784-400-20" if not args.conv else f"conv {args.size}x{args.size}"
    print(f"dataset {'colour JPEGs 64x64' if wide else args.dataset}, {threads} threads, model {model}")
    print(f"matmul (128x784)@(784x400), float32: {max(gf):.1f} GFLOP/s (rounds: {', '.join(f'{g:.0f}' for g in gf)})"
          + ("" if args.conv else f" -> limit {limit:,.0f} samples/s for the MLP"))
    ref = rates.get("reference (DataLoader)")
    for name, r in rates.items():
        line = f"{name:38s}: best {max(r):,.0f} samples/s"
        if not args.conv and name != "reference (DataLoader)":  # as recorded since the first wave
            line += f" = {max(r) / limit:.1%} of the MLP's limit"
        if name in flops:  # FLOPs counted by torch on a real step, against the float32 matmul probe
            line += (f", {flops[name] / 1e6:.1f} MFLOP/example -> {max(r) * flops[name] / 1e9:.0f} GFLOP/s "
                     f"= {max(r) * flops[name] / (max(gf) * 1e9):.1%} of the float32 matmul limit")
        if ref is not None:
            ratios = sorted(o / b for o, b in zip(r, ref))
            line += (f"; vs reference per round {', '.join(f'{o / b:.2f}' for o, b in zip(r, ref))}, "
                     f"median {ratios[len(ratios) // 2]:.2f}x")
        print(line)

    if args.epochs and args.conv and not wide:  # the conv model: each precision's test loss, eager
        import os

        os.environ["VAE_COMPILE"] = "0"
        line = f"conv 28x28 after {args.epochs} epoch(s):"
        for p in precisions:
            tr = ours(args.dataset, args.epochs, seed=1, precision=p, arch="conv")
            s = time.perf_counter()
            tr.start(); tr.join()
            test = [m for m in tr.metrics() if m["split"] == "test"][-1]
            line += f" {p} test -ELBO {-test['elbo']:.2f} (wall {time.perf_counter() - s:.1f} s);"
        print(line + " [BCE+KL nats per example]")
    if args.epochs and not args.conv:
        import os

        ref = ClassicRun(args.dataset, device, seed=1)
        s = time.perf_counter()
        ref.steps(args.epochs * len(ref.loader))
        t_ref = time.perf_counter() - s
        ref_loss = ref.test_loss()
        line = f"after {args.epochs} epoch(s): reference test loss {ref_loss:.2f} (wall {t_ref:.1f} s)"
        from vae_core import compiled_step

        # A run compiles after its 500th step, more than one Fashion-MNIST epoch (468): start at once here,
        # so the "compiled" run trains most of its epoch on the compiled step (it switches when ready).
        compiled_step.COMPILE_AFTER_STEPS = 1
        for p in precisions:
            for flag in ("0", "1"):
                os.environ["VAE_COMPILE"] = flag
                tr = ours(args.dataset, args.epochs, seed=1, precision=p)
                s = time.perf_counter()
                tr.start(); tr.join()
                test = [m for m in tr.metrics() if m["split"] == "test"][-1]
                line += (f"; vae_core {'compiled' if flag == '1' else 'eager'} {p} test -ELBO {-test['elbo']:.2f} "
                         f"(difference {abs(ref_loss + test['elbo']):.2f}, wall {time.perf_counter() - s:.1f} s)")
        print(line + " [BCE+KL nats per example; target: difference < 1]")


if __name__ == "__main__":
    main()
