"""Encoders, decoders and the VAE that joins them.

Shapes: images x are (B, C, H, W) in [0, 1] (C = 1 or 3, H = W = config.image_shape); codes z are (B, D).
The MLP is the classic PyTorch example's 784-400-D-400-784 network at 28x28 grey; the conv net
down-samples to an 8x8 (or smaller) map and back, whatever the size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

IMAGE_SHAPE = (1, 28, 28)  # the built-in sets' shape, and a config's without channels/image_size
N_PIXELS = 28 * 28
CONV_WIDTHS = (32, 64, 128, 256)  # channels after each stride-2 stage (the classic 28x28 net is the first two)
CONV_MAP_MAX = 8  # halve until the feature map is at most 8x8: 28->14->7, 32->16->8, 64->..->8, 128->..->8


def conv_sizes(size: int) -> list[int]:
    """Feature-map sides from the image down: each stride-2 conv (k4, p1) maps s to s // 2."""
    sizes = [size]
    while sizes[-1] > CONV_MAP_MAX and len(sizes) <= len(CONV_WIDTHS):
        sizes.append(sizes[-1] // 2)
    return sizes


class MLPEncoder(nn.Module):
    def __init__(self, *, latent_dim: int, hidden_dim: int, image_shape: tuple[int, int, int] = IMAGE_SHAPE) -> None:
        super().__init__()
        self.fc1 = nn.Linear(math.prod(image_shape), hidden_dim)
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_logvar = nn.Linear(hidden_dim, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc1(x.flatten(1)))  # (B, H)
        return self.fc_mu(h), self.fc_logvar(h)


class MLPDecoder(nn.Module):
    def __init__(self, *, latent_dim: int, hidden_dim: int, image_shape: tuple[int, int, int] = IMAGE_SHAPE) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.fc1 = nn.Linear(latent_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, math.prod(image_shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(z))).view(-1, *self.image_shape)  # (B, C, H, W) logits


class ConvEncoder(nn.Module):
    """Stride-2 convolutions down to a map of at most 8x8, then dense layers (28x28: 14x14, 7x7)."""

    def __init__(self, *, latent_dim: int, hidden_dim: int, image_shape: tuple[int, int, int] = IMAGE_SHAPE) -> None:
        super().__init__()
        c, size = image_shape[0], image_shape[1]
        sizes = conv_sizes(size)
        widths = CONV_WIDTHS[:len(sizes) - 1]
        layers: list[nn.Module] = []
        for c_in, c_out in zip((c, *widths[:-1]), widths):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1] * sizes[-1] ** 2, hidden_dim)
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_logvar = nn.Linear(hidden_dim, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc(self.conv(x).flatten(1)))
        return self.fc_mu(h), self.fc_logvar(h)


class ConvDecoder(nn.Module):
    """The encoder's mirror: dense layers to the smallest map, then stride-2 transposed convolutions back up.

    A transposed conv (k4, s2, p1) maps s to 2s; output_padding 1 restores an odd side (7 from 3).
    """

    def __init__(self, *, latent_dim: int, hidden_dim: int, image_shape: tuple[int, int, int] = IMAGE_SHAPE) -> None:
        super().__init__()
        c, size = image_shape[0], image_shape[1]
        sizes = conv_sizes(size)
        widths = CONV_WIDTHS[:len(sizes) - 1]
        self.map_shape = (widths[-1], sizes[-1], sizes[-1])
        self.fc = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(),
                                nn.Linear(hidden_dim, math.prod(self.map_shape)), nn.ReLU())
        layers: list[nn.Module] = []
        outs = (*reversed(widths[:-1]), c)
        for i, (c_in, c_out) in enumerate(zip(reversed(widths), outs)):
            target, source = sizes[-2 - i], sizes[-1 - i]
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, output_padding=target - 2 * source))
            if i < len(widths) - 1:
                layers.append(nn.ReLU())
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.fc(z).view(-1, *self.map_shape))


class VAE(nn.Module):
    """q(z|x) = N(mu, diag(exp(logvar))), p(z) = N(0, I), p(x|z) Bernoulli or Gaussian.

    The decoder emits logits; for the Gaussian likelihoods the mean is sigmoid(logits),
    which keeps means in [0, 1] like the pixels.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        enc, dec = (MLPEncoder, MLPDecoder) if config.arch == "mlp" else (ConvEncoder, ConvDecoder)
        shape = config.image_shape
        self.encoder = enc(latent_dim=config.latent_dim, hidden_dim=config.hidden_dim, image_shape=shape)
        self.decoder = dec(latent_dim=config.latent_dim, hidden_dim=config.hidden_dim, image_shape=shape)
        # log sigma of the Gaussian likelihood: a buffer when fixed, a parameter when learned
        # (the "sigma-VAE" of Rybkin et al. 2021 learns one shared scale).
        log_sigma = torch.tensor(math.log(config.gaussian_sigma))
        if config.likelihood in ("gaussian-pixel", "logistic"):
            # One learned log-scale per pixel and channel, (C, H, W): the Gaussian's log sigma, or the
            # discretized logistic's log s (a start of sigma = 0.1 is s = 0.055, the same spread).
            start = log_sigma if config.likelihood == "gaussian-pixel" else log_sigma + math.log(math.sqrt(3) / math.pi)
            log_sigma = start.expand(*shape).clone()
        if config.likelihood in ("gaussian-learned", "gaussian-pixel", "logistic"):
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    # Mixed precision (TrainConfig.precision "bf16", set by RunMath): in train mode the encoder and
    # decoder run under autocast in this dtype and hand back float32, so the loss, the KL, the
    # reparameterisation and every evaluation (eval mode) stay float32. None: float32 throughout.
    mixed_dtype: torch.dtype | None = None

    def _mixed(self, x: torch.Tensor) -> bool:
        return self.mixed_dtype is not None and self.training and x.device.type in ("cpu", "cuda")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mixed(x):
            with torch.autocast(x.device.type, dtype=self.mixed_dtype):
                mu, logvar = self.encoder(x)
            mu, logvar = mu.float(), logvar.float()
        else:
            mu, logvar = self.encoder(x)
        # Bound logvar so exp() cannot overflow early in training; the bound is far outside
        # anything a trained encoder uses (std from 5e-7 to 3e6).
        return mu, logvar.clamp(-30.0, 30.0)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        if self._mixed(z):
            with torch.autocast(z.device.type, dtype=self.mixed_dtype):
                logits = self.decoder(z)
            return logits.float()
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
