"""``--preset cifar10-fast``: the fast CIFAR-10 recipe, end to end on CIFAR-10 files in the real
format (written by the test: there is no CIFAR-10 here), with explicit flags winning."""

import json

import pytest

import fakedata
from dllab.cli import main
from dllab.train import with_preset
from dllab.train.classifier import PRESETS, ClassifierTrainConfig

SMALL = ["--epochs", "1", "--batch-size", "16", "--width", "4", "--device", "cpu", "--quiet"]


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    fakedata.write_cifar10(tmp_path / "data", n_per_batch=16, n_test=20)
    fakedata.pin_cifar_md5s(monkeypatch, tmp_path / "data")
    return tmp_path / "data"


def test_the_preset_trains_cifar10_with_its_recipe_and_the_given_flags(cifar, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "classifier", "--preset", "cifar10-fast", "--data-dir", str(cifar), *SMALL,
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    recipe = PRESETS["cifar10-fast"]
    given = {"epochs": 1, "batch_size": 16, "width": 4}
    assert config["preset"] == "cifar10-fast" and config["dataset"] == "cifar10"
    for key, value in recipe.items():
        if key == "precision":  # auto is recorded as what it picked
            assert config[key] in ("fp32", "bf16")
        else:
            assert config[key] == given.get(key, value), key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["epochs"] == 1
    assert 0.0 <= summary["test_acc"] <= 1.0
    # a resume keeps the preset's values; only what is given changes
    assert main(["train", "classifier", "--resume", "--out", str(out), "--epochs", "2", "--quiet"]) == 0
    resumed = json.loads((out / "config.json").read_text())
    assert resumed["epochs"] == 2 and resumed["lr"] == recipe["lr"] and resumed["batch_size"] == 16
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"


def test_an_unknown_preset_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "classifier", "--preset", "cifar100-fast", "--out", str(tmp_path / "r")])
    assert exit_.value.code == 2
    assert "cifar10-fast" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="unknown classifier preset 'imagenet'"):
        with_preset("classifier", {"preset": "imagenet"})


def test_a_python_caller_gets_the_preset_under_what_it_gives():
    assert with_preset("classifier", {"preset": "cifar10-fast", "lr": 0.2})["lr"] == 0.2
    assert with_preset("classifier", {"preset": "cifar10-fast"})["batch_size"] == 512
    # a typed config holds every setting: those left at their defaults take the preset's
    typed = ClassifierTrainConfig(preset="cifar10-fast", epochs=3)
    import dataclasses

    with pytest.warns(UserWarning, match="batch_size, .*dataset.* take the preset's values"):
        settings = with_preset("classifier", dataclasses.asdict(typed), typed=True)
    assert settings["epochs"] == 3 and settings["batch_size"] == 512 and settings["tta"] is True
    assert with_preset("classifier", {"lr": 0.3}) == {"lr": 0.3}  # no preset: as given
