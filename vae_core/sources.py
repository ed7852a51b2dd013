"""Where the built-in datasets come from: local folders, Debian's package, a download. No torch here.

The dashboard asks which datasets it can offer before torch has loaded (its first page must not
wait for it), so finding the files and probing the network live apart from data.py's loaders.
"""
from __future__ import annotations

import os
import socket
import urllib.parse
from pathlib import Path

DEBIAN_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
NETWORK_PROBE_TIMEOUT_S = 3.0
TORCHVISION_NAMES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # the folder torchvision's classes use
# The first of torchvision's mirrors for each set (MNIST.mirrors, FashionMNIST.mirrors): what the probe asks.
FIRST_MIRROR = {"mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}


def _torchvision_class(name: str):
    from torchvision import datasets  # imported lazily: torchvision (and torch) cost seconds at start-up

    return {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[name]


def default_cache_dir() -> Path:
    return Path(os.environ.get("VAE_DATA_CACHE", "data"))


def _has_idx(folder: Path) -> bool:
    return all((folder / f).exists() or (folder / f"{f}.gz").exists() for f in IDX_FILES)


def find_local(name: str, data_dir: str | Path | None = None) -> Path | None:
    """The first folder holding this dataset's four IDX files, in the documented search order.

    Each candidate root is tried as torchvision's layout (ROOT/MNIST/raw) and as a flat folder.
    """
    if name == "sprites":
        return None
    cls_name = TORCHVISION_NAMES[name]
    roots = [data_dir or os.environ.get("VAE_DATA_DIR"), default_cache_dir(), DEBIAN_DIRS.get(name)]
    for root in roots:
        if not root:
            continue
        root = Path(root)
        for folder in (root / cls_name / "raw", root):
            if folder.is_dir() and _has_idx(folder):
                return folder
    return None


# What a first run trains on when nobody chose: a real dataset when one is on this machine (MNIST,
# the classic VAE example's, first), else the built-in sprites. Never a download: a first page or a
# bare `train` must not start fetching 50 MB.
FIRST_CHOICE = ("mnist", "fashion-mnist")
DEFAULT_ENV = "VAE_DEFAULT_DATASET"  # a class's teacher (or the test suite) may pin the default


def default_dataset(data_dir: str | Path | None = None) -> str:
    """The dataset a run uses when none is chosen: $VAE_DEFAULT_DATASET, else MNIST or Fashion-MNIST found
    locally (find_local's search order), else sprites. Stat calls only: cheap enough for a first page."""
    pinned = os.environ.get(DEFAULT_ENV, "").strip()
    if pinned in ("sprites", *FIRST_CHOICE):
        return pinned
    return next((name for name in FIRST_CHOICE if find_local(name, data_dir) is not None), "sprites")


def _network_reachable(url: str, timeout: float = NETWORK_PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the host of url? Bounded by timeout, so no hang offline."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _how_to_provide(name: str) -> str:
    ways = ["put its four IDX files (gzipped or not) in a folder and pass --data-dir DIR or set VAE_DATA_DIR",
            f"or place them under ./data/{TORCHVISION_NAMES[name]}/raw"]
    if name == "fashion-mnist":
        ways.append("or install Debian's package: apt-get install dataset-fashion-mnist")
    return "; ".join(ways)


def availability(data_dir: str | Path | None = None, *, probe_network: bool = True) -> dict[str, tuple[bool, str]]:
    """For each dataset: can it be used now, and why (where it is found, or how to get it).

    Without probe_network a set that is not on this machine is offered, to be downloaded when
    a run starts (which fails with a clear message where there is no network).
    """
    out: dict[str, tuple[bool, str]] = {"sprites": (True, "built in, no download")}
    for name in ("mnist", "fashion-mnist"):
        folder = find_local(name, data_dir)
        if folder is not None:
            out[name] = (True, f"found in {folder}")
        elif not probe_network:
            out[name] = (True, "not on this machine; a run will try to download it")
        elif _network_reachable(FIRST_MIRROR[name], timeout=1.0):
            out[name] = (True, "not on this machine; will download")
        else:
            out[name] = (False, f"not on this machine and no network. {_how_to_provide(name)}")
    return out
