"""Validated, frozen configuration for a run: the one place every setting is checked.

The UI, the CLI, resumed runs and URL parameters all build these objects, so a bad
value gets the same actionable message wherever it came from.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

DatasetName = Literal["sprites", "mnist", "fashion-mnist"]
ArchName = Literal["mlp", "conv"]
LikelihoodName = Literal["bernoulli", "gaussian-fixed", "gaussian-learned", "gaussian-pixel", "logistic"]
DeviceName = Literal["auto", "cpu", "cuda", "mps"]
PrecisionName = Literal["fp32", "bf16"]  # bf16: mixed precision (vae_core/devices.py mixed_dtype)

DATASETS: tuple[str, ...] = get_args(DatasetName)
ARCHS: tuple[str, ...] = get_args(ArchName)
LIKELIHOODS: tuple[str, ...] = get_args(LikelihoodName)
DEVICES: tuple[str, ...] = get_args(DeviceName)
PRECISIONS: tuple[str, ...] = get_args(PrecisionName)
# Colour sets read through torchvision (vae_core/colour_sets.py) and any image folder ("folder:PATH",
# vae_core/folder_data.py): not in DATASETS, whose names the built-in pickers list.
COLOUR_DATASETS: tuple[str, ...] = ("cifar10", "celeba")
FOLDER_PREFIX = "folder:"
CHANNELS: tuple[int, ...] = (1, 3)

# Ranges and defaults for every control, next to the config they describe; the
# dashboard builds its sliders from these and validation enforces them.
LIMITS: dict[str, tuple[float, float]] = {
    "latent_dim": (1, 128),
    "hidden_dim": (16, 4096),
    "beta": (0.0, 100.0),
    "lr": (1e-6, 1.0),
    "batch_size": (1, 8192),
    "epochs": (1, 10_000),
    "warmup_epochs": (0.0, 1000.0),
    "free_bits": (0.0, 10.0),
    "gaussian_sigma": (1e-3, 10.0),
    "seed": (0, 2**31 - 1),
    "train_size": (16, 1_000_000),
    "evidence_every": (0, 10_000),
    "snapshot_budget_mb": (0.0, 400.0),  # a run zip unpacks to at most 512 MB (transfer.MAX_ZIP_BYTES)
    "image_size": (16, 128),
}
UI_LIMITS: dict[str, tuple[float, float]] = {"latent_dim": (1, 64), "beta": (0.0, 10.0)}

# Settings that may change while a run trains; everything else fixes the run.
LIVE_FIELDS: tuple[str, ...] = ("beta", "lr", "warmup_epochs", "free_bits")


MLP_MAX_PIXELS = 3 * 64 * 64  # the MLP's first layer is (C*H*W) x hidden: past this the conv net is the one to use


def _check_dataset(value: Any) -> None:
    if isinstance(value, str) and value.startswith(FOLDER_PREFIX):
        if not value[len(FOLDER_PREFIX):].strip():
            raise ConfigError("dataset folder: needs a path, e.g. folder:/data/my-images")
        return
    if value not in DATASETS + COLOUR_DATASETS:
        raise ConfigError(f"dataset must be one of {', '.join(DATASETS + COLOUR_DATASETS)} or folder:PATH; "
                          f"got {value!r}")


class ConfigError(ValueError):
    """A setting is out of range or of the wrong kind; the message says which and how to fix it."""


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_number(name: str, value: Any, *, integer: bool = False) -> None:
    lo, hi = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number; got {value!r}")
    if integer and (not float(value).is_integer()):
        raise ConfigError(f"{name} must be a whole number; got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite; got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo:g} and {hi:g}; got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The network: fixed for the life of a run."""

    arch: ArchName = "mlp"
    # 8, not 2: sprites vary in five factors (shape, scale, rotation, x, y) and 2 latents keep only where
    # the blob is (shape right 54% of the time, chance 33%); 8 keep the shape (98% after 1,000 steps).
    # Measured in docs/performance.md ("A first run that teaches"); 2-D views project or slice.
    latent_dim: int = 8
    hidden_dim: int = 400
    likelihood: LikelihoodName = "bernoulli"
    gaussian_sigma: float = 0.1  # observation std for "gaussian-fixed"; the start value when learned
    # The images the model sees, (channels, image_size, image_size). None: taken from the data when the
    # run loads it (then written into config.json); a config without them (every run before colour) is 1x28x28.
    channels: int | None = None
    image_size: int | None = None

    def __post_init__(self) -> None:
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("likelihood", self.likelihood, LIKELIHOODS)
        for name in ("latent_dim", "hidden_dim"):
            _check_number(name, getattr(self, name), integer=True)
            object.__setattr__(self, name, int(getattr(self, name)))
        _check_number("gaussian_sigma", self.gaussian_sigma)
        if self.channels is not None and (isinstance(self.channels, bool) or self.channels not in CHANNELS):
            raise ConfigError(f"channels must be 1 (grey) or 3 (colour); got {self.channels!r}")
        if self.image_size is not None:
            _check_number("image_size", self.image_size, integer=True)
            object.__setattr__(self, "image_size", int(self.image_size))
        if self.channels is not None:
            object.__setattr__(self, "channels", int(self.channels))
        c, s = self.image_shape[0], self.image_shape[1]
        if self.arch == "mlp" and c * s * s > MLP_MAX_PIXELS:
            raise ConfigError(f"the MLP takes images of at most {MLP_MAX_PIXELS} values (64x64 colour, 110x110 grey); "
                              f"these are {c}x{s}x{s}: choose arch conv or a smaller image size")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's images; 1x28x28 until the data say otherwise."""
        return (self.channels or 1, self.image_size or 28, self.image_size or 28)


@dataclass(frozen=True)
class TrainConfig:
    """Data and optimisation. Fields in LIVE_FIELDS can change while the run trains."""

    dataset: str = "sprites"  # a DatasetName, a COLOUR_DATASETS name, or "folder:PATH"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-3  # reaches those shapes in ~300 steps where 1e-3 needs ~1,000 (same page)
    beta: float = 1.0
    warmup_epochs: float = 0.0  # linear KL warm-up: beta ramps from 0 over this many epochs
    free_bits: float = 0.0  # per-dimension KL floor in nats (Kingma et al. 2016, eq. 15)
    binarize: bool = True  # dynamic binarization; only meaningful for the Bernoulli likelihood
    seed: int = 0
    device: DeviceName = "auto"
    # "bf16": the encoder and decoder run in bfloat16 during training steps (autocast); weights, Adam,
    # the loss and every evaluation stay float32. Faster on CUDA GPUs and on CPUs with AMX.
    precision: PrecisionName = "fp32"
    train_size: int | None = None  # use only the first N training images (quick runs, tests)
    evidence_every: int = 5  # epochs between importance-weighted evaluations; 0 turns them off
    # Disk for the time-lapse's weight snapshots (vae_core/snapshots.py); 0 turns them off. The default
    # model's float16 snapshot is 1.2 MiB, so 40 MB keeps the ~30 a default run takes without thinning.
    snapshot_budget_mb: float = 40.0

    def __post_init__(self) -> None:
        _check_dataset(self.dataset)
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        for name in ("epochs", "batch_size", "seed", "evidence_every"):
            _check_number(name, getattr(self, name), integer=True)
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.train_size is not None:
            _check_number("train_size", self.train_size, integer=True)
            object.__setattr__(self, "train_size", int(self.train_size))
        for name in ("lr", "beta", "warmup_epochs", "free_bits", "snapshot_budget_mb"):
            _check_number(name, getattr(self, name))
            object.__setattr__(self, name, float(getattr(self, name)))
        if not isinstance(self.binarize, bool):
            raise ConfigError(f"binarize must be true or false; got {self.binarize!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything needed to rebuild the model and repeat the run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig) or not isinstance(self.train, TrainConfig):
            raise ConfigError("RunConfig needs a ModelConfig and a TrainConfig")

    @property
    def binarized(self) -> bool:
        """True when the data are Bernoulli draws, so reported numbers are true log-likelihoods."""
        return self.model.likelihood == "bernoulli" and self.train.binarize

    def to_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, d: Any) -> "RunConfig":
        """Build from a dict (config.json, a checkpoint); unknown keys are an error, not ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"a run config must be a JSON object; got {type(d).__name__}")
        return cls(model=_build(ModelConfig, d.get("model", {})), train=_build(TrainConfig, d.get("train", {})))

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with fields of either part changed by name, validated again."""
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(changes) - model_fields - train_fields
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        m = {k: v for k, v in changes.items() if k in model_fields}
        t = {k: v for k, v in changes.items() if k in train_fields}
        return RunConfig(model=dataclasses.replace(self.model, **m), train=dataclasses.replace(self.train, **t))


def _build(kind: type, d: Any) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{kind.__name__} must be a JSON object; got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown setting(s) for {kind.__name__}: {', '.join(sorted(unknown))}")
    try:
        return kind(**d)
    except TypeError as e:  # e.g. a missing argument in a hand-edited file
        raise ConfigError(str(e)) from None


def fit_to_data(config: RunConfig, shape: tuple[int, ...]) -> RunConfig:
    """The config with the model's image shape (C, H, W) taken from the data where it was left open.

    Unchanged when the data are the 1x28x28 a config without a shape means (every built-in set), so
    such runs' config.json stays as it was.
    """
    c, h = int(shape[0]), int(shape[-1])
    if config.model.image_shape == (c, h, h):
        return config
    return config.replace(channels=c, image_size=h)


def unit_label(config: RunConfig) -> str:
    """What a run's reported numbers are, named by their likelihood (every printed number says it)."""
    if config.binarized:
        return "nats per example; Bernoulli log-likelihood of binarized images"
    if config.model.likelihood == "bernoulli":
        return "nats per example; BCE on grey levels, not a log-likelihood"
    if config.model.likelihood == "logistic":
        return "nats per image; discretized logistic log-probability of 8-bit pixel values"
    kind = {"gaussian-learned": "learned", "gaussian-pixel": "learned per-pixel"}.get(config.model.likelihood, "fixed")
    levels = "grey levels" if config.model.image_shape[0] == 1 else "colour values"
    return f"nats per example; Gaussian ({kind} σ) log-density of {levels} in [0, 1], constants included"
