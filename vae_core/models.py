"""Encoders, decoders and the VAE that joins them.

Shapes: images x are (B, 1, 28, 28) in [0, 1]; codes z are (B, D).
The MLP is the classic PyTorch example's 784-400-D-400-784 network.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

IMAGE_SHAPE = (1, 28, 28)
N_PIXELS = 28 * 28


class MLPEncoder(nn.Module):
    def __init__(self, *, latent_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(N_PIXELS, hidden_dim)
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_logvar = nn.Linear(hidden_dim, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc1(x.flatten(1)))  # (B, H)
        return self.fc_mu(h), self.fc_logvar(h)


class MLPDecoder(nn.Module):
    def __init__(self, *, latent_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(latent_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, N_PIXELS)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(z))).view(-1, *IMAGE_SHAPE)  # (B, 1, 28, 28) logits


class ConvEncoder(nn.Module):
    def __init__(self, *, latent_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 4, stride=2, padding=1), nn.ReLU(),  # 14x14
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),  # 7x7
        )
        self.fc = nn.Linear(64 * 7 * 7, hidden_dim)
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_logvar = nn.Linear(hidden_dim, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc(self.conv(x).flatten(1)))
        return self.fc_mu(h), self.fc_logvar(h)


class ConvDecoder(nn.Module):
    def __init__(self, *, latent_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 64 * 7 * 7), nn.ReLU())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),  # 14x14
            nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1),  # 28x28
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.fc(z).view(-1, 64, 7, 7))


class VAE(nn.Module):
    """q(z|x) = N(mu, diag(exp(logvar))), p(z) = N(0, I), p(x|z) Bernoulli or Gaussian.

    The decoder emits logits; for the Gaussian likelihoods the mean is sigmoid(logits),
    which keeps means in [0, 1] like the pixels.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        enc, dec = (MLPEncoder, MLPDecoder) if config.arch == "mlp" else (ConvEncoder, ConvDecoder)
        self.encoder = enc(latent_dim=config.latent_dim, hidden_dim=config.hidden_dim)
        self.decoder = dec(latent_dim=config.latent_dim, hidden_dim=config.hidden_dim)
        # log sigma of the Gaussian likelihood: a buffer when fixed, a parameter when learned
        # (the "sigma-VAE" of Rybkin et al. 2021 learns one shared scale).
        log_sigma = torch.tensor(math.log(config.gaussian_sigma))
        if config.likelihood == "gaussian-learned":
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x)
        # Bound logvar so exp() cannot overflow early in training; the bound is far outside
        # anything a trained encoder uses (std from 5e-7 to 3e6).
        return mu, logvar.clamp(-30.0, 30.0)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def mean_image(self, logits: torch.Tensor) -> torch.Tensor:
        """E[x|z] in [0, 1] for either likelihood."""
        return torch.sigmoid(logits)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.mean_image(self.decode_logits(z))

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2014, sec. 2.4)."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * logvar)  # (B, D)


def build_model(config: ModelConfig) -> VAE:
    return VAE(config)
