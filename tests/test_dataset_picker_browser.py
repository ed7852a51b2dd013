"""Your own images in headless Chromium: a zip uploaded from the page becomes the run's dataset, described before training.

Reuses test_browser's server and page fixtures.
"""
from __future__ import annotations

import io
import re
import zipfile

import numpy as np
import pytest
from PIL import Image

from test_browser import expect, page, server  # noqa: F401  (fixtures; skip where they skip)

pytestmark = pytest.mark.browser


def images_zip() -> bytes:
    """Two labels of small colour images (reds and blues, 40x40 and 48x48) and one file that is no image."""
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buf, "w") as z:
        for label, channel in (("reds", 0), ("blues", 2)):
            for i in range(12):
                side = 40 if i % 2 else 48
                pixels = rng.integers(0, 60, (side, side, 3), dtype=np.uint8)
                pixels[..., channel] = 200
                out = io.BytesIO()
                Image.fromarray(pixels).save(out, format="PNG")
                z.writestr(f"shapes/{label}/{i}.png", out.getvalue())
        z.writestr("shapes/reds/notes.png", b"not an image")
    return buf.getvalue()


def test_an_uploaded_zip_becomes_the_dataset_and_is_described(page, server):  # noqa: F811
    page.locator(".st-key-cfg_dataset").click()
    page.get_by_role("option", name=re.compile("Your own images")).click()
    uploader = page.locator(".st-key-dsp_zip input[type=file]")
    uploader.set_input_files(files=[{"name": "shapes.zip", "mimeType": "application/zip", "buffer": images_zip()}])
    expect(page.locator(".st-key-dsp_zip").get_by_text("shapes.zip")).to_be_visible()
    page.get_by_role("button", name="Unpack and use the zip").click()
    expect(page.get_by_text("Unpacked shapes.zip.")).to_be_visible()
    # The picker now names the folder and says what training will see, before Train is pressed.
    expect(page.get_by_role("combobox", name="Dataset")).to_have_value(re.compile(r"^Folder: upload-"))
    # 25 files by name (the one that is no image is found out, and skipped, when the images are decoded)
    expect(page.get_by_text(re.compile(r"25 image files, 2 labels \(blues, reds\); 40×40 to 48×48, colour")).first
           ).to_be_visible()
    exceptions = page.locator('[data-testid="stException"]').all_inner_texts()
    assert not exceptions, exceptions
