"""The standard colour sets: CIFAR-10 (32x32) and CelebA (faces, cropped and resized to 64x64).

Read locally first, in the layout torchvision's own classes download to (ROOT/cifar-10-batches-py,
ROOT/celeba/img_align_celeba + list files), from --data-dir or $VAE_DATA_DIR, then the data cache
(./data or $VAE_DATA_CACHE). The files are read here, not through torchvision's classes, which
refuse any copy whose MD5 differs from the original's (a subset, a re-packed copy). When no copy is
found, torchvision downloads one where the network allows; where it does not, a probe bounded by
a few seconds says so in one line.
"""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np

from .records import DatasetUnavailable
from .sources import _network_reachable, default_cache_dir

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # torchvision's CIFAR10.url
CELEBA_DIR, CELEBA_IMAGES, CELEBA_SPLIT = "celeba", "img_align_celeba", "list_eval_partition.txt"
CELEBA_URL = "https://drive.google.com/"  # torchvision's CelebA downloads from Google Drive
CELEBA_CROP, CELEBA_SIZE = 148, 64  # the face square of the 178x218 aligned images, as VAE papers crop it
CELEBA_TEST_MAX = 2000
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _roots(data_dir: str | Path | None) -> list[Path]:
    return [Path(r) for r in (data_dir or os.environ.get("VAE_DATA_DIR"), default_cache_dir()) if r]


def _how_to_provide(name: str) -> str:
    if name == "cifar10":
        return (f"extract cifar-10-python.tar.gz so that DIR/{CIFAR_DIR}/data_batch_1 exists and pass --data-dir DIR "
                f"or set VAE_DATA_DIR (or place it under ./data)")
    return (f"put the aligned images in DIR/{CELEBA_DIR}/{CELEBA_IMAGES}/ (with {CELEBA_SPLIT} beside them) and pass "
            f"--data-dir DIR or set VAE_DATA_DIR (or place it under ./data)")


def find_cifar(data_dir: str | Path | None = None) -> Path | None:
    for root in _roots(data_dir):
        for folder in (root / CIFAR_DIR, root):
            if (folder / CIFAR_TRAIN[0]).is_file() and (folder / "test_batch").is_file():
                return folder
    return None


def find_celeba(data_dir: str | Path | None = None) -> Path | None:
    for root in _roots(data_dir):
        for folder in (root / CELEBA_DIR, root):
            if (folder / CELEBA_IMAGES).is_dir():
                return folder
    return None


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")  # the batches were pickled by Python 2


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # rows are R plane, G plane, B plane
    y = np.asarray(d.get(b"labels", d.get(b"fine_labels")), dtype=np.int64)
    if len(x) != len(y):
        raise ValueError(f"{path.name}: {len(x)} images but {len(y)} labels")
    return x, y


def read_cifar(folder: Path) -> tuple:
    """CIFAR-10's python batches in folder as (train_x, train_y, test_x, test_y) float in [0, 1], and class names."""
    parts = [_cifar_batch(folder / f) for f in CIFAR_TRAIN if (folder / f).is_file()]
    tx, ty = _cifar_batch(folder / "test_batch")
    names = CIFAR_CLASSES
    if (folder / "batches.meta").is_file():
        meta = _unpickle(folder / "batches.meta")
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"label_names", names))
    import torch

    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    f = lambda a: torch.from_numpy(a).float().div_(255)  # noqa: E731
    return f(x), torch.from_numpy(y), f(tx), torch.from_numpy(ty), names


def _download_or_refuse(name: str, url: str) -> Path:
    """Download with torchvision into the data cache, or raise DatasetUnavailable within seconds."""
    if not _network_reachable(url):
        raise DatasetUnavailable(f"{name} is not on this machine and cannot be downloaded (no network). "
                                 f"To provide it: {_how_to_provide(name)}.")
    from torchvision import datasets

    root = default_cache_dir()
    try:
        if name == "cifar10":
            datasets.CIFAR10(str(root), train=True, download=True)
        else:
            datasets.CelebA(str(root), split="all", target_type=[], download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError with multi-line text
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetUnavailable(f"downloading {name} failed ({first}). To provide it: {_how_to_provide(name)}.") from None
    return root


def load_cifar10(data_dir: str | Path | None = None):
    from .data import ImageData

    folder = find_cifar(data_dir)
    source = str(folder) if folder else None
    if folder is None:
        root = _download_or_refuse("cifar10", CIFAR_URL)
        folder, source = root / CIFAR_DIR, f"downloaded to {root}"
    try:
        train_x, train_y, test_x, test_y, names = read_cifar(folder)
    except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
        raise DatasetUnavailable(f"cifar10 files in {folder} could not be read ({str(e)[:120]}). "
                                 f"To provide it: {_how_to_provide('cifar10')}.") from None
    return ImageData("cifar10", train_x, train_y, test_x, test_y, names, source)


def _celeba_partition(folder: Path) -> dict[str, int]:
    path = folder / CELEBA_SPLIT
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def load_celeba(data_dir: str | Path | None = None, size: int | None = None):
    """CelebA's aligned faces, centre 148x148 cropped and resized to 64x64 (or size), decoded once into the cache."""
    import torch

    from .data import ImageData
    from .folder_data import StreamedImages, _memory_budget, decode_listing, split, warn_bad
    from .image_folders import NO_LABEL, Listing

    folder = find_celeba(data_dir)
    source = str(folder) if folder else None
    if folder is None:
        root = _download_or_refuse("celeba", CELEBA_URL)
        folder, source = root / CELEBA_DIR, f"downloaded to {root}"
    images_dir = folder / CELEBA_IMAGES
    files = tuple(sorted(p for p in images_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")))
    if not files:
        raise DatasetUnavailable(f"no images in {images_dir}. To provide it: {_how_to_provide('celeba')}.")
    listing = Listing(images_dir.resolve(), files, (0,) * len(files), (NO_LABEL,), ())
    dec = decode_listing(listing, 3, size or CELEBA_SIZE, crop=CELEBA_CROP)
    warn_bad(dec.bad, str(images_dir), lambda m: print(f"warning: {m}", file=sys.stderr))
    partition = _celeba_partition(folder)
    kept = [p.name for p, ok in zip(files, dec.good) if ok]
    if partition:  # the official split: 0 train, 1 validation, 2 test
        part = np.array([partition.get(n, 0) for n in kept])
        train_idx, test_idx = np.flatnonzero(part == 0), np.flatnonzero(part == 2)[:CELEBA_TEST_MAX]
        if len(test_idx) == 0 or len(train_idx) == 0:
            train_idx, test_idx = split(len(kept))
    else:
        train_idx, test_idx = split(len(kept))
    test_x = torch.from_numpy(np.ascontiguousarray(dec.images[test_idx])).float().div_(255)
    if len(train_idx) * dec.images[0].size * 4 <= _memory_budget():
        train_x = torch.from_numpy(np.ascontiguousarray(dec.images[train_idx])).float().div_(255)
    else:
        train_x = StreamedImages(dec.images, train_idx)
    labels = torch.from_numpy(dec.labels)
    return ImageData("celeba", train_x, labels[train_idx], test_x, labels[test_idx], (NO_LABEL,), source)


def load_colour_set(name: str, data_dir: str | Path | None = None, size: int | None = None):
    """CIFAR-10 or CelebA as ImageData (vae_core.data); raises DatasetUnavailable with how to provide it.

    size: CelebA is decoded at it (default 64); CIFAR-10 is read at 32 (data.conform resizes it).
    """
    if name == "cifar10":
        return load_cifar10(data_dir)
    return load_celeba(data_dir, size)


def availability(data_dir: str | Path | None = None) -> dict[str, tuple[bool, str]]:
    """Each colour set: found here (where, and the shape it trains at), or not (a run will try to download it)."""
    out = {}
    for name, found, shape in (("cifar10", find_cifar(data_dir), "colour 32×32, 50,000 + 10,000 images"),
                               ("celeba", find_celeba(data_dir), "colour faces cropped to 64×64, ~200,000 images")):
        out[name] = (True, f"{shape}; found in {found}") if found else \
            (True, f"{shape}; not on this machine, a run will try to download it")
    return out
