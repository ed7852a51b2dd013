"""Datasets by name, held whole as tensors on the training device and batched by index.

`sprites` is built in: 28x28 shapes generated from a seed, no download. MNIST and
Fashion-MNIST go through torchvision's own dataset classes, found locally first
(--data-dir / VAE_DATA_DIR, ./data, Debian's dataset-fashion-mnist package) and
downloaded only when none is present.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPRITE_SHAPES = ("square", "ellipse", "triangle")
SPRITE_FACTORS = ("shape", "scale", "rotation", "x", "y")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPRITES_TRAIN, SPRITES_TEST = 20_000, 2_000


from .records import DatasetUnavailable  # noqa: E402  (defined torch-free, so readers can catch it without torch)
from .sources import (DEBIAN_DIRS, IDX_FILES, NETWORK_PROBE_TIMEOUT_S, _how_to_provide,  # noqa: E402, F401
                      _network_reachable, _torchvision_class, availability, default_cache_dir, find_local)

@dataclass
class ImageData:
    """A whole dataset as tensors: images (N, C, H, W) float32 in [0, 1], labels (N,) int64.

    A folder too large for memory has a folder_data.StreamedImages as train_x (uint8 on disk, read by batch).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    label_names: tuple[str, ...]
    source: str  # where it came from, for the UI and config.json
    # The test images' generating factors (N_test, 5) = SPRITE_FACTORS, where the dataset knows them (sprites).
    test_factors: np.ndarray | None = None

    def to(self, device: torch.device | str) -> "ImageData":
        return ImageData(self.name, self.train_x.to(device), self.train_y.to(device), self.test_x.to(device),
                         self.test_y.to(device), self.label_names, self.source, self.test_factors)

    def subset_train(self, n: int | None) -> "ImageData":
        if n is None or n >= len(self.train_x):
            return self
        return ImageData(self.name, self.train_x[:n], self.train_y[:n], self.test_x, self.test_y,
                         self.label_names, self.source, self.test_factors)


# ---------------------------------------------------------------- sprites

def render_sprites(factors: np.ndarray, supersample: int = 2) -> np.ndarray:
    """Render shapes from factors (N, 5) = shape id, scale, rotation (rad), x, y -> (N, 28, 28) in [0, 1].

    Each pixel is the covered fraction of supersample^2 sub-pixels, so edges are anti-aliased.
    Each sprite is tested against its own shape only, a few hundred sprites at a time (arrays that
    stay in cache): 4x faster than all three shapes over 2000 at once, and the same values bit for bit.
    """
    factors = np.asarray(factors, dtype=np.float64)
    n = len(factors)
    s = 28 * supersample
    c = (np.arange(s) + 0.5) / s * 2 - 1  # sub-pixel centres in [-1, 1]
    v, u = np.meshgrid(-c, c, indexing="ij")  # v up, u right; (s, s)
    out = np.empty((n, 28, 28), dtype=np.float32)
    shape_id = factors[:, 0]
    groups = (np.flatnonzero(shape_id == 0), np.flatnonzero(shape_id == 1),
              np.flatnonzero((shape_id != 0) & (shape_id != 1)))  # square, ellipse, and triangle for the rest
    for kind, members in enumerate(groups):
        for start in range(0, len(members), _RENDER_CHUNK):
            idx = members[start:start + _RENDER_CHUNK]
            scale, rot, tx, ty = (factors[idx, i, None, None] for i in range(1, 5))
            du, dv = u[None] - tx, v[None] - ty  # (n, s, s)
            cos, sin = np.cos(rot), np.sin(rot)
            pu = (cos * du + sin * dv) / scale  # shape frame: rotate by -rot, unit size
            pv = (-sin * du + cos * dv) / scale
            if kind == 0:
                inside = (np.abs(pu) <= 0.45) & (np.abs(pv) <= 0.45)
            elif kind == 1:
                inside = (pu / 0.6) ** 2 + (pv / 0.3) ** 2 <= 1
            else:  # equilateral triangle with circumradius 0.6: three half-planes
                r = 0.3  # inradius
                inside = (pv >= -r) & (np.sqrt(3) * pu + pv <= 2 * r) & (-np.sqrt(3) * pu + pv <= 2 * r)
            out[idx] = inside.reshape(len(idx), 28, supersample, 28, supersample).mean(axis=(2, 4))
    return out


_RENDER_CHUNK = 256  # sprites per step of render_sprites


def sprite_factors(n: int, seed: int) -> np.ndarray:
    """Draw n generating factors (shape, scale, rotation, x, y) deterministically from seed."""
    rng = np.random.default_rng(seed)
    return np.stack([
        rng.integers(0, len(SPRITE_SHAPES), n).astype(np.float64),
        rng.uniform(0.5, 1.0, n),
        rng.uniform(0, 2 * np.pi, n),
        rng.uniform(-0.35, 0.35, n),
        rng.uniform(-0.35, 0.35, n),
    ], axis=1)


def make_sprites(n_train: int = SPRITES_TRAIN, n_test: int = SPRITES_TEST, seed: int = 1234) -> tuple[ImageData, np.ndarray]:
    """The built-in dataset and the test set's generating factors (n_test, 5)."""
    f_train, f_test = sprite_factors(n_train, seed), sprite_factors(n_test, seed + 1)
    xs = [render_sprites(f_train[i:i + 2000]) for i in range(0, n_train, 2000)]
    train_x = torch.from_numpy(np.concatenate(xs)).unsqueeze(1)
    test_x = torch.from_numpy(render_sprites(f_test)).unsqueeze(1)
    data = ImageData("sprites", train_x, torch.from_numpy(f_train[:, 0].astype(np.int64)), test_x,
                     torch.from_numpy(f_test[:, 0].astype(np.int64)), SPRITE_SHAPES, "built-in (procedural)", f_test)
    return data, f_test


# ---------------------------------------------------------------- MNIST / Fashion-MNIST

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), gzipped or not, as a numpy array; read in place, never copied."""
    path = Path(path)
    if not path.exists():
        path = path.with_name(path.name + ".gz")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetUnavailable(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetUnavailable(f"{path} is truncated: {data.size} values for shape {shape}")
    return data.reshape(shape)


def _read_local(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train images, train labels, test images, test labels from the four IDX files in folder."""
    arrays = [torch.from_numpy(read_idx(folder / f).copy()) for f in IDX_FILES]
    train_x, train_y, test_x, test_y = arrays
    return (train_x.float() / 255).unsqueeze(1), train_y.long(), (test_x.float() / 255).unsqueeze(1), test_y.long()


def load_torchvision(name: str, data_dir: str | Path | None = None) -> ImageData:
    label_names = tuple(str(i) for i in range(10)) if name == "mnist" else FASHION_CLASSES
    folder = find_local(name, data_dir)
    if folder is not None:  # read where it lies (e.g. Debian's read-only folder): no copy into ./data
        try:
            train_x, train_y, test_x, test_y = _read_local(folder)
        except (OSError, ValueError, EOFError) as e:
            raise DatasetUnavailable(f"{name} files in {folder} could not be read ({e}). To provide it: "
                                     f"{_how_to_provide(name)}.") from None
        return ImageData(name, train_x, train_y, test_x, test_y, label_names, str(folder))
    cls = _torchvision_class(name)
    mirrors = [m for m in cls.mirrors if _network_reachable(m)]
    if not mirrors:
        raise DatasetUnavailable(
            f"{name} is not on this machine and cannot be downloaded (no network). To provide it: "
            f"{_how_to_provide(name)}. The built-in 'sprites' dataset needs no download.")
    root = default_cache_dir()  # a download is kept here (./data or VAE_DATA_CACHE) for the next run
    try:
        # A class attribute read by download(); narrowing it skips mirrors we could not reach.
        saved, cls.mirrors = cls.mirrors, mirrors
        try:
            cls(str(root), train=True, download=True)
        finally:
            cls.mirrors = saved
    except Exception as e:  # torchvision raises RuntimeError/URLError with multi-line text
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetUnavailable(f"downloading {name} failed ({first}). To provide it: {_how_to_provide(name)}.") from None
    try:
        train_x, train_y, test_x, test_y = _read_local(root / cls.__name__ / "raw")
    except (OSError, ValueError, EOFError) as e:
        raise DatasetUnavailable(f"{name} files in {root} could not be read ({e}). To provide it: "
                                 f"{_how_to_provide(name)}.") from None
    return ImageData(name, train_x, train_y, test_x, test_y, label_names, f"downloaded to {root}")


def load_dataset(name: str, data_dir: str | Path | None = None, *, channels: int | None = None,
                 image_size: int | None = None) -> ImageData:
    """Load a dataset by name onto the CPU; raises DatasetUnavailable with a how-to message.

    channels and image_size (None: the data's own) convert the images: a folder's as it decodes them
    (folder_data.py), a built-in set's here (conform).
    """
    if name.startswith("folder:"):
        from .folder_data import load_folder

        return load_folder(name, channels, image_size)
    if name in ("cifar10", "celeba"):
        from .colour_sets import load_colour_set

        return conform(load_colour_set(name, data_dir, image_size), channels, image_size)
    if name == "sprites":
        return conform(make_sprites()[0], channels, image_size)
    if name in ("mnist", "fashion-mnist"):
        return conform(load_torchvision(name, data_dir), channels, image_size)
    raise DatasetUnavailable(f"unknown dataset {name!r}; choose sprites, mnist, fashion-mnist, cifar10, celeba "
                             "or folder:PATH")


def _conform_images(x: torch.Tensor, channels: int | None, size: int | None) -> torch.Tensor:
    if channels is not None and x.shape[1] != channels:
        # Grey to colour repeats the value; colour to grey is the luma of ITU-R BT.601 (PIL's "L").
        x = x.repeat(1, 3, 1, 1) if channels == 3 else \
            (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if size is not None and x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False).clamp_(0, 1)
        x = torch.round(x * 255) / 255  # still 8-bit values: the discretized logistic needs them
    return x


def conform(data: ImageData, channels: int | None, size: int | None) -> ImageData:
    """The dataset with its images converted to channels and resized to size x size (None: as they are)."""
    shape = data.test_x.shape
    if (channels is None or channels == shape[1]) and (size is None or size == shape[-1]):
        return data
    return ImageData(data.name, _conform_images(data.train_x, channels, size), data.train_y,
                     _conform_images(data.test_x, channels, size), data.test_y, data.label_names,
                     f"{data.source}, converted to {channels or shape[1]}x{size or shape[-1]}x{size or shape[-1]}")


class IndexBatcher:
    """Shuffled minibatches by index from tensors already on the device (no DataLoader, no copies per sample)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> None:
        self.n, self.batch_size, self.generator, self.device = n, batch_size, generator, device
        self.steps_per_epoch = max(1, n // batch_size)  # drop the ragged last batch: equal-size steps

    def epoch(self) -> list[torch.Tensor]:
        perm = torch.randperm(self.n, generator=self.generator, device=self.generator.device).to(self.device)
        return [perm[i * self.batch_size:(i + 1) * self.batch_size] for i in range(self.steps_per_epoch)]


def shape_iou(x: np.ndarray, x_hat: np.ndarray, threshold: float = 0.5) -> float:
    """Mean intersection-over-union of the shapes in x and x_hat, each thresholded at `threshold`.

    1 when every reconstruction covers exactly its input's pixels; a blurred blob of the right size
    in the right place scores ~0.5, so this tells "kept the shape" from "kept only where it was".
    """
    a = np.asarray(x).reshape(len(x), -1) > threshold
    b = np.asarray(x_hat).reshape(len(x_hat), -1) > threshold
    union = (a | b).sum(1)
    inter = (a & b).sum(1)
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def shape_kept(factors: np.ndarray, x_hat: np.ndarray) -> float:
    """Fraction of sprite reconstructions whose shape is right: of the three shapes drawn with the same
    scale, rotation and position, the true one overlaps x_hat best (IoU). Chance is 1/3; a blob scores ~1/3."""
    f = np.asarray(factors, dtype=np.float64)
    b = np.asarray(x_hat).reshape(len(f), -1) > 0.5
    ious = []
    for s in range(len(SPRITE_SHAPES)):
        a = render_sprites(np.concatenate([np.full((len(f), 1), s), f[:, 1:]], axis=1)).reshape(len(f), -1) > 0.5
        union = (a | b).sum(1)
        ious.append(np.where(union > 0, (a & b).sum(1) / np.maximum(union, 1), 0.0))
    return float(np.mean(np.argmax(np.stack(ious), 0) == f[:, 0].astype(int)))
