"""ResNet-18 for small images, structured like torchvision's ``resnet.py``.

He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
(https://arxiv.org/abs/1512.03385): BasicBlocks in four stages of two blocks each, a 1x1
convolution + norm on the shortcut where the shape changes, global average pooling and one linear
layer.

Two stems:

* ``stem="imagenet"``: torchvision's 7x7 stride-2 convolution followed by a 3x3 stride-2 max-pool
  (a 224x224 image reaches layer1 at 56x56). With ``width=64`` the ``state_dict`` has exactly the
  keys and shapes of ``torchvision.models.resnet18()``, so its weights load directly.
* ``stem="cifar"``: a 3x3 stride-1 convolution and no max-pool, the usual choice for 28x28 and
  32x32 images (He et al. section 4.2 use a 3x3 first layer on CIFAR-10), so layer1 sees the full
  resolution. ``maxpool=True`` adds torchvision's 3x3 stride-2 max-pool back as an ablation.

Two layer backends: ``layers="torch"`` uses ``torch.nn`` (its convolutions are
``dllab.layers.TorchConv2d``, a subclass of ``nn.Conv2d`` whose bf16 weight gradients of small
images on the CPU come from one GEMM, where oneDNN is 1.8-4.8x slower, and so do the forward pass
and input gradient of images of 16 pixels or fewer); ``layers="scratch"`` takes every
convolution, max-pool and batch norm from ``dllab.layers`` (same signatures and parameter names as
``torch.nn``, so the ``state_dict`` is the same). The global average pool is a parameter-free mean
(``nn.AdaptiveAvgPool2d``) in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from dllab.layers import BatchNorm2d, Conv2d, MaxPool2d, TorchConv2d

STEMS = ("cifar", "imagenet")
LAYER_BACKENDS = ("torch", "scratch")


@dataclass
class ResNetConfig:
    """Hyper-parameters of a ResNet-18; ``dataclasses.asdict(cfg)`` is saved in checkpoints.

    num_classes: size of the output layer.
    in_channels: image channels (1 for MNIST / Fashion-MNIST, 3 for CIFAR-10 / ImageNet).
    stem: "cifar" (3x3 stride-1 conv) or "imagenet" (7x7 stride-2 conv + 3x3 stride-2 max-pool).
    layers: "torch" (torch.nn) or "scratch" (dllab.layers) convolutions, pools and norms.
    norm: False replaces every BatchNorm2d by nn.Identity and gives the convolutions a bias.
    maxpool: max-pool after the stem; None means the stem's default (imagenet: True, cifar: False).
    width: channels of the first stage; the four stages have width * (1, 2, 4, 8) channels.
    """

    num_classes: int = 10
    in_channels: int = 3
    stem: str = "cifar"
    layers: str = "torch"
    norm: bool = True
    maxpool: bool | None = None
    width: int = 64

    def __post_init__(self):
        for name in ("num_classes", "in_channels", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; expected one of {STEMS}")
        if self.layers not in LAYER_BACKENDS:
            raise ValueError(f"unknown layers {self.layers!r}; expected one of {LAYER_BACKENDS}")
        if not isinstance(self.norm, bool):
            raise ValueError(f"norm must be True or False, got {self.norm!r}")
        if self.maxpool is not None and not isinstance(self.maxpool, bool):
            raise ValueError(f"maxpool must be None, True or False, got {self.maxpool!r}")

    @property
    def use_maxpool(self) -> bool:
        """Whether the stem is followed by a max-pool (``maxpool`` with the default resolved)."""
        return self.stem == "imagenet" if self.maxpool is None else self.maxpool


def layer_classes(layers: str) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    """(Conv2d, MaxPool2d, BatchNorm2d) classes of a layer backend, "torch" or "scratch"."""
    if layers == "torch":  # TorchConv2d: nn.Conv2d with oneDNN's slow bf16 kernels of small images replaced
        return TorchConv2d, nn.MaxPool2d, nn.BatchNorm2d
    if layers == "scratch":
        return Conv2d, MaxPool2d, BatchNorm2d
    raise ValueError(f"unknown layers {layers!r}; expected one of {LAYER_BACKENDS}")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, bias: bool = False,
            conv: Callable[..., nn.Module] = nn.Conv2d) -> nn.Module:
    """3x3 convolution with padding 1 (halves H and W when stride=2)."""
    return conv(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1, bias: bool = False,
            conv: Callable[..., nn.Module] = nn.Conv2d) -> nn.Module:
    """1x1 convolution, used on the shortcut where the number of channels or the stride changes."""
    return conv(in_planes, out_planes, kernel_size=1, stride=stride, bias=bias)


def _no_norm(num_features: int) -> nn.Module:
    """Stand-in for a norm layer when ``norm=False``: passes its input through."""
    return nn.Identity()


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); shortcut is the identity or
    ``downsample`` (1x1 conv + norm) where the stride or the number of channels changes."""

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
        conv_layer: Callable[..., nn.Module] | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        conv_layer = conv_layer or nn.Conv2d
        # Both conv1 and downsample halve H and W when stride=2.
        self.conv1 = conv3x3(inplanes, planes, stride, bias=bias, conv=conv_layer)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, bias=bias, conv=conv_layer)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x                                    # (N, inplanes, H, W)

        out = self.relu(self.bn1(self.conv1(x)))        # (N, planes, H/stride, W/stride)
        out = self.bn2(self.conv2(out))                 # (N, planes, H/stride, W/stride)

        if self.downsample is not None:
            identity = self.downsample(x)               # (N, planes, H/stride, W/stride)

        out = out + identity                            # (N, planes, H/stride, W/stride)
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet-18 built from a :class:`ResNetConfig`.

    With batch norm, initialisation follows torchvision: Kaiming-normal (He et al. 2015,
    "Delving Deep into Rectifiers", https://arxiv.org/abs/1502.01852, fan_out mode) for every
    convolution, batch-norm weight 1 and bias 0, PyTorch's default for the final linear layer.
    ``zero_init_residual=True`` starts the last batch norm of each residual branch at 0, so each
    block starts as the identity (Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training
    ImageNet in 1 Hour", https://arxiv.org/abs/1706.02677).

    ``norm=False`` (the no-batch-norm ablation) puts ``nn.Identity`` where each BatchNorm2d was
    (so the ``bn*`` and ``downsample.1`` keys vanish from the ``state_dict``) and gives every
    convolution a bias (``conv*.bias`` and ``downsample.0.bias`` keys appear); every other key and
    shape is unchanged. With nothing to rescale activations, it also initialises differently:

    * Every residual branch starts at zero: the last convolution (weight and bias) of each
      BasicBlock is zero, so each block starts as the identity and the network starts as the
      shallow chain stem -> shortcut 1x1 convolutions -> linear, whose branches then grow. This is
      the zero-branch rule of Fixup (Zhang, Dauphin & Ma 2019, "Fixup Initialization: Residual
      Learning Without Normalization", https://arxiv.org/abs/1901.09321) and of SkipInit (De &
      Smith 2020, https://arxiv.org/abs/2002.10444), without Fixup's extra scalar multipliers and
      biases, so the parameters are still only convolutions and the linear layer.
    * Convolutions use Kaiming fan_in rather than fan_out, which keeps the forward activation
      variance (fan_out from a 1- or 3-channel input shrinks it by about sqrt(2 * C_in / width) at
      the stem alone).

    Measured on 1,024 MNIST digits, width 16, SGD momentum 0.9, batch 64: fan_in with zero
    branches reached 0.63 training loss after 5 epochs at lr 0.05; fan_out with zero branches was
    still at 2.16, and fan_in without zero branches started at loss 6.3 and diverged to NaN at
    lr 0.1. Without batch norm, use a smaller learning rate than with it: on 16 fixed images
    (width 8, momentum 0.9) the loss fell smoothly at lr 0.01 but spiked after 9 steps at lr 0.05.
    """

    def __init__(self, config: ResNetConfig, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.config = config
        conv_layer, pool_layer, bn_layer = layer_classes(config.layers)
        norm_layer = bn_layer if config.norm else _no_norm
        bias = not config.norm
        self._conv_layer, self._norm_layer, self._bias = conv_layer, norm_layer, bias

        w = config.width
        self.inplanes = w
        if config.stem == "imagenet":
            self.conv1 = conv_layer(config.in_channels, w, kernel_size=7, stride=2, padding=3,
                                    bias=bias)
        else:
            self.conv1 = conv3x3(config.in_channels, w, bias=bias, conv=conv_layer)
        self.bn1 = norm_layer(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (pool_layer(kernel_size=3, stride=2, padding=1) if config.use_maxpool
                        else nn.Identity())
        self.layer1 = self._make_layer(w, 2)
        self.layer2 = self._make_layer(2 * w, 2, stride=2)
        self.layer3 = self._make_layer(4 * w, 2, stride=2)
        self.layer4 = self._make_layer(8 * w, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * w * BasicBlock.expansion, config.num_classes)

        conv_types = tuple({nn.Conv2d, conv_layer})
        norm_types = tuple({nn.BatchNorm2d, bn_layer})
        # fan_out as in torchvision; without batch norm nothing rescales the activations, so use
        # fan_in, which keeps their variance (He et al. 2015, eq. 10) -- see the class docstring.
        mode = "fan_out" if config.norm else "fan_in"
        for m in self.modules():
            if isinstance(m, conv_types):
                nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, norm_types):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        for m in self.modules():
            if isinstance(m, BasicBlock):
                if not config.norm:
                    nn.init.zeros_(m.conv2.weight)
                    nn.init.zeros_(m.conv2.bias)
                elif zero_init_residual:
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        """One stage: ``blocks`` BasicBlocks, the first one with ``stride`` and a shortcut conv."""
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * BasicBlock.expansion, stride, bias=self._bias,
                        conv=self._conv_layer),
                self._norm_layer(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, self._norm_layer,
                             self._conv_layer, self._bias)]
        self.inplanes = planes * BasicBlock.expansion
        for _ in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes, norm_layer=self._norm_layer,
                                     conv_layer=self._conv_layer, bias=self._bias))
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features, (N, 8 * width), for embeddings and linear probes."""
        # x: (N, C_in, H, W); the shapes below are for the cifar stem without max-pool.
        # The imagenet stem's conv halves H and W; the max-pool (if any) halves them again.
        x = self.relu(self.bn1(self.conv1(x)))  # (N, w, H, W)
        x = self.maxpool(x)                     # (N, w, H, W) or (N, w, H/2, W/2) with max-pool
        x = self.layer1(x)                      # (N, w, H, W)
        x = self.layer2(x)                      # (N, 2w, H/2, W/2)
        x = self.layer3(x)                      # (N, 4w, H/4, W/4)
        x = self.layer4(x)                      # (N, 8w, H/8, W/8)  (rounded up at each stride)
        x = self.avgpool(x)                     # (N, 8w, 1, 1)
        return torch.flatten(x, 1)              # (N, 8w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input of shape (N, {self.config.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        return self.fc(self.features(x))        # (N, num_classes)


def resnet18(zero_init_residual: bool = False, **kwargs) -> ResNet:
    """ResNet-18: ``resnet18(num_classes=10, in_channels=3, stem="cifar", layers="torch",
    norm=True, maxpool=None, width=64)``; the keyword arguments are :class:`ResNetConfig`'s.

    ``resnet18(stem="imagenet", num_classes=1000)`` has torchvision's ``resnet18()``
    ``state_dict`` (11,689,512 parameters); the default CIFAR version has 11,173,962.
    """
    return ResNet(ResNetConfig(**kwargs), zero_init_residual=zero_init_residual)


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (elements, not tensors)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
