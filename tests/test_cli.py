"""The CLI end to end, in subprocesses as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from pathlib import Path

import pytest

from tests.helpers import spincount_when_torch_loads

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd, timeout=120):
    # PYTHONPATH: this checkout's code, whatever `pip install -e` points at (the tests run from tmp_path).
    env = {**os.environ, "VAE_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("VAE_RUNS_DIR", None)
    return subprocess.run([sys.executable, "-m", "vae_core", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_train_evaluate_runs_end_to_end(tmp_path):
    r = cli("train", "--dataset", "sprites", "--latent-dim", "2", "--beta", "1", "--epochs", "2",
            "--train-size", "1024", "--hidden-dim", "64", "--name", "e2e", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "test ELBO" in r.stdout and "nats per example" in r.stdout
    assert "samples/s" in r.stderr  # the progress bar
    run = tmp_path / "runs" / "e2e"
    assert (run / "checkpoint.pt").exists()

    r = cli("evaluate", str(run), "--iwae-k", "50", "--num-examples", "64", "--grid", "60", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["k"] == 50 and ev["num_examples"] == 64
    assert ev["elbo"] == pytest.approx(ev["recon"] - ev["kl"], abs=1e-3)
    assert ev["elbo"] <= ev["iwae"] + 0.5  # the IWAE bound is at least the ELBO (MC error allowed)
    assert "log_px_grid" in ev and "kl_to_posterior_grid" in ev

    r = cli("runs", "--json", cwd=tmp_path)
    rows = json.loads(r.stdout)
    assert [x["name"] for x in rows] == ["e2e"] and rows[0]["status"] == "finished"
    assert rows[0]["epochs_done"] == 2

    r = cli("train", "--resume", str(run), "--epochs", "1", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(cli("runs", "--json", cwd=tmp_path).stdout)
    assert rows[0]["epochs_done"] == 3


@pytest.mark.parametrize("args,needle", [
    (["train", "--latent-dim", "0"], "latent_dim must be between 1 and 128"),
    (["train", "--beta", "-1"], "beta must be between"),
    (["train", "--beta", "nan"], "beta must be finite"),
    (["train", "--dataset", "cifar"], "invalid choice"),
    (["train", "--device", "cuda"], "CUDA was requested but is not available"),
    (["train", "--batch-size", "600", "--train-size", "512"], "larger than the training set"),
    (["evaluate", "runs/nope"], "missing"),
    (["evaluate", ".", "--iwae-k", "0"], "--iwae-k"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_one_line_no_traceback(tmp_path, args, needle):
    if "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    r = cli(*args, cwd=tmp_path)
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_usage_error_is_answered_without_loading_torch(tmp_path):
    """A mistyped command or option is answered in a fraction of a second: main() loads torch only for work."""
    code = ("import sys\nfrom vae_core.cli import main\ntry:\n    rc = main(['frobnicate'])\nexcept SystemExit as e:\n"
            "    rc = e.code\nprint(rc, 'torch' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["2", "False"], (r.stdout, r.stderr)
    assert "invalid choice" in r.stderr


def test_the_cli_shortens_openmp_polling_before_torch_loads(tmp_path):
    """`python -m vae_core` sets GOMP_SPINCOUNT (as the dashboard does) before torch loads; a user's value wins."""
    code = """
sys.argv = ["vae_core", "runs", "--json", "--runs-dir", sys.argv[1]]
try:
    runpy.run_module("vae_core", run_name="__main__")
except SystemExit:
    pass
"""
    assert spincount_when_torch_loads(code, str(tmp_path)) == "['10000']"
    assert spincount_when_torch_loads(code, str(tmp_path), spincount="500") == "['500']"
