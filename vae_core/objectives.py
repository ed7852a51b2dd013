"""The VAE objective and the importance-weighted bound, as per-example terms in nats.

Every function returns per-example tensors (summed over pixels and latent dimensions);
the mean over the batch happens in one place, `elbo_loss`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from . import likelihoods
from .models import VAE

LOG_2PI = math.log(2 * math.pi)


def log_px_given_z(model: VAE, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log p(x|z) per example, summed over values. x: (B, C, H, W); logits: same shape (likelihoods.py).

    Bernoulli uses BCE-with-logits, stable for large |logits|. Gaussian: N(x; sigmoid(logits), sigma^2),
    sigma global or per pixel. Logistic: the discretized logistic on 8-bit values.
    """
    lik = model.config.likelihood
    mean = None if lik == "bernoulli" else model.mean_image(logits)
    return likelihoods.log_px_given_z(lik, x, logits, mean, model.log_sigma)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per dimension, (B, D), closed form (Kingma & Welling 2014, app. B)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


@dataclass
class ElboTerms:
    """Per-example terms of one forward pass, in nats."""

    recon: torch.Tensor  # E_q[log p(x|z)], one sample, (B,)
    kl: torch.Tensor  # KL(q(z|x) || p(z)), (B,)
    kl_dims: torch.Tensor  # (B, D)
    mu: torch.Tensor  # (B, D)
    logvar: torch.Tensor  # (B, D)
    logits: torch.Tensor  # (B, 1, 28, 28)

    @property
    def elbo(self) -> torch.Tensor:
        return self.recon - self.kl


def elbo_terms(model: VAE, x: torch.Tensor, generator: torch.Generator | None = None) -> ElboTerms:
    mu, logvar = model.encode(x)
    z = model.reparameterize(mu, logvar, generator)
    logits = model.decode_logits(z)
    kl_dims = kl_per_dim(mu, logvar)
    return ElboTerms(recon=log_px_given_z(model, x, logits), kl=kl_dims.sum(1), kl_dims=kl_dims,
                     mu=mu, logvar=logvar, logits=logits)


def elbo_loss(terms: ElboTerms, *, beta: float, free_bits: float = 0.0) -> torch.Tensor:
    """-(recon - beta * KL), averaged over the batch (Higgins et al. 2017).

    With free bits lambda, each dimension's batch-mean KL is floored at lambda
    (Kingma et al. 2016, eq. 15), so the optimiser gains nothing by pushing it lower.
    """
    recon = terms.recon.mean()
    if free_bits > 0:
        kl = terms.kl_dims.mean(0).clamp(min=free_bits).sum()
    else:
        kl = terms.kl.mean()
    return -(recon - beta * kl)


@torch.no_grad()
def importance_log_weights(model: VAE, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, k: int, *,
                           generator: torch.Generator | None = None,
                           max_chunk_elems: int = 2_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Log weights log p(x, z_i) - log q(z_i|x) and log p(x|z_i), each (k, B), for z_i ~ q(z|x) = N(mu, exp(logvar)).

    The one sampler behind every importance-weighted number (iwae_bound, evidence.iwae_curve).
    Samples are drawn in chunks so memory stays bounded for large k: each chunk decodes at most
    max_chunk_elems pixels.
    """
    B, D = mu.shape
    per_chunk = max(1, max_chunk_elems // (B * x[0].numel()))
    std = torch.exp(0.5 * logvar)  # (B, D)
    log_w, log_lik = [], []
    done = 0
    while done < k:
        n = min(per_chunk, k - done)
        eps = torch.randn((n, B, D), generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + eps * std  # (n, B, D)
        logits = model.decode_logits(z.reshape(n * B, D))
        xr = x.unsqueeze(0).expand(n, *x.shape).reshape(n * B, *x.shape[1:])
        lpx = log_px_given_z(model, xr, logits).view(n, B)
        log_lik.append(lpx)
        log_w.append(lpx + log_standard_normal(z) - log_normal(z, mu, logvar))  # (n, B)
        done += n
    return torch.cat(log_w, 0), torch.cat(log_lik, 0)


def iwae_bound(model: VAE, x: torch.Tensor, k: int, *, generator: torch.Generator | None = None,
               max_chunk_elems: int = 2_000_000) -> torch.Tensor:
    """log p_k(x) = logsumexp_i [log p(x|z_i) + log p(z_i) - log q(z_i|x)] - log k, (B,).

    Burda et al. 2016, eq. 8. k = 1 is the ELBO in expectation; the bound rises with k
    toward log p(x).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    mu, logvar = model.encode(x)  # (B, D)
    log_w, _ = importance_log_weights(model, x, mu, logvar, k, generator=generator, max_chunk_elems=max_chunk_elems)
    return torch.logsumexp(log_w, 0) - math.log(k)
