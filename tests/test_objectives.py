"""Loss terms against references; the IWAE bound's basic properties; config validation."""
from __future__ import annotations


import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from vae_core.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from vae_core.models import VAE
from vae_core.objectives import elbo_loss, elbo_terms, iwae_bound, kl_per_dim, log_px_given_z


def test_closed_form_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(8, 5, generator=g) * 2, torch.randn(8, 5, generator=g)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0))
    assert torch.allclose(kl_per_dim(mu, logvar), ref, atol=1e-5)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian-fixed", "gaussian-learned"])
def test_log_likelihood_matches_torch_distributions(likelihood):
    model = VAE(ModelConfig(likelihood=likelihood, gaussian_sigma=0.2, hidden_dim=32))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 28, 28, generator=g)
    logits = torch.randn(4, 1, 28, 28, generator=g) * 5
    if likelihood == "bernoulli":
        x = x.round()
        ref = Independent(Bernoulli(logits=logits), 3).log_prob(x)
    else:
        ref = Independent(Normal(torch.sigmoid(logits), 0.2), 3).log_prob(x)
    assert torch.allclose(log_px_given_z(model, x, logits), ref, rtol=1e-4, atol=1e-3)


def test_bernoulli_is_stable_for_extreme_logits():
    model = VAE(ModelConfig(hidden_dim=32))
    x = torch.ones(1, 1, 28, 28)
    ll = log_px_given_z(model, x, torch.full_like(x, -200.0))
    assert torch.isfinite(ll).all() and ll.item() == pytest.approx(-200.0 * 784, rel=1e-6)


def test_loss_is_negative_beta_elbo_and_free_bits_floor():
    model = VAE(ModelConfig(latent_dim=3, hidden_dim=32))
    x = torch.bernoulli(torch.full((16, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    t = elbo_terms(model, x, torch.Generator().manual_seed(0))
    assert t.recon.shape == (16,) and t.kl.shape == (16,) and t.kl_dims.shape == (16, 3)
    for beta in (0.0, 1.0, 4.0):
        assert elbo_loss(t, beta=beta).item() == pytest.approx(-(t.recon.mean() - beta * t.kl.mean()).item(), rel=1e-6)
    floor = float(t.kl_dims.detach().mean(0).max()) + 1.0
    with_fb = elbo_loss(t, beta=1.0, free_bits=floor)
    assert with_fb.item() == pytest.approx(-(t.recon.mean().item() - 3 * floor), rel=1e-6)


def test_iwae_at_least_elbo_and_rises_with_k():
    torch.manual_seed(0)
    model = VAE(ModelConfig(latent_dim=2, hidden_dim=32)).eval()
    x = torch.bernoulli(torch.full((32, 1, 28, 28), 0.2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        elbo = elbo_terms(model, x, torch.Generator().manual_seed(1)).elbo.mean().item()
    bounds = [iwae_bound(model, x, k, generator=torch.Generator().manual_seed(2)).mean().item() for k in (1, 10, 100, 1000)]
    assert bounds[0] == pytest.approx(elbo, abs=3.0)  # k = 1 is the ELBO in expectation
    assert all(b2 >= b1 - 0.05 for b1, b2 in zip(bounds, bounds[1:])), bounds
    assert bounds[-1] > elbo


def test_iwae_chunking_keeps_memory_bounded_and_matches():
    model = VAE(ModelConfig(latent_dim=2, hidden_dim=32)).eval()
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.2), generator=torch.Generator().manual_seed(0))
    a = iwae_bound(model, x, 5000, generator=torch.Generator().manual_seed(3), max_chunk_elems=50_000)
    b = iwae_bound(model, x, 5000, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(a, b, atol=0.1)
    with pytest.raises(ValueError):
        iwae_bound(model, x, 0)


@pytest.mark.parametrize("kwargs,needle", [
    ({"latent_dim": 0}, "latent_dim"), ({"latent_dim": 1000}, "latent_dim"), ({"beta": -0.1}, "beta"),
    ({"beta": float("inf")}, "finite"), ({"lr": float("nan")}, "finite"), ({"batch_size": 2.5}, "whole"),
    ({"dataset": "cifar"}, "dataset"), ({"arch": "resnet"}, "arch"), ({"device": "tpu"}, "device"),
    ({"beta": "1"}, "number"), ({"binarize": "yes"}, "binarize"), ({"epochs": True}, "number"),
])
def test_config_validation_messages(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig().replace(**kwargs)


def test_config_round_trip_and_unknown_keys():
    c = RunConfig(ModelConfig(arch="conv", latent_dim=8), TrainConfig(beta=0.5, dataset="mnist"))
    assert RunConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown"):
        RunConfig.from_dict({"model": {"latent": 2}})
    with pytest.raises(ConfigError):
        RunConfig.from_dict([1, 2])


def test_conv_model_shapes():
    m = VAE(ModelConfig(arch="conv", latent_dim=7, hidden_dim=64))
    x = torch.rand(3, 1, 28, 28)
    mu, logvar = m.encode(x)
    assert mu.shape == (3, 7) and m.decode(mu).shape == (3, 1, 28, 28)
