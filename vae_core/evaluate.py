"""Evaluating a saved run: the ELBO, the importance-weighted bound and, for 2 latents, the grid evidence.

Every number is in nats per example, and `units` names the likelihood it is for (config.unit_label).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from . import runs
from .config import ConfigError, RunConfig, unit_label
from .models import VAE, build_model
from .objectives import elbo_terms, iwae_bound
from .inference import get_dataset, held_out
from .likelihoods import bits_per_dim


def load_model(run_dir: Path) -> tuple[VAE, RunConfig, dict[str, Any]]:
    """The run's model on the CPU in eval mode, its config and checkpoint metadata."""
    ckpt = runs.load_checkpoint(Path(run_dir) / runs.CHECKPOINT)
    try:
        config = RunConfig.from_dict(ckpt["config"])
    except ValueError as e:
        raise runs.RunFileError(f"{Path(run_dir) / runs.CHECKPOINT}: {e}") from None
    model = build_model(config.model)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise runs.RunFileError(f"{Path(run_dir) / runs.CHECKPOINT}: weights do not fit the model ({str(e)[:200]})") from None
    return model.eval(), config, ckpt


def held_out_batch(config: RunConfig, n: int, data_dir: str | None = None) -> torch.Tensor:
    """The first n test images of the run's dataset, binarized with the trainer's fixed test seed."""
    m = config.model
    return held_out(get_dataset(config.train.dataset, data_dir, channels=m.channels, image_size=m.image_size),
                    config, n)


GRID_MAX = 1000  # points per axis: 1000^2 decoder passes per example is already minutes on a CPU
IWAE_NOTE = ("log p̂ₖ(x) is a lower bound that rises toward log p(x) only as fast as k samples from q(z|x) find "
             "the posterior's mass: where q sits far from a posterior with several modes, even k = 5000 can stay "
             "many nats below (seen on 2-latent sprites, where the grid shows it)")


def _rounded(values: list[float]) -> list[float]:
    return [round(float(v), 4) for v in values]


@torch.no_grad()
def evaluate_run(run_dir: Path, *, k: int = 100, num_examples: int = 500, grid: int = 100, seed: int = 0,
                 grid_examples: int = 16,
                 data_dir: str | None = None) -> dict[str, Any]:
    """Test ELBO, recon, KL and the k-sample IWAE bound in nats per example (plus grid evidence for 2 latents).

    With 2 latents the first grid_examples images also get log p(x) by quadrature, each checked
    against grid-free estimates (evidence.grid_checks), and each image's gap between that log p(x)
    and its IWAE bound; images whose bound is far below are listed, not hidden in a mean.
    """
    if not (grid == 0 or 8 <= grid <= GRID_MAX):
        raise ConfigError(f"grid must be 0 (off) or 8 to {GRID_MAX} points per axis; got {grid}")
    if grid_examples < 0:
        raise ConfigError(f"grid examples must be 0 or more; got {grid_examples}")
    model, config, ckpt = load_model(run_dir)
    x = held_out_batch(config, num_examples, data_dir)
    gen = torch.Generator().manual_seed(seed)
    t = elbo_terms(model, x, gen)
    iw = torch.cat([iwae_bound(model, x[i:i + 100], k, generator=gen) for i in range(0, len(x), 100)])
    out: dict[str, Any] = {
        "run": Path(run_dir).name, "step": int(ckpt["step"]), "num_examples": len(x),
        "units": unit_label(config),
        "elbo": float(t.elbo.mean()), "recon": float(t.recon.mean()), "kl": float(t.kl.mean()),
        "iwae": float(iw.mean()), "k": k,
    }
    dims = math.prod(config.model.image_shape)
    bpd = {key: bits_per_dim(out[key], config.model.likelihood, dims, binarized=config.binarized)
           for key in ("elbo", "iwae")}
    if bpd["elbo"] is not None:  # colour models are compared in bits per dimension (-log2 p(x) per value)
        out["bits_per_dim"] = {key: round(v, 4) for key, v in bpd.items()}
    if config.model.latent_dim == 2 and grid > 0 and grid_examples > 0:
        from .evidence import REFERENCE_SAMPLES, far_below, grid_evidence

        # A grid costs ~0.1 s per example at n = 100 on 2 cores (and its check as much again), so it
        # covers the first few examples; iwae_grid_examples is the IWAE bound on the same ones.
        xg = x[:grid_examples]
        ev = grid_evidence(model, xg, n=grid, reference_samples=REFERENCE_SAMPLES)
        out.update({key: float(ev[key]) for key in ("log_px_grid", "kl_to_posterior_grid", "elbo_grid")})
        out["grid_examples"] = len(xg)
        out["grid_checks_failed"] = ev["grid_checks_failed"]
        out["iwae_grid_examples"] = float(iw[:len(xg)].mean())
        each = iw[:len(xg)].tolist()
        out["log_px_grid_each"] = _rounded(ev["log_px_grid_each"])
        out["iwae_gap_each"] = _rounded([a - b for a, b in zip(ev["log_px_grid_each"], each)])
        out["iwae_far_below"] = far_below(ev["log_px_grid_each"], each)
    elif config.model.latent_dim > 2:
        out["note"] = IWAE_NOTE + "; with more than 2 latents there is no grid to show it."
    return out
