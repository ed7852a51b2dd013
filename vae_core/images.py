"""Turning image batches into uint8 arrays and mosaics for display and export."""
from __future__ import annotations

import io

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1], any leading shape, to uint8 (rounded, clipped)."""
    return (np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def to_display(x: np.ndarray) -> np.ndarray:
    """Model-layout images (N, C, H, W) as readers get them: (N, H, W) grey, (N, H, W, 3) colour."""
    x = np.asarray(x)
    return x[:, 0] if x.shape[1] == 1 else np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def from_display(x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Display-layout images ((N, H, W) or (N, H, W, 3)) back to the model's (N, C, H, W)."""
    c, h, w = shape
    x = np.asarray(x)
    if c == 1:
        return x.reshape(-1, 1, h, w)
    return np.ascontiguousarray(x.reshape(-1, h, w, c).transpose(0, 3, 1, 2))


def shrink(images: np.ndarray, side: int) -> np.ndarray:
    """Display-layout images reduced to at most side x side by block averaging (a 12x12 manifold of
    64x64 colour images is 3.5 MB of pixels; a page draws it at a few hundred pixels anyway)."""
    images = np.asarray(images)
    h = images.shape[1]
    f = -(-h // side)
    if f <= 1:
        return images
    h2 = (h // f) * f
    x = images[:, :h2, :h2].astype(np.float32)
    x = x.reshape(x.shape[0], h2 // f, f, h2 // f, f, *x.shape[3:]).mean(axis=(2, 4))
    return x.astype(images.dtype) if images.dtype != np.uint8 else (x + 0.5).astype(np.uint8)


def tile(images: np.ndarray, ncols: int, pad: int = 1, pad_value: int = 64) -> np.ndarray:
    """(N, H, W) or (N, H, W, 3) uint8 -> one (rows*(H+pad)-pad, ncols*(W+pad)-pad[, 3]) mosaic, row-major."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 1:  # (N, 1, H, W)
        images = images[:, 0]
    n, h, w = images.shape[:3]
    ncols = max(1, min(ncols, n))
    rows = -(-n // ncols)
    out = np.full((rows * (h + pad) - pad, ncols * (w + pad) - pad, *images.shape[3:]), pad_value,
                  dtype=images.dtype)
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
