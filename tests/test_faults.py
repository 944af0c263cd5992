"""Faults and bad input through the CLI: non-finite losses, a full disk, an unwritable run folder
and corrupt dataset files each end with one clear line, the right exit code, and a good
checkpoint left in place."""

from __future__ import annotations

import errno
import json
import os
import re

import numpy as np
import pytest
import torch

import fakedata
from dllab.checkpoint import load_checkpoint
from dllab.cli import main
from dllab.engine import unwrap
from dllab.runs import read_json, read_metrics

TINY = {
    "classifier": ["--width", "4", "--batch-size", "32", "--lr", "0.05"],
    "vae": ["--batch-size", "32", "--latent-dim", "4"],
    "dcgan": ["--batch-size", "32", "--g-width", "8", "--d-width", "8", "--nz", "16"],
}


def train_argv(kind, out, *extra, limit=128, epochs=1):
    return ["train", kind, "--dataset", "mnist5k", "--limit", str(limit), "--epochs", str(epochs),
            "--out", str(out), "--quiet", "--seed", "1", "--device", "cpu", "--log-every", "1",
            *TINY[kind], *extra]


def state_vector(trainer) -> torch.Tensor:
    """All weights and buffers of a trainer's models, flattened (float64)."""
    return torch.cat([v.detach().double().flatten() for m in trainer.modules().values()
                      for v in unwrap(m).state_dict().values()])


def checkpoint_vector(path) -> torch.Tensor:
    return torch.cat([v.double().flatten() for sd in load_checkpoint(path)["models"].values()
                      for v in sd.values()])


@pytest.fixture
def poisoned(monkeypatch):
    """``poisoned(kind, steps)``: batches of those (0-based) steps become NaN; records the model
    state after every step in the returned list."""

    def setup(kind, steps):
        from dllab.train import kind_module

        trainer_cls = kind_module(kind).TRAINER
        original = trainer_cls.train_step
        after: list[torch.Tensor] = []

        def train_step(self, x, y):
            if self.step in steps:
                x = torch.full_like(x, float("nan"))
            out = original(self, x, y)
            after.append(state_vector(self))
            return out

        monkeypatch.setattr(trainer_cls, "train_step", train_step)
        monkeypatch.setattr(trainer_cls, "finish", lambda self, metrics: {})  # no t-SNE etc.
        return after

    return setup


@pytest.mark.parametrize("kind", ["classifier", "vae", "dcgan"])
def test_nonfinite_steps_are_skipped_and_counted(kind, tmp_path, poisoned):
    """NaN batches at steps 1 and 2 of 4: those steps change nothing (weights, optimiser, BatchNorm
    statistics), are counted in summary.json and leave no loss in the log; training goes on."""
    after = poisoned(kind, {1, 2})
    out = tmp_path / "run"
    assert main(train_argv(kind, out)) == 0
    assert len(after) == 4
    assert torch.equal(after[1], after[0]) and torch.equal(after[2], after[0])
    assert not torch.equal(after[3], after[2])
    assert torch.isfinite(after[3]).all()
    summary = read_json(out / "summary.json")
    assert summary["nonfinite_steps_skipped"] == 2 and summary["steps"] == 4
    loss_key = "loss" if kind != "dcgan" else "d_loss"
    logged = {r["step"]: r for r in read_metrics(out) if r["split"] == "train"}
    assert [s for s in sorted(logged) if loss_key in logged[s]] == [1, 4]
    final = checkpoint_vector(out / "checkpoints" / "last.pt")
    assert torch.equal(final, after[3])
    if kind != "dcgan":  # the optimiser took exactly the two good steps
        opt = load_checkpoint(out / "checkpoints" / "last.pt")["optimizers"]["model"]
        if kind == "vae":  # Adam counts its steps
            assert {float(s["step"]) for s in opt["state"].values()} == {2.0}


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path, poisoned, capsys):
    """From step 4 on every batch is NaN: the third skip in a row stops the run with exit code 1
    and one line; last.pt is loadable, finite and holds the last good weights."""
    after = poisoned("classifier", set(range(4, 100)))
    out = tmp_path / "run"
    code = main(train_argv("classifier", out, "--max-nonfinite", "3", "--checkpoint-every", "2",
                           limit=256))
    err = capsys.readouterr().err
    assert code == 1
    lines = err.strip().splitlines()
    # the skips are counted on the device and read at the next checkpoint (every 2 steps here):
    # the row is 4 long by then
    found = re.search(r"(\d+) steps in a row had a non-finite loss", lines[0])
    assert len(lines) == 1 and found and int(found.group(1)) >= 3, err
    assert "Traceback" not in err
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 6  # saved during the streak: weights unchanged since step 4
    final = checkpoint_vector(out / "checkpoints" / "last.pt")
    assert torch.isfinite(final).all()
    assert torch.equal(final, after[3])  # after the 4th (last good) step
    summary = read_json(out / "summary.json")  # not complete: failed, and says why
    assert summary["status"] == "failed" and "non-finite" in summary["error"]


def test_non_finite_weights_are_never_checkpointed(tmp_path, poisoned, monkeypatch, capsys):
    """A weight turns NaN after the 3rd step (an overflow in an update, say): the next save is
    refused with one line and exit code 1, and last.pt keeps the step-2 state."""
    from dllab.train.vae import VAETrainer

    after = poisoned("vae", set())
    step = VAETrainer.train_step

    def step_then_break(self, x, y):
        out = step(self, x, y)
        if self.step == 2:  # 0-based step 2, the third
            with torch.no_grad():
                next(self.net.parameters()).view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(VAETrainer, "train_step", step_then_break)
    out = tmp_path / "run"
    assert main(train_argv("vae", out, "--checkpoint-every", "2")) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no longer finite" in err, err
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 2
    assert torch.equal(checkpoint_vector(out / "checkpoints" / "last.pt"), after[1])


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, poisoned, monkeypatch, capsys):
    """The 2nd checkpoint write fails with ENOSPC half-way: exit code 1, one line, and the first
    checkpoint is still in place, loadable and unchanged; no temp file is left behind."""
    after = poisoned("vae", set())
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    code = main(train_argv("vae", out, "--checkpoint-every", "2"))
    err = capsys.readouterr().err
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "last.pt" in lines[0], err
    assert "previous checkpoint" in lines[0] and "Traceback" not in err
    monkeypatch.setattr(torch, "save", real_save)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 2
    assert torch.equal(checkpoint_vector(out / "checkpoints" / "last.pt"), after[1])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt"]


@pytest.mark.parametrize("where", ["build", "step"])
def test_out_of_memory_is_one_line(where, tmp_path, poisoned, monkeypatch, capsys):
    """An allocation failure (a model or batch too large) ends with one line and exit code 1; in
    training, the last checkpoint stays. (Simulated: a real 360 GB request could meet the OOM
    killer on machines that overcommit memory.)"""
    from dllab.train.vae import VAETrainer

    poisoned("vae", set())
    failure = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 360000000000 bytes.")
    if where == "build":
        def build(self):
            raise failure

        monkeypatch.setattr(VAETrainer, "build", build)
    else:
        step = VAETrainer.train_step

        def step_or_fail(self, x, y):
            if self.step == 3:
                raise failure
            return step(self, x, y)

        monkeypatch.setattr(VAETrainer, "train_step", step_or_fail)
    out = tmp_path / "run"
    assert main(train_argv("vae", out, "--checkpoint-every", "2")) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "out of memory" in lines[0] and "Traceback" not in err, err
    if where == "build":
        assert "building the model" in lines[0]
    else:
        assert "at step 4" in lines[0]
        assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2


@pytest.mark.parametrize("where", ["build", "step"])
def test_a_run_that_failed_before_its_first_checkpoint_begins_again(where, tmp_path, poisoned, monkeypatch,
                                                                    capsys):
    """Out of memory before any checkpoint (while building, or at step 4 of an epoch): the folder
    was a dead end (the same command: "already holds a run"; --resume: the batch size cannot
    change). The same command with a smaller batch now begins it again, saying so, and the old
    attempt's steps are not in its log; --resume also begins it again. A run with a checkpoint
    is still refused."""
    from dllab.train.vae import VAETrainer

    poisoned("vae", set())
    failure = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 360 GB")
    real_build, real_step = VAETrainer.build, VAETrainer.train_step

    def build(self):
        if self.config.batch_size == 32:
            raise failure
        real_build(self)

    def step(self, x, y):
        if self.config.batch_size == 32 and self.step == 3:
            raise failure
        return real_step(self, x, y)

    monkeypatch.setattr(VAETrainer, "build" if where == "build" else "train_step",
                        build if where == "build" else step)
    out = tmp_path / "run"
    assert main(train_argv("vae", out, "--batch-size", "32", "--log-every", "1")) == 1
    assert "the same command with them lower begins it again" in capsys.readouterr().err
    failed = read_json(out / "summary.json")
    assert failed["status"] == "failed" and failed["steps"] == (0 if where == "build" else 3)
    assert bool(read_metrics(out)) is (where == "step")  # three steps logged, no checkpoint
    assert main(["train", "vae", "--resume", "--out", str(out), "--batch-size", "16", "--quiet"]) == 2
    assert "the same command without --resume begins it again" in capsys.readouterr().err
    assert main(train_argv("vae", out, "--batch-size", "16")) == 0
    err = capsys.readouterr().err
    assert f"{out} held a run that failed" in err and "begins again" in err, err
    assert read_json(out / "config.json")["batch_size"] == 16 and "resumed" not in read_json(out / "config.json")
    assert read_json(out / "summary.json")["status"] == "complete"
    steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    assert steps == sorted(set(steps)), steps  # no step logged twice
    assert main(train_argv("vae", out, "--batch-size", "16")) == 2  # now it has checkpoints: refused
    assert "already holds a run" in capsys.readouterr().err
    # --resume of a run that failed before its first checkpoint begins it again too
    again = tmp_path / "again"
    assert main(train_argv("vae", again, "--batch-size", "32", "--log-every", "1")) == 1
    assert main(["train", "vae", "--resume", "--out", str(again), "--quiet"]) == 1  # still batch 32
    monkeypatch.setattr(VAETrainer, "build", real_build)
    monkeypatch.setattr(VAETrainer, "train_step", real_step)
    capsys.readouterr()
    assert main(["train", "vae", "--resume", "--out", str(again), "--quiet"]) == 0
    steps = [r["step"] for r in read_metrics(again) if r["split"] == "train"]
    assert steps == sorted(set(steps)) and read_json(again / "summary.json")["status"] == "complete"


def test_unwritable_run_folder(tmp_path, monkeypatch, capsys):
    """--out below a regular file: exit code 2 and one line naming the folder and the file, before
    the data is read; a folder the OS refuses (here simulated: root writes anywhere) is named too."""
    from pathlib import Path

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    assert main(train_argv("vae", out)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"{out} lies under {blocker}, a file, not a folder" in lines[0], err
    assert blocker.read_text() == "not a folder"
    real_mkdir = Path.mkdir

    def refused(self, *args, **kwargs):
        if self == tmp_path / "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    assert main(train_argv("vae", tmp_path / "locked")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"cannot write run folder {tmp_path / 'locked'}: Permission denied" in lines[0]


def _truncated_idx(root):
    fakedata.write_mnist(root, n_train=40, n_test=10)
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    return "mnist", images, "truncated IDX file", []


def _corrupt_cifar_batch(root):
    fakedata.write_cifar10(root, n_per_batch=4, n_test=4)
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:700])
    return "cifar10", batch, "cannot unpickle CIFAR-10 batch", ["--no-verify"]


def _cifar_checksum(root):
    fakedata.write_cifar10(root, n_per_batch=4, n_test=4)
    return "cifar10", root / "cifar-10-batches-py" / "data_batch_1", "md5", []


def _unreadable_image(root):
    paths = fakedata.write_image_folder(root / "pets", n_per_class=5)
    bad = paths["dog"][3]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image needs")
    return f"folder:{root / 'pets'}", bad, "cannot read image", []


@pytest.mark.parametrize("make", [_truncated_idx, _corrupt_cifar_batch, _cifar_checksum,
                                  _unreadable_image], ids=lambda f: f.__name__.strip("_"))
def test_bad_dataset_files_name_the_file(make, tmp_path, capsys):
    """`dllab train classifier` on a broken file: non-zero exit, one line naming the file, no
    traceback and no run folder."""
    data_dir = tmp_path / "data"
    dataset, bad, reason, extra = make(data_dir)
    out = tmp_path / "run"
    code = main(["train", "classifier", "--dataset", dataset, "--data-dir", str(data_dir),
                 "--epochs", "1", "--out", str(out), "--quiet", "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert code == 1  # bad data, not bad usage
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(bad) in lines[0] and reason in lines[0] and "Traceback" not in err
    assert not out.exists()


def test_a_good_fixture_trains(tmp_path):
    """The fixtures above are broken only where we broke them: intact, they train."""
    fakedata.write_mnist(tmp_path / "data", n_train=128, n_test=16)
    out = tmp_path / "run"
    assert main(["train", "classifier", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                 "--epochs", "1", "--out", str(out), "--quiet", "--device", "cpu", "--width", "4",
                 "--batch-size", "32"]) == 0
    assert np.isfinite(read_json(out / "summary.json")["test_loss"])


def _killed_in_its_first_epoch(out):
    """Make ``out`` look like a run killed outright (SIGKILL) at step 3 of its first epoch: no
    summary, no checkpoint, three steps logged. Returns the log of the whole, straight run."""
    import shutil

    assert main(train_argv("vae", out, "--log-every", "1")) == 0
    full = read_metrics(out)
    (out / "summary.json").unlink()
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full if r["step"] <= 3))
    return full


def _untimed(log):
    return [{k: v for k, v in r.items() if k != "time"} for r in log]


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path, capsys):
    """Killed outright in its first epoch (the out-of-memory killer, say: no summary, steps logged,
    no checkpoint), a run was a dead end: --resume refused it as having lost last.pt, and the same
    command as holding a run. --resume now starts it over, and the same command (with smaller
    settings, say) begins it again, each saying so, with the lost steps gone from the log; a run
    that finished, or holds best.pt, is still refused."""
    import shutil

    out = tmp_path / "run"
    full = _killed_in_its_first_epoch(out)
    shutil.copytree(out, tmp_path / "copy")
    capsys.readouterr()
    assert main(["train", "vae", "--resume", "--out", str(out), "--quiet"]) == 0
    assert "saved no checkpoint in its 3 steps; it starts over from step 0" in capsys.readouterr().err
    assert _untimed(read_metrics(out)) == _untimed(full)  # the same run as straight through
    assert len(list((out / "tb").glob("events.*"))) == 1  # the stopped attempt's events went too
    assert main(train_argv("vae", tmp_path / "copy", "--log-every", "1")) == 0
    assert "was killed (it wrote no summary) before saving a checkpoint; it begins again" in capsys.readouterr().err
    assert _untimed(read_metrics(tmp_path / "copy")) == _untimed(full)
    (out / "checkpoints" / "last.pt").unlink()  # finished, and best.pt kept: refused
    assert main(["train", "vae", "--resume", "--out", str(out), "--quiet", "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert "last.pt is missing (it holds best.pt)" in err, err


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path, capsys):
    """While a process trains in a folder (it holds the folder's lock), neither a new run nor a
    resume may write there, even where the folder would otherwise be begun again (a reviewer's
    race: a failed run resumed by one command and begun again by another, both training into
    it). The lock goes with the process, so a killed one leaves none."""
    import subprocess
    import sys

    out = tmp_path / "run"
    _killed_in_its_first_epoch(out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(out)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for argv in (train_argv("vae", out), ["train", "vae", "--resume", "--out", str(out), "--quiet"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"{out} is in use by another process" in err and len(err.strip().splitlines()) == 1, err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "vae", "--resume", "--out", str(out), "--quiet"]) == 0  # the lock went with it


def test_a_sweep_begins_again_a_run_that_failed_before_its_first_checkpoint(tmp_path, monkeypatch, capsys):
    """A sweep whose run ran out of memory while building, run again with a smaller batch: the
    failed run is begun again with the flags given (it was resumed, and --resume refused the new
    --batch-size, a flag the sweep's user never typed for it)."""
    from dllab.train.vae import VAETrainer

    real_build = VAETrainer.build

    def build(self):
        if self.config.batch_size == 32:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 360 GB")
        real_build(self)

    monkeypatch.setattr(VAETrainer, "build", build)
    sweep = ["sweep", "vae", "--limit", "64", "--epochs", "1", "--latent-dim", "4", "--tsne-points", "100",
             "--beta", "1", "2", "--sweep-out", str(tmp_path / "s"), "--quiet"]
    assert main([*sweep, "--batch-size", "32"]) == 1  # its first run fails, and the sweep with it
    assert read_json(tmp_path / "s" / "beta=1" / "summary.json")["status"] == "failed"
    capsys.readouterr()
    assert main([*sweep, "--batch-size", "16"]) == 0
    assert "beta=1 held a run that failed" in capsys.readouterr().err
    for run in ("beta=1", "beta=2"):
        assert read_json(tmp_path / "s" / run / "config.json")["batch_size"] == 16
        assert read_json(tmp_path / "s" / run / "summary.json")["status"] == "complete"
