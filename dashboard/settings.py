"""What the controls mean: their defaults, choices and labels, and the one way values become a RunConfig.

Kept free of drawing so the rules can be tested directly and reused (URL parameters,
the runs panel's forks); validation itself lives in vae_core.config.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from vae_core.lab import LIVE_FIELDS, UI_LIMITS, ConfigError, Lab, RunConfig

PREFIX = "cfg_"
# Non-uniform choices: fine steps where small changes matter (β near 1, lr near 1e-3).
BETAS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0,
         1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.4, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0)
LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
BATCH_SIZES = (16, 32, 64, 100, 128, 256, 512, 1024, 2048)

_defaults = RunConfig()
DEFAULTS: dict[str, Any] = {**dataclasses.asdict(_defaults.model), **dataclasses.asdict(_defaults.train)}
DEFAULTS["train_size"] = 0  # the widget's "all images"; config_from_values maps 0 to None
# A first page offers the best dataset on this machine (a real one beats sprites), found once per server.
DEFAULTS["dataset"] = Lab.default_dataset()

LABELS = {
    "dataset": "Dataset", "arch": "Architecture", "latent_dim": "Latent size D", "hidden_dim": "Hidden units",
    "likelihood": "Likelihood p(x|z)", "gaussian_sigma": "Gaussian σ", "beta": "β (KL weight)",
    "lr": "Learning rate", "batch_size": "Batch size", "epochs": "Epochs", "warmup_epochs": "KL warm-up (epochs)",
    "free_bits": "Free bits (nats per dim)", "binarize": "Binarize pixels (Bernoulli draws)", "seed": "Seed",
    "device": "Device", "train_size": "Training images (0 = all)", "evidence_every": "log p(x) estimate every N epochs",
    "channels": "Channels", "image_size": "Image size",
}
LABELS["snapshot_budget_mb"] = "Time-lapse snapshots (MB of disk)"
LABELS["precision"] = "Precision"
PRECISION_NAMES = {"fp32": "float32", "bf16": "bfloat16 mixed precision"}
DATASET_NAMES = {"sprites": "Sprites (built in)", "mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
# (CIFAR-10, CelebA and folders of your own: dashboard/panels/dataset_picker.py)
ARCH_NAMES = {"mlp": "MLP", "conv": "Convolutional"}
LIKELIHOOD_NAMES = {"bernoulli": "Bernoulli (cross-entropy)", "gaussian-fixed": "Gaussian, fixed σ",
                    "gaussian-learned": "Gaussian, learned σ", "gaussian-pixel": "Gaussian, learned σ per pixel",
                    "logistic": "Discretized logistic (8-bit)"}


def config_from_values(values: dict[str, Any]) -> RunConfig:
    """The RunConfig for a dict of control values (field names); raises ConfigError."""
    v = {k: values[k] for k in DEFAULTS if k in values}
    if not v.get("train_size"):
        v["train_size"] = None
    return _defaults.replace(**v)


def field_errors(values: dict[str, Any], availability: dict[str, tuple[bool, str]] | None = None) -> dict[str, str]:
    """Problems by field name ('' for ones that belong to no single control); empty when Train may run."""
    errors: dict[str, str] = {}
    for name, value in values.items():
        if name not in DEFAULTS:
            continue
        try:
            config_from_values({**DEFAULTS, name: value})
        except ConfigError as e:
            errors[name] = str(e)
    lo, hi = UI_LIMITS["latent_dim"]
    if "latent_dim" not in errors and not lo <= values.get("latent_dim", lo) <= hi:
        errors["latent_dim"] = f"latent size must be between {lo:g} and {hi:g} here"
    if availability is not None:
        ok, reason = availability.get(values.get("dataset"), (True, ""))
        if not ok:
            errors["dataset"] = f"Not available: {reason}"
    device, precision = values.get("device", "auto"), values.get("precision", "fp32")
    if "device" not in errors and device not in ("auto", "cpu"):  # those two always work
        try:
            Lab.check_device(device)  # imports torch: only for a device that may be missing
        except ConfigError as e:
            errors["device"] = str(e)
    if "device" not in errors and "precision" not in errors and precision != "fp32":
        try:
            Lab.check_device(device, precision)  # bf16: not on MPS, nor on a GPU without it
        except ConfigError as e:
            errors["precision"] = str(e)
    n, bs = values.get("train_size") or 0, values.get("batch_size", 1)
    if n and "batch_size" not in errors and isinstance(bs, int) and bs > n:
        errors["batch_size"] = (f"batch size {bs} is larger than the {n} training images chosen under Advanced; "
                                "lower it or use more images")
    if not errors:
        try:
            config_from_values(values)
        except ConfigError as e:
            errors[""] = str(e)
    return errors


def values_from_config(config: RunConfig) -> dict[str, Any]:
    v = {**dataclasses.asdict(config.model), **dataclasses.asdict(config.train)}
    v["train_size"] = v["train_size"] or 0
    return v


def changed_fields(config: RunConfig, running: RunConfig) -> list[str]:
    """Settings that differ from the running run's and so need a new run (live ones excluded)."""
    a, b = values_from_config(config), values_from_config(running)
    # channels and image_size left open (None) take the data's: a run that filled them in has not changed them
    return [k for k in DEFAULTS if k not in LIVE_FIELDS and a.get(k) != b.get(k)
            and not (k in ("channels", "image_size") and a.get(k) is None)]


def with_value(options: tuple, value: Any) -> list:
    """Options plus `value` (e.g. a β from a saved run that is not on the list), sorted."""
    return sorted(set(options) | {value}) if value is not None else list(options)


# ------------------------------------------------------------------ URL parameters (shareable settings)

def query_from_values(values: dict[str, Any]) -> dict[str, str]:
    """The URL parameters for these values: only those that differ from the defaults, so URLs stay short."""
    out = {}
    for name, default in DEFAULTS.items():
        value = values.get(name, default)
        if value != default:
            out[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def values_from_query(params: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Control values from URL parameters (missing ones at their defaults) and the parameters ignored as invalid.

    Each value is parsed to its field's type and checked by the config's own rules; a bad
    one is dropped (and reported) rather than stopping the page.
    """
    values, ignored = dict(DEFAULTS), []
    for name, raw in params.items():
        if name not in DEFAULTS:
            continue
        try:
            value = _parse(raw, DEFAULTS[name])
            config_from_values({**DEFAULTS, name: value})  # the config's rules; availability is checked later
            if name == "latent_dim" and not UI_LIMITS["latent_dim"][0] <= value <= UI_LIMITS["latent_dim"][1]:
                raise ValueError(raw)
        except ValueError:  # ConfigError is a ValueError
            ignored.append(f"{name}={raw}")
            continue
        values[name] = value
    return values, ignored


def _parse(raw: str, like: Any) -> Any:
    if isinstance(like, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError(raw)
    if isinstance(like, int):
        number = float(raw)
        if not number.is_integer():
            raise ValueError(raw)
        return int(number)
    if isinstance(like, float):
        return float(raw)
    if like is None:  # channels and image_size: None (from the data) by default, whole numbers when set
        return int(raw)
    return raw
