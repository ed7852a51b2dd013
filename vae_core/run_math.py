"""The math of one run: data on the device, model, optimiser, generator and batcher; a step, an evaluation.

`RunMath` is built whole in __init__ (nothing to prepare later) and knows nothing of threads,
locks or files: the Trainer holds one and runs it in its thread; tests and benchmarks build one
and call `train_step` and `evaluate` directly, as pythae's tests do.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import data as data_mod
from .compiled_step import CompiledStep, compile_wanted
from .config import RunConfig
from .devices import mixed_dtype
from .evidence import ACTIVE_THRESHOLD, active_units
from .images import to_display
from .inference import N_FIXED, N_SAMPLES, held_out
from .models import VAE, build_model
from .objectives import elbo_loss, elbo_terms

EVIDENCE_BATCH = 64  # held-out images for the importance-weighted evaluation
EVIDENCE_KS = (1, 10, 100, 1000)
EVIDENCE_GRID_EXAMPLES = 8  # examples whose true log p(x) is integrated on a grid (2 latents)


class RunMath:
    """Everything one VAE run computes with. `data` is the (CPU) dataset, already cut to train_size."""

    def __init__(self, config: RunConfig, data: data_mod.ImageData, device: torch.device, *, lr: float,
                 checkpoint: dict[str, Any] | None = None) -> None:
        self.config, self.device = config, device
        self.gen = torch.Generator(device=device).manual_seed(config.train.seed)
        self.train_x = data.train_x.to(device)
        self.test_x = data.test_x.to(device)
        # The test set is binarized once, by the one held-out rule (a CPU generator: the same images on any device).
        self.test_xb = held_out(data, config, len(data.test_x)).to(device)
        self.batcher = data_mod.IndexBatcher(len(data.train_x), config.train.batch_size, self.gen, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.train.seed)
            self.model: VAE = build_model(config.model).to(device)
        self.model.mixed_dtype = mixed_dtype(config.train.precision, device)  # bf16 steps (models.VAE)
        self.opt = self.make_optimizer(lr)
        # The loss compiled in the background and switched to when ready (~10% faster on CPU; compiled_step.py).
        planned = config.train.epochs * self.batcher.steps_per_epoch
        self.compiled = CompiledStep(device) if compile_wanted(device, planned, config.model.arch) else None
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            if "optimizer" in checkpoint:
                self.opt.load_state_dict(checkpoint["optimizer"])
            if "generator" in checkpoint and device.type == "cpu":
                self.gen.set_state(checkpoint["generator"])
            self.set_lr(lr)
        self.fixed_idx = torch.arange(min(N_FIXED, len(data.test_x)))  # a small folder holds out fewer
        self.fixed_z = torch.randn((N_SAMPLES, config.model.latent_dim),
                                   generator=torch.Generator().manual_seed(0)).to(device)

    @property
    def steps_per_epoch(self) -> int:
        return self.batcher.steps_per_epoch

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        # The fused kernel updates all parameters in one call: ~10% faster steps for this small MLP on CPU.
        return torch.optim.Adam(self.model.parameters(), lr=lr, fused=self.device.type in ("cpu", "cuda"))

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """The training batch at these indices; binarized runs draw a fresh binarization per batch."""
        # A streamed folder reads the batch from its uint8 cache on disk (folder_data.StreamedImages).
        x = self.train_x.batch(idx, self.device) if hasattr(self.train_x, "batch") else self.train_x[idx]
        return torch.bernoulli(x, generator=self.gen) if self.config.binarized else x

    def train_step(self, x: torch.Tensor, *, beta: float, free_bits: float, lr: float) -> torch.Tensor:
        """One Adam step on batch x; returns detached (loss, recon, kl, beta, 1) for logging, with no sync."""
        self.set_lr(lr)
        self.model.train()
        out = self.compiled.loss(self.model, x, self.gen, beta=beta, free_bits=free_bits) if self.compiled else None
        if out is None:
            terms = elbo_terms(self.model, x, self.gen)
            loss = elbo_loss(terms, beta=beta, free_bits=free_bits)
            recon, kl = terms.recon.detach().mean(), terms.kl.detach().mean()
        else:
            loss, recon, kl = out[0], out[1].detach(), out[2].detach()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        one = torch.ones((), device=x.device)
        return torch.stack([loss.detach(), recon, kl, one * beta, one])

    def weights_cpu(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the model's weights (the last good ones, to publish or to restore)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def restore(self, weights: dict[str, torch.Tensor], lr: float) -> None:
        """Go back to `weights` with a fresh optimiser (Adam's moments may hold NaN after a blow-up)."""
        self.model.load_state_dict(weights)
        self.opt = self.make_optimizer(lr)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor | None = None, batch: int = 1000) -> dict[str, Any]:
        """Test-set ELBO, recon, KL (nats per example), per-dimension KL and active units; no weight change."""
        x = self.test_xb if x is None else x
        self.model.eval()
        sums = torch.zeros(3, device=self.device)
        kl_dims, mus = [], []
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            t = elbo_terms(self.model, xb, self.gen)
            sums += torch.stack([t.recon.sum(), t.kl.sum(), torch.tensor(float(len(xb)), device=self.device)])
            kl_dims.append(t.kl_dims.sum(0))
            mus.append(t.mu)
        recon, kl, n = sums.tolist()
        per_dim = (torch.stack(kl_dims).sum(0) / n).cpu().numpy()
        active, _ = active_units(per_dim, ACTIVE_THRESHOLD)
        variances = torch.cat(mus).double().var(0).cpu().numpy()  # Var_x(E_q[z_d|x]), Burda et al.'s measure
        return {"elbo": (recon - kl) / n, "recon": recon / n, "kl": kl / n, "kl_per_dim": per_dim.tolist(),
                "active_units": int(active), "mu_variance": np.asarray(variances).tolist()}

    @torch.no_grad()
    def evidence(self, ks: tuple[int, ...] = EVIDENCE_KS, *, seed: int = 0) -> dict[str, Any]:
        """ELBO and importance-weighted bounds log p_k(x) on a fixed held-out batch, nats per example.

        The bounds rise with k toward log p(x) (Burda et al. 2016); their distance above the
        ELBO estimates KL(q(z|x) || p(z|x)), the inference gap. With 2 latents the true
        log p(x) by quadrature on a grid is added for a few of the examples.
        """
        from .evidence import grid_evidence, iwae_curve

        self.model.eval()
        x = self.test_xb[:EVIDENCE_BATCH]
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = iwae_curve(self.model, x, ks, generator=gen)
        if self.config.model.latent_dim == 2:
            out.update(grid_evidence(self.model, x[:EVIDENCE_GRID_EXAMPLES], n=64))
            # The same examples' IWAE bound, so the panel compares like with like.
            sub = iwae_curve(self.model, x[:EVIDENCE_GRID_EXAMPLES], (max(ks),), generator=gen)
            out["iwae_grid_examples"] = sub["iwae"][0]
        return out

    @torch.no_grad()
    def render_images(self) -> dict[str, np.ndarray]:
        """Fixed test images, their reconstructions and prior samples at fixed z, as float arrays in [0, 1]."""
        self.model.eval()
        x = self.test_x[self.fixed_idx]
        mu, _ = self.model.encode(x)
        return {"originals": to_display(x.cpu().numpy()), "reconstructions": to_display(self.model.decode(mu).cpu().numpy()),
                "samples": to_display(self.model.decode(self.fixed_z).cpu().numpy())}

    def checkpoint_state(self) -> dict[str, Any]:
        """Model, optimiser and (on the CPU) generator state for a checkpoint."""
        state: dict[str, Any] = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}
        if self.device.type == "cpu":
            state["generator"] = self.gen.get_state()
        return state
