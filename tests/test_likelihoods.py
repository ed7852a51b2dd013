"""The colour likelihoods against references, the conv net at every size, and the bounds built on them."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vae_core import likelihoods
from vae_core.config import ConfigError, ModelConfig, RunConfig, unit_label
from vae_core.models import build_model
from vae_core.objectives import elbo_terms, iwae_bound, log_px_given_z


def _np_sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _np_discretized_logistic(k: np.ndarray, mean: np.ndarray, s: np.ndarray) -> np.ndarray:
    """log P(k) of 8-bit levels k, written from the definition in float64: a difference of CDFs (tails at the
    ends), taken on the side of the mean where it does not cancel (F(b) - F(a) = S(a) - S(b), S = 1 - F)."""
    lo = np.where(k == 0, -np.inf, (k - 0.5) / 255)
    hi = np.where(k == 255, np.inf, (k + 0.5) / 255)
    cdf = lambda v: _np_sigmoid((v - mean) / s)  # noqa: E731  (1 at +inf, 0 at -inf)
    sf = lambda v: _np_sigmoid(-(v - mean) / s)  # noqa: E731
    return np.log(np.where(lo > mean, sf(lo) - sf(hi), cdf(hi) - cdf(lo)))


def test_discretized_logistic_matches_an_independent_numpy_reference():
    rng = np.random.default_rng(0)
    shape = (5, 3, 4, 4)
    k = rng.integers(0, 256, shape)
    k[0, 0, 0, :2] = [0, 255]  # both edge bins
    logits = rng.normal(0, 2, shape)
    log_s = rng.uniform(-4, -1, shape[1:])
    ref = _np_discretized_logistic(k, _np_sigmoid(logits), np.exp(log_s)).reshape(5, -1).sum(1)
    got = likelihoods.discretized_logistic(torch.tensor(k / 255.0), torch.sigmoid(torch.tensor(logits)),
                                           torch.tensor(log_s))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-8)


def test_discretized_logistic_sums_to_one_over_the_levels_and_stays_finite_when_sharp():
    levels = torch.arange(256, dtype=torch.float64).view(256, 1, 1, 1) / 255
    for mean_logit, log_s in ((0.3, -3.0), (4.0, -9.0), (-6.0, -12.0)):
        mean = torch.sigmoid(torch.full((256, 1, 1, 1), mean_logit, dtype=torch.float64))
        lp = likelihoods.discretized_logistic(levels, mean, torch.tensor(log_s, dtype=torch.float64))
        assert torch.isfinite(lp).all()
        assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-9)
    # float32 far in a tail: a log-probability, not -inf or NaN
    far = likelihoods.discretized_logistic(torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 0.9997), torch.tensor(-8.0))
    assert torch.isfinite(far).all() and far.item() < -1000


@pytest.mark.parametrize("likelihood", ["gaussian-fixed", "gaussian-learned", "gaussian-pixel"])
def test_gaussian_log_density_matches_torch_distributions(likelihood):
    torch.manual_seed(0)
    model = build_model(ModelConfig(likelihood=likelihood, channels=3, image_size=16, hidden_dim=32))
    with torch.no_grad():
        model.log_sigma.add_(torch.randn_like(model.log_sigma) * 0.3)
    x, logits = torch.rand(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    ref = torch.distributions.Normal(torch.sigmoid(logits), model.log_sigma.exp()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(log_px_given_z(model, x, logits), ref)
    assert model.log_sigma.shape == ((3, 16, 16) if likelihood == "gaussian-pixel" else ())


@pytest.mark.parametrize("arch,channels,size", [("conv", 1, 28), ("conv", 3, 16), ("conv", 3, 32), ("conv", 1, 50),
                                                ("conv", 3, 64), ("conv", 3, 128), ("mlp", 3, 32)])
def test_models_map_every_size_back_to_itself(arch, channels, size):
    model = build_model(ModelConfig(arch=arch, channels=channels, image_size=size, hidden_dim=32, latent_dim=4))
    x = torch.rand(2, channels, size, size)
    mu, logvar = model.encode(x)
    assert mu.shape == (2, 4) and model.decode_logits(mu).shape == x.shape
    if arch == "conv":  # down to a map of at most 8x8 before the dense layers
        assert model.decoder.map_shape[1] <= 8


def test_the_28x28_grey_conv_net_keeps_its_parameter_names_and_shapes():
    """Checkpoints saved before colour still load: the same layers as the classic 28x28 network."""
    shapes = {k: tuple(v.shape) for k, v in build_model(ModelConfig(arch="conv")).state_dict().items()}
    assert shapes["encoder.conv.0.weight"] == (32, 1, 4, 4) and shapes["encoder.conv.2.weight"] == (64, 32, 4, 4)
    assert shapes["encoder.fc.weight"] == (400, 64 * 7 * 7) and shapes["decoder.deconv.2.weight"] == (32, 1, 4, 4)
    assert len(shapes) == 19


def test_image_shape_settings_are_checked():
    with pytest.raises(ConfigError, match="channels must be 1"):
        ModelConfig(channels=2)
    with pytest.raises(ConfigError, match="image_size must be between 16 and 128"):
        ModelConfig(image_size=8)
    with pytest.raises(ConfigError, match="MLP takes images"):
        ModelConfig(arch="mlp", channels=3, image_size=128)
    with pytest.raises(ConfigError, match="folder:PATH"):
        RunConfig().replace(dataset="cifar")
    with pytest.raises(ConfigError, match="needs a path"):
        RunConfig().replace(dataset="folder:  ")
    assert RunConfig.from_dict(RunConfig().to_dict()) == RunConfig()  # a config without a shape reads back as one


@pytest.mark.slow
@pytest.mark.parametrize("likelihood", ["logistic", "gaussian-pixel"])
def test_iwae_bound_approaches_the_grid_evidence_for_colour_likelihoods(likelihood):
    """With 2 latents log p(x) is an integral on a grid: the ELBO lies below it and the k = 1000 IWAE bound
    closes most of the gap, for each likelihood (the same log p(x|z) feeds all three numbers)."""
    from vae_core.evidence import grid_evidence

    torch.manual_seed(1)
    model = build_model(ModelConfig(arch="mlp", likelihood=likelihood, channels=3, image_size=16, latent_dim=2,
                                    hidden_dim=32, gaussian_sigma=0.3)).eval()
    x = torch.round(torch.rand(1, 3, 16, 16) * 255) / 255
    with torch.no_grad():
        log_px = grid_evidence(model, x, n=80)["log_px_grid_each"]
        gen = torch.Generator().manual_seed(0)
        elbo = torch.stack([elbo_terms(model, x, gen).elbo for _ in range(100)]).mean(0)
        iw = iwae_bound(model, x, 1000, generator=gen)
    for i in range(1):
        assert elbo[i].item() <= log_px[i] + 0.05
        assert iw[i].item() <= log_px[i] + 0.05
        assert log_px[i] - iw[i].item() < 0.2 * max(log_px[i] - elbo[i].item(), 0.05) + 0.05


def test_bits_per_dimension_and_units():
    dims = 3 * 32 * 32
    nats = -dims * math.log(2) * 5.0  # 5 bits per value
    assert likelihoods.bits_per_dim(nats, "logistic", dims, binarized=False) == pytest.approx(5.0)
    assert likelihoods.bits_per_dim(nats, "gaussian-pixel", dims, binarized=False) == pytest.approx(5.0 + math.log2(255))
    assert likelihoods.bits_per_dim(nats, "bernoulli", dims, binarized=False) is None
    cfg = RunConfig().replace(likelihood="logistic", channels=3, image_size=32, arch="conv")
    assert "nats per image" in unit_label(cfg) and "8-bit" in unit_label(cfg)
