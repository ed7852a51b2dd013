"""The training loss compiled by torch.compile, built in a background thread and switched to when ready.

Measured on this 2-core CPU (docs/performance.md, "Speed on every device"): compiling the
forward pass and the loss (inductor fuses the reparameterisation, the BCE over the logits and
the KL into a few loops, and compiles their backward too) trains the default MLP ~10% faster;
compiling Adam's step as well gained nothing over the fused Adam kernel, so the optimiser stays
eager. Compiling takes ~18 s of one core the first time and ~2 s once inductor's on-disk cache
holds the kernels, so it runs in a background thread on a copy of the model, started only after
500 steps (the dashboard's first curve points are drawn before it takes a core), and only for runs long
enough to pay it back. Until it is ready, and wherever it fails, the eager step runs.

VAE_COMPILE=0 turns it off, VAE_COMPILE=1 on for any run length (tests, benchmarks).
"""
from __future__ import annotations

import copy
import os
import shutil
import threading
from typing import Callable

import torch

from .models import VAE
from .objectives import kl_per_dim, log_px_given_z

COMPILE_MIN_STEPS = 3000  # planned steps below which compiling does not pay (a default Fashion-MNIST run: 4,680)
COMPILE_AFTER_STEPS = 500  # eager steps first (~2 s): the first curve points and their drawing get the CPU


def step_loss(model: VAE, x: torch.Tensor, eps: torch.Tensor, beta: torch.Tensor, free_bits: torch.Tensor,
              use_free_bits: bool) -> torch.Tensor:
    """(loss, mean recon, mean KL) stacked, for noise eps ~ N(0, I) drawn by the caller; the function compiled.

    The same objective as objectives.elbo_terms + elbo_loss (a test holds them equal). eps comes from
    outside because the run's generator cannot enter a compiled graph; drawn with the same call as
    VAE.reparameterize, the random stream is the eager step's. beta and free_bits are 0-d tensors so
    that a changing beta (warm-up moves it every step) does not recompile.
    """
    mu, logvar = model.encode(x)  # (B, D)
    z = mu + eps * torch.exp(0.5 * logvar)  # (B, D)
    logits = model.decode_logits(z)
    recon = log_px_given_z(model, x, logits).mean()
    kl_dims = kl_per_dim(mu, logvar)  # (B, D)
    kl = kl_dims.sum(1).mean()
    kl_loss = kl_dims.mean(0).clamp(min=free_bits).sum() if use_free_bits else kl  # Kingma et al. 2016, eq. 15
    return torch.stack([-(recon - beta * kl_loss), recon, kl])


def compile_wanted(device: torch.device, planned_steps: int, arch: str = "mlp") -> bool:
    """Whether this run compiles its step: VAE_COMPILE, else long MLP runs on a CPU with a C++ compiler, or CUDA."""
    env = os.environ.get("VAE_COMPILE", "").strip()
    if env in ("0", "1"):
        return env == "1" and device.type in ("cpu", "cuda")
    if device.type == "cpu":  # the conv net compiled ran slower on this CPU (4.0k vs 5.0k samples/s)
        return arch == "mlp" and planned_steps >= COMPILE_MIN_STEPS and \
            shutil.which(os.environ.get("CXX", "g++")) is not None
    return device.type == "cuda" and planned_steps >= COMPILE_MIN_STEPS


class CompiledStep:
    """step_loss compiled in the background; `get()` is the compiled function once ready, else None."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # CUDA: "reduce-overhead" records the step as CUDA graphs (one launch instead of dozens) once
        # shapes are fixed; every batch has the same shape (the batcher drops the ragged last one).
        self._mode = "reduce-overhead" if device.type == "cuda" else None
        self._fn: Callable[..., torch.Tensor] | None = None  # torch.compile() itself takes ~0.7 s: made in the thread
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # why it fell back to eager, if it did
        self._calls = 0

    def start(self, model: VAE, x: torch.Tensor) -> None:
        """Compile on a copy of the model (the real one keeps training), with a batch shaped like x."""
        if self._thread is not None:
            return
        twin = copy.deepcopy(model).train()
        x = x.detach().clone()
        self._thread = threading.Thread(target=self._compile, args=(twin, x), name="vae-compile", daemon=True)
        self._thread.start()

    def _compile(self, twin: VAE, x: torch.Tensor) -> None:
        try:
            self._fn = torch.compile(step_loss, dynamic=False, mode=self._mode)
            eps = torch.zeros((len(x), twin.latent_dim), device=x.device, dtype=x.dtype)
            zero = torch.zeros((), device=x.device)
            for use_free_bits in (False, True):  # both graphs, so a free-bits change never compiles mid-run
                out = self._fn(twin, x, eps, zero + 1.0, zero, use_free_bits)
                out[0].backward()  # compiles the backward graph too (into the twin's gradients)
            self._ready.set()
        except Exception as e:  # no compiler, an unsupported op: the eager step stays
            self.error = f"{type(e).__name__}: {e}"[:300]

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the compile to end (tests, benchmarks); True when the compiled step is ready."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._ready.is_set()

    def get(self) -> Callable[..., torch.Tensor] | None:
        return self._fn if self._ready.is_set() and self.error is None else None

    def loss(self, model: VAE, x: torch.Tensor, gen: torch.Generator, *, beta: float,
             free_bits: float) -> torch.Tensor | None:
        """(loss, mean recon, mean KL) by the compiled step once it is ready, else None (the caller goes eager).

        Counts the calls and starts the compile after COMPILE_AFTER_STEPS of them.
        """
        self._calls += 1
        if self._calls == COMPILE_AFTER_STEPS:
            self.start(model, x)
        fn = self.get()
        if fn is None:
            return None
        eps = torch.randn((len(x), model.latent_dim), generator=gen, device=x.device, dtype=x.dtype)
        b = torch.full((), beta, device=x.device)
        fb = torch.full((), free_bits, device=x.device)
        try:
            return fn(model, x, eps, b, fb, free_bits > 0)
        except Exception as e:  # e.g. a guard that recompiles and fails: eager from now on
            self.error = f"{type(e).__name__}: {e}"[:300]
            return None
