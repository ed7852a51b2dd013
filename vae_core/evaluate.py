"""Evaluating a saved run: the ELBO, the importance-weighted bound and, for 2 latents, the grid evidence."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import runs
from .config import RunConfig, unit_label
from .models import VAE, build_model
from .objectives import elbo_terms, iwae_bound
from .inference import get_dataset, held_out


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
    return held_out(get_dataset(config.train.dataset, data_dir), config, n)


@torch.no_grad()
def evaluate_run(run_dir: Path, *, k: int = 100, num_examples: int = 500, grid: int = 100, seed: int = 0,
                 grid_examples: int = 16,
                 data_dir: str | None = None) -> dict[str, Any]:
    """Test ELBO, recon, KL and the k-sample IWAE bound in nats per example (plus grid evidence for 2 latents)."""
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
    if config.model.latent_dim == 2 and grid > 0:
        from .evidence import grid_evidence

        # A grid costs ~0.1 s per example at n = 100 on 2 cores, so it covers the first few examples;
        # grid_examples says how many, and iwae_grid_examples is the IWAE bound on the same ones.
        xg = x[:grid_examples]
        out.update({key: float(v) for key, v in grid_evidence(model, xg, n=grid).items()})
        out["grid_examples"] = len(xg)
        out["iwae_grid_examples"] = float(iw[:len(xg)].mean())
    return out
