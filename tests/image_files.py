"""Small image folders written by the tests themselves: mixed formats, modes and sizes, and bad files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_image(path: Path, size: tuple[int, int], mode: str = "RGB", fmt: str | None = None, seed: int = 0) -> Path:
    """A smooth random image (so resizing means something) of size (w, h) in mode, saved as fmt."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = [np.sin(xx / (3 + rng.uniform(0, 5)) + rng.uniform(0, 6)) * np.cos(yy / (3 + rng.uniform(0, 5)))
            for _ in range(4)]
    rgba = ((np.stack(base, -1) + 1) * 127.5).astype(np.uint8)
    img = Image.fromarray(rgba, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(rgba, "RGBA")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def make_mixed_folder(root: Path, n_per_class: int = 6, *, labelled: bool = True, bad: bool = True) -> dict[str, str]:
    """Two label folders of PNG/JPEG/WebP images, RGB, RGBA and grey, of different sizes; plus bad files.

    Returns {bad file relative path: the reason word its warning must carry}.
    """
    classes = ("cats", "dogs") if labelled else ("",)
    kinds = [("png", "RGB", (40, 30)), ("jpeg", "RGB", (50, 50)), ("png", "RGBA", (33, 47)),
             ("webp", "RGB", (64, 48)), ("jpeg", "L", (20, 25)), ("png", "RGB", (90, 60))]
    i = 0
    for c in classes:
        for j in range(n_per_class):
            ext, mode, size = kinds[j % len(kinds)]
            write_image(root / c / f"img{j}.{ext}", size, mode, {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext],
                        seed=i)
            i += 1
    expected: dict[str, str] = {}
    if not bad:
        return expected
    where = root / classes[0]
    (where / "empty.png").write_bytes(b"")
    expected[str((where / "empty.png").relative_to(root))] = "empty"
    (where / "notes.png").write_text("this is not an image\n")
    expected[str((where / "notes.png").relative_to(root))] = "not an image"
    good = (where / "img0.png").read_bytes()
    (where / "truncated.png").write_bytes(good[: len(good) // 2])
    expected[str((where / "truncated.png").relative_to(root))] = "truncated"
    write_image(where / "tiny.png", (4, 4), "RGB", "PNG")
    expected[str((where / "tiny.png").relative_to(root))] = "too small"
    outside = root.parent / f"{root.name}-outside.png"
    write_image(outside, (32, 32), "RGB", "PNG")
    os.symlink(outside, where / "escape.png")
    expected[str((where / "escape.png").relative_to(root))] = "outside"
    return expected
