"""Turning image batches into uint8 arrays and mosaics for display and export."""
from __future__ import annotations

import io

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1], any leading shape, to uint8 (rounded, clipped)."""
    return (np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def tile(images: np.ndarray, ncols: int, pad: int = 1, pad_value: int = 64) -> np.ndarray:
    """(N, H, W) uint8 -> one (rows*(H+pad)-pad, ncols*(W+pad)-pad) mosaic, row-major."""
    images = np.asarray(images)
    if images.ndim == 4:  # (N, 1, H, W)
        images = images[:, 0]
    n, h, w = images.shape
    ncols = max(1, min(ncols, n))
    rows = -(-n // ncols)
    out = np.full((rows * (h + pad) - pad, ncols * (w + pad) - pad), pad_value, dtype=images.dtype)
    for i in range(n):
        r, c = divmod(i, ncols)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = images[i]
    return out


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling: crisp pixels in any browser."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
