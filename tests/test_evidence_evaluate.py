"""evaluate_run (the CLI's `evaluate`): units that name the likelihood, per-example gaps to the grid, checked grids.

Runs are written here as a run directory holding a checkpoint: an untrained model where only the
labels matter, a briefly trained 2-latent model where the numbers do.
"""
from __future__ import annotations

import pytest
import torch

from vae_core import runs
from vae_core.config import ConfigError, RunConfig
from vae_core.evaluate import evaluate_run
from vae_core.models import build_model
from vae_core.objectives import elbo_loss, elbo_terms


def _write_run(runs_dir, config: RunConfig, model, name: str):
    run_dir = runs.create_run_dir(runs_dir, config, name)
    runs.save_checkpoint(run_dir, {"model": model.state_dict(), "config": config.to_dict(), "step": 0, "epoch": 0})
    return run_dir


@pytest.mark.parametrize("changes,label", [
    ({}, "Bernoulli log-likelihood of binarized images"),
    ({"binarize": False}, "BCE on grey levels, not a log-likelihood"),
    ({"likelihood": "gaussian-fixed", "binarize": False}, "Gaussian (fixed σ) log-density of grey levels"),
    ({"likelihood": "gaussian-learned", "binarize": False}, "Gaussian (learned σ) log-density of grey levels"),
])
def test_units_name_the_likelihood(runs_dir, tiny_config, changes, label):
    config = tiny_config.replace(**changes)
    torch.manual_seed(0)
    run_dir = _write_run(runs_dir, config, build_model(config.model), "u")
    out = evaluate_run(run_dir, k=5, num_examples=16, grid=0)
    assert out["units"].startswith("nats per example; ") and label in out["units"]
    if config.model.likelihood != "bernoulli":
        assert "BCE" not in out["units"] and "not a log-likelihood" not in out["units"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_sprites):
    """A 2-latent MLP after 300 Adam steps on the tiny sprites, saved as a run."""
    config = RunConfig().replace(latent_dim=2, hidden_dim=64, epochs=1, evidence_every=0)
    torch.manual_seed(0)
    model = build_model(config.model)
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(tiny_sprites.train_x, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = elbo_loss(elbo_terms(model, x[torch.randint(0, len(x), (64,), generator=g)], g), beta=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _write_run(tmp_path_factory.mktemp("eval") / "runs", config, model.eval(), "z2")


def test_grid_examples_get_their_own_gaps_and_checks(trained_run, monkeypatch, tmp_path):
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "data"))
    out = evaluate_run(trained_run, k=50, num_examples=32, grid=60, grid_examples=4)
    assert out["grid_examples"] == 4 and len(out["log_px_grid_each"]) == 4 and len(out["iwae_gap_each"]) == 4
    assert out["log_px_grid"] == pytest.approx(sum(out["log_px_grid_each"]) / 4, abs=1e-3)
    # Each gap is that image's log p(x) minus its bound; the flagged ones are those more than 1 nat below.
    assert out["iwae_far_below"] == [i for i, gap in enumerate(out["iwae_gap_each"]) if gap > 1.0]
    assert out["iwae_grid_examples"] == pytest.approx(
        sum(p - gap for p, gap in zip(out["log_px_grid_each"], out["iwae_gap_each"])) / 4, abs=1e-3)
    assert out["grid_checks_failed"] == []
    assert "identity" not in " ".join(out)


def test_more_latents_say_the_bound_can_understate(runs_dir, tiny_config):
    config = tiny_config.replace(latent_dim=5)
    run_dir = _write_run(runs_dir, config, build_model(config.model), "z5")
    out = evaluate_run(run_dir, k=5, num_examples=8)
    assert "log_px_grid" not in out and "many nats below" in out["note"] and "no grid" in out["note"]


@pytest.mark.parametrize("kw,needle", [({"grid": 3000}, "grid must be 0"), ({"grid": 3}, "grid must be 0"),
                                       ({"grid_examples": -5}, "grid examples")])
def test_bad_grid_arguments_are_refused_before_any_work(runs_dir, tiny_config, kw, needle):
    run_dir = _write_run(runs_dir, tiny_config, build_model(tiny_config.model), "bad")
    with pytest.raises(ConfigError, match=needle):
        evaluate_run(run_dir, **kw)
