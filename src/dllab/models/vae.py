"""Variational autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes").

A Gaussian encoder q(z|x) = N(mu(x), diag(exp(logvar(x)))), a standard normal prior p(z) = N(0, I)
and a decoder p(x|z) that is either a per-pixel Bernoulli (logits) or a per-pixel Gaussian (mean in
[0, 1] and a learned per-pixel or fixed scale). Encoder and decoder are convolutional ("conv") or
fully connected ("mlp"). Inputs are images in [0, 1] (the data loader's "unit" scale), (B, C, H, W).

This file holds only the model; the negative ELBO is in ``dllab.losses.vae`` and the metrics
(ELBO, IWAE log-likelihood, active units, k-NN) in ``dllab.metrics.vae``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("conv", "mlp")
LIKELIHOODS = ("bernoulli", "gaussian")
GAUSSIAN_VARIANCES = ("learned", "fixed")
BINARIZE = ("none", "dynamic")
DEFAULT_WIDTHS = {"conv": (32, 64), "mlp": (512, 256)}


@dataclass
class VAEConfig:
    """Hyper-parameters of a VAE; ``dataclasses.asdict`` of it goes into every checkpoint.

    widths: conv: output channels of each stride-2 stage (each halves the image side, so
        ``image_size`` must be divisible by ``2 ** len(widths)``); mlp: hidden layer sizes.
        None picks (32, 64) for conv and (512, 256) for mlp.
    fc_dim: conv only: width of the fully connected layer between the conv stack and the latent.
    gaussian_variance: "learned" (the decoder outputs a per-pixel log-scale, floored softly at
        ``log(gaussian_sigma_min)``) or "fixed" (sigma = ``gaussian_sigma`` for every pixel).
    beta, kl_warmup_steps, free_bits (nats per latent dim), binarize: read by the loss and the
        trainer, not by the network; kept here so a checkpoint describes the whole objective.
    """

    latent_dim: int = 16
    in_channels: int = 1
    image_size: int = 28
    arch: str = "conv"
    widths: tuple[int, ...] | None = None
    fc_dim: int = 256
    likelihood: str = "bernoulli"
    gaussian_variance: str = "learned"
    gaussian_sigma: float = 0.1
    gaussian_sigma_min: float = 0.01
    beta: float = 1.0
    kl_warmup_steps: int = 0
    free_bits: float = 0.0
    binarize: str = "none"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}; "
                             f"expected one of {LIKELIHOODS}")
        if self.gaussian_variance not in GAUSSIAN_VARIANCES:
            raise ValueError(f"unknown gaussian_variance {self.gaussian_variance!r}; "
                             f"expected one of {GAUSSIAN_VARIANCES}")
        if self.binarize not in BINARIZE:
            raise ValueError(f"unknown binarize {self.binarize!r}; expected one of {BINARIZE}")
        if self.binarize == "dynamic" and self.likelihood != "bernoulli":
            raise ValueError(f"binarize='dynamic' needs likelihood='bernoulli', "
                             f"got likelihood={self.likelihood!r}")
        for name in ("latent_dim", "in_channels", "image_size", "fc_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.widths is None:
            self.widths = DEFAULT_WIDTHS[self.arch]
        self.widths = tuple(self.widths)  # a JSON round trip turns the tuple into a list
        if not self.widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1
                                  for w in self.widths):
            raise ValueError(f"widths={self.widths!r} must be a non-empty tuple of positive ints")
        if self.arch == "conv" and self.image_size % (2 ** len(self.widths)) != 0:
            raise ValueError(f"image_size={self.image_size} is not divisible by "
                             f"2**len(widths)={2 ** len(self.widths)} (widths={self.widths}); "
                             f"use fewer conv stages")
        for name in ("gaussian_sigma", "gaussian_sigma_min"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive finite number")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta)
                and self.beta >= 0):
            raise ValueError(f"beta={self.beta!r} must be a finite number >= 0")
        if not (isinstance(self.free_bits, (int, float)) and math.isfinite(self.free_bits)
                and self.free_bits >= 0):
            raise ValueError(f"free_bits={self.free_bits!r} must be a finite number >= 0")
        if (isinstance(self.kl_warmup_steps, bool) or not isinstance(self.kl_warmup_steps, int)
                or self.kl_warmup_steps < 0):
            raise ValueError(f"kl_warmup_steps={self.kl_warmup_steps!r} must be an integer >= 0")

    @property
    def num_pixels(self) -> int:
        """D = C * H * W, the number of dimensions per image (for bits per dimension)."""
        return self.in_channels * self.image_size * self.image_size

    @property
    def decoder_channels(self) -> int:
        """Channels the decoder emits: C (logits or mean), 2C with a learned Gaussian log-scale."""
        learned = self.likelihood == "gaussian" and self.gaussian_variance == "learned"
        return self.in_channels * (2 if learned else 1)


def randn(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Standard normal noise on ``device``, drawn on the generator's own device (CPU or GPU)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def down(in_ch: int, out_ch: int) -> nn.Sequential:
    """4x4 stride-2 conv + ReLU: halves the image side."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1), nn.ReLU(inplace=True))


def up(in_ch: int, out_ch: int, act: bool = True) -> nn.Sequential:
    """4x4 stride-2 transposed conv (+ ReLU): doubles the image side."""
    layers = [nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Gaussian-latent VAE with a Bernoulli or Gaussian decoder; see ``VAEConfig``."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c, s, L = config.in_channels, config.image_size, config.latent_dim
        widths = list(config.widths)
        if config.arch == "conv":
            self.side = s // 2 ** len(widths)  # spatial side after the conv stack
            flat = widths[-1] * self.side * self.side
            self.encoder = nn.Sequential(
                *[down(a, b) for a, b in zip([c] + widths[:-1], widths)],
                nn.Flatten(),
                nn.Linear(flat, config.fc_dim), nn.ReLU(inplace=True),
                nn.Linear(config.fc_dim, 2 * L),
            )
            rev = widths[::-1]
            self.decoder_fc = nn.Sequential(
                nn.Linear(L, config.fc_dim), nn.ReLU(inplace=True),
                nn.Linear(config.fc_dim, flat), nn.ReLU(inplace=True),
            )
            self.decoder_conv = nn.Sequential(
                *[up(a, b) for a, b in zip(rev[:-1], rev[1:])],
                up(rev[-1], config.decoder_channels, act=False),
            )
        else:
            d = config.num_pixels
            self.encoder = nn.Sequential(nn.Flatten(), mlp([d] + widths + [2 * L]))
            self.decoder_fc = mlp([L] + widths[::-1] + [d * config.decoder_channels // c])
            self.decoder_conv = None
        if config.likelihood == "gaussian" and config.gaussian_variance == "fixed":
            self.register_buffer("fixed_log_scale",
                                 torch.tensor(math.log(config.gaussian_sigma)), persistent=False)

    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        want = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected input of shape (B, {want[0]}, {want[1]}, {want[2]}), "
                             f"got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x): (B, C, H, W) images in [0, 1] -> mean and log-variance, each (B, L)."""
        self._check_input(x)
        h = self.encoder(x)  # (B, 2L)
        mu, logvar = h.chunk(2, dim=1)  # (B, L), (B, L)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """p(x|z): (B, L) latents -> (loc, log_scale), each (B, C, H, W).

        Bernoulli: loc holds the logits and log_scale is None. Gaussian: loc is the mean, squashed
        into [0, 1] by a sigmoid, and log_scale the log standard deviation (learned per pixel, with
        a soft floor at log(gaussian_sigma_min), or the fixed log(gaussian_sigma) broadcast).
        """
        cfg = self.config
        B = z.shape[0]
        h = self.decoder_fc(z)
        if self.decoder_conv is not None:
            h = h.view(B, cfg.widths[-1], self.side, self.side)  # (B, w_last, s', s')
            h = self.decoder_conv(h)  # (B, C or 2C, H, W)
        else:
            s = cfg.image_size
            h = h.view(B, cfg.decoder_channels, s, s)  # (B, C or 2C, H, W)
        if cfg.likelihood == "bernoulli":
            return h, None
        if cfg.gaussian_variance == "learned":
            mean_raw, scale_raw = h.chunk(2, dim=1)  # (B, C, H, W) each
            log_min = math.log(cfg.gaussian_sigma_min)
            # smooth max(scale_raw, log_min): ~0 (sigma ~ 1) at initialisation, never below floor
            log_scale = log_min + F.softplus(scale_raw - log_min)
        else:
            mean_raw = h
            log_scale = self.fixed_log_scale.expand_as(mean_raw)
        return torch.sigmoid(mean_raw), log_scale

    def mean_image(self, loc: torch.Tensor) -> torch.Tensor:
        """The decoder's mean E[x|z] in [0, 1] from ``decode``'s loc (sigmoid of the logits)."""
        if self.config.likelihood == "bernoulli":
            return torch.sigmoid(loc)
        return loc.clamp(0, 1)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) (Kingma & Welling 2014, sec. 2.4)."""
        eps = randn(mu.shape, generator, mu.device, mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """One pass for the loss: {"mu", "logvar", "z": (B, L); "loc", "log_scale": ``decode``}."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, generator)  # (B, L)
        loc, log_scale = self.decode(z)
        return {"mu": mu, "logvar": logvar, "z": z, "loc": loc, "log_scale": log_scale}

    def log_px_given_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels, (B,), for x (B, C, H, W) and z (B, L).

        Bernoulli: minus binary cross-entropy with logits (a proper log-probability only for binary
        x). Gaussian: the exact log-density, in nats per image (not comparable to Bernoulli nats).
        """
        loc, log_scale = self.decode(z)
        loc, x = loc.float(), x.float()
        if log_scale is None:
            return -F.binary_cross_entropy_with_logits(loc, x, reduction="none").flatten(1).sum(1)
        log_scale = log_scale.float()
        log_density = (-0.5 * math.log(2 * math.pi) - log_scale
                       - 0.5 * ((x - loc) * torch.exp(-log_scale)) ** 2)
        return log_density.flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """n images from the prior with its std scaled by ``temperature``: z ~ N(0, T^2 I).

        Returns the decoder's mean images (n, C, H, W) in [0, 1]: Bernoulli probabilities and
        Gaussian means, not noisy pixel draws (which for Bernoulli would be salt-and-pepper).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} must be a positive integer")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature={temperature!r} must be a finite number >= 0")
        p = next(self.parameters())
        z = randn((n, self.config.latent_dim), generator, p.device, p.dtype) * temperature  # (n, L)
        loc, _ = self.decode(z)
        return self.mean_image(loc)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean: x (B, C, H, W) in [0, 1] -> mean images, (B, C, H, W).

        Uses z = mu(x), not a sample, so a reconstruction grid does not flicker between calls.
        """
        mu, _ = self.encode(x)
        loc, _ = self.decode(mu)
        return self.mean_image(loc)
