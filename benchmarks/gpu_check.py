"""One command that checks and measures dllab on a CUDA GPU, and prints one table (`make gpu-check`).

    python benchmarks/gpu_check.py [--out runs/gpu-check] [--budget 450] [--dataset fashion-mnist]

Stages, each a separate process with its own time limit (a hang or a crash in one leaves the
others to run), all within ``--budget`` seconds (default 450, under the 8 minutes the check is
meant to take on one GPU):

1. ``tests``: the test suite's ``cuda``-marked tests (tests/test_cuda.py: layer grids against torch
   on the GPU, modules in float32 and bf16 autocast, the no-native-kernel check, train, resume and
   evaluation of each kind through the CLI).
2. ``layers``: ``benchmarks/layers.py --device cuda --resnet`` (scratch/torch time, fp32 and bf16).
3. ``throughput``: ``benchmarks/train_throughput.py --device cuda --batch-size 256 --bf16`` (dllab's
   trainers against the textbook loops, one short round).
   ``compile``, after the training runs below and outside ``--budget`` (its own limit: 5
   minutes): the classifier and the VAE in bf16 again, compiled with torch.compile's ``default``
   and ``reduce-overhead`` (CUDA graphs) modes (``dllab train --compile --compile-mode MODE``),
   their build time left out.
4. ``classifier``, ``vae``, ``dcgan``: one short run of each on ``--dataset`` (the real
   Fashion-MNIST by default) on the GPU; the DCGAN is scored by that classifier.
5. ``cifar10-fast``, only with ``--cifar10``: ``dllab train classifier --preset cifar10-fast``, the
   whole recipe (README: "A fast CIFAR-10 run"); needs CIFAR-10's files in the data folder and
   runs outside ``--budget`` (its own limit: 10 minutes). Its figures are the README's budget.

Nothing is downloaded: the data must be on the machine (``../shared/gpu/README.md`` says how to
carry it and the missing wheels to a GPU machine without internet). Logs of every stage, the
table as Markdown and everything as JSON go to ``--out``. Exit code 0 when every stage passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stages(out: Path, dataset: str, cifar10: bool = False) -> list[dict]:
    py = sys.executable
    train = [py, "-m", "dllab", "train"]
    common = ["--dataset", dataset, "--device", "cuda", "--quiet"]
    return [
        {"name": "tests", "limit": 180,
         "argv": [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]},
        {"name": "layers", "limit": 90,
         "argv": [py, "benchmarks/layers.py", "--device", "cuda", "--dtype", "both", "--resnet"]},
        {"name": "throughput", "limit": 150,
         "argv": [py, "benchmarks/train_throughput.py", "--device", "cuda", "--batch-size", "256",
                  "--bf16", "--rounds", "1", "--seconds", "3", "--json", str(out / "throughput.json")]},
        {"name": "classifier", "limit": 120,
         "argv": [*train, "classifier", *common, "--width", "64", "--batch-size", "256", "--channels-last",
                  "--label-smoothing", "0.1", "--epochs", "5", "--out", str(out / "classifier")]},
        {"name": "vae", "limit": 90,
         "argv": [*train, "vae", *common, "--batch-size", "128", "--epochs", "5", "--tsne-points", "2000",
                  "--out", str(out / "vae")]},
        {"name": "dcgan", "limit": 120,
         "argv": [*train, "dcgan", *common, "--batch-size", "128", "--epochs", "3", "--eval-samples", "2000",
                  "--classifier-run", str(out / "classifier"), "--out", str(out / "dcgan")]},
        {"name": "compile", "limit": 300, "outside_budget": True,
         "argv": [py, "benchmarks/train_throughput.py", "--device", "cuda", "--kinds", "classifier", "vae",
                  "--batch-size", "256", "--bf16", "--compile", "--compile-modes", "default", "reduce-overhead",
                  "--only", "bf16", "--rounds", "1", "--seconds", "3", "--json", str(out / "compile.json")]},
    ] + ([{"name": "cifar10-fast", "limit": 600, "outside_budget": True,
           "argv": [*train, "classifier", "--preset", "cifar10-fast", "--device", "cuda", "--quiet",
                    "--out", str(out / "cifar10-fast")]}] if cifar10 else [])


def _summary(folder: Path, keys: tuple[str, ...]) -> str:
    try:
        s = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return "no summary.json"
    parts = []
    for k in keys:
        if k in s and isinstance(s[k], (int, float)):
            v = s[k]
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts + [f"precision {s.get('precision', '?')}"])


def _figures(name: str, log: str, out: Path) -> str:
    """The stage's headline figures, read from its output."""
    if name == "tests":
        m = re.findall(r"^=*\s*(.*(?:passed|failed|error|skipped).*?)(?: in [\d.]+s.*)?=*$", log, re.M)
        return m[-1].strip() if m else "no pytest summary"
    if name == "layers":
        found = re.findall(r"overall \(ResNet-18 weighted\): (\S+) .*?worst: (.+)$", log, re.M)
        steps = re.findall(r"ResNet-18 train step \(fwd\+bwd, (\w+).*ratio ([\d.]+)", log)
        parts = [f"{dt}: overall {o}, worst {w}" for (o, w), dt in zip(found, ("fp32", "bf16"))]
        parts += [f"ResNet-18 step {dt} {r}" for dt, r in steps]
        return "; ".join(parts) or "no table"
    if name in ("throughput", "compile"):
        try:
            res = json.loads((out / f"{name}.json").read_text())["results"]
        except (OSError, ValueError, KeyError):
            return f"no {name}.json"
        parts = []
        for kind in res:
            if name == "compile":  # every compiled variant, against the eager bf16 one
                shown = [r for r in kind["rows"] if "compile" in r["variant"] or r["variant"] == "dllab+bf16"]
            else:
                shown = [max(kind["rows"][1:], key=lambda r: r["images_per_s"])]
            parts += [f"{kind['kind']} {r['images_per_s']:,.0f} img/s ({r['variant']}, "
                      f"{r['ratio']:.2f}x the textbook loop)" for r in shown]
        return "; ".join(parts)
    keys = {"classifier": ("test_acc", "train_seconds", "images_per_second"),
            "vae": ("test_elbo", "bits_per_dim", "train_seconds", "images_per_second"),
            "dcgan": ("clf_fid", "clf_modes_covered", "train_seconds", "images_per_second"),
            "cifar10-fast": ("test_acc", "train_seconds", "images_per_second")}[name]
    return _summary(out / name, keys)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu-check", help="folder for the logs, runs and tables")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all stages together")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset of the three training runs")
    p.add_argument("--only", nargs="+", default=None, help="run only these stages")
    p.add_argument("--cifar10", action="store_true",
                   help="also run the cifar10-fast preset to its end (needs CIFAR-10; up to 10 minutes more)")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA GPU here; nothing to check", file=sys.stderr)
        return 1
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"gpu-check: {out} is not empty; name another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                      os.environ.get("PYTHONPATH")])),
           "MPLBACKEND": "Agg", "DLLAB_QUIET": "1"}
    head = (f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, "
            f"{time.strftime('%Y-%m-%d')}")
    print(f"gpu-check: {head}", flush=True)
    start, rows = time.perf_counter(), []
    for stage in _stages(out, args.dataset, args.cifar10):
        if args.only and stage["name"] not in args.only:
            continue
        left = args.budget - (time.perf_counter() - start)
        limit = stage["limit"] if stage.get("outside_budget") else min(stage["limit"], left)
        if limit < 10:
            rows.append({"stage": stage["name"], "status": "not run (budget spent)", "seconds": 0.0,
                         "figures": "", "command": " ".join(stage["argv"][1:])})
            continue
        t = time.perf_counter()
        try:
            proc = subprocess.run(stage["argv"], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=limit)
            log, status = proc.stdout + proc.stderr, "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired as e:
            log = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            status = f"timed out after {limit:.0f} s"
        seconds = time.perf_counter() - t
        (out / f"{stage['name']}.log").write_text(log)
        rows.append({"stage": stage["name"], "status": status, "seconds": round(seconds, 1),
                     "figures": _figures(stage["name"], log, out), "command": " ".join(stage["argv"][1:])})
        print(f"  {stage['name']:<11} {status:<22} {seconds:6.1f} s  {rows[-1]['figures']}", flush=True)
    total = time.perf_counter() - start
    table = [f"gpu-check ({head}), {total:.0f} s in all", "",
             "| stage | status | seconds | figures |", "|---|---|---:|---|"]
    table += [f"| {r['stage']} | {r['status']} | {r['seconds']:.0f} | {r['figures']} |" for r in rows]
    table += ["", "Commands (from the repository root):", ""]
    table += [f"- {r['stage']}: `python {r['command']}`" for r in rows]
    text = "\n".join(table) + "\n"
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps({"head": head, "total_seconds": total, "stages": rows},
                                                   indent=1))
    print("\n" + text)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
