"""``dllab demo``: the main job. Train a classifier, a VAE and a DCGAN on bundled data, evaluate
them and write one report, in minutes on a laptop-class CPU and with no network. Each trainer's
final analysis (confusion matrix and calibration; IWAE log-likelihood, t-SNE and interpolation;
classifier-feature FID, precision/recall and class coverage) runs at the end of its training, so
the report has every number and figure without a separate ``dllab eval``.

The classifier is trained first because the DCGAN's offline quality metrics (FID, precision and
recall, class coverage) are measured in that classifier's feature space. A demo folder that
already holds finished runs is reused only when their settings are exactly the ones asked for
(another dataset, --full or --epochs is refused, naming the difference; the default folder is
named after them), and an interrupted run continues where it stopped.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

# (kind, settings) for the quick demo and for --full; epochs may be overridden by --epochs
QUICK = {
    "classifier": {"width": 8, "epochs": 6, "batch_size": 128, "lr": 0.1},
    # batch 32: 750 steps in 6 epochs; at batch 128 (186 steps) the VAE stayed collapsed for up to
    # 3 epochs and ended at -178 +- 16 nats (seeds 0-2), at batch 32 at -128 (seeds 0 and 2)
    "vae": {"epochs": 6, "batch_size": 32, "lr": 1e-3, "latent_dim": 16, "tsne_points": 1000,
            "iw_samples": 100},
    # 4,000 digits are a small set for a GAN. Plain, at batch 32 for 15 epochs, the DCGAN's
    # samples missed one to three digits ("1", "4" or "6" came out too rarely), whatever else was
    # tried: EMA, hinge loss, spectral norm, TTUR, label smoothing, a wider G, DiffAugment, a
    # minibatch-std map, PacGAN. The R1 penalty on D (Mescheder et al. 2018, gamma = 1) is what
    # covers them; lazily, every 4th step (StyleGAN2), it costs little enough for 20 epochs in the
    # demo's 4 minutes. `dllab reproduce demo demo-bf16 --seeds 3` measures it (claims.json).
    "dcgan": {"epochs": 20, "batch_size": 32, "g_width": 32, "d_width": 32, "r1": 1.0, "r1_every": 4},
}
FULL = {
    "classifier": {"width": 64, "epochs": 15, "batch_size": 128, "lr": 0.1, "label_smoothing": 0.1},
    "vae": {"epochs": 40, "batch_size": 128, "lr": 1e-3, "latent_dim": 16, "iw_samples": 1000},
    "dcgan": {"epochs": 40, "batch_size": 64, "g_width": 64, "d_width": 64},
}


def default_out(dataset: str = "mnist5k", full: bool = False, epochs: int | None = None) -> Path:
    """``runs/demo`` for the quick demo on mnist5k, else a folder named after what differs."""
    safe = dataset.replace("folder:", "folder-").replace("/", "_")
    parts = [p for p in (None if dataset == "mnist5k" else safe, "full" if full else None,
                         None if epochs is None else f"e{epochs}") if p]
    return Path("runs") / "-".join(["demo", *parts])


def train_or_reuse(kind: str, config: dict, what: str = "the demo", quiet: bool = False) -> Path:
    """The run in ``config["out"]``: reused when it is complete and was trained with ``config``
    (refused by :func:`dllab.runs.check_same_settings` otherwise), continued when it is unfinished,
    trained when there is none, or when it stopped before its first checkpoint (begun again with
    ``config``). The demo and ``dllab reproduce`` both take their runs this way."""
    from dllab.runs import Run, check_same_settings, never_trained
    from dllab.train import train

    run_dir = Path(config["out"])
    existing = Run.open(run_dir) if (run_dir / "config.json").exists() else None
    if existing is not None and existing.complete:
        check_same_settings(run_dir, config, what)
    else:  # a run that stopped before its first checkpoint is begun again with ``config``
        train(kind, config, resume=existing is not None and never_trained(run_dir) is None, quiet=quiet)
    return run_dir


def reuse_state(run_dir: Path) -> str:
    """What :func:`train_or_reuse` will do with ``run_dir``, said in a few words for the stage line
    ("" for a new run)."""
    from dllab.runs import Run, is_run

    if not is_run(run_dir):
        return ""
    return " (finished: reused if its settings match)" if Run.open(run_dir).complete else " (unfinished: continued)"


def demo_command(dataset: str = "mnist5k", epochs: int | None = None, full: bool = False,
                 out: str | Path | None = None, device: str = "auto", data_dir: str | None = None) -> str:
    """The ``dllab demo`` command of these arguments: what continues the demo when it was stopped
    (its finished runs are reused, the interrupted one resumes, the others are trained)."""
    command = ["dllab", "demo"]
    if dataset != "mnist5k":
        command += ["--dataset", dataset]
    if epochs is not None:
        command += ["--epochs", str(epochs)]
    if full:
        command.append("--full")
    if out is not None:
        command += ["--out", str(out)]
    if device != "auto":
        command += ["--device", device]
    if data_dir:
        command += ["--data-dir", str(data_dir)]
    return shlex.join(command)


def demo(dataset: str = "mnist5k", epochs: int | None = None, full: bool = False,
         out: str | Path | None = None, device: str = "auto", data_dir: str | None = None,
         quiet: bool = False) -> Path:
    """Train the three models on ``dataset`` into ``out`` (default: :func:`default_out`) and
    return the report's path."""
    from dllab.engine import Interrupted
    from dllab.report import write_report
    from dllab.runs import check_runs_folder
    from dllab.utils import progress, progress_lines

    again = demo_command(dataset, epochs, full, out, device, data_dir)
    out = Path(out) if out is not None else default_out(dataset, full, epochs)
    check_runs_folder(out, "--out")  # new, empty, or an earlier demo's runs (reused or continued)
    settings = FULL if full else QUICK
    runs = {}
    stages = ["classifier", "vae", "dcgan"]
    bar = progress(total=len(stages) + 1, desc="dllab demo", quiet=quiet, leave=True)
    for kind in stages:
        run_dir = out / kind
        runs[kind] = run_dir
        config = {**settings[kind], "dataset": dataset, "device": device, "data_dir": data_dir,
                  "out": str(run_dir), "seed": 0}
        if epochs is not None:
            config["epochs"] = epochs
        if kind == "dcgan":
            config["classifier_run"] = str(runs["classifier"])
        bar.set_description(f"dllab demo: {kind}")
        if progress_lines(quiet):  # no progress bars in a log: one line per stage
            print(f"dllab demo: {kind} ({stages.index(kind) + 1}/{len(stages)}) in {run_dir}"
                  f"{reuse_state(run_dir)}", file=sys.stderr, flush=True)
        try:
            train_or_reuse(kind, config, quiet=quiet)
        except Interrupted as e:  # the same demo continues it, and then trains what is left
            raise e.continued_by(again) from None
        bar.update(1)
    bar.set_description("dllab demo: report")
    html, _ = write_report([str(runs[k]) for k in stages], str(out / "report.html"))
    bar.update(1)
    bar.close()
    return Path(html)
