"""The benchmark scripts run end to end (tiny settings) and print complete tables.

Their figures are not checked here (timings belong to benchmarks, not tests); what is checked is
that the scripts still work with the package as it is, including the CPU memory columns, which
come from a child process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _usage_error(monkeypatch, capsys, script: str, args: list[str]) -> str:
    """``script``'s ``main(args)`` run in this process (a process start and torch's import cost
    seconds each): it must exit with code 2; returns what it wrote to stderr. One bad input per
    script is also run as a real process (``test_*_usage_error_is_one_process_exit``)."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module(script.removesuffix(".py"))
    capsys.readouterr()
    threads = torch.get_num_threads()  # a script may set them before it finds the bad input
    try:
        with pytest.raises(SystemExit) as e:
            module.main(args)
    finally:
        torch.set_num_threads(threads)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("script, args, message", [
    ("conv_routes.py", ["routes", "--batch", "0"], "must be at least 1"),
    ("train_throughput.py", ["--rounds", "0"], "must be at least 1"),
    ("backward_inputs.py", ["--rounds", "0"], "must be at least 1")])
def test_a_benchmarks_usage_error_is_one_process_exit(script, args, message):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_layers_benchmark_prints_ratios_and_memory():
    out = _run("layers.py", "--dtype", "fp32", "--batch", "2", "--repeats", "1", "--only", "512",
               "--workspace-limit-mb", "4")
    assert "workspace limit 4 MiB" in out
    rows = [line for line in out.splitlines() if line.startswith(("conv", "bn", "maxpool", "stem"))]
    assert len(rows) == 4, out  # the 3x3 and 1x1 convolutions 256->512 s2, conv3x3 512 @4, bn 512 @4
    for row in rows:
        # ... scratch ms, torch ms, ratio, min, peak s/t, saved s/t, ws: all numbers (memory from the child)
        assert re.search(r"\s[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+/\d+\s+\d+/\d+\s+\d+$", row), row
    assert re.search(r"overall \(ResNet-18 weighted\): [\d.]+", out)


def test_train_throughput_benchmark_runs():
    out = _run("train_throughput.py", "--kinds", "vae", "--rounds", "1", "--seconds", "0.2", "--min-steps", "1",
               "--warmup", "1", "--loader-batches", "2", "--batch-size", "16")
    rows = [line for line in out.splitlines() if line.startswith(("| reference", "| dllab"))]
    assert [r.split("|")[1].strip() for r in rows] == ["reference", "dllab-loopopt", "dllab"], out
    for row in rows:
        step_mib = row.split("|")[5].strip()
        assert re.fullmatch(r"\d+", step_mib), row  # measured in the child process



def test_conv_routes_benchmark_times_every_route_and_names_the_chosen_one():
    out = _run("conv_routes.py", "routes", "--batch", "2", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith("conv")]
    assert len(rows) == 11, out  # ResNet-18's CIFAR convolutions
    for row in rows:
        assert re.search(r"(\s+[\d.]+){5}  (planar|nhwc), (gemm|copy) \([\d.]+x the best\)$", row), row
    out = _run("conv_routes.py", "routes", "--batch", "2", "--repeats", "1", "--memory-format", "channels_last")
    assert sum(bool(re.search(r"  (per-image gemms|one gemm) \(", line)) for line in out.splitlines()) == 11, out


def test_conv_routes_benchmark_times_winograd_against_im2col():
    out = _run("conv_routes.py", "winograd", "--batch", "2", "--repeats", "1")
    rows = [line for line in out.splitlines() if re.match(r"\d+->\d+ @\d+ ", line)]
    assert [r.split()[0] + r.split()[1] for r in rows] == ["64->64@32", "128->128@16", "256->256@8", "512->512@4",
                                                          "64->64@28", "128->128@14", "256->256@7", "512->512@4"], out
    for row in rows:  # torch, im2col and winograd times, then three ratios
        assert len(re.findall(r"\d+\.\d+", row)) == 6, row


def test_conv_routes_benchmark_times_the_weight_gradient_both_ways():
    out = _run("conv_routes.py", "weight-grad", "--batch", "2", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith("conv")]
    assert len(rows) == 11, out
    for row in rows:
        assert re.search(r"\s\d+(\s+[\d.]+){6}\s+(gemm|torch)$", row), row
    # the route column follows the rule: output images of at most 64 pixels, where bf16 is native
    native = "native bf16 GEMM: True" in out
    out_pixels = [int(row.split()[4]) for row in rows]  # "conv3x3 128->256 s2 @14  49 ..."
    assert [row.split()[-1] for row in rows] == ["gemm" if native and px <= 64 else "torch" for px in out_pixels]


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_conv_routes_benchmark_times_torch_conv2ds_routes(layout):
    out = _run("conv_routes.py", "torch-conv", "--batch", "2", "--repeats", "1", "--memory-format", layout)
    assert ("channels-last" if layout == "channels_last" else "NCHW") in out.splitlines()[0], out
    rows = [line for line in out.splitlines() if line.startswith("conv")]
    assert len(rows) == 11, out
    for row in rows:
        assert re.search(r"\s\d+(\s+[\d.]+){3}  (all|weight-grad|torch)$", row), row
    # the chosen column follows the rule: all up to 16 output pixels, the weight gradient up to 64
    native = "native bf16 GEMM: True" in out
    out_pixels = [int(row.split()[4]) for row in rows]
    want = ["torch" if not native or px > 64 else "all" if px <= 16 else "weight-grad" for px in out_pixels]
    assert [row.split()[-1] for row in rows] == want


def test_conv_routes_benchmark_times_the_classifier_step_with_and_without_the_tiny_route():
    out = _run("conv_routes.py", "step", "--batch", "2", "--repeats", "1", "--memory-format", "contiguous")
    assert "NCHW, batch 2" in out.splitlines()[0], out
    for name in ("tiny route off", "tiny route on"):
        assert re.search(rf"^{name}\s+median\s+[\d.]+ img/s  rounds \d+$", out, re.M), out
    assert re.search(r"^on / off: [\d.]+$", out, re.M), out


@pytest.mark.parametrize("args,message", [
    (["step", "--batch", "4050"], "at most 4000"),
    (["torch-conv", "--batch", "99999999999999999999"], "above 4096"),
    (["routes", "--repeats", "abc"], "expected a positive integer, got 'abc'"),
    (["routes", "--batch", "0"], "must be at least 1"),
])
def test_conv_routes_benchmark_refuses_bad_input_with_a_usage_error(args, message, monkeypatch, capsys):
    assert message in _usage_error(monkeypatch, capsys, "conv_routes.py", args)


@pytest.mark.parametrize("args,message", [
    (["--rounds", "0"], "must be at least 1"), (["--threads", "0"], "must be at least 1"),
    (["--seconds", "-1"], "must be a positive finite number"), (["--batch-size", "0"], "must be at least 1"),
    (["--batch-size", "100000", "--kinds", "vae"], "larger than mnist5k's 4000 training images"),
    (["--device", "tpu"], "unknown device 'tpu'"), (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--json", "/nonexistent-dir/x.json"], "its folder does not exist"), (["--json", "/"], "a folder, not a file"),
])
def test_train_throughput_refuses_bad_input_with_a_usage_error(args, message, monkeypatch, capsys):
    assert message in _usage_error(monkeypatch, capsys, "train_throughput.py", args)


def test_train_throughput_times_each_compile_mode_once(monkeypatch, capsys):
    """``--compile --compile-modes``: one compiled variant (and one bf16 one) per mode, named after
    it, each with the config settings that ``dllab train --compile --compile-mode`` gives."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_throughput

    variants = dict(train_throughput.variants_for("vae", True, True, ["default", "reduce-overhead", "default"]))
    compiled = {name: opts for name, opts in variants.items() if "compile" in name}
    assert compiled == {
        "dllab+compile": {"compile": True, "compile_mode": "default"},
        "dllab+bf16+compile": {"precision": "bf16", "compile": True, "compile_mode": "default"},
        "dllab+compile:reduce-overhead": {"compile": True, "compile_mode": "reduce-overhead"},
        "dllab+bf16+compile:reduce-overhead": {"precision": "bf16", "compile": True, "compile_mode": "reduce-overhead"}}
    assert not any("compile" in name for name, _ in train_throughput.variants_for("vae", False, True, ["default"]))
    # --only keeps the reference, plain dllab and the variants named by it
    monkeypatch.setattr(train_throughput, "Reference", lambda *a, **kw: "reference")
    monkeypatch.setattr(train_throughput, "Dllab", lambda *a, **kw: kw)
    args = argparse.Namespace(workers=0, compile=True, bf16=True, compile_modes=["default", "reduce-overhead"],
                              only=["bf16"])
    runners = train_throughput.build_runners("vae", None, 8, "cpu", args)
    assert list(runners) == ["reference", "dllab", "dllab+bf16", "dllab+bf16+compile",
                             "dllab+bf16+compile:reduce-overhead"]
    for args, message in ((["--compile", "--compile-modes", "fastest"], "invalid choice: 'fastest'"),
                          (["--compile-modes", "reduce-overhead"], "add --compile")):
        assert message in _usage_error(monkeypatch, capsys, "train_throughput.py", args)


@pytest.mark.slow  # compiles five functions with TorchInductor (a C++ compiler; ~30 s)
def test_fused_probe_prints_every_row():
    out = _run("fused_probe.py")
    rows = [line for line in out.splitlines() if line.startswith(("bn ", "maxpool"))]
    assert len(rows) == 5, out
    for row in rows:
        assert re.search(r"\s[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", row), row


def test_gpu_check_reads_the_figures_of_its_stages(tmp_path, monkeypatch):
    """benchmarks/gpu_check.py (`make gpu-check`) finds the headline figures in each stage's output,
    and refuses to start without a GPU (it needs one for every stage)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check
    import torch

    layers = _run("layers.py", "--dtype", "fp32", "--batch", "2", "--repeats", "1", "--only", "bn 512")
    assert re.match(r"fp32: overall [\d.]+, worst bn 512", gpu_check._figures("layers", layers, tmp_path))
    pytest_log = "....s\n=========== 40 passed, 1 skipped in 51.20s ===========\n"
    assert gpu_check._figures("tests", pytest_log, tmp_path) == "40 passed, 1 skipped"
    run = tmp_path / "classifier"
    run.mkdir()
    (run / "summary.json").write_text('{"test_acc": 0.9312, "train_seconds": 12.5, "precision": "bfloat16"}')
    assert gpu_check._figures("classifier", "", tmp_path) == \
        "test_acc 0.9312, train_seconds 12.5, precision bfloat16"
    rows = [{"variant": v, "images_per_s": r * 100.0, "ratio": r} for v, r in
            [("dllab", 1.5), ("dllab+bf16", 2.0), ("dllab+bf16+compile", 2.5), ("dllab+bf16+compile:reduce-overhead", 3.5)]]
    (tmp_path / "compile.json").write_text(json.dumps({"results": [{"kind": "classifier", "rows": rows}]}))
    assert gpu_check._figures("compile", "", tmp_path) == (
        "classifier 200 img/s (dllab+bf16, 2.00x the textbook loop); classifier 250 img/s (dllab+bf16+compile, "
        "2.50x the textbook loop); classifier 350 img/s (dllab+bf16+compile:reduce-overhead, 3.50x the textbook loop)")
    assert gpu_check._figures("throughput", "", tmp_path) == "no throughput.json"
    # the compile stage times both modes; the preset's stage is there only when asked for, and
    # outside the budget
    stages = gpu_check._stages(tmp_path, "fashion-mnist")
    assert [s["name"] for s in stages][-2:] == ["dcgan", "compile"] and stages[-1]["outside_budget"]
    argv = stages[-1]["argv"]
    assert argv[argv.index("--compile-modes") + 1:argv.index("--compile-modes") + 3] == ["default", "reduce-overhead"]
    preset = gpu_check._stages(tmp_path, "fashion-mnist", cifar10=True)[-1]
    assert preset["name"] == "cifar10-fast" and preset["outside_budget"] and "--preset" in preset["argv"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_backward_inputs_benchmark_times_both_rules():
    out = _run("backward_inputs.py", "--kinds", "vae", "--precisions", "fp32", "--rounds", "1", "--seconds", "0.1")
    row = [line for line in out.splitlines() if line.startswith("| vae | fp32 |")]
    assert len(row) == 1 and len(row[0].split("|")) == 8, out
    own, plain = (float(v) for v in row[0].split("|")[6].split("/"))
    assert own == plain > 0, row  # the VAE has one model: the same work either way
