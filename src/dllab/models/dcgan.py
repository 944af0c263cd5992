"""DCGAN: the deep convolutional GAN of Radford, Metz & Chintala (2016), "Unsupervised
Representation Learning with Deep Convolutional Generative Adversarial Networks".

The architecture guidelines of the paper (sec. 3): no pooling, strided convolutions in the
discriminator and fractionally strided (transposed) convolutions in the generator; batch norm in
both networks (except the generator output and the discriminator input layers); ReLU in the
generator with Tanh on the output; LeakyReLU(0.2) in the discriminator; weights drawn from
N(0, 0.02) (sec. 4). Batch norm is switchable in each network: the paper found it "critical to
get deep generators to begin learning, preventing the generator from collapsing all samples to a
single point" (sec. 3), so ``g_norm=False`` is the mode-collapse ablation; ``spectral_norm=True``
wraps every discriminator convolution in spectral normalisation (Miyato et al. 2018).

Images are in [-1, 1] (the data loader's "tanh" scale), (N, C, S, S) with S in {28, 32, 64}.
The discriminator returns raw logits (N,); the losses in ``dllab.losses.gan`` apply the sigmoid.

Sizes. Both networks are a stack of 4x4, stride-2 (transposed) convolutions that double (halve)
the side, on top of a "base" resolution b that a single convolution maps to/from 1x1:

    image_size  base b  stride-2 stages  G widths (base -> image)     D widths (image -> base)
    64          4       4                ngf*8, ngf*4, ngf*2, ngf, C  C, ndf, ndf*2, ndf*4, ndf*8
    32          4       3                ngf*4, ngf*2, ngf, C         C, ndf, ndf*2, ndf*4
    28          7       2                ngf*2, ngf, C                C, ndf, ndf*2

64 is exactly the network of the paper and of pytorch/examples ``dcgan/main.py``. 28 = 7 * 2^2
is not a power of two, so for MNIST-sized images the generator projects z to a 7x7 map with a
7x7 transposed convolution (on a 1x1 input that is exactly the paper's "project and reshape"
fully connected layer) and upsamples 7 -> 14 -> 28; the discriminator mirrors it, 28 -> 14 -> 7,
and reads the logit with a 7x7 convolution over the whole map. Nothing is generated at 32 and
cropped, and no 28x28 input is padded, so real and fake images pass through the same pixels.

This file holds only the models (the weight average of G is the engine's `EMA`); the losses
are in ``dllab.losses.gan``, the metrics in ``dllab.metrics.gan``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

IMAGE_SIZES = (28, 32, 64)
CHANNELS = (1, 3)
BASE_SIZE = {28: 7, 32: 4, 64: 4}  # the first map of G / last map of D


@dataclass
class DCGANConfig:
    """Hyper-parameters of a DCGAN (generator and discriminator); ``asdict`` goes into checkpoints.

    nz: length of the noise vector z ~ N(0, I).
    g_width: ngf, channels of the generator's last hidden map (earlier maps double it per stage).
    d_width: ndf, channels of the discriminator's first map (later maps double it per stage).
    image_size: 28, 32 or 64 (see the module docstring for the layers each one gets).
    channels: 1 (grey) or 3 (RGB).
    g_norm, d_norm: batch norm in the generator / discriminator hidden layers (Radford et al. use
        both; ``g_norm=False`` is the mode-collapse ablation).
    spectral_norm: wrap every discriminator convolution in spectral normalisation (Miyato et al.
        2018, "Spectral Normalization for Generative Adversarial Networks"); usually with
        ``d_norm=False`` and the hinge loss, but the switches are independent.
    leaky_slope: negative slope of the discriminator's LeakyReLU (0.2 in the paper).
    init_std: std of the N(0, init_std) initialisation of conv weights (0.02 in the paper); batch
        norm weights are drawn from N(1, init_std) and every bias starts at 0.
    minibatch_std: give the discriminator's last layer one more feature map, the standard
        deviation of its features across groups of 4 images (:class:`MinibatchStd`), so that D
        sees how varied a batch is and G gains from varying its samples.
    pack: PacGAN (Lin et al. 2018, "PacGAN: The power of two samples in generative adversarial
        networks"): D judges packs of ``pack`` images of the same kind, stacked as channels, and
        gives one logit per pack; a generator that drops modes makes packs that are easier to
        tell from real ones. The batch size must be a multiple of it. 1: plain DCGAN.
    """

    nz: int = 100
    g_width: int = 64
    d_width: int = 64
    image_size: int = 28
    channels: int = 1
    g_norm: bool = True
    d_norm: bool = True
    spectral_norm: bool = False
    leaky_slope: float = 0.2
    init_std: float = 0.02
    minibatch_std: bool = False
    pack: int = 1

    def __post_init__(self):
        for name in ("nz", "g_width", "d_width", "pack"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.image_size not in IMAGE_SIZES:
            raise ValueError(f"image_size={self.image_size!r} is not supported; "
                             f"expected one of {IMAGE_SIZES}")
        if self.channels not in CHANNELS:
            raise ValueError(f"channels={self.channels!r} is not supported; "
                             f"expected one of {CHANNELS}")
        for name in ("g_norm", "d_norm", "spectral_norm", "minibatch_std"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
        if not (isinstance(self.leaky_slope, (int, float)) and 0.0 <= self.leaky_slope < 1.0):
            raise ValueError(f"leaky_slope={self.leaky_slope!r} must be in [0, 1)")
        if not (isinstance(self.init_std, (int, float)) and self.init_std > 0
                and math.isfinite(self.init_std)):
            raise ValueError(f"init_std={self.init_std!r} must be a positive finite number")

    @property
    def base_size(self) -> int:
        """Side of the generator's first (and the discriminator's last) feature map."""
        return BASE_SIZE[self.image_size]

    @property
    def num_stages(self) -> int:
        """Number of stride-2 stages: image_size = base_size * 2 ** num_stages."""
        return int(round(math.log2(self.image_size // self.base_size)))


class ParamBudgetError(ValueError):
    """The model has more parameters than the allowed budget (raised before any training)."""


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """DCGAN initialisation: conv weights ~ N(0, std) (Radford et al. 2016, sec. 4); batch-norm
    weights ~ N(1, std) and all biases 0 (pytorch/examples ``dcgan/main.py`` ``weights_init``).
    Use with ``model.apply``."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, std)
        nn.init.zeros_(module.bias)


def up_block(in_ch: int, out_ch: int, norm: bool, kernel_size: int = 4, stride: int = 2,
             padding: int = 1) -> nn.Sequential:
    """Transposed conv (doubles the side by default) + optional BatchNorm + ReLU."""
    layers = [nn.ConvTranspose2d(in_ch, out_ch, kernel_size, stride, padding, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def down_block(in_ch: int, out_ch: int, norm: bool, slope: float) -> nn.Sequential:
    """4x4 stride-2 conv (halves the side) + optional BatchNorm + LeakyReLU(slope)."""
    layers = [nn.Conv2d(in_ch, out_ch, 4, 2, 1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.LeakyReLU(slope, inplace=True))
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """z (N, nz) or (N, nz, 1, 1) -> image (N, C, S, S) in [-1, 1].

    For image_size=64, ngf=64 (the paper's network), shapes are
    (N, nz, 1, 1) -> (N, ngf*8, 4, 4) -> (N, ngf*4, 8, 8) -> (N, ngf*2, 16, 16) -> (N, ngf, 32, 32)
    -> (N, C, 64, 64); for 28: (N, nz, 1, 1) -> (N, ngf*2, 7, 7) -> (N, ngf, 14, 14)
    -> (N, C, 28, 28).
    """

    def __init__(self, config: DCGANConfig):
        super().__init__()
        self.config = config
        c, n, b = config, config.num_stages, config.base_size
        widths = [c.g_width * 2 ** (n - 1 - i) for i in range(n)]  # e.g. 64: ngf*8, *4, *2, *1
        # "project and reshape": a b x b transposed conv on the 1x1 noise map
        self.project = up_block(c.nz, widths[0], c.g_norm, kernel_size=b, stride=1, padding=0)
        self.blocks = nn.Sequential(*[up_block(widths[i], widths[i + 1], c.g_norm)
                                      for i in range(n - 1)])
        # no batch norm on the output layer (Radford et al. sec. 3)
        self.to_image = nn.ConvTranspose2d(widths[-1], c.channels, 4, 2, 1, bias=True)
        self.apply(lambda m: init_weights(m, c.init_std))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = self.config
        if z.shape[1:] not in ((c.nz,), (c.nz, 1, 1)):
            raise ValueError(f"z has shape {tuple(z.shape)}; "
                             f"expected (N, {c.nz}) or (N, {c.nz}, 1, 1)")
        z = z.reshape(z.shape[0], c.nz, 1, 1)  # (N, nz, 1, 1)
        x = self.project(z)      # (N, ngf * 2^(n-1), b, b): b=7 for 28, 4 for 32/64
        x = self.blocks(x)       # (N, ngf, S/2, S/2): each block doubles the side, halves the width
        x = self.to_image(x)     # (N, C, S, S)
        return torch.tanh(x)

    def sample_noise(self, n: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
        """n noise vectors z ~ N(0, I), (n, nz), drawn on ``generator``'s device and moved to
        ``device`` (default: the model's), so a seeded CPU generator gives the same z everywhere."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} must be a positive integer")
        device = device if device is not None else next(self.parameters()).device
        gen_device = generator.device if generator is not None else device
        return torch.randn(n, self.config.nz, generator=generator, device=gen_device).to(device)


class MinibatchStd(nn.Module):
    """Minibatch standard deviation (Karras et al. 2018, "Progressive Growing of GANs", sec. 3):
    (N, C, H, W) -> (N, C + 1, H, W), the extra map being, for each image, the standard deviation
    of every feature over its group of ``group`` images, averaged over features and pixels. A
    collapsed generator gives batches of near-identical images, whose low spread D can then spot.
    Images are grouped with a stride (image i with i + N/G, i + 2N/G, ...); the group is the
    largest size up to ``group`` that divides N.
    """

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        g = next(k for k in range(min(self.group, n), 0, -1) if n % k == 0)
        y = x.float().reshape(g, n // g, *x.shape[1:])                # (G, N/G, C, H, W)
        centred = y - y.mean(0)  # the variance by hand: Tensor.var(0)'s backward is 8x slower on a CPU
        std = (centred.square().mean(0) + 1e-8).sqrt().mean((1, 2, 3))  # (N/G,)
        std = std.to(x.dtype).repeat(g).reshape(n, 1, 1, 1).expand(n, 1, h, w)
        return torch.cat([x, std], 1)


class Discriminator(nn.Module):
    """image (N, C, S, S) in [-1, 1] -> logits (N,) (real > 0 > fake).

    For image_size=64, ndf=64 (the paper's network), shapes are
    (N, C, 64, 64) -> (N, ndf, 32, 32) -> (N, ndf*2, 16, 16) -> (N, ndf*4, 8, 8) -> (N, ndf*8, 4, 4)
    -> (N, 1, 1, 1); for 28: (N, C, 28, 28) -> (N, ndf, 14, 14) -> (N, ndf*2, 7, 7) -> (N, 1, 1, 1).
    The first layer has no batch norm (Radford et al. sec. 3).
    """

    def __init__(self, config: DCGANConfig):
        super().__init__()
        self.config = config
        c, n, b = config, config.num_stages, config.base_size
        widths = [c.d_width * 2 ** i for i in range(n)]  # e.g. 64: ndf, ndf*2, ndf*4, ndf*8
        blocks = [down_block(c.channels * c.pack, widths[0], norm=False, slope=c.leaky_slope)]
        blocks += [down_block(widths[i], widths[i + 1], c.d_norm, c.leaky_slope)
                   for i in range(n - 1)]
        self.blocks = nn.Sequential(*blocks)
        self.minibatch_std = MinibatchStd() if c.minibatch_std else nn.Identity()
        # the logit: one b x b convolution over the whole last map
        self.to_logit = nn.Conv2d(widths[-1] + int(c.minibatch_std), 1, b, 1, 0, bias=True)
        self.apply(lambda m: init_weights(m, c.init_std))
        if c.spectral_norm:
            for module in list(self.modules()):
                if isinstance(module, nn.Conv2d):
                    nn.utils.parametrizations.spectral_norm(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.dim() != 4 or x.shape[1:] != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"images have shape {tuple(x.shape)}; expected "
                             f"(N, {c.channels}, {c.image_size}, {c.image_size})")
        if c.pack > 1:  # PacGAN: images i*pack .. i*pack + pack - 1 become pack i's channels
            if x.shape[0] % c.pack:
                raise ValueError(f"a batch of {x.shape[0]} images does not split into packs of {c.pack}")
            x = x.reshape(x.shape[0] // c.pack, c.pack * c.channels, *x.shape[2:])
        x = self.blocks(x)       # (N, ndf * 2^(n-1), b, b): each block halves the side
        x = self.minibatch_std(x)  # (+1 channel with --minibatch-std)
        x = self.to_logit(x)     # (N, 1, 1, 1)
        return x.flatten()       # (N,), or (N / pack,)


class DCGAN(nn.Module):
    """Both networks in one module (``.generator``, ``.discriminator``), so a single state dict
    and ``DCGAN(DCGANConfig(**ckpt["config"]["model"]))`` rebuild the pair."""

    def __init__(self, config: DCGANConfig):
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Generate images from noise (the discriminator is called explicitly by the trainer)."""
        return self.generator(z)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``module`` (each shared tensor counted once). Spectral
    norm's u, v vectors are buffers, so they are not counted."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def param_counts(config: DCGANConfig) -> dict[str, int]:
    """{"generator", "discriminator", "total"} parameter counts of ``config``, computed on the
    meta device (no memory is allocated, so an oversized config is cheap to check)."""
    # spectral norm adds no parameters and its power iteration cannot run on meta tensors
    cfg = dataclasses.replace(config, spectral_norm=False)
    with torch.device("meta"):
        g, d = count_params(Generator(cfg)), count_params(Discriminator(cfg))
    return {"generator": g, "discriminator": d, "total": g + d}


def check_budget(config: DCGANConfig, max_params: int | None) -> dict[str, int]:
    """Raise ``ParamBudgetError`` (a ValueError) if G + D have more than ``max_params`` parameters.

    Call it before building optimisers or touching data; the message is one line with the
    counted and allowed numbers. Returns the counts (see ``param_counts``) when within budget;
    ``max_params=None`` only counts.
    """
    counts = param_counts(config)
    if max_params is None:
        return counts
    if isinstance(max_params, bool) or not isinstance(max_params, int) or max_params < 1:
        raise ValueError(f"max_params={max_params!r} must be a positive integer or None")
    if counts["total"] > max_params:
        raise ParamBudgetError(
            f"DCGAN has {counts['total']} parameters (generator {counts['generator']} + "
            f"discriminator {counts['discriminator']}), more than max_params={max_params}; "
            f"reduce g_width={config.g_width} / d_width={config.d_width} or nz={config.nz}")
    return counts
