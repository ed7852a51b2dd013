"""`--dataset folder:PATH`: mixed files decoded once into a cache, bad files skipped and named, streaming."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from image_files import make_mixed_folder, write_image
from vae_core import folder_data, image_folders
from vae_core.config import RunConfig
from vae_core.data import load_dataset
from vae_core.records import DatasetUnavailable


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "folders"


def test_a_mixed_folder_loads_as_colour_64x64_with_labels_and_each_bad_file_named(tmp_path, cache):
    bad = make_mixed_folder(tmp_path / "pets", n_per_class=6)
    warnings: list[str] = []
    d = folder_data.load_folder(f"folder:{tmp_path / 'pets'}", warn=warnings.append)
    assert d.train_x.shape[1:] == (3, 64, 64) and d.test_x.shape[1:] == (3, 64, 64)  # mixed sizes: 64
    assert len(d.train_x) + len(d.test_x) == 12 and d.train_x.dtype == torch.float32
    assert 0 <= d.train_x.min() and d.train_x.max() <= 1
    assert d.label_names == ("cats", "dogs")
    assert sorted(torch.cat([d.train_y, d.test_y]).tolist()) == [0] * 6 + [1] * 6
    assert len(warnings) == len(bad) + 1 and warnings[-1].startswith(f"{len(bad)} file(s) skipped")
    for name, reason in bad.items():
        assert any(w.startswith(f"skipped {name}:") and reason in w for w in warnings), (name, warnings)
    # the cache is complete (meta.json written last) and no temporary directory is left
    assert [p.name.startswith(".") for p in cache.iterdir()] == [False]
    assert (next(cache.iterdir()) / "meta.json").exists()


def test_second_load_reads_the_cache_without_decoding(tmp_path, cache, monkeypatch):
    make_mixed_folder(tmp_path / "pets", n_per_class=3, bad=False)
    first = folder_data.load_folder(f"folder:{tmp_path / 'pets'}", warn=lambda m: None)

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder_data, "_decode_all", no_decoding)
    again = folder_data.load_folder(f"folder:{tmp_path / 'pets'}", warn=lambda m: None)
    assert torch.equal(first.train_x, again.train_x)
    # a changed folder is a different cache entry: it decodes again
    write_image(tmp_path / "pets" / "cats" / "new.png", (30, 30), "RGB", "PNG", seed=9)
    with pytest.raises(AssertionError, match="decoded again"):
        folder_data.load_folder(f"folder:{tmp_path / 'pets'}", warn=lambda m: None)


def test_one_size_grey_folder_keeps_its_size_and_channels_can_be_forced(tmp_path, cache):
    for i in range(5):
        write_image(tmp_path / "flat" / f"g{i}.png", (32, 32), "L", "PNG", seed=i)
    d = load_dataset(f"folder:{tmp_path / 'flat'}")
    assert d.train_x.shape[1:] == (1, 32, 32) and d.label_names == (image_folders.NO_LABEL,)
    c = load_dataset(f"folder:{tmp_path / 'flat'}", channels=3, image_size=16)
    assert c.train_x.shape[1:] == (3, 16, 16)
    assert torch.allclose(c.train_x[:, 0], c.train_x[:, 1])  # grey made colour: equal channels


def test_resize_is_a_centre_crop_of_the_short_side(tmp_path, cache):
    from PIL import Image

    a = np.zeros((20, 60, 3), np.uint8)
    a[:, 20:40] = 255  # a white middle third: after the centre crop to 20x20, all white
    (tmp_path / "wide").mkdir()
    Image.fromarray(a).save(tmp_path / "wide" / "w.png")
    Image.fromarray(a).save(tmp_path / "wide" / "w2.png")
    d = load_dataset(f"folder:{tmp_path / 'wide'}", image_size=16)
    assert d.train_x.min().item() > 0.95


def test_a_folder_with_no_usable_image_is_refused_in_one_line_and_leaves_nothing(tmp_path, cache):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"")
    (tmp_path / "junk" / "b.jpg").write_text("not a jpeg")
    with pytest.raises(DatasetUnavailable) as e:
        folder_data.load_folder(f"folder:{tmp_path / 'junk'}", warn=lambda m: None)
    assert "no usable image" in str(e.value) and "\n" not in str(e.value)
    assert not cache.exists() or list(cache.iterdir()) == []
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetUnavailable, match="no usable image"):
        folder_data.load_folder(f"folder:{tmp_path / 'none'}")
    with pytest.raises(DatasetUnavailable, match="no folder"):
        folder_data.load_folder(f"folder:{tmp_path / 'missing'}")


def test_a_large_set_is_streamed_from_the_uint8_cache(tmp_path, cache, monkeypatch, tiny_config):
    from vae_core.run_math import RunMath

    make_mixed_folder(tmp_path / "pets", n_per_class=6, bad=False)
    name = f"folder:{tmp_path / 'pets'}"
    in_memory = folder_data.load_folder(name, 3, 16, warn=lambda m: None)
    monkeypatch.setenv(folder_data.MEMORY_ENV, "0.001")  # 1 kB: nothing fits
    streamed = folder_data.load_folder(name, 3, 16, warn=lambda m: None)
    assert isinstance(streamed.train_x, folder_data.StreamedImages) and "streamed" in streamed.source
    assert isinstance(streamed.train_x.images, np.memmap)
    cfg = tiny_config.replace(dataset=name, channels=3, image_size=16, batch_size=4, arch="conv",
                              likelihood="logistic")
    m = RunMath(cfg, streamed.subset_train(8), torch.device("cpu"), lr=1e-3)
    idx = torch.tensor([5, 0, 3])
    torch.testing.assert_close(m.batch(idx), in_memory.train_x[idx], rtol=0, atol=1e-6)
    before = [p.clone() for p in m.model.parameters()]
    m.train_step(m.batch(idx), beta=1.0, free_bits=0.0, lr=1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.model.parameters()))


@pytest.mark.slow
def test_cli_trains_on_a_mixed_folder_and_evaluate_reports_elbo_and_iwae(tmp_path):
    bad = make_mixed_folder(tmp_path / "pets", n_per_class=6)
    env = {"VAE_DATA_CACHE": str(tmp_path / "cache"), "VAE_RUNS_DIR": str(tmp_path / "runs"),
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(__import__("pathlib").Path.cwd())}
    r = subprocess.run([sys.executable, "-m", "vae_core", "train", "--dataset", f"folder:{tmp_path / 'pets'}",
                        "--epochs", "1", "--batch-size", "4", "--hidden-dim", "32", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{len(bad)} file(s) skipped" in r.stderr and "Traceback" not in r.stderr
    run = next((tmp_path / "runs").iterdir())
    assert run.name.startswith("folder-pets-")
    model = json.loads((run / "config.json").read_text())["model"]
    assert (model["channels"], model["image_size"]) == (3, 64)
    e = subprocess.run([sys.executable, "-m", "vae_core", "evaluate", str(run), "--num-examples", "2",
                        "--iwae-k", "10", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert e.returncode == 0, e.stderr
    out = json.loads(e.stdout)
    assert np.isfinite(out["elbo"]) and np.isfinite(out["iwae"]) and out["iwae"] >= out["elbo"] - 50
    assert "Bernoulli log-likelihood of binarized images" in out["units"]  # the default likelihood
    assert out["bits_per_dim"]["elbo"] == pytest.approx(-out["elbo"] / (3 * 64 * 64 * np.log(2)), abs=1e-3)
    assert out["bits_per_dim"]["iwae"] == pytest.approx(-out["iwae"] / (3 * 64 * 64 * np.log(2)), abs=1e-3)


def test_folder_dataset_names_in_the_config(tmp_path):
    cfg = RunConfig().replace(dataset=f"folder:{tmp_path}")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
