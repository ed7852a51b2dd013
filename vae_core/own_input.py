"""A person's own image through a run's model: its code, reconstruction, samples and bounds beside the test set's.

The image comes from vae_core.drawn (a drawn canvas or an upload, 28 x 28 in [0, 1]). For a
binarized run it is evaluated as the test images are, as one Bernoulli draw of its pixels with
a fixed seed, so its ELBO and IWAE bound are log-likelihoods of the same kind as the test set's.
All values are nats per example; everything returned is numpy or plain values.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .evidence import PosteriorGrid, iwae_curve, posterior_grid
from .inference import Weights, held_out
from .models import VAE
from .records import DEFAULT_EXAMPLES, DatasetUnavailable

# The IWAE bound's k, for the input and the test images alike. Every stroke is a new input, so the cost
# counts: k = 1000 on the 64 test images took 18 s on the loaded 2-core machine (hidden 400), k = 100
# about a tenth of that (docs/performance.md, "Your own input").
K = 100
KS = (1, 10, K)
REPEATS = 10  # independent estimates of the input's bounds: their spread is the Monte Carlo error
N_SAMPLES = 16  # decoded draws from q(z|x)
TEST_N = DEFAULT_EXAMPLES  # held-out images for the comparison (the Evidence tab's default, 64)
GRID_N = 64  # points per axis of the true posterior's grid (2 latents): 4,096 decoder passes (+ 4,608 to place it)
SEED = 0


@dataclass(frozen=True)
class TestBounds:
    """The held-out set's mean ELBO and IWAE bound (k = K) with standard errors across images."""

    elbo: float
    elbo_se: float
    iwae: float
    iwae_se: float
    n: int
    k: int


@dataclass(frozen=True)
class OwnInput:
    """One input image's encoding and bounds under the weights of `step` (nats per example)."""

    image: np.ndarray  # (28, 28) what was given, in [0, 1]
    evaluated: np.ndarray  # (28, 28) what the likelihood scored: the Bernoulli draw when the run is binarized
    mu: np.ndarray  # (D,) mean of q(z|x)
    logvar: np.ndarray  # (D,) log variance of q(z|x) (diagonal)
    reconstruction: np.ndarray  # (28, 28) decoder mean at z = mu
    samples: np.ndarray  # (N_SAMPLES, 28, 28) decoder means at z ~ q(z|x)
    elbo: float  # mean over REPEATS copies (the closed-form-KL ELBO of each)
    iwae: float  # log p_k(x), k = K, mean over REPEATS independent estimates
    iwae_se: float  # its Monte Carlo standard error
    k: int
    kl: float  # KL(q(z|x) || p(z)), the rate
    test: TestBounds | None  # None where the run's dataset is not on this machine
    test_missing: str  # why there is no test comparison ("" when there is one)
    grid: PosteriorGrid | None  # the true posterior p(z|x) on a grid: 2 latents only
    step: int


def _input_tensor(image: np.ndarray, binarized: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.clip(np.asarray(image, np.float32), 0.0, 1.0).reshape(1, 1, 28, 28))
    if binarized:  # the held-out rule (inference.held_out): one Bernoulli draw, a fixed generator
        return x, torch.bernoulli(x, generator=torch.Generator().manual_seed(10_000 + seed))
    return x, x


def test_bounds(model: VAE, x_test: torch.Tensor, k: int = K) -> TestBounds:
    """Mean ELBO and log p_k(x) over the held-out batch x_test (B, 1, 28, 28)."""
    c = iwae_curve(model, x_test, (1, k), generator=torch.Generator().manual_seed(SEED))
    return TestBounds(c["elbo"], c["elbo_se"], c["iwae"][-1], c["iwae_se"][-1], c["n"], k)


def evaluate(model: VAE, image: np.ndarray, *, binarized: bool, seed: int = 0, x_test: torch.Tensor | None = None,
             grid_n: int = GRID_N) -> dict[str, Any]:
    """The fields of OwnInput (except test_missing and step) for one (28, 28) image under `model`."""
    given, x = _input_tensor(image, binarized, seed)
    mu, logvar = model.encode(x)  # (1, D) each
    gen = torch.Generator().manual_seed(SEED)
    eps = torch.randn((N_SAMPLES, mu.shape[1]), generator=gen)
    z = mu + eps * torch.exp(0.5 * logvar)  # (N_SAMPLES, D), draws from q(z|x)
    copies = x.expand(REPEATS, *x.shape[1:])  # (R, 1, 28, 28): R independent estimates of the same bounds
    curve = iwae_curve(model, copies, KS, generator=gen)
    grid = posterior_grid(model, x[0], n=grid_n, reference_samples=0) if mu.shape[1] == 2 else None
    return {
        "image": given[0, 0].numpy().copy(), "evaluated": x[0, 0].numpy().copy(),
        "mu": mu[0].double().numpy(), "logvar": logvar[0].double().numpy(),
        "reconstruction": model.decode(mu)[0, 0].numpy().copy(), "samples": model.decode(z)[:, 0].numpy().copy(),
        "elbo": curve["elbo"], "iwae": curve["iwae"][-1], "iwae_se": curve["iwae_se"][-1], "k": KS[-1],
        "kl": curve["kl"], "test": test_bounds(model, x_test) if x_test is not None else None, "grid": grid,
    }


_TEST_CACHE: "collections.OrderedDict[tuple[int, int], TestBounds]" = collections.OrderedDict()
_TEST_CACHE_SIZE = 16  # (weights view, version) pairs: the test bounds are the same for every drawing on them


def _cached_test_bounds(model: VAE, key: tuple[int, int], x_test: torch.Tensor) -> TestBounds:
    """test_bounds once per published weights (called under the weights' reader lock, so no lock of its own)."""
    if key not in _TEST_CACHE:
        _TEST_CACHE[key] = test_bounds(model, x_test)
        while len(_TEST_CACHE) > _TEST_CACHE_SIZE:
            _TEST_CACHE.popitem(last=False)
    return _TEST_CACHE[key]


def own_input(weights: Weights, image: np.ndarray) -> OwnInput:
    """Encode and score `image` (28, 28) in [0, 1] with the run's latest published weights."""
    image = np.asarray(image, dtype=np.float32)
    if image.shape != (28, 28) or not np.isfinite(image).all():
        raise ValueError(f"an input image must be 28 x 28 finite grey levels; got shape {image.shape}")
    config = weights.config
    try:
        x_test, missing = held_out(weights.dataset(), config, TEST_N), ""
    except DatasetUnavailable as e:
        x_test, missing = None, str(e)

    def run(model: VAE, version: int) -> OwnInput:
        step = weights.step()  # a publish meanwhile makes this one step count newer than the model: display only
        fields = evaluate(model, image, binarized=config.binarized, seed=config.train.seed)
        test = _cached_test_bounds(model, (weights.token, version), x_test) if x_test is not None else None
        return OwnInput(**{**fields, "test": test}, test_missing=missing, step=step)

    return weights.using_model(run)
