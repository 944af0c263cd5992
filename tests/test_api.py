"""The Python API and the engine's step: train(kind, config) -> Run, load_run, typed configs that
check their values, one EMA, the declared updates, gradient clipping, and run status."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import dllab
from dllab.checkpoint import load_checkpoint, save_checkpoint
from dllab.cli import main
from dllab.config import from_mapping
from dllab.engine import EMA, Update
from dllab.runs import Run
from dllab.train import check_param_budget, config_class, defaults, kind_module, load_run, train
from dllab.train.classifier import ClassifierTrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"
TINY_CLF = {"dataset": "mnist5k", "limit": 64, "epochs": 1, "width": 4, "batch_size": 32,
            "device": "cpu", "precision": "fp32"}


def test_readme_api_example_runs(tmp_path, monkeypatch):
    """README's Python example, as written, with its run folder moved into tmp_path."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "dllab.load_run" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["run"].status == "complete"
    assert isinstance(namespace["vae"], torch.nn.Module) and not namespace["vae"].training
    assert (tmp_path / "runs" / "vae-api" / "summary.json").exists()


@pytest.mark.parametrize("settings, message", [
    ({"epoch": 2}, "'epoch' is not ClassifierTrainConfig"),
    ({"epochs": 0}, "epochs=0: must be at least 1"),
    ({"epochs": 2.5}, "epochs=2.5: invalid integer"),
    ({"optimizer": "sgdx"}, "optimizer='sgdx': choose from sgd, adamw"),
    ({"augment": "yes"}, "augment='yes': augment is a switch"),
    ({"lr": -1}, "lr=-1: must be a positive finite number"),
    ({"dataset": "nope"}, "unknown dataset 'nope'"),
    ({"seed": None}, "seed cannot be None"),
    ({"momentum": 0.0}, "Nesterov momentum needs --momentum above 0"),
])
def test_a_bad_setting_from_python_is_refused_by_name_before_anything_is_written(tmp_path, settings,
                                                                                 message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(message)):
        train("classifier", {**TINY_CLF, **settings, "out": str(out)})
    assert not out.exists()


def test_from_mapping_reads_a_saved_config_back_typed():
    saved = {**defaults("vae"), "lr": 1, "environment": {"torch": "x"}, "resumed": []}
    cfg = from_mapping(config_class("vae"), saved)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # JSON wrote 1; the setting is a float
    assert cfg == config_class("vae")(lr=1.0)


def test_train_returns_the_run_and_load_run_rebuilds_the_ema_model(tmp_path):
    """A classifier with a weight average: train() returns its Run; load_run rebuilds the averaged
    model from the checkpoint alone, and it gives the accuracy the run reported."""
    out = tmp_path / "clf"
    run = train("classifier", ClassifierTrainConfig(**TINY_CLF, ema=0.9, out=str(out)), quiet=True)
    assert isinstance(run, Run) and run.path == out and run.complete
    summary = run.summary()
    assert summary["status"] == "complete" and summary["epochs"] == summary["epochs_planned"] == 1
    state = load_checkpoint(out / "checkpoints" / "best.pt")
    assert set(state["models"]) == {"model", "model_ema"} and state["ema_updates"]["model_ema"] == 2
    loaded = dllab.load_run(out)
    assert loaded.checkpoint == "best" and loaded.epoch == 1 and loaded.config.ema == 0.9
    assert loaded.classes == [str(i) for i in range(10)]
    ema_weights = state["models"]["model_ema"]
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, ema_weights[name]), name
    assert not torch.equal(state["models"]["model"]["fc.weight"], ema_weights["fc.weight"])
    from dllab.data import load
    from dllab.metrics.classification import evaluate_classifier

    data = load("mnist5k", limit=64)
    loader = data.loader("test", batch_size=64, shuffle=False, augment=False, scale="standard",
                         device=torch.device("cpu"), drop_last=False)
    result = evaluate_classifier(loaded.model, loader, torch.device("cpu"), data.num_classes)
    assert result["test_acc"] == pytest.approx(summary["test_acc"])


def test_load_run_of_a_dcgan_gives_its_generator(tmp_path):
    out = tmp_path / "gan"
    assert main(["train", "dcgan", "--limit", "64", "--epochs", "1", "--batch-size", "32", "--g-width", "8",
                 "--d-width", "8", "--nz", "16", "--ema", "0.99", "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    loaded = load_run(out, checkpoint="last")
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert type(loaded.model).__name__ == "Generator" and loaded.checkpoint == "last"
    assert torch.equal(loaded.model.state_dict()["to_image.weight"],
                       state["models"]["generator_ema"]["to_image.weight"])
    images = loaded.model(loaded.model.sample_noise(3))
    assert images.shape == (3, 1, 28, 28) and images.abs().max() <= 1


def test_load_run_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_run(tmp_path / "nothing")


# ---- the engine owns the step -------------------------------------------------------------------
def _trainer(kind: str, tmp_path, **settings):
    from dllab.data import load

    cfg = from_mapping(config_class(kind), {**defaults(kind), "dataset": "mnist5k", "limit": 64,
                                            "batch_size": 32, "device": "cpu", "precision": "fp32",
                                            "out": str(tmp_path), **settings})
    data = load("mnist5k", limit=64)
    trainer = kind_module(kind).TRAINER(cfg, data, Run(tmp_path, {}, writer=False), torch.device("cpu"),
                                        quiet=True)
    trainer.build()
    x, y = next(iter(trainer.loader("train", shuffle=True, augment=False, drop_last=True)))
    return trainer, x, y


def test_the_dcgan_declares_its_two_updates_in_order(tmp_path):
    trainer, x, y = _trainer("dcgan", tmp_path, g_width=8, d_width=8, nz=16)
    updates = trainer.declared_updates()
    assert [u.name for u in updates] == ["discriminator", "generator"]
    assert all(isinstance(u, Update) for u in updates)
    assert trainer.optimizers() == {"discriminator": trainer.opt_d, "generator": trainer.opt_g}
    calls = []
    for u in updates:
        loss = u.loss
        u.loss = (lambda batch, loss=loss, name=u.name: calls.append((name, "fake" in batch)) or loss(batch))
    metrics = trainer.train_step(x, y)
    # D goes first and leaves G(z) for G's update, which runs against the updated D
    assert calls == [("discriminator", False), ("generator", True)]
    assert {"d_loss", "g_loss", "grad_norm_d", "grad_norm_g", "d_fake_after"} <= set(metrics)


def test_grad_clip_bounds_each_update_and_logs_the_norm_before_clipping(tmp_path):
    """Plain SGD at a constant rate: one clipped step moves the weights by exactly lr * clip."""
    settings = dict(width=4, optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=0.0, schedule="constant",
                    warmup_epochs=0.0, lr=0.5, grad_clip=0.01)
    trainer, x, y = _trainer("classifier", tmp_path, **settings)
    before = torch.cat([p.detach().flatten().clone() for p in trainer.net.parameters()])
    metrics = trainer.train_step(x, y)
    after = torch.cat([p.detach().flatten() for p in trainer.net.parameters()])
    assert torch.linalg.vector_norm(after - before).item() == pytest.approx(0.5 * 0.01, rel=1e-4)
    # the same step unclipped is larger: the gradient norm was above the clip
    trainer2, x, y = _trainer("classifier", tmp_path, **{**settings, "grad_clip": 0.0})
    before = torch.cat([p.detach().flatten().clone() for p in trainer2.net.parameters()])
    trainer2.train_step(x, y)
    after = torch.cat([p.detach().flatten() for p in trainer2.net.parameters()])
    assert torch.linalg.vector_norm(after - before).item() > 10 * 0.5 * 0.01
    assert metrics["loss"].item() > 0


def test_a_non_finite_loss_skips_the_update_and_the_later_ones_but_keeps_the_schedule(tmp_path):
    trainer, x, y = _trainer("classifier", tmp_path, width=4)
    weights = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert trainer.train_step(torch.full_like(x, float("nan")), y) == {}
    assert all(torch.equal(v, weights[k]) for k, v in trainer.net.state_dict().items())
    assert trainer.optimizer.param_groups[0]["lr"] != lr  # the schedule stepped with the skip
    assert trainer.nonfinite_total == 1


def test_ema_warms_up_then_keeps_its_decay():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.999)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update(model)
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    ema.updates = 10_000
    assert ema.current_decay() == 0.999
    with pytest.raises(ValueError, match="decay"):
        EMA(model, 1.0)


def test_a_checkpoint_of_the_previous_layout_resumes(tmp_path):
    """Checkpoints written before the engine owned the step kept the classifier's optimiser as
    "optimizer", its schedule as "scheduler" and its average as torch's AveragedModel ("ema":
    module.<name> and n_averaged). Such a run still resumes, and evaluates with its average."""
    out = tmp_path / "old"
    argv = ["train", "classifier", "--limit", "64", "--batch-size", "32", "--width", "4", "--ema", "0.9",
            "--precision", "fp32", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main([*argv, "--epochs", "1"]) == 0
    for name in ("last", "best"):
        path = out / "checkpoints" / f"{name}.pt"
        state = load_checkpoint(path)
        average = state["models"].pop("model_ema")
        state["models"]["ema"] = {**{f"module.{k}": v for k, v in average.items()},
                                  "n_averaged": torch.tensor(2)}
        state["optimizers"] = {"optimizer": state["optimizers"]["model"]}
        state["schedulers"] = {"scheduler": state["schedulers"]["model"]}
        state.pop("ema_updates")
        save_checkpoint(state, path)
    loaded = load_run(out)
    assert torch.equal(loaded.model.state_dict()["fc.weight"], average["fc.weight"])
    assert main(["train", "classifier", "--resume", "--out", str(out), "--epochs", "2", "--quiet"]) == 0
    assert Run.open(out).complete and Run.open(out).summary()["epochs"] == 2


# ---- run status ---------------------------------------------------------------------------------
def test_status_of_a_run_and_how_report_and_compare_show_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "classifier", "--limit", "64", "--batch-size", "32", "--width", "4", "--epochs",
                 "1", "--precision", "fp32", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    assert Run.open(out).status == "complete"
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "config.json").write_text((out / "config.json").read_text())
    assert Run.open(stopped).status == "unfinished" and Run.open(stopped).resumable
    summary = {**json.loads((out / "summary.json").read_text()), "status": "interrupted",
               "epochs": 1, "epochs_planned": 3}
    (stopped / "summary.json").write_text(json.dumps(summary))
    assert Run.open(stopped).status == "interrupted" and not Run.open(stopped).complete
    capsys.readouterr()
    assert main(["compare", str(out), str(stopped)]) == 0
    table = capsys.readouterr().out
    assert "interrupted at epoch 1 of 3" in table and re.search(r"\bcomplete\b", table)
    report = tmp_path / "report.html"
    assert main(["report", str(out), str(stopped), "--out", str(report)]) == 0
    html = report.read_text()
    assert "This run is interrupted at epoch 1 of 3: its numbers are not final." in html
    assert "INTERRUPTED AT EPOCH 1 OF 3" in html


def test_a_finished_run_resumed_for_more_epochs_and_killed_is_shown_as_far_as_it_got(tmp_path, capsys):
    """A complete run resumed with --epochs 3 and killed (SIGKILL) after its second epoch keeps
    its first summary ("complete" at epoch 1 of 1). The report and compare show it unfinished at
    epoch 2 of 3: the test records and config.json say so, not the summary."""
    out = tmp_path / "run"
    argv = ["train", "classifier", "--limit", "64", "--batch-size", "32", "--width", "4", "--precision",
            "fp32", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main([*argv, "--epochs", "1"]) == 0
    first = (out / "summary.json").read_text()
    assert main(["train", "classifier", "--resume", "--epochs", "2", "--quiet", "--out", str(out)]) == 0
    (out / "summary.json").write_text(first)  # what a resume killed after its epoch 2 leaves
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "epochs": 3}))
    assert Run.open(out).status == "unfinished"
    capsys.readouterr()
    assert main(["compare", str(out)]) == 0
    assert "unfinished at epoch 2 of 3" in capsys.readouterr().out
    assert main(["report", str(out), "--out", str(tmp_path / "report.html")]) == 0
    assert "This run is unfinished at epoch 2 of 3: its numbers are not final." in (
        tmp_path / "report.html").read_text()

@pytest.mark.parametrize("kind, flags, named", [
    ("classifier", ["--width", "4"], "--width"),
    ("vae", ["--latent-dim", "4"], "--latent-dim"),
    ("dcgan", ["--g-width", "8", "--d-width", "8"], "generator"),
])
def test_every_kind_refuses_a_model_over_its_parameter_budget_before_writing(tmp_path, capsys, kind,
                                                                             flags, named):
    out = tmp_path / "run"
    assert main(["train", kind, "--limit", "64", "--batch-size", "32", *flags, "--max-params", "1000",
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "more than --max-params 1,000" in err and named in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    # within budget: the same counts the run reports
    assert main(["train", kind, "--limit", "64", "--epochs", "1", "--batch-size", "32", *flags,
                 "--max-params", "10000000", "--out", str(out), "--quiet", "--device", "cpu",
                 *(["--tsne-points", "60"] if kind == "vae" else [])]) == 0
    summary = Run.open(out).summary()
    cfg = from_mapping(config_class(kind), Run.open(out).config)
    from dllab.data import load

    assert sum(check_param_budget(kind, cfg, load("mnist5k", limit=64)).values()) == summary["params"]


def test_python_settings_as_python_writes_them(tmp_path):
    """Paths, numpy numbers and the dataset aliases dllab.data.load takes are settings too."""
    import numpy as np

    cfg = from_mapping(config_class("classifier"), {"out": tmp_path / "x", "epochs": np.int64(3),
                                                    "lr": np.float32(0.5), "dataset": "MNIST-5k"},
                       strict=True)
    assert (cfg.out, cfg.epochs, cfg.lr, cfg.dataset) == (str(tmp_path / "x"), 3, 0.5, "MNIST-5k")
    assert type(cfg.epochs) is int and type(cfg.lr) is float
    with pytest.raises(ValueError, match=r"image_size=32.5: invalid integer"):
        from_mapping(config_class("classifier"), {"image_size": 32.5})
    with pytest.raises(ValueError, match=r"image_size=32.5: invalid literal"):  # type=int names it too
        from_mapping(config_class("dcgan"), {"image_size": 32.5})
    with pytest.raises(ValueError, match="out=5: out takes a string"):
        from_mapping(config_class("classifier"), {"out": 5})


def test_a_resume_checks_the_settings_it_changes(tmp_path):
    out = tmp_path / "run"
    train("classifier", {**TINY_CLF, "out": str(out)}, quiet=True)
    with pytest.raises(ValueError, match="epochs='three': invalid integer"):
        train("classifier", {"out": str(out), "epochs": "three"}, resume=True)
    assert json.loads((out / "config.json").read_text())["epochs"] == 1
    train("classifier", {"out": str(out), "epochs": "2"}, resume=True, quiet=True)  # as the flag parses it
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["resumed"][-1]["changed"]["epochs"] == [1, 2]


def test_a_resume_that_cannot_read_its_checkpoint_changes_nothing(tmp_path, capsys):
    """Resuming a complete run for more epochs, with a damaged last.pt: one line, exit code 1, and
    config.json and summary.json stay as they were (the run is still the complete 1-epoch run)."""
    out = tmp_path / "run"
    train("classifier", {**TINY_CLF, "out": str(out)}, quiet=True)
    before = {name: (out / name).read_bytes() for name in ("config.json", "summary.json")}
    (out / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    assert main(["train", "classifier", "--resume", "--out", str(out), "--epochs", "2", "--quiet"]) == 1
    assert "last.pt" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert Run.open(out).complete


def test_resume_of_a_complete_run_with_nothing_to_change_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    train("classifier", {**TINY_CLF, "out": str(out)}, quiet=True)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(["train", "classifier", "--resume", "--out", str(out), "--quiet"]) == 0
    assert "test_acc" in capsys.readouterr().out  # its summary, as a finished run prints it
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_a_failed_resume_after_its_checkpoint_keeps_the_numbers_it_had(tmp_path, monkeypatch):
    """Resumed for more epochs, the run fails in its second epoch: summary.json says failed, with
    the epochs reached and planned, and keeps the first run's final numbers."""
    from dllab.train.classifier import ClassifierTrainer

    out = tmp_path / "run"
    before = train("classifier", {**TINY_CLF, "out": str(out)}, quiet=True).summary()

    def broken(self, x, y):
        raise RuntimeError("a test stand-in for a failure mid-epoch")

    monkeypatch.setattr(ClassifierTrainer, "train_step", broken)
    with pytest.raises(RuntimeError, match="stand-in"):
        train("classifier", {"out": str(out), "epochs": 2}, resume=True)
    after = Run.open(out).summary()
    assert after["status"] == "failed" and "stand-in" in after["error"]
    assert (after["epochs"], after["epochs_planned"], after["test_acc"]) == (1, 2, before["test_acc"])
    assert json.loads((out / "config.json").read_text())["epochs"] == 2  # the run now plans 2


def test_a_complete_run_resumed_for_more_epochs_is_not_complete_until_it_finishes(tmp_path):
    out = tmp_path / "run"
    train("classifier", {**TINY_CLF, "out": str(out)}, quiet=True)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "epochs": 3}))  # as a resume records it
    assert Run.open(out).status == "unfinished" and not Run.open(out).complete
