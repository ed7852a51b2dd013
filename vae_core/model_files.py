"""A run's weights without pickle: model.safetensors and model.json beside every checkpoint.

model.safetensors holds the model's tensors (loading it runs no code, unlike a pickle); model.json
says what they are (arch, sizes, likelihood, the whole config), and rides in the safetensors
header too. Both are written each time checkpoint.pt is (runs.save_checkpoint), each replaced
atomically like it, so a kill leaves the previous pair or the new one. docs/load-model.md loads
them in ten lines of plain PyTorch; load_model() does it with this package.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from . import runs
from .config import ConfigError, RunConfig
from .interop import INSTALL, require

SAFETENSORS, MODEL_JSON = "model.safetensors", "model.json"
MODEL_FORMAT, MODEL_FORMAT_VERSION = "vae-dashboard/vae", 1
_warned_missing = False


def model_description(config: RunConfig, step: int, live: dict[str, Any] | None = None,
                      shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """What model.json says: enough to rebuild the network without this package."""
    m = config.model
    return {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "arch": m.arch,
            "latent_dim": m.latent_dim, "hidden_dim": m.hidden_dim, "likelihood": m.likelihood,
            "gaussian_sigma": m.gaussian_sigma, "image_shape": [1, 28, 28], "step": int(step),
            "decoder_output": "logits; the mean image is sigmoid(logits) for every likelihood",
            "tensors": {k: list(v) for k, v in (shapes or {}).items()},
            "config": config.to_dict(), "live": dict(live or {})}


def save_model_files(run_dir: Path, state: dict[str, Any]) -> bool:
    """model.json and model.safetensors from a checkpoint's state, each replaced atomically.

    Called by runs.save_checkpoint. Returns False (and says so once per process, in one line) when safetensors is
    not installed, or when the state carries no model and config (nothing to describe).
    """
    global _warned_missing
    model, config = state.get("model"), state.get("config")
    if not isinstance(model, dict) or not isinstance(config, dict):
        return False
    try:
        from safetensors.torch import save as st_save
    except ImportError:
        if not _warned_missing:
            _warned_missing = True
            print(f"note: weights are not saved as safetensors (model.safetensors): {INSTALL}", file=sys.stderr)
        return False
    try:
        cfg = RunConfig.from_dict(config)
    except ConfigError:
        return False
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.items()}
    desc = model_description(cfg, int(state.get("step", 0)), state.get("live"),
                             {k: tuple(v.shape) for k, v in tensors.items()})
    text = json.dumps(desc, indent=2, sort_keys=True)
    run_dir = Path(run_dir)
    runs.atomic_write_bytes(run_dir / MODEL_JSON, (text + "\n").encode())
    # The description rides in the safetensors header too, so the weights file alone is self-describing.
    runs.atomic_write_bytes(run_dir / SAFETENSORS, st_save(tensors, metadata={"vae_dashboard": json.dumps(desc)}))
    return True


def write_model_files(run_dir: Path) -> Path:
    """model.safetensors and model.json for a run from its checkpoint (runs from before they were written)."""
    require("safetensors", "safetensors export")
    run_dir = Path(run_dir)
    ckpt = runs.load_checkpoint(run_dir / runs.CHECKPOINT)
    save_model_files(run_dir, ckpt)
    return run_dir / SAFETENSORS


def load_model(run_dir: Path) -> Any:
    """The run's VAE from model.json and model.safetensors (no pickle); RunFileError in one line if unusable."""
    require("safetensors", "Loading safetensors weights")
    from safetensors.torch import load_file

    from .models import build_model

    run_dir = Path(run_dir)
    desc, why = runs.json_problem(run_dir / MODEL_JSON)
    if why is not None:
        raise runs.RunFileError(why)
    if desc.get("format") != MODEL_FORMAT:
        raise runs.RunFileError(f"{MODEL_JSON} is not a model description of this program")
    try:
        config = RunConfig.from_dict(desc.get("config"))
    except ConfigError as e:
        raise runs.RunFileError(f"{MODEL_JSON}: its config is invalid ({e})") from None
    path = run_dir / SAFETENSORS
    if not path.is_file():
        raise runs.RunFileError(f"{path} is missing")
    if path.stat().st_size > runs.checkpoint_budget(config.model):
        raise runs.RunFileError(f"{path} is larger than the model its {MODEL_JSON} describes; refusing it")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise runs.RunFileError(f"{path} cannot be loaded: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    model = build_model(config.model)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise runs.RunFileError(f"{path} does not fit its {MODEL_JSON}: {str(e).splitlines()[0]}") from None
    return model.eval()
