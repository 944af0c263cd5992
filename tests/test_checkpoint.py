"""Checkpoints: atomic writes, weights_only loading, clear errors for corrupt/foreign/unsafe files."""

import os
import pickle

import pytest
import torch

from dllab.checkpoint import CheckpointError, load_checkpoint, pickled_imports, save_checkpoint
from dllab.runs import Run, RunFolderError, read_metrics


def test_round_trip_keeps_tensors_and_plain_values(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7,
                            "best": {"acc": 0.5}}, tmp_path / "c.pt")
    for mmap in (False, True):  # mmap: what Run.trained() reads (the tensors mapped, not read)
        state = load_checkpoint(path, mmap=mmap)
        assert state["step"] == 7 and state["best"] == {"acc": 0.5}
        assert state["format"] == "dllab-checkpoint"
        for k, v in model.state_dict().items():
            assert torch.equal(state["model"][k], v)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"],
                       opt.state_dict()["state"][0]["momentum_buffer"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "dllab-checkpoint", "payload": _Evil()}, path)
    for mmap in (False, True):
        with pytest.raises(CheckpointError, match="refusing to load"):
            load_checkpoint(path, mmap=mmap)


def test_a_raw_pickle_with_code_is_refused_not_called_corrupt(tmp_path):
    """A plain pickle (protocol 4) stops torch's safe loader at its framing, before any object:
    the message still says it was refused, and names what it would have run."""
    import pickle

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": "dllab-checkpoint", "payload": _Evil()}, protocol=4))
    for mmap in (False, True):  # (torch maps zip files only: a raw pickle is read and refused)
        with pytest.raises(CheckpointError, match=r"refusing to load .*safe \(weights_only\) loading forbids.*"
                                                  r"\((posix|os)\.system\)"):
            load_checkpoint(path, mmap=mmap)
    assert pickled_imports(tmp_path / "evil.pt") and not pickled_imports(
        save_checkpoint({"w": torch.randn(3)}, tmp_path / "good.pt"))


def test_truncated_file_is_reported_as_corrupt(tmp_path):
    path = save_checkpoint({"w": torch.randn(1000)}, tmp_path / "c.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for mmap in (False, True):
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_checkpoint(path, mmap=mmap)


def test_garbage_and_foreign_files(tmp_path):
    garbage = tmp_path / "g.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(garbage)
    foreign = tmp_path / "sd.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), foreign)
    with pytest.raises(CheckpointError, match="not a dllab checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint({"v": torch.tensor(1)}, tmp_path / "c.pt")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint({"v": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        save_checkpoint({"v": 1}, blocker / "sub" / "c.pt")


def test_run_folder_layout_and_refusal_to_overwrite(tmp_path):
    out = tmp_path / "run"
    run = Run.create(out, {"kind": "test", "seed": 3})
    run.log({"split": "train", "step": 1, "loss": torch.tensor(0.5)})
    run.log({"split": "train", "step": 2, "loss": float("nan")})
    run.write_summary({"acc": 0.9})
    run.save_checkpoint("last", {"step": 2})
    run.close()
    assert (out / "config.json").exists() and (out / "summary.json").exists()
    assert (out / "figures").is_dir() and (out / "checkpoints" / "last.pt").exists()
    assert any((out / "tb").iterdir())  # TensorBoard events
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 0.5 and records[1]["loss"] == "nan"
    config = Run.open(out).config
    assert config["seed"] == 3 and "torch" in config["environment"]
    with pytest.raises(RunFolderError, match="already holds a run"):
        Run.create(out, {"kind": "test"})
    with pytest.raises(RunFolderError, match="no run to resume"):
        Run.create(tmp_path / "other", {"kind": "test"}, resume=True)
    resumed = Run.create(out, {}, resume=True)
    resumed.truncate_metrics(1)
    assert [r["step"] for r in resumed.metrics()] == [1]
    assert resumed.load_checkpoint("last")["step"] == 2


def test_metrics_reader_tolerates_a_line_cut_by_a_kill(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_non_writer_run_writes_nothing(tmp_path):
    run = Run.create(tmp_path / "r", {"kind": "x"}, writer=False)
    run.log({"step": 1})
    run.write_summary({"a": 1})
    assert run.save_checkpoint("last", {"a": 1}) is None
    assert not (tmp_path / "r").exists()


def test_pickle_module_is_not_needed_to_read_metrics():
    # metrics are JSON, never pickle: a regression guard for the run-folder format
    assert "pickle" not in read_metrics.__code__.co_names
    assert pickle  # imported for the evil-object test above
