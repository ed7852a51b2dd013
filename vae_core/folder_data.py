"""Any folder of images as a dataset: `--dataset folder:PATH`.

The layout is torchvision's ImageFolder: each sub-folder is a label (its name), and a flat folder has
no labels. PNG, JPEG and WebP files, grey, RGB or RGBA, of any size, are converted to the run's
channel count and resized and centre-cropped to its image size. Bad files (empty, corrupt,
truncated, not an image, too small, a link out of the folder) are skipped with one warning each.

Decoding happens once: the decoded uint8 images are kept in a memory-mapped file under the data
cache (./data or $VAE_DATA_CACHE), keyed by the folder's listing, the channels and the size, so a
later epoch or run reads them at memory speed. A set that fits in memory is held as float tensors
like the built-in ones; a larger one stays a uint8 memmap that batches are read from (streamed).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .image_folders import MIN_SIDE, TEST_FRACTION, TEST_MAX, Listing, folder_path, list_folder, probe_shape
from .records import DatasetUnavailable
from .sources import default_cache_dir

WORKERS_FROM = 512  # decode in worker processes from this many files on (a worker costs ~1 s to start)
MEMORY_FRACTION = 0.25  # hold a set as float32 in memory when it takes at most this share of the free memory
MEMORY_ENV = "VAE_MEMORY_BUDGET_MB"  # or an explicit budget (tests, benchmarks)
CACHE_VERSION = 1


def _open(path: Path):
    """The image at path, fully decoded (truncated files fail here, not later); raises ValueError with why."""
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size == 0:
        raise ValueError("an empty file")
    try:
        img = Image.open(path)
        img.load()
    except UnidentifiedImageError:
        raise ValueError("not an image PIL can read") from None
    except Image.DecompressionBombError:
        raise ValueError("too many pixels (a decompression bomb?)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ValueError(f"corrupt or truncated ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})") from None
    if min(img.size) < MIN_SIDE:
        raise ValueError(f"too small ({img.size[0]}x{img.size[1]}; at least {MIN_SIDE}x{MIN_SIDE})")
    return img


def _to_array(img, channels: int, size: int, crop: int | None = None) -> np.ndarray:
    """(C, size, size) uint8: transparency flattened onto white, converted, resized (short side) and centre-cropped.

    crop: first cut a centre square of this side (CelebA's 148: the face, as VAE papers crop it).
    """
    from PIL import Image, ImageOps

    if crop is not None and min(img.size) >= crop:
        w, h = img.size
        left, top = (w - crop) // 2, (h - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    if img.mode.startswith("I") or img.mode == "F":  # 16-bit or float grey: scale to 8 bits, not clip
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(a * (255 / (65535 if a.max() > 255 else 255)), 0, 255).astype(np.uint8))
    img = img.convert("L" if channels == 1 else "RGB")
    img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


class _Decode(torch.utils.data.Dataset):
    """Decode file i to (i, (C, S, S) uint8 or None, why); run in DataLoader workers for large folders."""

    def __init__(self, files: tuple[Path, ...], channels: int, size: int, crop: int | None = None) -> None:
        self.files, self.channels, self.size, self.crop = files, channels, size, crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return i, _to_array(_open(self.files[i]), self.channels, self.size, self.crop), ""
        except ValueError as e:
            return i, None, str(e)
        except OSError as e:  # unreadable (permissions), or vanished since the listing
            return i, None, f"unreadable ({e.strerror or type(e).__name__})"


def _collate(items):
    return items


def _cache_key(listing: Listing, channels: int, size: int, crop: int | None) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}|{listing.root}|{channels}|{size}|{crop}".encode())
    for p in listing.files:
        st = p.stat()
        h.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _decode_all(listing: Listing, channels: int, size: int, out: np.ndarray,
                crop: int | None = None) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode every file into out (N, C, S, S); returns which rows are good and the bad files with reasons."""
    n = len(listing.files)
    workers = min(4, os.cpu_count() or 1) if n >= WORKERS_FROM else 0
    kw = {"multiprocessing_context": "forkserver", "persistent_workers": False} if workers else {}
    loader = torch.utils.data.DataLoader(_Decode(listing.files, channels, size, crop), batch_size=32,
                                         num_workers=workers, collate_fn=_collate, **kw)
    good = np.zeros(n, dtype=bool)
    bad = []
    for batch in loader:
        for i, a, why in batch:
            if a is None:
                bad.append((str(listing.files[i].relative_to(listing.root)), why))
            else:
                out[i] = a
                good[i] = True
    return good, bad


def _memory_budget() -> int:
    env = os.environ.get(MEMORY_ENV)
    if env:
        return int(float(env) * 2**20)
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        avail = 4 * 2**30
    return int(avail * MEMORY_FRACTION)


@dataclass
class DecodedFolder:
    images: np.ndarray  # (N, C, S, S) uint8, memory-mapped from the cache where there is one
    labels: np.ndarray  # (N,) int64
    label_names: tuple[str, ...]
    bad: list[tuple[str, str]]
    cache: Path | None
    good: np.ndarray  # (len(listing.files),) bool: which listed files are the rows of images, in order


def decode_folder(path: str | Path, channels: int | None = None, size: int | None = None, *,
                  cache_dir: Path | None = None) -> DecodedFolder:
    """Every usable image of the folder, decoded once and cached; raises DatasetUnavailable when none is."""
    listing = list_folder(path)
    if not listing.files:
        raise DatasetUnavailable(f"no usable image in {listing.root} (looked for PNG, JPEG and WebP files"
                                 f"{f'; {len(listing.bad)} other files skipped' if listing.bad else ''})")
    return decode_listing(listing, channels, size, cache_dir=cache_dir)


def open_cache(final: Path) -> DecodedFolder:
    """The decoded folder cached in final (images.u8, meta.json); raises OSError, ValueError or KeyError."""
    meta = json.loads((final / "meta.json").read_text())
    images = np.memmap(final / "images.u8", dtype=np.uint8, mode="r", shape=tuple(meta["shape"]))
    return DecodedFolder(images, np.asarray(meta["labels"], dtype=np.int64), tuple(meta["label_names"]),
                         [tuple(b) for b in meta["bad"]], final, np.asarray(meta["good"], dtype=bool))


def write_meta(where: Path, shape: tuple[int, ...], labels: np.ndarray, label_names: tuple[str, ...],
               bad: list, good: np.ndarray, root: Path) -> None:
    """The cache's meta.json beside its images.u8 (written last: a cache with it is complete)."""
    (where / "meta.json").write_text(json.dumps({"shape": list(shape), "labels": labels.tolist(),
                                                "label_names": list(label_names), "bad": bad,
                                                "good": good.astype(int).tolist(), "root": str(root)}))


def decode_listing(listing: Listing, channels: int | None, size: int | None, *, crop: int | None = None,
                   cache_dir: Path | None = None) -> DecodedFolder:
    """decode_folder for a listing made elsewhere (colour_sets.py's CelebA): decoded once, then the cache."""
    channels, size = probe_shape(listing, channels, size)
    root = (cache_dir or default_cache_dir()) / "folders"
    key = _cache_key(listing, channels, size, crop)
    final = root / key
    meta_path = final / "meta.json"
    if meta_path.exists():  # written last, so a cache with it is complete
        try:
            return open_cache(final)
        except (OSError, ValueError, KeyError):
            shutil.rmtree(final, ignore_errors=True)  # unreadable: decode again
    n = len(listing.files)
    shape = (n, channels, size, size)
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        raw = np.memmap(tmp / "images.u8", dtype=np.uint8, mode="w+", shape=shape)
    except OSError:  # a read-only or full cache: decode into memory, nothing cached
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        tmp, raw = None, np.zeros(shape, dtype=np.uint8)
    try:
        good, bad = _decode_all(listing, channels, size, raw, crop)
        bad = list(listing.bad) + bad
        labels = np.asarray(listing.labels, dtype=np.int64)[good]
        if not good.any():
            raise DatasetUnavailable(f"no usable image in {listing.root}: all {n} image files were skipped "
                                     f"(first: {bad[0][0]}: {bad[0][1]})")
        if tmp is None:
            return DecodedFolder(raw[good], labels, listing.label_names, bad, None, good)
        kept = shape if good.all() else (int(good.sum()), *shape[1:])
        if not good.all():  # compact the good rows in place (they only move towards the front)
            for j, i in enumerate(np.flatnonzero(good)):
                raw[j] = raw[i]
        raw.flush()
        del raw
        os.truncate(tmp / "images.u8", int(np.prod(kept)))
        write_meta(tmp, kept, labels, listing.label_names, bad, good, listing.root)
        try:
            os.rename(tmp, final)
        except OSError:  # another process cached it first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
        tmp = None
        images = np.memmap(final / "images.u8", dtype=np.uint8, mode="r", shape=kept)
        return DecodedFolder(images, labels, listing.label_names, bad, final, good)
    finally:
        if tmp is not None:  # failed or interrupted: nothing half-written stays behind
            shutil.rmtree(tmp, ignore_errors=True)


def split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices: a fixed random 10% (at most 1,000; at least 2 from 4 images on) held out."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = min(TEST_MAX, max(2 if n >= 4 else 1 if n > 1 else 0, int(round(n * TEST_FRACTION))))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test]) if n_test else perm[:1]


def warn_bad(bad: list[tuple[str, str]], root: str, warn: Callable[[str], None]) -> None:
    """One warning per skipped file, then the count."""
    for name, why in bad:
        warn(f"skipped {name}: {why}")
    if bad:
        warn(f"{len(bad)} file(s) skipped in {root}")


def _stderr(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def load_folder(name: str, channels: int | None = None, size: int | None = None, *,
                warn: Callable[[str], None] = _stderr):
    """The folder dataset `folder:PATH` as ImageData (vae_core.data), train set streamed when it is too large."""
    root = folder_path(name)
    dec = decode_folder(root, channels, size)
    warn_bad(dec.bad, str(root), warn)
    return image_data(name, root, dec)


def image_data(name: str, root: Path, dec: DecodedFolder):
    """The decoded folder as ImageData: a fixed split; the train set in memory or streamed (memory budget)."""
    from .data import ImageData

    train_idx, test_idx = split(len(dec.images))
    images = dec.images
    test_x = torch.from_numpy(np.ascontiguousarray(images[test_idx])).float().div_(255)
    if len(train_idx) * images[0].size * 4 <= _memory_budget():
        train_x = torch.from_numpy(np.ascontiguousarray(images[train_idx])).float().div_(255)
        how = "in memory"
    else:  # streamed: a uint8 view of the memmap; RunMath reads each batch from it (the page cache)
        train_x = StreamedImages(images, train_idx)
        how = "streamed from a uint8 cache"
    labels = torch.from_numpy(dec.labels)
    source = f"folder {root} ({len(images)} images, {len(dec.bad)} skipped; {how})"
    data = ImageData(name, train_x, labels[train_idx], test_x, labels[test_idx], dec.label_names, source)
    return data


class StreamedImages:
    """A training set too large to hold as floats: uint8 rows of a memmap, read batch by batch.

    It answers what the trainer asks of a training tensor: len, shape, slicing (a subset), indexing
    by a batch of indices (then float32 in [0, 1]), and .to(device), which keeps it on disk.
    """

    def __init__(self, images: np.ndarray, index: np.ndarray) -> None:
        self.images, self.index = images, np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.images.shape[1:])

    def to(self, device) -> "StreamedImages":
        return self

    def __getitem__(self, key) -> "StreamedImages | torch.Tensor":
        if isinstance(key, slice):
            return StreamedImages(self.images, self.index[key])
        rows = self.index[np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key)]
        order = np.argsort(rows)  # read the file front to back; put the rows back in batch order after
        batch = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        batch[order] = self.images[rows[order]]
        return torch.from_numpy(batch)

    def batch(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Rows idx as float32 in [0, 1] on device (through pinned memory to a GPU)."""
        u8 = self[idx]
        if device.type == "cuda":
            u8 = u8.pin_memory().to(device, non_blocking=True)
        else:
            u8 = u8.to(device)
        return u8.float().div_(255)
