"""Datasets: the procedural sprites, torchvision's real MNIST loading path on IDX files we write, offline errors."""
from __future__ import annotations

import gzip
import struct
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from vae_core import data


def write_idx(folder, n_train=60, n_test=20, gz=False, seed=0):
    """Write the four MNIST IDX files (magic numbers and big-endian sizes as in LeCun's format)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        arrays[prefix] = (images, labels)
        for kind, payload in (("images-idx3-ubyte", struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()),
                              ("labels-idx1-ubyte", struct.pack(">II", 2049, n) + labels.tobytes())):
            name = f"{prefix}-{kind}"
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(payload)
            else:
                (folder / name).write_bytes(payload)
    return arrays


def test_sprites_are_deterministic_and_labelled():
    a, fa = data.make_sprites(n_train=64, n_test=32, seed=3)
    b, fb = data.make_sprites(n_train=64, n_test=32, seed=3)
    c, _ = data.make_sprites(n_train=64, n_test=32, seed=4)
    assert torch.equal(a.train_x, b.train_x) and not torch.equal(a.train_x, c.train_x)
    assert a.train_x.shape == (64, 1, 28, 28) and a.train_x.dtype == torch.float32
    assert 0 <= a.train_x.min() and a.train_x.max() <= 1
    assert fa.shape == (32, 5) and np.array_equal(fa, fb)
    assert torch.equal(a.test_y, torch.from_numpy(fa[:, 0].astype(np.int64)))
    assert a.label_names == ("square", "ellipse", "triangle")


def _render_all_shapes_at_once(factors, supersample=2):
    """render_sprites as it was first written: every shape tested at every sprite, all sprites at once."""
    n, s = len(factors), 28 * supersample
    c = (np.arange(s) + 0.5) / s * 2 - 1
    v, u = np.meshgrid(-c, c, indexing="ij")
    shape, scale, rot, tx, ty = (factors[:, i, None, None] for i in range(5))
    du, dv = u[None] - tx, v[None] - ty
    cos, sin = np.cos(rot), np.sin(rot)
    pu, pv = (cos * du + sin * dv) / scale, (-sin * du + cos * dv) / scale
    square = (np.abs(pu) <= 0.45) & (np.abs(pv) <= 0.45)
    ellipse = (pu / 0.6) ** 2 + (pv / 0.3) ** 2 <= 1
    tri = (pv >= -0.3) & (np.sqrt(3) * pu + pv <= 0.6) & (-np.sqrt(3) * pu + pv <= 0.6)
    inside = np.where(shape == 0, square, np.where(shape == 1, ellipse, tri))
    return inside.reshape(n, 28, supersample, 28, supersample).mean(axis=(2, 4)).astype(np.float32)


def test_sprites_render_in_chunks_by_shape_exactly_as_all_at_once():
    # More sprites than one chunk of each shape, in mixed order, so the grouping and the scatter back are used.
    f = data.sprite_factors(3 * data._RENDER_CHUNK + 37, seed=21)
    f[::97, 0] = 2.0  # a float shape id, as factors arrays hold them
    f[5, 0] = 3.0  # not a shape id: drawn as a triangle, as before
    x = data.render_sprites(f)
    assert x.dtype == np.float32 and x.shape == (len(f), 28, 28)
    assert np.array_equal(x, _render_all_shapes_at_once(f))
    for ss in (1, 3):
        assert np.array_equal(data.render_sprites(f[:50], supersample=ss), _render_all_shapes_at_once(f[:50], ss))
    assert data.render_sprites(f[:0]).shape == (0, 28, 28)


def test_sprite_factors_change_the_image():
    base = np.array([[0, 0.8, 0.0, 0.0, 0.0]])
    img = data.render_sprites(base)[0]
    assert 0.1 < img.mean() < 0.5  # a visible shape, not a blank or full frame
    for i, delta in ((0, 1), (1, -0.3), (2, 0.5), (3, 0.3), (4, 0.3)):
        other = base.copy()
        other[0, i] += delta
        assert not np.allclose(data.render_sprites(other)[0], img), f"factor {data.SPRITE_FACTORS[i]} has no effect"
    moved = base.copy()
    moved[0, 3] = 0.3  # x to the right: mass moves right
    cols = np.arange(28)
    assert (data.render_sprites(moved)[0].sum(0) * cols).sum() / data.render_sprites(moved)[0].sum() > \
        (img.sum(0) * cols).sum() / img.sum()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_through_torchvision_from_a_flat_data_dir(tmp_path, monkeypatch, gz):
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "cache"))
    arrays = write_idx(tmp_path / "idx", gz=gz)
    d = data.load_dataset("mnist", tmp_path / "idx")
    assert d.train_x.shape == (60, 1, 28, 28) and d.test_x.shape == (20, 1, 28, 28)
    assert np.array_equal((d.train_x[:, 0] * 255).round().byte().numpy(), arrays["train"][0])
    assert np.array_equal(d.test_y.numpy(), arrays["t10k"][1])
    assert d.label_names[3] == "3"
    assert not (tmp_path / "cache").exists()  # read in place: nothing copied


def test_a_truncated_idx_file_is_refused_with_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "cache"))
    write_idx(tmp_path / "idx")
    images = tmp_path / "idx" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(data.DatasetUnavailable, match="truncated"):
        data.load_dataset("mnist", tmp_path / "idx")


def test_fashion_from_torchvision_layout_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "cache"))
    arrays = write_idx(tmp_path / "root" / "FashionMNIST" / "raw", seed=1)
    monkeypatch.setenv("VAE_DATA_DIR", str(tmp_path / "root"))
    d = data.load_dataset("fashion-mnist")
    assert np.array_equal(d.train_y.numpy(), arrays["train"][1])
    assert d.label_names[9] == "Ankle boot"
    assert data.availability()["fashion-mnist"][0] is True


def test_missing_dataset_offline_fails_fast_with_how_to(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VAE_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    # A closed port on this machine stands in for "no network": no packet leaves the host.
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(data.DatasetUnavailable) as e:  # bounded by the probe's timeout, not a download's
        data.load_dataset("mnist", tmp_path / "empty")
    msg = str(e.value)
    assert "mnist" in msg and "--data-dir" in msg and "VAE_DATA_DIR" in msg and "sprites" in msg
    ok, why = data.availability(tmp_path / "empty")["mnist"]
    assert ok is False and "no network" in why


def test_index_batcher_covers_the_epoch_once():
    g = torch.Generator().manual_seed(0)
    b = data.IndexBatcher(100, 32, g, torch.device("cpu"))
    batches = b.epoch()
    assert len(batches) == 3 and all(len(i) == 32 for i in batches)
    flat = torch.cat(batches)
    assert len(set(flat.tolist())) == 96


@pytest.fixture
def no_local_datasets(tmp_path, monkeypatch):
    """A machine with no MNIST anywhere: no data dir, an empty cache, no Debian package, no pinned default."""
    from vae_core import sources

    monkeypatch.delenv("VAE_DATA_DIR", raising=False)
    monkeypatch.delenv(sources.DEFAULT_ENV, raising=False)
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "DEBIAN_DIRS", {})
    return sources


def test_default_dataset_is_sprites_without_local_files(no_local_datasets):
    assert no_local_datasets.default_dataset() == "sprites"


def test_default_dataset_prefers_a_real_set_found_locally(tmp_path, no_local_datasets, monkeypatch):
    sources = no_local_datasets
    write_idx(tmp_path / "fashion" / "FashionMNIST" / "raw", gz=True)
    monkeypatch.setattr(sources, "DEBIAN_DIRS", {"fashion-mnist": tmp_path / "fashion"})  # as Debian's package
    assert sources.default_dataset() == "fashion-mnist"
    write_idx(tmp_path / "idx")  # MNIST in a --data-dir folder wins: the classic VAE example's set
    assert sources.default_dataset(tmp_path / "idx") == "mnist"
    monkeypatch.setenv(sources.DEFAULT_ENV, "sprites")  # a teacher's pin beats both
    assert sources.default_dataset(tmp_path / "idx") == "sprites"


@pytest.mark.parametrize("local", [True, False])
def test_cli_train_defaults_to_the_best_local_dataset(tmp_path, no_local_datasets, monkeypatch, capsys, local):
    from vae_core import cli
    from vae_core.lab import Lab

    started = []

    def start(self, config, **kw):  # stop at the config the CLI built: the choice is what is tested
        started.append(config)
        return types.SimpleNamespace(name=kw.get("name"))

    monkeypatch.setattr(Lab, "start", start)
    monkeypatch.setattr(cli, "_watch", lambda run, args, signals: 0)  # nothing trains
    args = ["train", "--runs-dir", str(tmp_path / "runs")]
    if local:
        write_idx(tmp_path / "idx")
        args += ["--data-dir", str(tmp_path / "idx")]
    assert cli.main(args) == 0
    want = "mnist" if local else "sprites"
    assert started[0].train.dataset == want
    assert f"dataset: {want}" in capsys.readouterr().err
    assert cli.main(args + ["--dataset", "sprites"]) == 0  # a dataset named on the command line is kept
    assert started[1].train.dataset == "sprites"
    assert "dataset:" not in capsys.readouterr().err  # and not announced as a default


def test_the_dashboard_first_page_defaults_to_a_local_dataset(tmp_path):
    """The sidebar's default is found once per server process (settings.DEFAULTS), so ask a fresh one."""
    import os
    import subprocess
    import sys

    write_idx(tmp_path / "idx")
    env = {k: v for k, v in os.environ.items() if k != "VAE_DEFAULT_DATASET"}
    code = "from dashboard import settings; print(settings.DEFAULTS['dataset'])"
    root = str(Path(__file__).resolve().parents[1])
    found = subprocess.run([sys.executable, "-c", code], cwd=root, env={**env, "VAE_DATA_DIR": str(tmp_path / "idx")},
                           capture_output=True, text=True, timeout=120)
    assert found.stdout.strip() == "mnist", found.stderr
    pinned = subprocess.run([sys.executable, "-c", code], cwd=root, env={**env, "VAE_DEFAULT_DATASET": "sprites"},
                            capture_output=True, text=True, timeout=120)
    assert pinned.stdout.strip() == "sprites", pinned.stderr


def test_shape_measures_tell_a_kept_shape_from_a_blob():
    _, f = data.make_sprites(n_train=16, n_test=64, seed=5)
    x = data.render_sprites(f)
    assert data.shape_iou(x, x) == 1.0 and data.shape_kept(f, x) == 1.0
    blob = np.stack([data.render_sprites(np.array([[1, s, 0.0, u, v]]))[0] for _, s, _, u, v in f])  # ellipses
    assert data.shape_kept(f, blob) < 0.5  # right only where the shape was an ellipse anyway
    assert data.shape_iou(x, np.zeros_like(x)) == 0.0


@pytest.mark.slow  # ~10 s on a quiet 2-core machine, minutes on a loaded one
def test_the_default_sprites_run_learns_the_shapes_in_a_few_hundred_steps():
    """The first run must teach: after 400 steps (about ten seconds on 2 cores) the reconstructions keep
    each sprite's shape, not just a blob where it was. Steps, not seconds, so machine load cannot matter."""
    from vae_core.config import RunConfig
    from vae_core.run_math import RunMath

    sprites, f_test = data.make_sprites(n_train=4096, n_test=300, seed=11)
    cfg = RunConfig()
    assert cfg.train.dataset == "sprites"
    m = RunMath(cfg, sprites, torch.device("cpu"), lr=cfg.train.lr)
    step = 0
    while step < 400:
        for idx in m.batcher.epoch():
            m.train_step(m.batch(idx), beta=cfg.train.beta, free_bits=cfg.train.free_bits, lr=cfg.train.lr)
            step += 1
            if step == 400:
                break
    with torch.no_grad():
        m.model.eval()
        x_hat = m.model.decode(m.model.encode(sprites.test_x)[0])[:, 0].numpy()
    x = sprites.test_x[:, 0].numpy()
    assert data.shape_kept(f_test, x_hat) > 0.8  # 2 latents at lr 1e-3 (the old default): 0.5, near chance
    assert data.shape_iou(x, x_hat) > 0.7  # the old default: 0.6


def test_the_servers_warm_up_loads_the_default_dataset(monkeypatch, tmp_path):
    """The first Train should not wait for the dataset the sidebar offers first (Fashion-MNIST takes seconds)."""
    from dashboard import state
    from vae_core.lab import Lab

    loaded = []
    monkeypatch.setattr(Lab, "warm_up", lambda self, dataset="sprites": loaded.append(dataset))
    monkeypatch.setattr(state, "_frozen", True)  # no gc.freeze in a test process
    monkeypatch.setenv("VAE_DEFAULT_DATASET", "fashion-mnist")
    state._warm_up(Lab(tmp_path / "runs", max_runs=1))
    assert loaded == ["fashion-mnist"]
