"""A run's latest weights as a reader sees them: decode, encode, images and evidence from a CPU copy.

Both kinds of run a reader may look at use this one class: a run this process trains (its
Trainer publishes weights here about once a second) and a run another process trains (a
FollowedRun publishes the weights of its checkpoint whenever the file changes). Readers never
touch the model the optimiser updates; everything returned is numpy or plain values.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import data as data_mod
from .config import RunConfig
from .images import from_display, to_display, to_uint8
from .models import VAE, build_model

N_FIXED = 16  # test images shown with their reconstructions
N_SAMPLES = 64  # prior samples with a fixed z
POSTERIOR_IMAGE_K = 1000  # importance samples for one image's own IWAE bound ...
POSTERIOR_REPEATS = 10  # ... estimated this many times independently (their mean and standard error)

_TOKENS = itertools.count(1)
_DATA_CACHE: dict[tuple[str, str | None, int | None, int | None], data_mod.ImageData] = {}
_DATA_LOCK = threading.Lock()


def get_dataset(name: str, data_dir: str | None = None, *, channels: int | None = None,
                image_size: int | None = None) -> data_mod.ImageData:
    """Datasets are loaded once per process (sprites take seconds to render) and shared read-only.

    channels and image_size (a run's config.model; None: the data's own) convert the images.
    """
    key = (name, str(data_dir) if data_dir else None, channels, image_size)
    with _DATA_LOCK:
        if key not in _DATA_CACHE:
            _DATA_CACHE[key] = data_mod.load_dataset(name, data_dir, channels=channels, image_size=image_size)
        return _DATA_CACHE[key]


def held_out(data: data_mod.ImageData, config: RunConfig, n: int) -> torch.Tensor:
    """The first n test images, binarized with the run's fixed test seed (10_000 + seed) on the CPU.

    The one rule for "the held-out images": the trainer's test numbers, the evidence rows, the
    on-demand jobs and the CLI's evaluate all use it, so they speak of the same images on any device.
    """
    x = data.test_x[:n]
    if config.binarized:
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(10_000 + config.train.seed))
    return x


@dataclass(frozen=True)
class PosteriorResult:
    """One held-out image's true posterior on a grid (2 latents) and its own IWAE bounds (numpy/plain only)."""

    grid: Any  # evidence.PosteriorGrid: numpy arrays and floats
    curve: dict[str, Any]  # evidence.iwae_curve over POSTERIOR_REPEATS copies of the image
    seconds: float  # the grid's computing time
    step: int  # the weights' step
    image: np.ndarray  # (28, 28) the binarized draw x that was evaluated


class Weights:
    """The latest published weights of one run on the CPU, with the reads every panel needs. Thread-safe."""

    def __init__(self, config: RunConfig, *, data_dir: str | None = None,
                 data: data_mod.ImageData | None = None) -> None:
        self.config = config
        self.data_dir = data_dir
        self.token = next(_TOKENS)  # unique in this process, never reused: a cache key for readers
        self._data = data
        self._lock = threading.Lock()  # guards the published state and version
        self._state: dict[str, torch.Tensor] | None = None
        self._version = 0
        self._step = 0
        self._infer_lock = threading.Lock()  # the CPU model is used by one reader at a time
        self._model: VAE | None = None
        self._model_version = -1

    # ------------------------------------------------------------ publishing (the run's side)

    def publish(self, state: dict[str, torch.Tensor], step: int) -> None:
        cpu = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        with self._lock:
            self._state, self._step = cpu, int(step)
            self._version += 1

    # ------------------------------------------------------------ reading

    def version(self) -> int:
        with self._lock:
            return self._version

    def step(self) -> int:
        with self._lock:
            return self._step

    def state_copy(self) -> dict[str, torch.Tensor] | None:
        """A CPU copy of the latest weights (for evaluation jobs); never the live model."""
        with self._lock:
            return None if self._state is None else {k: v.clone() for k, v in self._state.items()}

    def _current_model(self) -> VAE:
        """The CPU model holding the published weights; call under self._infer_lock."""
        with self._lock:
            state, version = self._state, self._version
        if state is None:
            raise RuntimeError("no weights published yet")
        if self._model is None:
            self._model = build_model(self.config.model).eval()
        if version != self._model_version:
            self._model.load_state_dict(state)
            self._model_version = version
        return self._model

    @torch.no_grad()
    def decode(self, z: np.ndarray) -> np.ndarray:
        """Decode codes (N, D) to mean images float32 in [0, 1]: (N, H, W) grey, (N, H, W, 3) colour."""
        z = np.asarray(z, dtype=np.float32).reshape(-1, self.config.model.latent_dim)
        with self._infer_lock:
            return to_display(self._current_model().decode(torch.from_numpy(z)).numpy())

    @torch.no_grad()
    def encode(self, x: np.ndarray, batch: int = 2000) -> tuple[np.ndarray, np.ndarray]:
        """Encode images in [0, 1] ((N, H, W) grey, (N, H, W, 3) colour) to (mu, logvar), each (N, D)."""
        x = torch.from_numpy(from_display(np.asarray(x, dtype=np.float32), self.config.model.image_shape))
        with self._infer_lock:
            model = self._current_model()
            outs = [model.encode(x[i:i + batch]) for i in range(0, len(x), batch)]
        return torch.cat([o[0] for o in outs]).numpy(), torch.cat([o[1] for o in outs]).numpy()

    def dataset(self) -> data_mod.ImageData:
        """The run's dataset on the CPU (loaded on first use; raises DatasetUnavailable)."""
        if self._data is None:
            m = self.config.model
            self._data = get_dataset(self.config.train.dataset, self.data_dir, channels=m.channels,
                                     image_size=m.image_size)
        return self._data

    def test_set(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        """Test images (N, 28, 28) float32, labels (N,), label names: what panels pick from."""
        d = self.dataset()
        x = d.test_x[:n] if n else d.test_x
        y = d.test_y[:n] if n else d.test_y
        return to_display(x.numpy()).copy(), y.numpy().copy(), d.label_names

    def test_size(self) -> int:
        return len(self.dataset().test_x)

    def held_out(self, n: int) -> np.ndarray:
        """The first n held-out images as evaluated (binarized when the run is), (N, 28, 28) float32."""
        return to_display(held_out(self.dataset(), self.config, n).numpy()).copy()

    def render_artifacts(self) -> dict[str, Any]:
        """Originals, their reconstructions and prior samples (fixed z) as uint8, from the published weights.

        Without the run's dataset on this machine (an example or a copied run) the samples, which need
        no data, are still drawn, and "missing" says why there are no reconstructions.
        """
        z = torch.randn((N_SAMPLES, self.config.model.latent_dim), generator=torch.Generator().manual_seed(0))
        art: dict[str, Any] = {"samples": to_uint8(self.decode(z.numpy())), "step": self.step()}
        try:
            originals = self.test_set(N_FIXED)[0]
        except data_mod.DatasetUnavailable as e:
            return {**art, "missing": str(e)}
        mu, _ = self.encode(originals)
        return {**art, "originals": to_uint8(originals), "reconstructions": to_uint8(self.decode(mu))}

    def posterior(self, index: int, n: int) -> PosteriorResult:
        """Held-out image `index`'s true posterior on an n x n grid and its IWAE bounds up to k = 1000."""
        from .evidence import iwae_curve, posterior_grid

        x = held_out(self.dataset(), self.config, index + 1)[index]  # (1, 28, 28)
        with self._infer_lock:
            model = self._current_model()
            step = self.step()
            t0 = time.perf_counter()
            grid = posterior_grid(model, x, n=n)
            seconds = time.perf_counter() - t0
            copies = x[None].expand(POSTERIOR_REPEATS, *x.shape)  # (R, 1, 28, 28)
            curve = iwae_curve(model, copies, (1, 10, 100, POSTERIOR_IMAGE_K),
                               generator=torch.Generator().manual_seed(index))
        return PosteriorResult(grid, curve, seconds, step, to_display(x[None].numpy())[0].copy())

    def using_model(self, fn: Callable[[VAE, int], Any]) -> Any:
        """fn(model, version) on the CPU model with the published weights, holding the readers' lock (no grad).

        `version` is the one those weights were published as (a cache key for results computed from them).
        """
        with torch.no_grad(), self._infer_lock:
            model = self._current_model()
            return fn(model, self._model_version)
