"""log p(x|z) for each likelihood, per example (summed over channels and pixels), in nats.

Every function takes the data x (B, C, H, W) in [0, 1] and the decoder's output of the same shape:
the Bernoulli its logits, the others the mean image (the VAE's sigmoid(logits)). These are true log-densities
(or log-probabilities) of the data as the model sees it: every constant term is included, so the
ELBO and IWAE bounds built on them are bounds on log p(x) itself.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)
LEVELS = 256  # 8-bit pixels: the discretized logistic puts its mass on 256 bins per value
# Likelihoods whose numbers are probabilities of discrete data, so bits per dimension are code lengths.
DISCRETE = ("logistic",)


def bernoulli(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum_i x_i log p_i + (1 - x_i) log(1 - p_i), p = sigmoid(logits); a log-probability when x is 0/1."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def gaussian(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, sigma^2) summed over values; log_sigma a scalar or (C, H, W), broadcast."""
    ll = -0.5 * ((x - mean) / log_sigma.exp()) ** 2 - log_sigma - 0.5 * LOG_2PI
    return ll.flatten(1).sum(1)


def _log_sigmoid_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(a) - sigmoid(b)) for a > b, stable for any a, b.

    sigmoid(a) - sigmoid(b) = e^b (e^(a-b) - 1) / ((1 + e^a)(1 + e^b)), so its log is
    b + log(expm1(a - b)) - softplus(a) - softplus(b), with log(expm1(d)) = d + log1p(-e^-d) for large d.
    """
    d = a - b
    log_expm1 = torch.where(d > 15.0, d + torch.log1p(-torch.exp(-d.clamp(min=15.0))),
                            torch.log(torch.expm1(d.clamp(max=15.0))))
    return b + log_expm1 - F.softplus(a) - F.softplus(b)


def discretized_logistic(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of 8-bit values under a logistic with this mean and scale e^log_scale, binned.

    Value k/255 (k = 0..255) gets the logistic's mass on [k/255 - 1/510, k/255 + 1/510]; the edge bins
    take the tails, so the 256 probabilities sum to 1 (Salimans et al. 2017, PixelCNN++, sec. 2.1).
    x is rounded to the nearest level first: the data must be 8-bit images scaled to [0, 1].
    """
    k = torch.round(x * (LEVELS - 1))
    centre = k / (LEVELS - 1)
    half = 0.5 / (LEVELS - 1)
    inv_s = torch.exp(-log_scale)
    upper = (centre + half - mean) * inv_s  # (B, C, H, W)
    lower = (centre - half - mean) * inv_s
    log_mid = _log_sigmoid_difference(upper, lower)
    log_first = F.logsigmoid(upper)  # k = 0: P(X < 1/510)
    log_last = F.logsigmoid(-lower)  # k = 255: P(X > 1 - 1/510)
    ll = torch.where(k <= 0, log_first, torch.where(k >= LEVELS - 1, log_last, log_mid))
    return ll.flatten(1).sum(1)


def log_px_given_z(likelihood: str, x: torch.Tensor, logits: torch.Tensor, mean: torch.Tensor | None,
                   log_sigma: torch.Tensor) -> torch.Tensor:
    """log p(x|z) per example for the named likelihood (config.LIKELIHOODS), (B,); mean unused by the Bernoulli."""
    if likelihood == "bernoulli":
        return bernoulli(x, logits)
    if likelihood == "logistic":
        return discretized_logistic(x, mean, log_sigma)
    return gaussian(x, mean, log_sigma)  # gaussian-fixed, gaussian-learned (scalar sigma), gaussian-pixel


def bits_per_dim(nats_per_image: float, likelihood: str, dims: int, *, binarized: bool) -> float | None:
    """-log2 p(x) per value, as the literature reports colour models; None where it means nothing.

    Discrete likelihoods (the discretized logistic, the Bernoulli on binarized pixels) give code lengths.
    A Gaussian is a density on [0, 1]: on the 0..255 scale it is 255^D times smaller, so its bits per
    dimension are -log2 p / D + log2 255 (comparable to published numbers only for dequantized data).
    BCE on grey levels is not a log-likelihood: None.
    """
    per_dim = -nats_per_image / (dims * math.log(2))
    if likelihood in DISCRETE or (likelihood == "bernoulli" and binarized):
        return per_dim
    if likelihood.startswith("gaussian"):
        return per_dim + math.log2(LEVELS - 1)
    return None
