"""Shared fixtures: tiny seeded data, a runs directory per test, no network."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Idle OpenMP threads poll 10,000 rounds instead of 300,000 before they sleep, as in the dashboard (app.py):
# the suite runs its torch beside test servers, train processes and whatever else shares the machine, and two
# pools spinning on 2 cores slow each other down ten-fold or more (400 steps of the default model beside
# another 2-thread torch process: 23 s per 100 steps at the default, 4 s at 10,000; the same 1.6 s when quiet).
# Only the scheduling changes, never a number. Set before torch loads libgomp, and inherited by the
# subprocesses; test_trainer's test of the dashboard's own setting removes it from its environment.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, os.cpu_count() or 1))
# The suite must not depend on which datasets this machine has: without this, a machine with Debian's
# Fashion-MNIST would default every run (and every test server) to it. Tests of the choice unset it.
os.environ["VAE_DEFAULT_DATASET"] = "sprites"
# Tests that want "a run that never ends" plan thousands of steps, which would start a background
# torch.compile (compiled_step.py) in every one of them; tests of the compiled step set VAE_COMPILE themselves.
os.environ.setdefault("VAE_COMPILE", "0")


@pytest.fixture(scope="session")
def tiny_sprites():
    """512 train / 128 test sprites: the real generator, small enough for seconds-long runs."""
    from vae_core.data import make_sprites

    return make_sprites(n_train=512, n_test=128, seed=7)[0]


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    d = tmp_path / "runs"
    monkeypatch.setenv("VAE_RUNS_DIR", str(d))
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "data"))
    return d


@pytest.fixture
def sprites_cached(tiny_sprites, monkeypatch):
    """Runs on "sprites" in this process load the tiny sprites: planted in the process's dataset cache."""
    from vae_core import inference

    monkeypatch.setitem(inference._DATA_CACHE, ("sprites", None, None, None), tiny_sprites)
    return tiny_sprites


@pytest.fixture
def lab(runs_dir, sprites_cached):
    """A Lab over this test's runs folder, one run at a time, training on the tiny sprites."""
    from vae_core.lab import Lab

    lab = Lab(runs_dir, max_runs=1, num_threads=1, log_every=4)
    yield lab
    lab.shutdown()


@pytest.fixture
def tiny_config():
    from vae_core.config import RunConfig

    return RunConfig().replace(epochs=2, batch_size=64, hidden_dim=64, latent_dim=2, evidence_every=0)


@pytest.fixture
def tiny_idx_dir(tmp_path, tiny_sprites):
    """The tiny sprites as MNIST IDX files (--dataset mnist --data-dir): real shapes, loaded at once by a subprocess."""
    import struct

    folder = tmp_path / "idx"
    folder.mkdir()
    for prefix, x in (("train", tiny_sprites.train_x), ("t10k", tiny_sprites.test_x)):
        images = (x[:, 0].numpy() * 255).round().astype("uint8")
        n = len(images)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + bytes(n))
    return folder


@dataclass(frozen=True)
class FinishedSweep:
    """What `python -m vae_core sweep` returned and printed, and the runs folder it trained into (read only)."""

    code: int
    out: str
    err: str
    runs_dir: Path
    sweep_id: str


# The 2 x 2 sweep both test_sweep (the command) and test_sweeps_browser (the page) look at: 512 sprites,
# one epoch, a 64-unit MLP per run, two runs at once.
GRID_SWEEP_ARGS = ["sweep", "--beta", "0.5,2", "--latent-dim", "2,4", "--name", "grid", "--workers", "2",
                   "--epochs", "1", "--train-size", "512", "--batch-size", "64", "--hidden-dim", "64",
                   "--evidence-every", "0", "--dataset", "sprites"]


@pytest.fixture(scope="session")
def grid_sweep(tmp_path_factory) -> FinishedSweep:
    """A finished 2 x 2 sweep, trained once per test session by the CLI in this process (four train processes).

    Tests read it; a test that changes runs copies `runs_dir` first (shutil.copytree).
    """
    import contextlib
    import io

    from vae_core import cli

    root = tmp_path_factory.mktemp("grid_sweep")
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv("VAE_DATA_CACHE", str(root / "data"))
        mp.delenv("VAE_RUNS_DIR", raising=False)
        code = cli.main([*GRID_SWEEP_ARGS, "--runs-dir", str(root / "runs")])
    return FinishedSweep(code, out.getvalue(), err.getvalue(), root / "runs", "grid")
