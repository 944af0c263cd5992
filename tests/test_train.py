"""End-to-end training through the CLI on tiny real data: run folders, resume, kill, faults."""

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dllab.checkpoint import load_checkpoint
from dllab.cli import main
from dllab.runs import Run, read_metrics

# tiny but real settings per kind: bundled MNIST-5k, a few steps
TINY = {
    "classifier": ["--width", "4", "--batch-size", "32", "--lr", "0.05"],
    "vae": ["--batch-size", "32", "--latent-dim", "4", "--tsne-points", "100"],
    "dcgan": ["--batch-size", "32", "--g-width", "8", "--d-width", "8", "--nz", "16"],
}


def train_argv(kind, out, *extra, limit=128, epochs=2):
    return ["train", kind, "--dataset", "mnist5k", "--limit", str(limit), "--epochs", str(epochs),
            "--out", str(out), "--quiet", "--seed", "3", "--device", "cpu", *TINY[kind], *extra]


def final_weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["models"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for model in a:
        for key, value in a[model].items():
            assert torch.equal(value, b[model][key]), f"{model}.{key} differs"


@pytest.mark.parametrize("kind", ["classifier", "vae", "dcgan"])
def test_run_folder_is_complete(kind, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(kind, out, epochs=1)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == kind and config["seed"] == 3 and config["environment"]["torch"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["train_seconds"] > 0 and summary["params"] > 0
    records = read_metrics(out)
    assert any(r["split"] == "train" for r in records)
    assert (out / "checkpoints" / "last.pt").exists()
    assert any((out / "figures").glob("*.png"))
    assert any((out / "tb").iterdir())


@pytest.mark.parametrize("kind, shown", [("classifier", "test_acc "), ("vae", "test_elbo "),
                                         ("dcgan", "train_d_loss ")])  # no classifier run: G and D losses
def test_a_log_gets_one_line_per_epoch(kind, shown, tmp_path, capsys):
    """Where stderr is not a terminal (a log file, a pipe, CI; here pytest's capture) no progress bar
    is drawn: each epoch writes one line, its headline metrics and its time, instead. --quiet
    silences it."""
    argv = [a for a in train_argv(kind, tmp_path / "run", limit=64, epochs=2) if a != "--quiet"]
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if ": epoch " in line]
    assert [line.split("  ")[0] for line in lines] == [f"dllab {kind}: epoch 1/2", f"dllab {kind}: epoch 2/2"]
    assert all(shown in line and " s (elapsed " in line for line in lines), lines
    assert main(train_argv(kind, tmp_path / "quiet", limit=64, epochs=1)) == 0
    assert ": epoch " not in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["classifier", "vae", "dcgan"])
def test_same_seed_same_numbers(kind, tmp_path):
    assert main(train_argv(kind, tmp_path / "a", epochs=1)) == 0
    assert main(train_argv(kind, tmp_path / "b", epochs=1)) == 0
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))


def _signal_after_epoch_1(monkeypatch, kind, sig):
    """The kind's trainer sends ``sig`` to this process once its first epoch has ended."""
    from dllab.train import kind_module

    trainer = kind_module(kind).TRAINER
    original = trainer.epoch_end

    def epoch_end_then_signal(self, epoch, metrics):
        original(self, epoch, metrics)
        if epoch == 1:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(trainer, "epoch_end", epoch_end_then_signal)


@pytest.mark.parametrize("kind", ["classifier", "vae", "dcgan"])
def test_resume_matches_an_uninterrupted_run(kind, tmp_path, monkeypatch, capsys):
    """SIGTERM after the first of two epochs, resume, and land on the uninterrupted weights."""
    assert main(train_argv(kind, tmp_path / "straight", epochs=2)) == 0
    _signal_after_epoch_1(monkeypatch, kind, signal.SIGTERM)
    assert main(train_argv(kind, tmp_path / "split", epochs=2)) == 128 + signal.SIGTERM
    assert "checkpoint saved" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["epoch"] == 1
    monkeypatch.undo()
    assert main(train_argv(kind, tmp_path / "split", "--resume", epochs=2)) == 0
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "split"))
    steps = [r["step"] for r in read_metrics(tmp_path / "split") if r["split"] == "train"]
    assert steps == sorted(set(steps))  # no step logged twice after the resume


def test_more_epochs_on_resume_replans_the_schedule(tmp_path):
    """Raising --epochs on resume re-plans one-cycle: later steps follow a 2-epoch run's plan."""
    out = tmp_path / "run"
    assert main(train_argv("classifier", out, "--log-every", "1", epochs=1)) == 0
    assert main(train_argv("classifier", out, "--resume", "--log-every", "1", epochs=2)) == 0
    assert main(train_argv("classifier", tmp_path / "plan", "--log-every", "1", epochs=2)) == 0
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["config"]["epochs"] == 2
    saved = json.loads((out / "config.json").read_text())  # config.json tells the run as continued
    assert saved["epochs"] == 2 and [r["changed"] for r in saved["resumed"]] == [{"epochs": [1, 2]}]
    lrs = [r["lr"] for r in read_metrics(out) if r["split"] == "train"]
    planned = [r["lr"] for r in read_metrics(tmp_path / "plan") if r["split"] == "train"]
    assert len(lrs) == len(planned) == 8
    assert lrs[4:] == pytest.approx(planned[4:])
    assert lrs[:4] != pytest.approx(planned[:4])  # the first epoch ran on the 1-epoch plan


def _files_and_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fewer_epochs_on_resume_is_a_new_plan_said_aloud_but_never_fewer_than_trained(tmp_path, monkeypatch,
                                                                                        capsys):
    """Stopped after epoch 1 of 3 and resumed with --epochs 2: one line on stderr (--quiet too) says
    the new plan, config.json records it, the run ends at epoch 2 on a 2-epoch schedule. Resumed then
    with --epochs 1, below the 2 epochs trained: exit 2, one line naming both, not a byte written."""
    from dllab.checkpoint import save_checkpoint
    from dllab.train import check_epochs_on_resume

    out = tmp_path / "run"
    _signal_after_epoch_1(monkeypatch, "classifier", signal.SIGINT)
    assert main(train_argv("classifier", out, "--log-every", "1", limit=64, epochs=3)) == 128 + signal.SIGINT
    monkeypatch.undo()
    capsys.readouterr()
    assert main(train_argv("classifier", out, "--resume", "--log-every", "1", limit=64, epochs=2)) == 0
    err = capsys.readouterr().err
    assert f"dllab classifier: the run in {out} now plans 2 epochs, not 3 (config.json records the change)" in err
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["resumed"][-1]["changed"] == {"epochs": [3, 2]}
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["epochs"], summary["epochs_planned"]) == ("complete", 2, 2)
    assert main(train_argv("classifier", tmp_path / "plan", "--log-every", "1", limit=64, epochs=2)) == 0
    lrs = [r["lr"] for r in read_metrics(out) if r["split"] == "train"]
    planned = [r["lr"] for r in read_metrics(tmp_path / "plan") if r["split"] == "train"]
    assert lrs[2:] == pytest.approx(planned[2:])  # the second epoch on the new plan's schedule

    before = _files_and_bytes(out)
    capsys.readouterr()  # what the runs above said (an alarm of the tiny "plan" run, with --quiet too)
    assert main(["train", "classifier", "--resume", "--out", str(out), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert (f"--epochs 1: the run in {out} has already trained 2 epochs; give --epochs 2 or more (without "
            "--epochs it keeps its plan of 2)") in err
    assert _files_and_bytes(out) == before

    state = load_checkpoint(out / "checkpoints" / "last.pt")  # as if saved in the middle of epoch 3
    save_checkpoint({**state, "batch_in_epoch": 1}, out / "checkpoints" / "last.pt")
    with pytest.raises(ValueError, match="already trained 2 epochs and part of epoch 3; give --epochs 3 or more"):
        check_epochs_on_resume(Run.open(out), 2)
    check_epochs_on_resume(Run.open(out), 3)



def test_a_copied_run_resumes_in_the_copy_and_leaves_the_original_alone(tmp_path, capsys):
    import shutil

    original, copy = tmp_path / "original", tmp_path / "copy"
    assert main(train_argv("classifier", original, limit=64, epochs=1)) == 0
    shutil.copytree(original, copy)
    before = _files_and_bytes(original)
    assert main(["train", "classifier", "--resume", "--out", str(copy), "--epochs", "2", "--quiet"]) == 0
    assert _files_and_bytes(original) == before  # not one byte of the original changed
    assert f"run                      {copy}" in capsys.readouterr().out
    saved = json.loads((copy / "config.json").read_text())
    assert saved["out"] == str(copy) and saved["epochs"] == 2
    assert saved["resumed"][-1]["changed"] == {"epochs": [1, 2], "out": [str(original), str(copy)]}
    assert load_checkpoint(copy / "checkpoints" / "last.pt")["epoch"] == 2


def test_a_trained_run_whose_checkpoint_is_gone_is_not_silently_started_over(tmp_path, capsys):
    """Resuming a run that has trained but lost checkpoints/last.pt started it over, logging its
    steps a second time into metrics.jsonl; now it is refused (exit 1) and nothing is written."""
    import shutil

    run = tmp_path / "run"
    assert main(train_argv("classifier", run, limit=64, epochs=1)) == 0
    shutil.rmtree(run / "checkpoints")
    before = _files_and_bytes(run)
    capsys.readouterr()
    assert main(["train", "classifier", "--resume", "--out", str(run), "--quiet"]) == 0  # complete: nothing to do
    assert main(["train", "classifier", "--resume", "--out", str(run), "--quiet", "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert "has trained 2 steps" in err and "last.pt is missing" in err and "Traceback" not in err, err
    assert _files_and_bytes(run) == before


def test_a_moved_run_resumes_where_it_lies(tmp_path):
    old, new = tmp_path / "old", tmp_path / "renamed"
    assert main(train_argv("vae", old, limit=64, epochs=1)) == 0
    old.rename(new)
    assert main(["train", "vae", "--resume", "--out", str(new), "--epochs", "2", "--quiet"]) == 0
    assert not old.exists()
    assert json.loads((new / "summary.json").read_text())["epochs"] == 2


def test_eval_uses_the_runs_precision_unless_told(tmp_path):
    """A bf16 run's `dllab eval` gives summary.json's accuracy (it evaluates in bf16 as the run
    did); `--precision fp32` evaluates in fp32 and says so in eval.json."""
    out = tmp_path / "run"
    assert main(train_argv("classifier", out, "--precision", "bf16", limit=64, epochs=1)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert main(["eval", str(out), "--device", "cpu", "--quiet", "--checkpoint", "last"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["precision"] == "bfloat16" and result["test_acc"] == summary["test_acc"]
    assert result["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
    assert main(["eval", str(out), "--device", "cpu", "--quiet", "--precision", "fp32"]) == 0
    assert json.loads((out / "eval.json").read_text())["precision"] == "fp32"


def test_eval_refuses_the_options_of_another_kind_before_it_loads_anything(tmp_path, capsys, monkeypatch):
    """`dllab eval CLASSIFIER_RUN --iw-samples 5000` used to evaluate the classifier and ignore the
    VAE's option without a word: it is a usage error naming the option, and nothing is written."""
    import dllab.data

    out = tmp_path / "run"
    assert main(train_argv("classifier", out, limit=64, epochs=1)) == 0
    capsys.readouterr()
    monkeypatch.setattr(dllab.data, "load", lambda *a, **k: pytest.fail("loaded data"))
    assert main(["eval", str(out), "--iw-samples", "5000", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--iw-samples is for vae runs; {out} is a classifier run, which does not use it" in err
    assert main(["eval", str(out), "--num-samples", "10", "--classifier", str(out), "--tta"]) == 2
    assert "--classifier, --num-samples are for dcgan runs" in capsys.readouterr().err
    assert not (out / "eval.json").exists()
    from dllab.evaluate import check_options

    check_options("vae", {"iw_samples": 5, "tta": False, "precision": None, "checkpoint": "last"}, out)
    with pytest.raises(ValueError, match="--tta, --precision are for classifier runs"):
        check_options("dcgan", {"tta": True, "precision": "fp32", "num_samples": 10}, out)

def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(tmp_path, monkeypatch):
    """A non-interactive script's `cmd &` starts a process with SIGINT ignored: the terminal's Ctrl-C is
    not meant to reach it. Python keeps that in every phase, so training does too: a SIGINT after
    epoch 1 changes nothing, and SIGTERM still stops the run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the autouse foreground_sigint fixture restores it
    _signal_after_epoch_1(monkeypatch, "vae", signal.SIGINT)
    out = tmp_path / "run"
    assert main(train_argv("vae", out, limit=64, epochs=2)) == 0
    assert Run.open(out).complete and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    _signal_after_epoch_1(monkeypatch, "vae", signal.SIGTERM)
    assert main(train_argv("vae", tmp_path / "run2", limit=64, epochs=2)) == 128 + signal.SIGTERM


@pytest.mark.parametrize("kind", ["vae", "classifier"])
def test_resume_without_flags_keeps_the_runs_settings(kind, tmp_path, monkeypatch, capsys):
    """Stopped after epoch 1 of 3 and resumed with only --resume --out (the command the interrupt
    message prints), the run ends at epoch 3 with its own settings, not the parser's defaults."""
    out = tmp_path / "run"
    _signal_after_epoch_1(monkeypatch, kind, signal.SIGINT)
    assert main(train_argv(kind, out, "--lr", "0.003", limit=64, epochs=3)) == 128 + signal.SIGINT
    assert f"--resume --out {out}" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["train", kind, "--resume", "--out", str(out), "--quiet"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 3 and saved["lr"] == 0.003 and "resumed" not in saved
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 3
    assert json.loads((out / "summary.json").read_text())["epochs"] == 3


def test_resume_refuses_a_setting_that_cannot_change_and_names_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv("classifier", out, limit=64, epochs=1)) == 0
    before = _files_and_bytes(out)
    code = main(["train", "classifier", "--resume", "--out", str(out), "--epochs", "2", "--batch-size", "64",
                 "--width", "8", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--batch-size (the run has 32, given 64)" in err and "--width (the run has 4, given 8)" in err
    assert "--epochs" in err.split("only", 1)[1]  # and it says what can change
    assert _files_and_bytes(out) == before
    # a setting the run began without (a preset) is said so, not shown as None
    assert main(["train", "classifier", "--resume", "--out", str(out), "--preset", "cifar10-fast", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--preset (the run began without it, given 'cifar10-fast')" in err and "None" not in err
    assert _files_and_bytes(out) == before


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv("vae", out, epochs=1)) == 0
    before = (out / "checkpoints" / "last.pt").read_bytes()
    assert main(train_argv("vae", out, epochs=1)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


def _wait_for_steps(path, steps, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if path.exists() and sum(1 for r in read_metrics(path) if r.get("split") == "train") >= steps:
            return True
        time.sleep(0.05)
    raise TimeoutError("training did not reach the kill point")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_weights(sig, tmp_path):
    """Kill a run at a random step (SIGKILL: no chance to save; SIGTERM: saves first), resume it,
    and get bit-identical final weights to an uninterrupted run with the same seed."""
    kind = "classifier"
    extra = ["--checkpoint-every", "3", "--log-every", "1"]
    assert main(train_argv(kind, tmp_path / "straight", *extra, limit=256, epochs=2)) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as this process (conftest)
    proc = subprocess.Popen([sys.executable, "-m", "dllab",
                             *train_argv(kind, out, *extra, limit=256, epochs=2)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_at = int(torch.randint(4, 14, ()).item())
    reached = _wait_for_steps(out / "metrics.jsonl", kill_at, proc)
    if reached:
        proc.send_signal(sig)
    code = proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    if reached:
        assert code in (-sig, 128 + sig), err
        if sig == signal.SIGTERM:
            assert "checkpoint saved" in err
    assert main(train_argv(kind, out, *extra, "--resume", limit=256, epochs=2)) == 0
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(out))


def test_one_cycle_on_a_run_too_short_for_its_phases(tmp_path):
    """2 steps in all: one-cycle's warm-up and decay phases cannot both exist (was a ZeroDivisionError)."""
    assert main(train_argv("classifier", tmp_path / "run", limit=64, epochs=1)) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2


def _built_trainer(kind, tmp_path, **settings):
    """A kind's trainer, built (models, optimisers) as `dllab train` builds it, not yet trained."""
    from dllab.cli import build_parser
    from dllab.data import load
    from dllab.runs import Run
    from dllab.train import command_line_config, defaults, kind_module

    argv = train_argv(kind, tmp_path / "run")
    parsed = command_line_config(kind, build_parser().parse_args(argv), argv[2:], resume=False)
    config = {**defaults(kind), **parsed, **settings}
    data = load("mnist5k", limit=64)
    trainer = kind_module(kind).TRAINER(config, data, Run(tmp_path / "run", config, writer=False),
                                        torch.device("cpu"), quiet=True)
    trainer.build()
    return trainer


@pytest.mark.parametrize("kind", ["classifier", "vae", "dcgan"])
def test_trainers_use_fused_optimisers_where_torch_has_them(kind, tmp_path):
    from dllab.utils import optimizer_options

    trainer = _built_trainer(kind, tmp_path)
    expected = optimizer_options(torch.device("cpu")).get("fused") or None
    assert expected, "torch 2.4+ has fused SGD/Adam/AdamW kernels for the CPU"
    for name, opt in trainer.optimizers().items():
        assert opt.defaults.get("fused") is expected, name


@pytest.mark.parametrize("kind", ["classifier", "vae", "dcgan"])
def test_compile_wraps_the_models_but_checkpoints_hold_plain_weights(kind, tmp_path):
    plain = _built_trainer(kind, tmp_path / "a")
    compiled = _built_trainer(kind, tmp_path / "b", compile=True)
    wrapped = [m for m in vars(compiled).values() if isinstance(m, torch._dynamo.eval_frame.OptimizedModule)]
    assert wrapped, "config['compile'] should torch.compile the trained models"
    assert not any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in vars(plain).values())
    for name, module in compiled.modules().items():
        keys = list(module.state_dict())
        assert keys == list(plain.modules()[name].state_dict()), name
        assert not any("_orig_mod" in k for k in keys), name


def test_compile_flag_reaches_the_config_and_may_change_on_resume(tmp_path, monkeypatch):
    """`--compile` and `--compile-mode` are speed settings: saved in config.json, passed to
    torch.compile, and a resumed run may change them."""
    import dllab.engine as engine

    compiled_models = []
    monkeypatch.setattr(engine.torch, "compile", lambda m, **kw: compiled_models.append(kw["mode"]) or m)
    out = tmp_path / "run"

    def saved():
        config = json.loads((out / "config.json").read_text())
        return config["compile"], config["compile_mode"]

    assert main(train_argv("vae", out, "--compile", limit=64, epochs=1)) == 0
    assert saved() == (True, "default")
    assert compiled_models == ["default"], "the engine should have called torch.compile"
    compiled_models.clear()
    assert main(train_argv("vae", out, "--resume", limit=64, epochs=2)) == 0  # not given: kept
    assert saved() == (True, "default") and compiled_models == ["default"]
    compiled_models.clear()
    assert main(train_argv("vae", out, "--resume", "--compile-mode", "reduce-overhead", limit=64, epochs=3)) == 0
    assert saved() == (True, "reduce-overhead") and compiled_models == ["reduce-overhead"]
    compiled_models.clear()
    assert main(train_argv("vae", out, "--resume", "--no-compile", limit=64, epochs=4)) == 0
    assert saved() == (False, "reduce-overhead")
    assert not compiled_models


def test_a_run_from_before_a_setting_existed_resumes_with_its_default(tmp_path, monkeypatch):
    """A run whose config.json predates ``compile_mode`` resumes; its history records the change
    from the default the run had, not from nothing."""
    import dllab.engine as engine

    monkeypatch.setattr(engine.torch, "compile", lambda m, **kw: m)
    out = tmp_path / "run"
    assert main(train_argv("vae", out, limit=64, epochs=1)) == 0
    config = json.loads((out / "config.json").read_text())
    del config["compile_mode"]
    (out / "config.json").write_text(json.dumps(config))
    assert main(train_argv("vae", out, "--resume", "--compile", "--compile-mode", "reduce-overhead",
                           limit=64, epochs=2)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["compile_mode"] == "reduce-overhead"
    assert config["resumed"][-1]["changed"]["compile_mode"] == ["default", "reduce-overhead"]


def test_an_unknown_compile_mode_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(train_argv("vae", out, "--compile", "--compile-mode", "fastest", limit=64, epochs=1))
    assert e.value.code == 2 and "invalid choice: 'fastest'" in capsys.readouterr().err
    assert not out.exists()


def test_a_compile_mode_without_compile_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    """A mode without --compile would be ignored: refused (exit 2) for a new run, at a resume that
    gives it, and by a sweep before its first run; a resume may still turn --compile off."""
    import dllab.engine as engine

    monkeypatch.setattr(engine.torch, "compile", lambda m, **kw: m)
    out = tmp_path / "run"
    assert main(train_argv("vae", out, "--compile-mode", "reduce-overhead", limit=64, epochs=1)) == 2
    assert "--compile-mode reduce-overhead is torch.compile's mode" in capsys.readouterr().err and not out.exists()
    sweep_out = tmp_path / "sweep"
    assert main(["sweep", "vae", "--compile-mode", "default", "reduce-overhead", "--dataset", "mnist5k",
                 "--limit", "64", "--epochs", "1", "--sweep-out", str(sweep_out), "--quiet"]) == 2
    assert "add --compile" in capsys.readouterr().err and not sweep_out.exists()
    ablate_out = tmp_path / "ablate"
    assert main(["ablate", "classifier", "--compile-mode", "reduce-overhead", "--dataset", "mnist5k", "--limit", "64",
                 "--epochs", "1", "--ablate-out", str(ablate_out), "--quiet"]) == 2
    assert "add --compile" in capsys.readouterr().err and not ablate_out.exists()
    assert main(train_argv("vae", out, limit=64, epochs=1)) == 0
    assert main(train_argv("vae", out, "--resume", "--compile-mode", "max-autotune", limit=64, epochs=2)) == 2
    assert main(train_argv("vae", out, "--resume", "--compile", "--compile-mode", "max-autotune", limit=64,
                           epochs=2)) == 0
    assert main(train_argv("vae", out, "--resume", "--no-compile", limit=64, epochs=3)) == 0  # the mode is kept
    config = json.loads((out / "config.json").read_text())
    assert (config["compile"], config["compile_mode"]) == (False, "max-autotune")


@pytest.mark.parametrize("compile,mode,device,graphs", [
    (True, "reduce-overhead", "cuda", True), (True, "max-autotune", "cuda", True),
    (True, "default", "cuda", False), (True, "max-autotune-no-cudagraphs", "cuda", False),
    (False, "reduce-overhead", "cuda", False), (True, "reduce-overhead", "cpu", False)])
def test_steps_are_marked_for_cuda_graphs_only_where_torch_records_them(compile, mode, device, graphs, tmp_path,
                                                                       monkeypatch):
    """With CUDA graphs (``--compile`` in a graph-recording mode, on a GPU) each training step tells
    torch where it begins, so that a graph's replay never overwrites outputs the step still reads
    (the DCGAN calls D three times in one step); elsewhere nothing is marked."""
    import dllab.engine as engine

    monkeypatch.setattr(engine.torch, "compile", lambda m, **kw: m)  # the plain model, on the CPU
    marks = []
    monkeypatch.setattr(engine.torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    trainer = _built_trainer("dcgan", tmp_path, compile=compile, compile_mode=mode)
    trainer.device = torch.device(device)  # what the property reads; the step itself runs on the CPU
    assert trainer.uses_cuda_graphs is graphs
    trainer.device = torch.device("cpu")
    monkeypatch.setattr(type(trainer), "uses_cuda_graphs", property(lambda self: graphs))
    x, y = next(iter(trainer.loader("train", shuffle=True, augment=False, drop_last=True)))
    for _ in range(2):
        trainer.train_step(x, y)
        trainer.step += 1
    assert len(marks) == (2 if graphs else 0)


@pytest.mark.slow
def test_a_compiled_run_trains_and_resumes(tmp_path):
    """The real torch.compile path end to end (a minute or more of compilation on a 2-core CPU)."""
    out = tmp_path / "run"
    assert main(train_argv("vae", out, "--compile", limit=64, epochs=1)) == 0
    assert main(train_argv("vae", out, "--compile", "--resume", limit=64, epochs=2)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and math.isfinite(summary["test_elbo"])


def _table_rows(path):
    """Data rows of a Markdown table written by dllab (header and rule dropped), split into cells."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


# a tiny classifier run for the many-run commands
TINY_RUN = ["--dataset", "mnist5k", "--limit", "64", "--epochs", "1", "--quiet", "--device", "cpu",
            "--width", "4", "--batch-size", "32"]


def test_sweep_trains_every_combination_and_resumes_without_retraining(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "classifier", *TINY_RUN, "--lr", "0.05", "0.1", "--sweep-out", str(out)]
    assert main(argv) == 0
    rows = _table_rows(out / "sweep.md")
    assert sorted(r[0] for r in rows) == ["lr=0.05", "lr=0.1"]
    assert (out / "sweep.csv").exists() and (out / "sweep_test_acc.png").exists()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    assert len(stamps) == 2
    assert main(argv) == 0  # finished runs are read back, not trained again
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == stamps
    capsys.readouterr()
    other = [*argv[:2], "--label-smoothing", "0.1", *argv[2:]]  # not what the runs there were trained with
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "holds a finished classifier run with other settings (label_smoothing: 0.0 there, 0.1 asked)" in err
    assert "give the sweep another --sweep-out" in err
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == stamps


def test_an_interrupted_sweep_resumes_its_run(tmp_path, monkeypatch, capsys):
    """Stopped in its first run, the same sweep command resumes that run (its precision as auto
    picked it, its settings as saved) and trains the rest."""
    out = tmp_path / "sweep"
    argv = ["sweep", "classifier", *TINY_RUN, "--epochs", "2", "--lr", "0.05", "0.1", "--sweep-out", str(out)]
    _signal_after_epoch_1(monkeypatch, "classifier", signal.SIGINT)
    assert main(argv) == 128 + signal.SIGINT
    monkeypatch.undo()
    assert main(argv) == 0, capsys.readouterr().err
    for name in ("lr=0.05", "lr=0.1"):
        assert json.loads((out / name / "summary.json").read_text())["epochs"] == 2
    assert "resumed" not in json.loads((out / "lr=0.05" / "config.json").read_text())  # nothing changed


def test_ablate_with_seeds_reports_mean_and_spread(tmp_path, capsys):
    out = tmp_path / "ablate"
    argv = ["ablate", "classifier", *TINY_RUN, "--seeds", "0", "1", "--ablate-out", str(out)]
    assert main(argv) == 0
    runs = _table_rows(out / "ablation.md")
    assert len(runs) == 8  # 4 variants x 2 seeds
    assert {r[0] for r in runs} == {f"{v}-seed{s}" for v in ("bn+pool", "bn", "pool", "none") for s in (0, 1)}
    summary = _table_rows(out / "ablation_summary.md")
    assert len(summary) == 4 and all(r[2] == "2" for r in summary)  # batch_norm, max_pool, seeds, ...
    # the mean and sample std of test_acc for BN on, pool on, from the two runs' own summaries
    accs = [json.loads((out / f"bn+pool-seed{s}" / "summary.json").read_text())["test_acc"] for s in (0, 1)]
    row = next(r for r in summary if r[:2] == ["True", "True"])
    mean, std = (float(v) for v in row[3].split("+-"))
    assert math.isclose(mean, sum(accs) / 2, rel_tol=1e-3)
    assert math.isclose(std, abs(accs[0] - accs[1]) / math.sqrt(2), rel_tol=0.05, abs_tol=1e-4)
    configs = [json.loads((out / f"none-seed{s}" / "config.json").read_text()) for s in (0, 1)]
    assert [c["seed"] for c in configs] == [0, 1]


def test_ablate_refuses_seed_with_seeds(tmp_path, capsys):
    argv = ["ablate", "classifier", "--seed", "3", "--seeds", "0", "1", "--ablate-out", str(tmp_path / "a")]
    assert main(argv) == 2
    assert "either --seed or --seeds" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("flag", [["--norm"], ["--no-norm"], ["--maxpool", "on"], ["--layers", "torch"]])
def test_ablate_refuses_the_flags_it_sets(tmp_path, capsys, flag):
    """`--norm` was accepted and then overridden in half the variants, without a word."""
    assert main(["ablate", "classifier", *flag, "--ablate-out", str(tmp_path / "a")]) == 2
    assert f"{flag[0]} is set by the ablation itself" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("precision, first_tol", [("fp32", 1e-4), ("bf16", 1e-2)])
def test_scratch_layers_train_evaluate_and_train_on_like_torch_layers(tmp_path, precision, first_tol):
    """--layers scratch through the whole loop: training steps, an evaluation (inference mode, a
    larger batch) between epochs, more training; same seed and data as the torch layers give
    nearly the same numbers (the arithmetic differs only in rounding: float32 rounding in fp32,
    bf16 GEMM inputs under bf16 autocast, which is why the precision is pinned, not ``auto``)."""
    runs = {}
    for layers in ("torch", "scratch"):
        out = tmp_path / layers
        assert main(train_argv("classifier", out, "--layers", layers, "--precision", precision,
                               limit=128, epochs=2)) == 0
        assert json.loads((out / "summary.json").read_text())["precision"] == \
            {"fp32": "fp32", "bf16": "bfloat16"}[precision]
        runs[layers] = [r for r in read_metrics(out) if r["split"] in ("train", "test")]
    assert [r["split"] for r in runs["torch"]] == [r["split"] for r in runs["scratch"]]
    first = [r for r in runs["torch"] if r["split"] == "train"][0]
    first_s = [r for r in runs["scratch"] if r["split"] == "train"][0]
    assert math.isclose(first["loss"], first_s["loss"], rel_tol=first_tol)
    for a, b in zip(runs["torch"], runs["scratch"]):
        assert math.isclose(a["loss"], b["loss"], rel_tol=0.05), (a, b)


def test_every_declared_metric_name_is_written_by_a_real_run(tmp_path):
    """Each kind's METRICS (read by sweep, compare and report) names only keys that a run of that
    kind writes: headline and cost columns in summary.json, curves in metrics.jsonl's test records."""
    from dllab.train import KINDS, metric_names

    extra = {"classifier": [], "vae": ["--iw-samples", "4"],
             "dcgan": ["--classifier-run", str(tmp_path / "classifier"), "--eval-samples", "64"]}
    for kind in KINDS:  # the classifier first: it scores the DCGAN
        out = tmp_path / kind
        assert main(train_argv(kind, out, *extra[kind], limit=64, epochs=1)) == 0
        summary = json.loads((out / "summary.json").read_text())
        tested = set().union(*[r for r in read_metrics(out) if r["split"] == "test"])
        names = metric_names(kind)
        assert not [n for n in (*names.headline, *names.cost) if n not in summary], kind
        assert not [n for n in names.curves if n not in tested], kind


# the demo's three runs at test size
TINY_DEMO = {"classifier": {"width": 4, "epochs": 1, "limit": 64, "batch_size": 32},
             "vae": {"epochs": 1, "latent_dim": 4, "tsne_points": 100, "limit": 128, "batch_size": 32},
             "dcgan": {"epochs": 1, "g_width": 8, "d_width": 8, "nz": 16, "eval_samples": 64, "limit": 64,
                       "batch_size": 32}}


def test_demo_reuses_a_finished_run_only_with_the_same_settings(tmp_path, monkeypatch, capsys):
    """`dllab demo` twice: the second reuses the runs (nothing retrained); with other settings it
    is refused, naming the difference, and nothing is written. The default folder is named after
    the dataset and size, so `dllab demo --dataset fashion-mnist` after `make demo` is a new demo."""
    from dllab import demo as demo_module
    from dllab.runs import RunFolderError

    monkeypatch.setattr(demo_module, "QUICK", TINY_DEMO)
    out = tmp_path / "demo"
    report = demo_module.demo(out=out, device="cpu", quiet=True)
    assert report == out / "report.html" and report.exists()
    before = _files_and_bytes(out / "classifier")
    capsys.readouterr()
    demo_module.demo(out=out, device="cpu", quiet=False)  # reused: not one byte of the runs changed
    assert _files_and_bytes(out / "classifier") == before
    said = capsys.readouterr().err  # a log (not a terminal) gets one line per stage, saying so
    assert f"dllab demo: classifier (1/3) in {out / 'classifier'} (finished: reused if its settings match)" in said
    with pytest.raises(RunFolderError, match=r"epochs: 1 there, 2 asked"):
        demo_module.demo(out=out, epochs=2, device="cpu", quiet=True)
    assert _files_and_bytes(out / "classifier") == before
    assert demo_module.default_out() == Path("runs/demo")
    assert demo_module.default_out("fashion-mnist", full=True) == Path("runs/demo-fashion-mnist-full")
    assert demo_module.default_out(epochs=3) == Path("runs/demo-e3")


def test_an_interrupted_demo_says_to_run_the_demo_again_which_continues_it(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the demo's VAE: the one line names the same `dllab demo` command (not `dllab train
    --resume`, which would leave the DCGAN and the report undone), and that command reuses the
    classifier, continues the VAE and finishes the demo."""
    from dllab import demo as demo_module

    monkeypatch.setattr(demo_module, "QUICK", TINY_DEMO)
    out = tmp_path / "my demo"  # a space: the command is quoted for the shell
    argv = ["demo", "--out", str(out), "--device", "cpu", "--quiet"]
    with pytest.MonkeyPatch.context() as mp:
        _signal_after_epoch_1(mp, "vae", signal.SIGINT)
        assert main(argv) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "dllab train" not in err, err
    assert f"checkpoint saved in {out / 'vae'}/checkpoints/last.pt" in err
    assert err.strip().endswith(f"(continue with: dllab demo --out '{out}' --device cpu)"), err
    classifier = _files_and_bytes(out / "classifier")
    assert main(argv) == 0
    assert _files_and_bytes(out / "classifier") == classifier  # reused, not trained again
    assert all(Run.open(out / kind).complete for kind in ("classifier", "vae", "dcgan"))
    assert (out / "report.html").exists()


def test_a_run_that_fails_in_its_final_phase_is_finished_by_a_resume(tmp_path, monkeypatch, capsys):
    """The VAE trains, then its final t-SNE fails: the run keeps its last checkpoint, and a resume
    (here also with other --tsne-points, an evaluation setting) goes straight to the final phase
    and completes the run without retraining."""
    import dllab.figures.vae as vae_figures

    def broken(*args, **kwargs):
        raise ValueError("t-SNE failed (a test stand-in for a late failure)")

    out = tmp_path / "run"
    monkeypatch.setattr(vae_figures, "plot_tsne", broken)
    code = main(train_argv("vae", out, limit=128, epochs=1))
    assert code != 0 and "t-SNE failed" in capsys.readouterr().err
    failed = Run.open(out).summary()  # the run says it failed, how far it got, and why
    assert Run.open(out).status == "failed" and not Run.open(out).complete
    assert (failed["epochs"], failed["epochs_planned"]) == (1, 1) and "t-SNE failed" in failed["error"]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1
    steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    monkeypatch.undo()
    assert main(["train", "vae", "--resume", "--out", str(out), "--tsne-points", "60", "--quiet"]) == 0
    assert [r["step"] for r in read_metrics(out) if r["split"] == "train"] == steps  # no epoch retrained
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    assert Run.open(out).status == "complete"
    assert json.loads((out / "config.json").read_text())["tsne_points"] == 60
    assert (out / "figures" / "tsne.png").exists()


@pytest.mark.parametrize("kind, extra, needle", [
    ("classifier", ["--batch-size", "256"], "batch size 256 is larger than the training set (128"),
    ("vae", ["--tsne-points", "5"], "give at least 6 points"),
    ("dcgan", ["--classifier-run", "NOWHERE"], "does not exist"),
    ("dcgan", ["--classifier-run", "VAE_RUN"], "is a 'vae' run, not a classifier"),
])
def test_settings_that_cannot_work_are_refused_before_the_run_folder_is_made(kind, extra, needle, tmp_path,
                                                                              capsys):
    vae_run = tmp_path / "vae_run"
    if "VAE_RUN" in extra:
        assert main(train_argv("vae", vae_run, limit=64, epochs=1)) == 0
        capsys.readouterr()
    extra = [str(tmp_path / "nowhere") if e == "NOWHERE" else str(vae_run) if e == "VAE_RUN" else e
             for e in extra]
    out = tmp_path / "run"
    assert main(train_argv(kind, out, *extra, limit=128, epochs=1)) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_classifier_run_on_another_dataset_is_refused(tmp_path, capsys):
    from dllab.train.dcgan import validate

    clf = tmp_path / "clf"
    assert main(train_argv("classifier", clf, limit=64, epochs=1)) == 0
    from dllab.data import load
    from dllab.train.dcgan import DCGANTrainConfig

    config = DCGANTrainConfig(dataset="fashion-mnist", classifier_run=str(clf))
    with pytest.raises(ValueError, match="trained on 'mnist5k', not on 'fashion-mnist'"):
        validate(config, load("mnist5k", limit=64))


def test_a_classifier_run_that_has_not_finished_an_epoch_cannot_score_a_gan(tmp_path, capsys):
    """A classifier interrupted in its first epoch has a checkpoint but features of an untrained
    network: refused, for training and for eval, saying how to finish it. One interrupted later
    is used, and said. A file is called a file, not a missing folder."""
    import shutil

    clf = tmp_path / "clf"
    assert main(train_argv("classifier", clf, limit=64, epochs=1)) == 0
    records = read_metrics(clf)
    summary = json.loads((clf / "summary.json").read_text())
    early, later = tmp_path / "early", tmp_path / "later"
    for folder in (early, later):
        shutil.copytree(clf, folder)
    (early / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records if r["split"] != "test"))
    (early / "summary.json").write_text(json.dumps({**summary, "status": "interrupted", "epochs": 0}))
    (later / "summary.json").write_text(json.dumps({**summary, "status": "interrupted", "epochs_planned": 2}))
    gan = tmp_path / "gan"
    capsys.readouterr()
    assert main(train_argv("dcgan", gan, "--classifier-run", str(early), "--eval-samples", "64", limit=64)) == 2
    assert (f"--classifier-run {early} has not finished an epoch (interrupted): its features would score "
            f"the images by an untrained network; finish it with `dllab train classifier --resume --out {early}`"
            ) in capsys.readouterr().err
    assert not gan.exists()
    assert main(train_argv("dcgan", gan, "--classifier-run", str(later), "--eval-samples", "64", limit=64)) == 0
    assert f"note: --classifier-run {later} is interrupted, not complete" in capsys.readouterr().err
    assert main(["eval", str(gan), "--classifier", str(early), "--num-samples", "64", "--device", "cpu"]) == 2
    assert "has not finished an epoch" in capsys.readouterr().err
    assert main(["eval", str(gan), "--classifier", str(clf / "config.json"), "--device", "cpu"]) == 2
    assert f"{clf / 'config.json'} is a file, not a run folder" in capsys.readouterr().err
    assert not (gan / "eval.json").exists()

def test_a_dcgan_on_images_of_a_size_it_does_not_make_resizes_them(tmp_path, capsys):
    """16-pixel folder images had no way out (--image-size 32 "differs from the images' size").
    --image-size now resizes the data, as for the classifier, and the hint says so; a classifier
    trained at another size sees the images resized to its own, and the protocol says how."""
    import fakedata

    folder = tmp_path / "images"
    fakedata.write_image_folder(folder, n_per_class=30, size=(16, 16))
    common = ["--dataset", f"folder:{folder}", "--epochs", "1", "--quiet", "--device", "cpu"]
    out, clf = tmp_path / "gan", tmp_path / "clf"
    assert main(["train", "dcgan", *common, *TINY["dcgan"], "--out", str(out)]) == 2
    assert ("images are 16x16, a size the DCGAN does not make; give --image-size 28, 32 or 64 to resize "
            "them") in capsys.readouterr().err
    assert not out.exists()
    assert main(["train", "classifier", *common, *TINY["classifier"], "--out", str(clf)]) == 0
    assert main(["train", "dcgan", *common, *TINY["dcgan"], "--image-size", "32", "--classifier-run", str(clf),
                 "--eval-samples", "32", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"]["resize"] == ("bilinear (antialiased) from 32x32 to the classifier's input "
                                             "size, 16x16")
    assert math.isfinite(summary["clf_fid"])
    assert main(["eval", str(out), "--num-samples", "32", "--device", "cpu", "--quiet"]) == 0
    assert json.loads((out / "eval.json").read_text())["protocol"]["resize"] == summary["protocol"]["resize"]

def test_one_cycle_with_a_one_step_warm_up_trains(tmp_path):
    """20 steps with warm-up 0.05 epochs (1 step) divided by zero inside torch's OneCycleLR."""
    assert main(train_argv("classifier", tmp_path / "run", "--warmup-epochs", "0.05", limit=640,
                           epochs=1)) == 0


def test_auto_precision_is_recorded_and_kept_on_resume(tmp_path, monkeypatch):
    from dllab.utils import AUTO_PRECISION_ENV

    out = tmp_path / "run"
    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp32")
    assert main(train_argv("classifier", out, limit=64, epochs=1)) == 0
    assert json.loads((out / "config.json").read_text())["precision"] == "fp32"
    monkeypatch.setenv(AUTO_PRECISION_ENV, "bf16")  # auto would now pick bf16: the run keeps fp32
    assert main(["train", "classifier", "--resume", "--out", str(out), "--epochs", "2", "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["precision"] == "fp32"


def test_a_run_stopped_before_its_first_checkpoint_is_started_by_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C between the run folder and the first checkpoint (e.g. while the models are built):
    the folder holds only config.json; --resume then trains it from the beginning."""
    from dllab.train import kind_module

    trainer = kind_module("vae").TRAINER

    def interrupted_build(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "build", interrupted_build)
    out = tmp_path / "run"
    assert main(train_argv("vae", out, limit=64, epochs=1)) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (out / "config.json").exists() and not (out / "checkpoints" / "last.pt").exists()
    monkeypatch.undo()
    assert main(["train", "vae", "--resume", "--out", str(out), "--quiet"]) == 0
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1


def test_sweep_with_nothing_to_sweep_is_a_usage_error(tmp_path, capsys):
    assert main(["sweep", "vae", "--epochs", "1", "--sweep-out", str(tmp_path / "s")]) == 2
    assert "nothing to sweep" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_in_the_final_phase_stops_the_run_and_resume_finishes_it(sig, tmp_path, monkeypatch, capsys):
    """A signal during the VAE's final t-SNE (the hook: t-SNE starting) stops the run at once with
    128 + signal and one line; --resume goes straight back to the final phase."""
    import dllab.figures.vae as vae_figures

    plot_tsne = vae_figures.plot_tsne

    def tsne_then_signal(*args, **kwargs):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler interrupts this; it would run on if the signal were ignored
        return plot_tsne(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(vae_figures, "plot_tsne", tsne_then_signal)
    start = time.perf_counter()
    assert main(train_argv("vae", out, limit=128, epochs=1)) == 128 + sig
    assert time.perf_counter() - start < 60
    err = capsys.readouterr().err
    assert f"--resume --out {out}" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert Run.open(out).status == "interrupted" and not Run.open(out).complete
    steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    monkeypatch.undo()
    assert main(["train", "vae", "--resume", "--out", str(out), "--quiet"]) == 0
    assert [r["step"] for r in read_metrics(out) if r["split"] == "train"] == steps
    assert (out / "summary.json").exists() and (out / "figures" / "tsne.png").exists()




def test_a_signal_in_the_final_phase_whose_exception_is_swallowed_still_stops_the_run(tmp_path, monkeypatch,
                                                                                    capsys):
    """The exception a signal raises may land where it is swallowed (a weakref callback, a
    library's `except Exception`): the run used to go on and be written complete. It is
    interrupted, as if the exception had gone through."""
    import dllab.figures.vae as vae_figures

    plot_tsne = vae_figures.plot_tsne

    def tsne_swallowing_a_signal(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except Exception:  # noqa: BLE001 (what such code does)
            pass
        return plot_tsne(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(vae_figures, "plot_tsne", tsne_swallowing_a_signal)
    assert main(train_argv("vae", out, limit=128, epochs=1)) == 130
    err = capsys.readouterr().err
    assert f"--resume --out {out}" in err and "Traceback" not in err
    assert Run.open(out).status == "interrupted"


@pytest.mark.parametrize("command", ["sweep", "reproduce"])
def test_an_interrupted_sweep_or_study_names_the_command_that_continues_it(command, tmp_path, monkeypatch,
                                                                           capsys):
    """Ctrl-C after the first epoch of a sweep's or a study's first run: the line names the same
    command (with the folder it chose), not `dllab train --resume`, and that command finishes
    every run."""
    from dllab import reproduce

    out = tmp_path / "my runs"  # a space: the command is quoted for the shell
    if command == "sweep":
        argv = ["sweep", "vae", "--beta", "0.5", "1", "--epochs", "2", "--limit", "64", "--batch-size", "32",
                "--tsne-points", "64", "--quiet", "--sweep-out", str(out)]
        expected = ("dllab sweep vae --beta 0.5 1 --epochs 2 --limit 64 --batch-size 32 --tsne-points 64 "
                    f"--quiet --sweep-out '{out}'")
    else:
        monkeypatch.setitem(reproduce.QUICK, "epochs", 2)  # a quick study's runs, with a second epoch
        argv = ["reproduce", "tsne", "--quick", "--out", str(out), "--quiet"]
        expected = f"dllab reproduce tsne --seeds 1 --out '{out}' --quick"
    with pytest.MonkeyPatch.context() as mp:
        _signal_after_epoch_1(mp, "vae", signal.SIGINT)
        assert main(argv) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert f"(continue with: {expected})" in err and "--resume" not in err
    assert main(shlex.split(expected)[1:]) == 0
    runs = [p.parent for p in out.rglob("config.json")]
    assert len(runs) == (2 if command == "sweep" else 1) and all(Run.open(r).complete for r in runs)


def test_r1_adds_its_penalty_to_d_only(tmp_path):
    """`--r1 GAMMA`: the first step's GAN losses are those of the same run without it (same seed,
    same weights, same batch), the penalty is logged beside them, and it changes what D learns."""
    plain, r1 = tmp_path / "plain", tmp_path / "r1"
    assert main(train_argv("dcgan", plain, limit=64, epochs=1)) == 0
    assert main(train_argv("dcgan", r1, "--r1", "10", limit=64, epochs=1)) == 0
    first = [next(r for r in read_metrics(run) if r["split"] == "train") for run in (plain, r1)]
    for key in ("d_loss", "d_loss_real", "d_loss_fake", "d_real", "d_fake_before"):
        assert first[0][key] == first[1][key], key
    assert "r1_penalty" not in first[0] and first[1]["r1_penalty"] > 0
    assert math.isfinite(first[1]["r1_penalty"])
    a, b = final_weights(plain), final_weights(r1)
    assert not torch.equal(a["discriminator"]["blocks.0.0.weight"], b["discriminator"]["blocks.0.0.weight"])
    assert Run.open(r1).config["r1"] == 10.0


def test_lazy_r1_applies_the_penalty_every_nth_step_scaled_by_n(tmp_path):
    """`--r1 5 --r1-every 2` penalises step 0 with gamma 10 and leaves step 1 alone: its step 1
    starts from the weights of a `--r1 10` run's step 1 (same GAN losses there), and logs no
    penalty."""
    every, full = tmp_path / "every", tmp_path / "full"
    assert main(train_argv("dcgan", every, "--r1", "5", "--r1-every", "2", limit=64, epochs=1)) == 0
    assert main(train_argv("dcgan", full, "--r1", "10", limit=64, epochs=1)) == 0
    lazy, eager = ([r for r in read_metrics(run) if r["split"] == "train"] for run in (every, full))
    assert [r["step"] for r in lazy] == list(range(1, len(lazy) + 1))  # every step logged
    assert [("r1_penalty" in r) for r in lazy] == [i % 2 == 0 for i in range(len(lazy))]
    assert lazy[0]["r1_penalty"] == eager[0]["r1_penalty"]
    for key in ("d_loss_real", "d_loss_fake", "d_real"):
        assert lazy[1][key] == eager[1][key], key
    assert all("r1_penalty" in r for r in eager)


def test_lazy_r1_is_logged_as_the_mean_over_the_steps_that_gave_it(tmp_path):
    """With --log-every 2 and --r1-every 2 each record spans one penalised step and one not: it
    logs that step's penalty, not half of it (the other step is not a zero)."""
    one, two = tmp_path / "one", tmp_path / "two"
    lazy = ["--r1", "1", "--r1-every", "2"]
    assert main(train_argv("dcgan", one, *lazy, "--log-every", "1", limit=64, epochs=1)) == 0
    assert main(train_argv("dcgan", two, *lazy, "--log-every", "2", limit=64, epochs=1)) == 0
    each, pairs = ([r for r in read_metrics(run) if r["split"] == "train"] for run in (one, two))
    assert [r["step"] for r in pairs] == [2]  # 64 images at batch 32: steps 1 and 2
    assert pairs[0]["r1_penalty"] == pytest.approx(each[0]["r1_penalty"], rel=1e-6)
    assert pairs[0]["d_loss"] == pytest.approx((each[0]["d_loss"] + each[1]["d_loss"]) / 2, rel=1e-5)


@pytest.mark.parametrize("extra, named", [(["--r1", "1", "--compile"], "torch.compile does not do"),
                                          (["--loss", "hinge", "--label-smoothing", "0.1"],
                                           "--label-smoothing 0.1 is defined for --loss bce only")])
def test_dcgan_settings_that_would_fail_at_the_first_step_are_refused_before_writing(tmp_path, capsys, extra,
                                                                                      named):
    out = tmp_path / "run"
    assert main(train_argv("dcgan", out, *extra, limit=64, epochs=1)) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not out.exists()


def test_a_hinge_runs_loss_plot_is_drawn_for_hinge(tmp_path, monkeypatch):
    import dllab.figures.gan as figures

    kinds = []
    real = figures.plot_gan_losses
    monkeypatch.setattr(figures, "plot_gan_losses",
                        lambda records, path, loss_kind="bce", **kw: kinds.append(loss_kind) or real(
                            records, path, loss_kind=loss_kind, **kw))
    assert main(train_argv("dcgan", tmp_path / "run", "--loss", "hinge", limit=64, epochs=1)) == 0
    assert kinds and set(kinds) == {"hinge"}


def test_d_minimises_its_gan_loss_plus_half_gamma_times_r1(tmp_path):
    """The loss D's optimiser sees is d_loss + gamma / 2 * r1_penalty (gamma 2 here: + 1 x the
    penalty; with --r1-every 3, gamma 6 on the penalised steps), and the logged d_loss is the
    GAN loss alone, the same as without R1."""
    from dllab.config import from_mapping
    from dllab.data import load
    from dllab.train import config_class, defaults, kind_module

    def d_step(**settings):
        cfg = from_mapping(config_class("dcgan"), {**defaults("dcgan"), "dataset": "mnist5k", "limit": 64,
                                                   "batch_size": 32, "device": "cpu", "out": str(tmp_path),
                                                   "g_width": 8, "d_width": 8, "nz": 16, **settings})
        torch.manual_seed(0)
        trainer = kind_module("dcgan").TRAINER(cfg, load("mnist5k", limit=64), Run(tmp_path, {}, writer=False),
                                               torch.device("cpu"), quiet=True)
        trainer.build()
        x, y = next(iter(trainer.loader("train", shuffle=False, augment=False, drop_last=True)))
        torch.manual_seed(1)  # the same z
        return trainer.d_loss(trainer.prepare(x, y))

    plain_total, plain = d_step()
    total, logged = d_step(r1=2.0)
    lazy_total, lazy = d_step(r1=2.0, r1_every=3)  # step 0 is penalised, at 3 x gamma
    assert "r1_penalty" not in plain and logged["r1_penalty"] > 0
    assert torch.equal(logged["d_loss"], plain["d_loss"]) and torch.equal(plain_total, plain["d_loss"])
    assert torch.allclose(total, plain_total + 1.0 * logged["r1_penalty"], rtol=1e-6)
    assert torch.allclose(lazy_total, plain_total + 3.0 * lazy["r1_penalty"], rtol=1e-6)


def test_a_sparse_metric_is_averaged_over_the_kept_steps_that_gave_it():
    """Three steps: one skipped on the device (its metrics zeroed, kept 0) that had an R1 penalty,
    one kept with a penalty of 3, one kept without. d_loss is the mean over the 2 kept steps, the
    penalty over the 1 kept step that gave it; a window with no such step leaves it out."""
    from types import SimpleNamespace

    from dllab.engine import STEP_KEPT, STEPS_OF, Trainer

    me = SimpleNamespace(device=torch.device("cpu"), distributed=False)
    t = torch.tensor
    sums = {STEP_KEPT: t(2.0), "d_loss": t(1.0 + 2.0), "r1_penalty": t(0.0 + 3.0), STEPS_OF + "r1_penalty": t(1.0)}
    assert Trainer._mean_over_ranks(me, sums) == {"d_loss": 1.5, "r1_penalty": 3.0}
    none = {STEP_KEPT: t(1.0), "d_loss": t(2.0), "r1_penalty": t(0.0), STEPS_OF + "r1_penalty": t(0.0)}
    assert Trainer._mean_over_ranks(me, none) == {"d_loss": 2.0}
    assert Trainer._mean_over_ranks(me, {STEP_KEPT: t(0.0), "d_loss": t(0.0)}) == {}


def test_sweep_with_a_repeated_value_is_a_usage_error(tmp_path, capsys):
    """`--lr 0.1 0.1` trained one run and listed it twice in sweep.md; refused like ablate's --seeds."""
    assert main(["sweep", "vae", "--epochs", "1", "--lr", "0.1", "0.1", "--sweep-out", str(tmp_path / "s")]) == 2
    assert "--lr repeats a value: 0.1 0.1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_sgd_momentum_flags_with_adamw_are_refused_before_anything_is_written(tmp_path, capsys):
    """--optimizer adamw ignored --momentum and --no-nesterov: a new run (or a sweep, before its
    first run) that gives them is refused, naming them; AdamW with SGD's defaults is fine."""
    from dllab.train import check_new_run
    from dllab.train.classifier import ClassifierTrainConfig

    for extra, named in ((["--momentum", "0.5"], "--momentum sets"), (["--no-nesterov"], "--no-nesterov sets")):
        assert main(train_argv("classifier", tmp_path / "run", "--optimizer", "adamw", *extra)) == 2
        assert named in capsys.readouterr().err
    sweep = ["sweep", "classifier", *TINY_RUN, "--optimizer", "sgd", "adamw", "--momentum", "0.5",
             "--sweep-out", str(tmp_path / "s")]
    assert main(sweep) == 2
    assert "--optimizer adamw has none" in capsys.readouterr().err
    assert main(["ablate", "classifier", *TINY_RUN, "--optimizer", "adamw", "--momentum", "0.5",
                 "--ablate-out", str(tmp_path / "a")]) == 2
    assert "--momentum sets SGD's momentum" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written, not even the sweep's or ablation's folder
    check_new_run("classifier", ClassifierTrainConfig(optimizer="adamw"))
    check_new_run("classifier", ClassifierTrainConfig(momentum=0.5, nesterov=False))


def test_settings_that_would_do_nothing_are_refused_before_anything_is_written(tmp_path, capsys):
    """A cosine or constant warm-up longer than the run never reaches --lr, and instance noise with
    no steps to anneal it over is no noise: both were accepted without a word. Refused for a new
    run and a sweep, naming the setting; what is meaningful (one-cycle's capped rise, steps with no
    noise in an ablation) is not."""
    from dllab.train import check_new_run
    from dllab.train.classifier import ClassifierTrainConfig
    from dllab.train.dcgan import DCGANTrainConfig

    assert main(train_argv("classifier", tmp_path / "run", "--schedule", "cosine", "--warmup-epochs", "3",
                           epochs=2)) == 2
    assert ("--warmup-epochs 3 is longer than the run (--epochs 2): with --schedule cosine the learning "
            "rate would never reach --lr") in capsys.readouterr().err
    assert main(train_argv("dcgan", tmp_path / "run", "--instance-noise", "0.1")) == 2
    assert "--instance-noise 0.1 falls to 0 over --instance-noise-steps, which is 0" in capsys.readouterr().err
    assert main(["sweep", "dcgan", "--epochs", "1", "--instance-noise", "0", "0.1",
                 "--sweep-out", str(tmp_path / "s")]) == 2
    assert "--instance-noise-steps too" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    for fine in (ClassifierTrainConfig(epochs=2, warmup_epochs=2, schedule="constant"),
                 ClassifierTrainConfig(epochs=2, warmup_epochs=3, schedule="onecycle")):
        check_new_run("classifier", fine)
    check_new_run("dcgan", DCGANTrainConfig(instance_noise_steps=100))
    check_new_run("dcgan", DCGANTrainConfig(instance_noise=0.1, instance_noise_steps=100))

def test_a_sweep_begun_before_the_adamw_check_still_continues(tmp_path, monkeypatch, capsys):
    """A sweep over --optimizer with --momentum made before the check existed: its runs are
    reused or continued as they are (as a resume is), not refused by the new-run check."""
    import dllab.train.classifier as classifier

    sweep = ["sweep", "classifier", *TINY_RUN, "--optimizer", "sgd", "adamw", "--momentum", "0.5",
             "--sweep-out", str(tmp_path / "s")]
    with monkeypatch.context() as m:  # as dllab was before the check
        m.setattr(classifier, "check_new_run", lambda config: None)
        assert main(sweep) == 0
    before = _files_and_bytes(tmp_path / "s" / "optimizer=adamw")
    capsys.readouterr()
    assert main(sweep) == 0  # finished runs: reused, their table written again
    assert _files_and_bytes(tmp_path / "s" / "optimizer=adamw") == before


def test_resuming_a_finished_run_to_measure_again_says_so_in_the_summary(tmp_path, capsys):
    """A finished classifier resumed with --tta is measured again: summary.json says when, keeps
    the numbers training gave (metrics.jsonl's last test row) under measured_again.before, and
    says whether its test numbers are flip-averaged; a second change keeps training's numbers."""
    out = tmp_path / "run"
    assert main(train_argv("classifier", out, limit=64, epochs=1)) == 0
    first = json.loads((out / "summary.json").read_text())
    assert first["tta"] is False and "measured_again" not in first
    last_test = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["split"] == "test"][-1]
    for tta in ("--tta", "--no-tta"):
        assert main(["train", "classifier", "--resume", "--out", str(out), tta, "--quiet"]) == 0
        again = json.loads((out / "summary.json").read_text())
        assert again["tta"] is (tta == "--tta") and again["measured_again"]["at"]
        assert again["measured_again"]["before"] == {k: first[k] for k in ("test_loss", "test_acc", "ece")}
        assert again["measured_again"]["before"]["test_loss"] == last_test["loss"]
    assert again["test_loss"] == first["test_loss"]  # back without flips: the same evaluation
    # a run stopped in its final phase and resumed is measured for the first time: nothing to say
    stopped = {k: v for k, v in first.items() if k not in ("test_loss", "test_acc", "ece")}
    (out / "summary.json").write_text(json.dumps({**stopped, "status": "interrupted"}))
    assert main(["train", "classifier", "--resume", "--out", str(out), "--quiet"]) == 0
    final = json.loads((out / "summary.json").read_text())
    assert final["status"] == "complete" and "measured_again" not in final
    assert final["test_loss"] == first["test_loss"]
    capsys.readouterr()
