"""A person's own image (drawn on the page's canvas or uploaded) turned into a model input. No torch.

The canvas sends a PNG and an upload is a file: both come here as bytes, so both take the
same path: decode, grey, light ink on a dark ground (the training images' convention), then
downscale by area averaging to 28 x 28 with intensities in [0, 1].
"""
from __future__ import annotations

import base64
import binascii
import io
from typing import Literal

import numpy as np

SIDE = 28  # the models' input size
MAX_BYTES = 8 * 2**20  # a larger upload is refused before it is decoded
MAX_PIXELS = 4096 * 4096  # ... and so is a larger image (a small PNG can claim a huge size)
MNIST_BOX = 20  # MNIST's digits fit a 20 x 20 box, centred by their centre of mass in 28 x 28 (LeCun et al. 1998)
Fit = Literal["whole", "mnist"]
FITS: tuple[str, ...] = ("whole", "mnist")


class ImageInputError(ValueError):
    """An image that cannot be used as input; the message says why in one line."""


def png_from_data_url(url: str) -> bytes:
    """The bytes of a `data:image/png;base64,...` URL (what the drawing canvas sends)."""
    head, _, body = str(url).partition(",")
    if not head.startswith("data:image/") or ";base64" not in head:
        raise ImageInputError("the canvas sent something that is not an image")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("the canvas sent an image that could not be decoded") from None


def grey_from_bytes(data: bytes) -> np.ndarray:
    """Decode an image file (PNG, JPEG, ...) to grey levels (H, W) float32 in [0, 1], light ink on dark.

    Transparent parts count as white paper; an image whose border is mostly light (dark ink on
    paper, a photo of a drawing) is inverted, since the training images are light on black.
    """
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_BYTES:
        raise ImageInputError(f"the image is larger than {MAX_BYTES // 2**20} MB")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageInputError(f"the image has {im.width} x {im.height} pixels; at most 4096 x 4096 are read")
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(paper, rgba)
            grey = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except ImageInputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise ImageInputError("the file is not an image this page can read (PNG, JPEG, GIF, BMP or WebP)") from None
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    return 1.0 - grey if border.mean() > 0.5 else grey


def downscale(grey: np.ndarray, side: int = SIDE) -> np.ndarray:
    """(H, W) grey levels to (side, side) by area averaging (each output pixel is the mean of what it covers).

    A non-square image is padded with the ground (0) to a square first, so shapes keep their proportions.
    """
    from PIL import Image

    g = np.asarray(grey, dtype=np.float32)
    h, w = g.shape
    n = max(h, w)
    square = np.zeros((n, n), np.float32)
    square[(n - h) // 2:(n - h) // 2 + h, (n - w) // 2:(n - w) // 2 + w] = g
    # PIL's BOX filter is exact area averaging, also for sizes that are not multiples of `side`.
    out = Image.fromarray(square).resize((side, side), Image.Resampling.BOX)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def fit_mnist(grey: np.ndarray, side: int = SIDE, box: int = MNIST_BOX) -> np.ndarray:
    """As MNIST was made: the ink's bounding box scaled to fit box x box, then centred by its centre of mass.

    Blank input stays blank (zeros).
    """
    from PIL import Image

    g = np.asarray(grey, dtype=np.float32)
    rows, cols = np.flatnonzero(g.max(1) > 0.05), np.flatnonzero(g.max(0) > 0.05)
    if len(rows) == 0:
        return np.zeros((side, side), np.float32)
    crop = g[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    scale = box / max(crop.shape)
    h, w = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    small = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((w, h), Image.Resampling.BOX), dtype=np.float32)
    mass = small.sum()
    cy, cx = ((np.arange(h) * small.sum(1)).sum() / mass, (np.arange(w) * small.sum(0)).sum() / mass)
    top, left = int(round(side / 2 - 0.5 - cy)), int(round(side / 2 - 0.5 - cx))
    top, left = min(max(top, 0), side - h), min(max(left, 0), side - w)
    out = np.zeros((side, side), np.float32)
    out[top:top + h, left:left + w] = small
    return np.clip(out, 0.0, 1.0)


def prepare(data: bytes, fit: Fit = "whole") -> np.ndarray:
    """Image file bytes to the model's input: (28, 28) float32 in [0, 1], light ink on dark.

    fit="whole" scales the whole picture down; fit="mnist" frames the ink as MNIST's digits are framed.
    """
    if fit not in FITS:
        raise ImageInputError(f"fit must be one of {', '.join(FITS)}; got {fit!r}")
    grey = grey_from_bytes(data)
    return fit_mnist(grey) if fit == "mnist" else downscale(grey)
