"""``dllab demo``: the main job. Train a classifier, a VAE and a DCGAN on bundled data, evaluate
them and write one report, in minutes on a laptop-class CPU and with no network.

The classifier is trained first because the DCGAN's offline quality metrics (FID, precision and
recall, class coverage) are measured in that classifier's feature space. A demo folder that
already holds finished runs is reused, and an interrupted one continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path

# (kind, settings) for the quick demo and for --full; epochs may be overridden by --epochs
QUICK = {
    "classifier": {"width": 16, "epochs": 6, "batch_size": 128, "lr": 0.1, "label_smoothing": 0.1},
    "vae": {"epochs": 8, "batch_size": 128, "lr": 2e-3, "latent_dim": 16},
    "dcgan": {"epochs": 10, "batch_size": 64, "g_width": 32, "d_width": 32},
}
FULL = {
    "classifier": {"width": 64, "epochs": 15, "batch_size": 128, "lr": 0.1, "label_smoothing": 0.1},
    "vae": {"epochs": 40, "batch_size": 128, "lr": 1e-3, "latent_dim": 16},
    "dcgan": {"epochs": 40, "batch_size": 64, "g_width": 64, "d_width": 64},
}


def demo(dataset: str = "mnist5k", epochs: int | None = None, full: bool = False,
         out: str | Path = "runs/demo", device: str = "auto", data_dir: str | None = None,
         quiet: bool = False) -> Path:
    """Train the three models on ``dataset`` into ``out`` and return the report's path."""
    from dllab.evaluate import evaluate_run
    from dllab.report import write_report
    from dllab.train import train
    from dllab.utils import progress

    out = Path(out)
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
        if not (run_dir / "summary.json").exists():
            resume = (run_dir / "checkpoints" / "last.pt").exists()
            train(kind, config, resume=resume, quiet=quiet)
        bar.update(1)
    bar.set_description("dllab demo: evaluation and report")
    evaluate_run(runs["classifier"], {"device": device, "data_dir": data_dir})
    evaluate_run(runs["vae"], {"device": device, "data_dir": data_dir, "iw_samples": 100})
    evaluate_run(runs["dcgan"], {"device": device, "data_dir": data_dir,
                                 "classifier": str(runs["classifier"]), "num_samples": 1000})
    html, _ = write_report([str(runs[k]) for k in stages], str(out / "report.html"))
    bar.update(1)
    bar.close()
    return Path(html)
