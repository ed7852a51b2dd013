"""CIFAR-10 and CelebA read from files the tests write in each set's own layout; no network, ever."""
from __future__ import annotations

import pickle
import time

import numpy as np
import pytest

from image_files import write_image
from vae_core import colour_sets
from vae_core.data import load_dataset
from vae_core.records import DatasetUnavailable


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VAE_DATA_DIR", raising=False)


def _write_cifar(root, n_per_batch=6, batches=2):
    """Python-2 style pickles as in cifar-10-python.tar.gz: data (N, 3072) uint8 R,G,B planes, labels."""
    folder = root / colour_sets.CIFAR_DIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches_out = {}
    for name in [*colour_sets.CIFAR_TRAIN[:batches], "test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data}, f, protocol=2)
        batches_out[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in colour_sets.CIFAR_CLASSES]}, f, protocol=2)
    return batches_out


def test_cifar10_reads_the_python_batches(tmp_path):
    written = _write_cifar(tmp_path / "d")
    d = load_dataset("cifar10", tmp_path / "d")
    assert d.train_x.shape == (12, 3, 32, 32) and d.test_x.shape == (6, 3, 32, 32)
    assert d.label_names[3] == "cat" and d.source.endswith(colour_sets.CIFAR_DIR)
    data, labels = written["test_batch"]
    # pixel (row 0, col 1) of image 2: the R plane comes first, then G, then B
    np.testing.assert_allclose(d.test_x[2, :, 0, 1].numpy() * 255, data[2, [1, 1025, 2049]], atol=1e-3)
    assert d.test_y.tolist() == labels
    grey = load_dataset("cifar10", tmp_path / "d", channels=1, image_size=16)
    assert grey.train_x.shape == (12, 1, 16, 16)


def test_celeba_reads_the_aligned_folder_cropped_and_resized(tmp_path):
    folder = tmp_path / "d" / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 9)]
    for i, n in enumerate(names):
        write_image(folder / "img_align_celeba" / n, (178, 218), "RGB", "JPEG", seed=i)
    (folder / "list_eval_partition.txt").write_text("".join(f"{n} {0 if i < 5 else 1 if i < 6 else 2}\n"
                                                            for i, n in enumerate(names)))
    (folder / "img_align_celeba" / "000009.jpg").write_bytes(b"\xff\xd8 broken")  # one bad file: skipped
    d = load_dataset("celeba", tmp_path / "d")
    assert d.train_x.shape == (5, 3, 64, 64) and d.test_x.shape == (2, 3, 64, 64)
    # the same as cropping the centre 148x148 and resizing it, done here with PIL directly
    from PIL import Image

    img = Image.open(folder / "img_align_celeba" / names[6]).convert("RGB")
    box = ((178 - 148) // 2, (218 - 148) // 2)
    ref = np.asarray(img.crop((*box, box[0] + 148, box[1] + 148)).resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(d.test_x[0].permute(1, 2, 0).numpy() * 255, ref, atol=1.01)


def test_no_copy_and_no_network_fails_within_seconds_in_one_line(tmp_path, monkeypatch):
    # An unreachable host (a closed local port) stands for the network: refused at once, never a real request.
    monkeypatch.setattr(colour_sets, "CIFAR_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    monkeypatch.setattr(colour_sets, "CELEBA_URL", "http://127.0.0.1:9/")
    for name in ("cifar10", "celeba"):
        t0 = time.monotonic()
        with pytest.raises(DatasetUnavailable) as e:
            load_dataset(name, tmp_path / "empty")
        assert time.monotonic() - t0 < 60  # generous: the probe's own bound is 3 s
        msg = str(e.value)
        assert "no network" in msg and "\n" not in msg and "--data-dir" in msg


def test_a_corrupt_cifar_copy_is_refused_in_one_line(tmp_path):
    _write_cifar(tmp_path / "d")
    (tmp_path / "d" / colour_sets.CIFAR_DIR / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DatasetUnavailable, match="could not be read"):
        load_dataset("cifar10", tmp_path / "d")
