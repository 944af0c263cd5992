"""What ``--precision auto`` picks on each CPU kind and on GPUs, ``$DLLAB_AUTO_PRECISION``, and the
bf16 path where auto picks it.

The rule is checked on every machine by faking what the CPU or GPU reports; the end-to-end bf16
tests (marked ``auto_bf16``) run where auto really picks bf16 on this CPU (AVX512-BF16 or AMX, or
``DLLAB_AUTO_PRECISION=bf16``) and are skipped, with the reason, elsewhere.
"""

from __future__ import annotations

import json

import pytest
import torch

from dllab import utils
from dllab.checkpoint import load_checkpoint
from dllab.cli import main
from dllab.utils import AUTO_PRECISION_ENV, resolve_precision

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.mark.parametrize("cpu_bf16, gpu_bf16, forced, expected", [
    # (CPU has AVX512-BF16/AMX, GPU supports bf16, $DLLAB_AUTO_PRECISION) -> (cpu, cuda, mps)
    (False, True, "", (None, torch.bfloat16, None)),
    (True, True, "", (torch.bfloat16, torch.bfloat16, None)),
    (True, False, "", (torch.bfloat16, None, None)),
    (False, True, "bf16", (torch.bfloat16, torch.bfloat16, None)),
    (False, False, "bf16", (torch.bfloat16, None, None)),  # no bf16 on that GPU: fp32 still
    (True, True, "fp32", (None, None, None)),
    (True, True, " FP32 ", (None, None, None)),
])
def test_auto_follows_the_hardware_unless_the_environment_says(monkeypatch, cpu_bf16, gpu_bf16, forced,
                                                              expected):
    monkeypatch.setattr(utils, "cpu_supports_bf16", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    monkeypatch.setenv(AUTO_PRECISION_ENV, forced)
    assert tuple(resolve_precision("auto", d) for d in (CPU, CUDA, MPS)) == expected
    # explicit choices ignore both the hardware and the environment
    assert resolve_precision("fp32", CPU) is None and resolve_precision("bf16", CPU) == torch.bfloat16


def test_a_bad_environment_value_is_a_usage_error_before_anything_is_written(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match=f"{AUTO_PRECISION_ENV}='fp16'"):
        resolve_precision("auto", CPU)
    resolve_precision("fp32", CPU)  # only auto reads it
    out = tmp_path / "run"
    code = main(["train", "classifier", "--dataset", "mnist5k", "--limit", "64", "--epochs", "1",
                 "--width", "4", "--device", "cpu", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"{AUTO_PRECISION_ENV}='fp16'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cpu_detection_reads_the_flags(monkeypatch, tmp_path):
    """/proc/cpuinfo's flags decide; AVX2 alone is not enough."""
    import builtins

    real_open = builtins.open

    def fake(flags):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        return lambda file, *a, **k: real_open(path if file == "/proc/cpuinfo" else file, *a, **k)

    for flags, native in (("fpu sse avx2 fma", False), ("avx2 avx512f avx512_bf16", True),
                          ("avx2 avx512f amx_bf16 amx_tile", True)):
        monkeypatch.setattr(builtins, "open", fake(flags))
        assert utils.cpu_supports_bf16() is native, flags


# ---- where auto really picks bf16 on this CPU ------------------------------------------------------
TINY = ["--dataset", "mnist5k", "--limit", "128", "--quiet", "--seed", "4", "--device", "cpu",
        "--width", "4", "--batch-size", "32", "--lr", "0.05",
        "--schedule", "constant", "--warmup-epochs", "0"]  # a schedule that does not depend on --epochs


@pytest.mark.auto_bf16
def test_auto_trains_in_bf16_and_resumes_exactly(tmp_path):
    """With no --precision, the classifier trains under bf16 autocast; stopped after an epoch and
    resumed it lands on the weights of the uninterrupted run, bit for bit (CPU, same threads)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", "classifier", *TINY, "--epochs", "2", "--out", str(straight)]) == 0
    assert main(["train", "classifier", *TINY, "--epochs", "1", "--out", str(split)]) == 0
    assert main(["train", "classifier", *TINY, "--epochs", "2", "--out", str(split), "--resume"]) == 0
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["precision"] == "bfloat16"
    a, b = (load_checkpoint(p / "checkpoints" / "last.pt")["models"] for p in (straight, split))
    for model in a:
        for key, value in a[model].items():
            assert value.dtype != torch.bfloat16  # autocast: the weights stay float32
            assert torch.equal(value, b[model][key]), f"{model}.{key}"
    fp32 = tmp_path / "fp32"  # and bf16 really was used: fp32 gives other weights
    assert main(["train", "classifier", *TINY, "--epochs", "2", "--out", str(fp32), "--precision", "fp32"]) == 0
    c = load_checkpoint(fp32 / "checkpoints" / "last.pt")["models"]
    assert any(not torch.equal(v, c[m][k]) for m in a for k, v in a[m].items() if v.is_floating_point())
