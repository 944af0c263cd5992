"""Writers of small datasets in the real on-disk formats, for tests (import from tests: `import fakedata`).

Every image carries its identity so tests can check that images and labels stay paired: in
channel 0, pixel (0, 0) holds the label and pixels (0, 1), (0, 2) hold the example's index
(low byte, high byte) within its split. The rest is seeded noise.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch")
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def fake_images(n: int, shape: tuple[int, ...], num_classes: int = 10, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, *shape) with shape (H, W) or (C, H, W) and int64 labels, ids stamped in."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    y = (np.arange(n) % num_classes).astype(np.int64)
    rng.shuffle(y)
    flat = x.reshape(n, -1) if len(shape) == 2 else x.reshape(n, shape[0], -1)[:, 0]
    flat[:, 0] = y
    flat[:, 1] = np.arange(n) % 256
    flat[:, 2] = np.arange(n) // 256
    return x, y


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    blob = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    blob += array.tobytes()
    path.write_bytes(gzip.compress(blob, mtime=0) if path.suffix == ".gz" else blob)
    return path


def write_idx_set(folder: str | Path, n_train: int = 60, n_test: int = 20, gz: bool = False,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """The 4 MNIST-format IDX files (28 x 28) in ``folder``; returns the arrays written."""
    folder = Path(folder)
    train_x, train_y = fake_images(n_train, (28, 28), seed=seed)
    test_x, test_y = fake_images(n_test, (28, 28), seed=seed + 1)
    arrays = dict(zip(IDX_FILES, (train_x, train_y, test_x, test_y)))
    for base, array in arrays.items():
        write_idx(folder / (base + (".gz" if gz else "")), array)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def write_mnist(data_dir: str | Path, kind: str = "MNIST", **kw) -> dict[str, np.ndarray]:
    """MNIST (kind="MNIST") or Fashion-MNIST (kind="FashionMNIST") in torchvision's layout:
    ``data_dir/KIND/raw/*-idx?-ubyte[.gz]``."""
    return write_idx_set(Path(data_dir) / kind / "raw", **kw)


def write_cifar10(data_dir: str | Path, n_per_batch: int = 10, n_test: int = 20, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """CIFAR-10's python-version files in ``data_dir/cifar-10-batches-py/``.

    Returns train_x/test_x as uint8 (N, 3, 32, 32) and train_y/test_y, in file order.
    """
    folder = Path(data_dir) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i, name in enumerate(CIFAR_BATCHES):
        n = n_test if name == "test_batch" else n_per_batch
        x, y = fake_images(n, (3, 32, 32), seed=seed + i)
        if name != "test_batch":  # ids count across the five training batches
            ids = np.arange(n) + i * n_per_batch
            x[:, 0, 0, 1], x[:, 0, 0, 2] = ids % 256, ids // 256
        write_cifar_batch(folder / name, x, y, name)
        xs.append(x)
        ys.append(y)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": n_per_batch, "label_names": CIFAR_CLASSES,
                     "num_vis": 3072}, f, protocol=2)
    return {"train_x": np.concatenate(xs[:5]), "train_y": np.concatenate(ys[:5]),
            "test_x": xs[5], "test_y": ys[5]}


def write_cifar_batch(path: str | Path, x: np.ndarray, y: np.ndarray, name: str = "batch") -> None:
    """One CIFAR-10 batch pickle: {'data': uint8 (N, 3072) in C, H, W order, 'labels': [...]}."""
    entry = {"batch_label": name, "labels": [int(v) for v in y],
             "data": np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.uint8),
             "filenames": [f"img_{i}.png" for i in range(len(x))]}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def cifar_md5s(data_dir: str | Path) -> dict[str, str]:
    """md5 of each file in ``data_dir/cifar-10-batches-py/`` (to stand in for torchvision's pins)."""
    folder = Path(data_dir) / "cifar-10-batches-py"
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def pin_cifar_md5s(monkeypatch, data_dir: str | Path) -> None:
    """Make torchvision's CIFAR10 pinned md5 lists match the fake files in ``data_dir``."""
    from torchvision.datasets import CIFAR10

    md5 = cifar_md5s(data_dir)
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5[n]] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5[n]] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})


def write_image_folder(root: str | Path, classes=("cat", "dog", "eel"), n_per_class: int = 10,
                       size: tuple[int, int] = (12, 12), mode: str = "RGB", seed: int = 0,
                       ext: str = ".png") -> dict[str, list[Path]]:
    """An ImageFolder tree ``root/CLASS/NNN.png`` of seeded noise images; returns paths by class.

    ``size`` is (width, height) as PIL has it. Pixel (0, 0) of channel 0 holds the class index.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    out: dict[str, list[Path]] = {}
    for ci, cls in enumerate(classes):
        (Path(root) / cls).mkdir(parents=True, exist_ok=True)
        out[cls] = []
        for i in range(n_per_class):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
            arr[(0, 0) if mode == "L" else (0, 0, 0)] = ci
            path = Path(root) / cls / f"{i:03d}{ext}"
            Image.fromarray(arr, mode=mode).save(path)
            out[cls].append(path)
    return out
