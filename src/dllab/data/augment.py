"""Batch augmentation: the :class:`Augment` recipe (zero-pad, random crop back, maybe a horizontal
flip) that each dataset names as its default, and :func:`crop_flip`, which applies given crop
offsets and flips to a whole (B, C, H, W) batch with one ``gather``, on any device. The random
draws themselves are made by the batch loader (:mod:`dllab.data.loader`), so that they follow the
loader's seed, epoch and sharding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["NO_AUGMENT", "Augment", "crop_flip"]


@dataclass(frozen=True)
class Augment:
    """Batch augmentation: zero-pad by ``pad`` pixels, crop back at a random offset, maybe flip.

    ``Augment(pad=4, flip=True)`` is the CIFAR-10 recipe of He et al., "Deep Residual Learning for
    Image Recognition" (CVPR 2016), Sec. 4.2. Digits get ``Augment(pad=2)``: a mirrored digit is
    not the same digit, so no flips. Clothes get ``Augment(pad=2, flip=True)``: a mirrored shirt or
    shoe is still a shirt or shoe, and flips are the usual Fashion-MNIST augmentation (they also
    make test-time flip averaging, ``--tta``, meaningful).
    """

    pad: int = 0
    flip: bool = False

    def __post_init__(self):
        if not isinstance(self.pad, int) or self.pad < 0:
            raise ValueError(f"Augment pad must be an int >= 0, got {self.pad!r}")

    def __bool__(self) -> bool:
        return self.pad > 0 or self.flip


NO_AUGMENT = Augment()


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              pad: int) -> torch.Tensor:
    """Zero-pad a batch by ``pad`` and crop each image back to (H, W) at its own offset.

    ``top``/``left`` (B,) are offsets in [0, 2*pad] into the padded image; ``flip`` (B,) bool
    mirrors an image left-right. Same result as torchvision's ``RandomCrop(H, padding=pad)``
    followed by ``RandomHorizontalFlip`` with those draws, done for the whole batch with one
    ``gather`` (no Python loop per image). Works on any dtype; ``x`` is (B, C, H, W).
    """
    b, c, h, w = x.shape
    if not (len(top) == len(left) == len(flip) == b):
        raise ValueError(f"crop_flip: {b} images but {len(top)}/{len(left)}/{len(flip)} draws")
    if x.device.type == "cpu" and b and (int(top.min()) < 0 or int(top.max()) > 2 * pad
                                         or int(left.min()) < 0 or int(left.max()) > 2 * pad):
        raise ValueError(f"crop_flip: offsets must lie in [0, {2 * pad}] for pad={pad}")
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p), zeros around
    hp, wp = h + 2 * pad, w + 2 * pad
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = top[:, None] + ar_h  # (B, H)
    cols = torch.where(flip[:, None], left[:, None] + ar_w.flip(0), left[:, None] + ar_w)  # (B, W)
    idx = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, hp * wp).gather(2, idx).view(b, c, h, w)
