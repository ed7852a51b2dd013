"""Evidence estimates against known answers.

A linear-Gaussian "VAE" has p(x) and p(z|x) in closed form, so the grid and the importance-
weighted bound are checked against exact numbers; a small VAE trained on sprites checks that
the estimators agree with each other and keep their order, ELBO <= log p_k(x) <= log p(x).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from vae_core.config import ModelConfig
import dataclasses

from vae_core.evidence import (ELBO_TOL, MIN_ESS, PosteriorGrid, active_units, encode_means, far_below, grid_checks,
                               grid_evidence, iwae_curve, kl_per_dimension, posterior_grid)
from vae_core.models import VAE
from vae_core.objectives import elbo_loss, elbo_terms, iwae_bound, log_px_given_z


# ---------------------------------------------------------------- a model with a known posterior

class LinearGaussian(nn.Module):
    """p(z) = N(0, I), p(x|z) = N(W z + b, sigma^2 I), q(z|x) = N(A (x - b) + shift, diag(exp(logvar))).

    So p(x) = N(b, W W^T + sigma^2 I) and p(z|x) = N(S W^T (x - b) / sigma^2, S) with
    S = (I + W^T W / sigma^2)^-1 (Bishop 2006, eqs. 2.113-2.117). Float64, P pixels; it has the
    VAE's interface (encode, decode_logits, mean_image, config, log_sigma), with an identity mean.
    """

    def __init__(self, W: torch.Tensor, b: torch.Tensor, sigma: float, *, shift=(0.0, 0.0), logvar_offset=(0.0, 0.0)):
        super().__init__()
        self.config = ModelConfig(latent_dim=2, likelihood="gaussian-fixed", gaussian_sigma=sigma)
        self.W, self.b, self.sigma = W.double(), b.double(), sigma
        self.register_buffer("log_sigma", torch.tensor(math.log(sigma), dtype=torch.float64))
        self.S = torch.linalg.inv(torch.eye(2, dtype=torch.float64) + self.W.T @ self.W / sigma**2)  # (2, 2)
        self.A = self.S @ self.W.T / sigma**2  # (2, P)
        self.shift = torch.tensor(shift, dtype=torch.float64)
        self.logvar = self.S.diagonal().log() + torch.tensor(logvar_offset, dtype=torch.float64)

    def posterior(self, x: torch.Tensor) -> MultivariateNormal:
        return MultivariateNormal((x - self.b) @ self.A.T, self.S)

    def marginal(self) -> MultivariateNormal:
        return MultivariateNormal(self.b, self.W @ self.W.T + self.sigma**2 * torch.eye(len(self.b), dtype=torch.float64))

    def q(self, x: torch.Tensor) -> MultivariateNormal:
        mu, logvar = self.encode(x)
        return MultivariateNormal(mu, torch.diag_embed(logvar.exp()))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = (x - self.b) @ self.A.T + self.shift  # (B, 2)
        return mu, self.logvar.expand_as(mu)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W.T + self.b  # (M, P)

    def mean_image(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def _orthogonal_w(P: int, scales: tuple[float, float], seed: int) -> torch.Tensor:
    """W with orthogonal columns: W^T W is diagonal, so the exact posterior is a diagonal Gaussian."""
    q, _ = torch.linalg.qr(torch.randn(P, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.tensor(scales, dtype=torch.float64)


def _observe(model: LinearGaussian, z_star, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.tensor(z_star, dtype=torch.float64)
    return model.decode_logits(z[None])[0] + model.sigma * torch.randn(len(model.b), generator=g, dtype=torch.float64)


def _random_lg(P: int = 6, sigma: float = 0.5, seed: int = 0, **kw) -> LinearGaussian:
    g = torch.Generator().manual_seed(seed)
    return LinearGaussian(torch.randn(P, 2, generator=g, dtype=torch.float64),
                          torch.randn(P, generator=g, dtype=torch.float64), sigma, **kw)


# A correlated posterior near the prior, one far outside [-6, 6]^2 with q near it, the same with q
# left at the prior (the search box must grow to find the posterior), and one 100x narrower than a
# first-pass grid cell: the grid must find, cover and resolve each one.
CASES = {
    "correlated": dict(model=lambda: _random_lg(shift=(0.3, -0.2), logvar_offset=(0.7, -0.5)), z_star=(0.5, -1.0)),
    "far": dict(model=lambda: _random_lg(sigma=0.05, seed=1, shift=(0.01, 0.0), logvar_offset=(0.4, 0.0)),
                z_star=(9.0, -7.5)),
    "far-q-prior": dict(model=lambda: _random_lg(sigma=0.5, seed=1), z_star=(9.0, -7.5), q_prior=True),
    "narrow": dict(model=lambda: _random_lg(sigma=0.002, seed=2, shift=(0.0, 0.001), logvar_offset=(-0.5, 0.3)),
                   z_star=(1.5, 0.5)),
}


@pytest.mark.parametrize("case", CASES)
def test_grid_recovers_closed_form_evidence_and_posterior_gap(case):
    model = CASES[case]["model"]()
    x = _observe(model, CASES[case]["z_star"], seed=5)
    if CASES[case].get("q_prior"):  # q(z|x) = N(0, I) for this x
        model.shift, model.logvar = -model.posterior(x[None]).mean[0], torch.zeros(2, dtype=torch.float64)
    grid = posterior_grid(model, x, n=200)
    exact_log_px = model.marginal().log_prob(x).item()
    exact_kl = kl_divergence(model.q(x[None]), model.posterior(x[None])).item()
    # The midpoint rule on a smooth, covered density converges fast: ~1e-8 nats here, 1e-6 allowed.
    assert grid.log_px == pytest.approx(exact_log_px, abs=1e-6)
    assert grid.kl_to_posterior == pytest.approx(exact_kl, abs=1e-6, rel=1e-6)
    assert grid.elbo == pytest.approx(exact_log_px - exact_kl, abs=1e-6, rel=1e-8)
    # Gauss-Hermite integrates this quadratic log-likelihood exactly: an independent check of the grid's ELBO.
    assert grid.elbo_reference == pytest.approx(exact_log_px - exact_kl, abs=1e-6)
    # The grid-free importance-sampling log p(x) lands within its own error of the exact value, and both checks pass.
    assert abs(grid.log_px_reference - exact_log_px) < 4 * grid.log_px_reference_se + 1e-3
    # Even with q at the prior and the posterior 12 prior std away, the sampler's fitted second round finds it.
    assert [c.verdict for c in grid.checks()] == ["pass", "pass"]
    assert grid.log_px_reference_ess > 4 * MIN_ESS
    assert grid.posterior_edge_mass < 1e-8 and grid.q_grid_mass == pytest.approx(1.0, abs=1e-6)
    assert grid.cells_per_std > 2
    # The normalised density on the grid is the exact posterior's density.
    z = torch.from_numpy(np.stack(np.meshgrid(grid.z1, grid.z2), -1))  # (n, n, 2), rows z2
    exact_density = model.posterior(x[None]).log_prob(z).numpy()
    mass = np.exp(exact_density) * grid.cell_area
    assert np.abs(np.exp(grid.log_density) - np.exp(exact_density)).sum() * grid.cell_area < 1e-4
    assert mass.sum() == pytest.approx(1.0, abs=1e-4)
    if case.startswith("far"):
        assert grid.z1.max() > 6 and grid.z2.min() < -6  # the search had to leave the prior's box


def test_perfect_encoder_makes_every_bound_exact():
    W = _orthogonal_w(8, (1.5, 0.7), seed=3)
    model = LinearGaussian(W, torch.linspace(-1, 1, 8), 0.4)
    x = torch.stack([_observe(model, (0.8, -0.3), seed=s) for s in range(5)])  # (5, 8)
    exact = model.marginal().log_prob(x)  # (5,)
    torch.testing.assert_close(model.q(x).covariance_matrix, model.posterior(x).covariance_matrix)

    grid = posterior_grid(model, x[0], n=120)
    assert grid.kl_to_posterior == pytest.approx(0.0, abs=1e-6)
    assert grid.elbo == pytest.approx(exact[0].item(), abs=1e-6)
    assert grid.log_px == pytest.approx(exact[0].item(), abs=1e-6)
    np.testing.assert_allclose(grid.q_cov, model.S.numpy(), rtol=1e-12, atol=1e-15)

    # Every importance weight equals p(x) when q is the posterior, so log p_k(x) is exact for each k.
    curve = iwae_curve(model, x, ks=(1, 7, 50), generator=torch.Generator().manual_seed(0))
    for bound in curve["iwae"] + [curve["elbo_mc"]]:
        assert bound == pytest.approx(exact.mean().item(), abs=1e-9)
    assert curve["elbo"] == pytest.approx(exact.mean().item(), abs=0.15)  # its recon term is only right on average
    assert torch.allclose(iwae_bound(model, x, 3), exact, atol=1e-9)


def test_iwae_closes_the_gap_of_a_wrong_encoder():
    # q too wide rather than too narrow: its importance weights are light-tailed, so k = 5000 suffices.
    model = _random_lg(P=6, sigma=0.5, seed=4, shift=(0.4, -0.3), logvar_offset=(1.0, 0.6))
    x = torch.stack([_observe(model, (0.3 * s, -0.5), seed=s) for s in range(4)])
    exact = model.marginal().log_prob(x).mean().item()
    kl = kl_divergence(model.q(x), model.posterior(x)).mean().item()
    assert kl > 0.5  # the encoder is really wrong
    curve = iwae_curve(model, x, ks=(1, 10, 100, 5000), generator=torch.Generator().manual_seed(1))
    assert curve["elbo"] == pytest.approx(exact - kl, abs=0.1)  # recon averaged over 5000 samples
    assert curve["iwae"][0] == pytest.approx(exact - kl, abs=0.1)  # the k = 1 bound is the ELBO in expectation
    assert all(b > a for a, b in zip(curve["iwae"], curve["iwae"][1:]))
    assert curve["iwae"][-1] == pytest.approx(exact, abs=0.05) and curve["iwae"][-1] <= exact + 0.01
    assert grid_evidence(model, x, n=100)["log_px_grid"] == pytest.approx(exact, abs=1e-3)


# ---------------------------------------------------------------- a small trained VAE on sprites

@pytest.fixture(scope="module")
def trained():
    """A 2-latent MLP VAE after 400 Adam steps on 2000 binarized sprites (~2 s), and 4 test images.

    Longer training makes some posteriors multimodal, and q then misses modes that k = 5000
    importance samples do not find either; here q is still close enough for the IWAE comparison.
    """
    from vae_core.data import make_sprites

    torch.manual_seed(0)
    data, _ = make_sprites(n_train=2000, n_test=200, seed=3)
    g = torch.Generator().manual_seed(0)
    train_x = torch.bernoulli(data.train_x, generator=g)
    model = VAE(ModelConfig(latent_dim=2, hidden_dim=128))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = elbo_loss(elbo_terms(model, train_x[torch.randint(0, 2000, (100,), generator=g)], g), beta=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, torch.bernoulli(data.test_x[:4], generator=g)


@pytest.fixture(scope="module")
def grids(trained):
    model, x = trained
    return [posterior_grid(model, xi, n=150) for xi in x]


def test_grid_log_px_matches_sampling_from_the_prior(trained, grids):
    """log p(x) = log E_p(z)[p(x|z)]: a q-free estimate, consistent however wrong the encoder is."""
    model, x = trained
    k = 100_000
    z = torch.randn(k, 2, generator=torch.Generator().manual_seed(4))  # (k, 2)
    for xi, grid in zip(x, grids):
        with torch.no_grad():
            ll = torch.cat([log_px_given_z(model, xi.expand(10_000, *xi.shape), model.decode_logits(z[j:j + 10_000]))
                            for j in range(0, k, 10_000)]).double()  # (k,) log p(x|z), decoded in chunks
        w = torch.softmax(ll, 0)
        assert 1 / (w**2).sum() > 100  # effective sample size: the estimate below is not one lucky draw
        assert grid.log_px == pytest.approx((torch.logsumexp(ll, 0) - math.log(k)).item(), abs=0.15)


def test_grid_and_iwae_5000_agree_and_keep_the_bounds_in_order(trained, grids):
    model, x = trained
    log_px = np.mean([g.log_px for g in grids])
    curve = iwae_curve(model, x, ks=(1, 10, 100, 1000, 5000), generator=torch.Generator().manual_seed(2))
    assert curve["elbo"] < -20  # a real model, not a degenerate one
    assert abs(curve["iwae"][-1] - log_px) < 0.5
    assert curve["elbo"] < curve["iwae"][1] and curve["elbo_mc"] < curve["iwae"][1]
    assert all(b >= a - 0.02 for a, b in zip(curve["iwae"], curve["iwae"][1:])), curve["iwae"]
    assert curve["iwae"][-1] <= log_px + 0.05
    # E_q[log p(x, z) - log q] by 5000 samples and by the grid.
    assert curve["elbo"] == pytest.approx(np.mean([g.elbo for g in grids]), abs=0.1)


def test_grid_gap_is_the_kl_to_the_true_posterior(trained, grids):
    model, x = trained
    for g in grids:
        assert g.kl_to_posterior >= 0
        assert g.log_px - g.elbo == pytest.approx(g.kl_to_posterior, rel=1e-3, abs=1e-9)
        assert g.elbo == pytest.approx(g.elbo_reference, abs=0.05)  # the grid resolves q
        assert g.posterior_edge_mass < 1e-6 and g.q_grid_mass == pytest.approx(1.0, abs=1e-3)
        assert g.log_density.shape == (150, 150) and np.exp(g.log_density).sum() * g.cell_area == pytest.approx(1.0)
    summary = grid_evidence(model, x[:2], n=150)
    assert set(summary) == {"log_px_grid", "kl_to_posterior_grid", "elbo_grid", "log_px_grid_each", "elbo_grid_each"}
    assert summary["log_px_grid_each"] == pytest.approx([g.log_px for g in grids[:2]], abs=1e-9)
    assert summary["log_px_grid"] == pytest.approx(np.mean([g.log_px for g in grids[:2]]), abs=1e-9)
    assert summary["kl_to_posterior_grid"] == pytest.approx(np.mean([g.kl_to_posterior for g in grids[:2]]), abs=1e-9)


def test_grid_checks_pass_on_a_trained_model_and_fail_on_wrong_numbers(trained, grids):
    """The checks shown to a user can fail: a grid whose log p(x) or ELBO is off by a little fails its check."""
    for g in grids:
        checks = grid_checks(g)
        assert [c.name for c in checks] == ["ELBO", "log p(x)"]
        assert [c.verdict for c in checks] == ["pass", "pass"], [c.why for c in checks]
        assert g.log_px_reference_ess > MIN_ESS and 0 < g.log_px_reference_se < 0.1
        # log p(x) = ELBO + KL holds for any log_px on the grid; the checks do not.
        wrong_px = dataclasses.replace(g, log_px=g.log_px + 0.3, kl_to_posterior=g.kl_to_posterior + 0.3)
        assert [c.verdict for c in grid_checks(wrong_px)] == ["pass", "fail"]
        assert g.elbo_reference_error < 0.005  # on a trained model the tolerance is tight: under 0.015 nats
        wrong_elbo = dataclasses.replace(g, elbo=g.elbo - 3 * ELBO_TOL)
        assert grid_checks(wrong_elbo)[0].verdict == "fail" and "outside the tolerance" in grid_checks(wrong_elbo)[0].why
        starved = dataclasses.replace(g, log_px_reference_ess=MIN_ESS / 2)
        assert grid_checks(starved)[1].verdict == "inconclusive"


def test_a_grid_that_misses_mass_fails_its_check(trained, grids):
    """A real failure, not a perturbed number: a fixed box cutting the posterior in half underestimates log p(x)."""
    model, x = trained
    g = grids[0]
    p = np.exp(g.log_density) * g.cell_area
    mean_z1 = float((p.sum(0) * g.z1).sum())
    cut = posterior_grid(model, x[0], n=150, span=((mean_z1, g.z1[-1]), (g.z2[0], g.z2[-1])))
    assert cut.log_px < g.log_px - 0.3  # about half the mass is outside
    verdicts = {c.name: c.verdict for c in cut.checks()}
    assert verdicts["log p(x)"] == "fail"


def test_reference_can_be_skipped_and_is_seeded(trained):
    model, x = trained
    g = posterior_grid(model, x[1], n=40, reference_samples=0)
    assert math.isnan(g.log_px_reference) and math.isnan(g.elbo_reference) and g.checks() == []
    a = posterior_grid(model, x[1], n=40, reference_samples=3000, seed=3)
    b = posterior_grid(model, x[1], n=40, reference_samples=3000, seed=3)
    c = posterior_grid(model, x[1], n=40, reference_samples=3000, seed=4)
    assert a.log_px_reference == b.log_px_reference != c.log_px_reference
    with pytest.raises(ValueError, match="reference_samples"):
        posterior_grid(model, x[1], n=40, reference_samples=-1)


def test_step_errors_are_paired_by_image(trained):
    """The k chart's error bars: each rise's standard error over images of the paired differences, far below
    the spread of the mean across images that every k shares."""
    model, x = trained
    one = iwae_curve(model, x, ks=(50,), generator=torch.Generator().manual_seed(3))
    d = np.array(one["iwae_each"]) - np.array(one["elbo_each"])
    assert one["iwae_step_se"][0] == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)), rel=1e-9)
    assert np.mean(one["iwae_each"]) == pytest.approx(one["iwae"][0], abs=1e-9)
    curve = iwae_curve(model, x, ks=(1, 10, 100, 1000), generator=torch.Generator().manual_seed(4))
    assert len(curve["iwae_step_se"]) == 4
    assert all(s < se / 3 for s, se in zip(curve["iwae_step_se"][1:], curve["iwae_se"][1:]))


def test_far_below_flags_each_example():
    assert far_below([-80.0, -70.0, -60.0], [-80.5, -75.0, -59.0]) == [1]
    assert far_below([-80.0, -70.0], [-80.5, -70.6], nats=0.4) == [0, 1]


def test_results_are_plain_values(trained):
    model, x = trained
    curve = iwae_curve(model, x[:2], ks=(1, 5))
    assert all(not isinstance(v, torch.Tensor) for v in curve.values())
    g = posterior_grid(model, x[0], n=20, span=3.0)
    assert isinstance(g, PosteriorGrid) and isinstance(g.log_density, np.ndarray)
    assert g.z1[0] > -3 and g.z1[-1] < 3 and len(g.z1) == 20  # a fixed span is honoured
    assert all(isinstance(getattr(g, f), (float, np.ndarray)) for f in g.__dataclass_fields__)
    assert all(not isinstance(v, torch.Tensor) for c in g.checks() for v in dataclasses.asdict(c).values())


def test_grid_refuses_other_latent_sizes_and_bad_arguments():
    model = VAE(ModelConfig(latent_dim=3, hidden_dim=16))
    x = torch.zeros(2, 1, 28, 28)
    with pytest.raises(ValueError, match="2 latent"):
        posterior_grid(model, x[0])
    with pytest.raises(ValueError, match="2 latent"):
        grid_evidence(model, x)
    model2 = VAE(ModelConfig(latent_dim=2, hidden_dim=16))
    with pytest.raises(ValueError, match="one example"):
        posterior_grid(model2, x)
    with pytest.raises(ValueError, match="every k"):
        iwae_curve(model, x, ks=(0, 10))


# ---------------------------------------------------------------- the IWAE bound itself

def test_iwae_curve_reuses_iwae_bound_samples():
    """Same generator, same chunking: iwae_curve's largest-k bound is iwae_bound's, number for number."""
    model = VAE(ModelConfig(latent_dim=2, hidden_dim=32)).eval()
    x = torch.bernoulli(torch.full((5, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    ref = iwae_bound(model, x, 300, generator=torch.Generator().manual_seed(9), max_chunk_elems=40_000)
    curve = iwae_curve(model, x, ks=(300,), generator=torch.Generator().manual_seed(9), max_chunk_elems=40_000)
    assert curve["iwae"][0] == pytest.approx(ref.mean().item(), abs=1e-4)  # float64 vs float32 logsumexp


def test_iwae_bound_chunking_changes_memory_not_the_answer():
    """With B * D a multiple of 16, CPU randn draws chunk by chunk exactly what it draws at once, so
    every chunk size sees the same samples; otherwise the estimates still agree statistically."""
    model = VAE(ModelConfig(latent_dim=2, hidden_dim=32)).eval()
    x = torch.bernoulli(torch.full((8, 1, 28, 28), 0.2), generator=torch.Generator().manual_seed(1))
    runs = [iwae_bound(model, x, 1000, generator=torch.Generator().manual_seed(5), max_chunk_elems=m)
            for m in (8 * 784, 8 * 784 * 37, 2_000_000)]  # 1, 37 and 318 samples per chunk
    for r in runs[1:]:
        torch.testing.assert_close(r, runs[0], atol=1e-4, rtol=0)
    x7 = x[:7]  # 14 numbers per sample: chunk boundaries no longer line up with randn's blocks of 16
    a = iwae_bound(model, x7, 2000, generator=torch.Generator().manual_seed(6), max_chunk_elems=7 * 784 * 3)
    b = iwae_bound(model, x7, 2000, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(a, b) and abs(a.mean() - b.mean()) < 0.1


class TableEncoder(VAE):
    """Example i (its first pixel holds i) has posterior N(mu[i], diag(exp(logvar[i]))), drawn at random."""

    def __init__(self, config: ModelConfig, n: int) -> None:
        super().__init__(config)
        g = torch.Generator().manual_seed(0)
        self.mu_table = torch.randn(n, config.latent_dim, generator=g) * 2
        self.logvar_table = torch.randn(n, config.latent_dim, generator=g)

    def encode(self, x):
        i = x.flatten(1)[:, 0].long()
        return self.mu_table[i], self.logvar_table[i]


def test_kl_per_dimension_matches_torch_distributions():
    model = TableEncoder(ModelConfig(latent_dim=4, hidden_dim=16), n=10)
    x = torch.arange(10.0)[:, None, None, None].expand(10, 1, 28, 28)
    ref = kl_divergence(Normal(model.mu_table, (0.5 * model.logvar_table).exp()), Normal(0.0, 1.0)).mean(0)
    np.testing.assert_allclose(kl_per_dimension(model, x, batch=3), ref.numpy(), rtol=1e-5)  # across batches


# ---------------------------------------------------------------- active units and per-dimension KL

class TemplateEncoder(VAE):
    """mu_0 and mu_2 follow the image; mu_1 is constant; mu_3 moves, but too little to count."""

    def encode(self, x):
        s = x.flatten(1).mean(1, keepdim=True)  # (B, 1) mean brightness, in [0, 1]
        mu = torch.cat([4 * s, torch.full_like(s, 1.5), -3 * s + 1, 0.05 * s], 1)  # (B, 4)
        return mu, torch.tensor([[0.0, -1.0, math.log(0.25), 0.5]]).expand_as(mu)


class MostlyCollapsed(VAE):
    """16 latents as a beta = 8 run left them: 4 carry the image, 12 sit at the prior with means that wobble
    (Var_x(mu) ~ 0.02, above Burda et al.'s 0.01) but carry ~0.01 nats each."""

    def encode(self, x):
        s = x.flatten(1)[:, :16] * 2 - 1  # (B, 16) per-example numbers in [-1, 1]
        mu = torch.cat([3 * s[:, :4], 0.25 * s[:, 4:]], 1)
        logvar = torch.cat([torch.full_like(s[:, :4], -3.0), torch.zeros_like(s[:, 4:])], 1)
        return mu, logvar


def test_active_units_count_only_dimensions_that_carry_information():
    model = TemplateEncoder(ModelConfig(latent_dim=4, hidden_dim=16))
    x = torch.rand(200, 1, 1, 1, generator=torch.Generator().manual_seed(0)).expand(200, 1, 28, 28)
    kl = kl_per_dimension(model, x, batch=64)
    count, mask = active_units(kl)
    # mu_1 = 1.5 with var e^-1 carries nothing about x but sits off the prior: 1.32 nats, so it counts;
    # mu_3 varies by 0.05 with var e^0.5 (KL 0.07 nats): collapsed.
    assert count == 3 and mask.tolist() == [True, True, True, False]
    assert active_units(kl, threshold=1e-3)[0] == 4  # the threshold matters
    with pytest.raises(ValueError):
        active_units(np.zeros((2, 3)))


def test_a_mostly_collapsed_code_is_counted_as_collapsed():
    """The beta = 8 case: the variance rule said 16 of 16 active; the KL rule, which the heatmap draws, says 4."""
    model = MostlyCollapsed(ModelConfig(latent_dim=16, hidden_dim=16))
    x = torch.rand(500, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    mu = encode_means(model, x)
    assert (mu.var(0, ddof=1) > 0.01).all()  # Burda et al.'s rule would count all 16
    kl = kl_per_dimension(model, x)
    assert (kl[4:] < 0.02).all() and (kl[:4] > 1).all()
    assert active_units(kl)[0] == 4


def test_kl_per_dimension_has_the_closed_form_value():
    model = TemplateEncoder(ModelConfig(latent_dim=4, hidden_dim=16))
    x = torch.full((10, 1, 28, 28), 0.5)  # mean brightness 0.5: mu = (2, 1.5, -0.5, 0.025)
    mu = np.array([2.0, 1.5, -0.5, 0.025])
    var = np.array([1.0, math.exp(-1.0), 0.25, math.exp(0.5)])
    expected = 0.5 * (mu**2 + var - 1 - np.log(var))  # Kingma & Welling 2014, app. B
    np.testing.assert_allclose(kl_per_dimension(model, x, batch=3), expected, rtol=1e-5)
