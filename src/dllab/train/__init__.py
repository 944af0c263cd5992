"""Training entry points, one module per model kind, and :func:`train` that runs any of them.

Each kind's module (``dllab.train.classifier``, ``.vae``, ``.dcgan``) provides:

- ``DEFAULTS``: its default settings (epochs, batch size, learning rate, ...);
- ``add_arguments(parser)``: its own CLI flags;
- ``data_options(config) -> dict``: extra keyword arguments for :func:`dllab.data.load`;
- ``model_config(config, data)``: the model's config dataclass (raises ValueError when bad), and
  optionally ``validate(config, data)`` for further checks, both run before a folder is written;
- a :class:`dllab.engine.Trainer` subclass named ``TRAINER``;
- ``evaluate_run(run, device, options) -> dict``: what ``dllab eval RUN`` does for that kind.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import os
from pathlib import Path
from types import ModuleType

KINDS = ("classifier", "vae", "dcgan")

#: settings every kind has, with their defaults (a kind's DEFAULTS override these)
COMMON_DEFAULTS = {
    "dataset": "mnist5k",
    "data_dir": None,
    "download": False,
    "epochs": 5,
    "batch_size": 128,
    "lr": 1e-3,
    "seed": 0,
    "device": "auto",
    "precision": "auto",
    "out": None,
    "limit": None,
    "log_every": 10,
    "checkpoint_every": 0,
    "max_nonfinite": 20,
    "channels_last": False,
    "compile": False,
    "sync_bn": False,
    "augment": True,
    "verify": True,
}

#: settings that may change when a run is resumed (the rest must match the saved config)
RESUMABLE = ("epochs", "device", "data_dir", "log_every", "checkpoint_every", "max_nonfinite", "compile")


def kind_module(kind: str) -> ModuleType:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")
    return importlib.import_module(f"dllab.train.{kind}")


def defaults(kind: str) -> dict:
    """Every setting of ``kind`` with its default value."""
    return {**COMMON_DEFAULTS, **kind_module(kind).DEFAULTS, "kind": kind}


def default_out(kind: str, dataset: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = dataset.replace("folder:", "folder-").replace("/", "_").replace(os.sep, "_")
    return Path("runs") / f"{kind}-{safe}-{stamp}"


def train(kind: str, config: dict | None = None, *, resume: bool = False, quiet: bool = False) -> dict:
    """Train a model of ``kind`` with ``config`` (missing keys take their defaults).

    Returns the summary metrics (also written to ``summary.json`` in the run folder, whose path
    is ``summary["run"]``). With ``resume``, ``config["out"]`` names the run to continue; only the
    settings in :data:`RESUMABLE` may differ from the saved config.
    """
    import torch.distributed as dist

    from dllab.data import load
    from dllab.engine import create_run, init_distributed, validate_config
    from dllab.runs import read_json
    from dllab.utils import resolve_device, seed_everything

    module = kind_module(kind)
    config = {**defaults(kind), **(config or {})}
    if resume:
        if not config.get("out"):
            raise ValueError("--resume needs --out RUN, the folder of the run to continue")
        saved_path = Path(config["out"]) / "config.json"
        if not saved_path.exists():
            from dllab.runs import RunFolderError

            raise RunFolderError(f"--resume: no run to resume in {config['out']} (no config.json)")
        saved = read_json(saved_path)
        if saved.get("kind") != kind:
            raise ValueError(f"--resume: {config['out']} holds a {saved.get('kind')!r} run, not {kind!r}")
        config = {**saved, **{k: config[k] for k in RESUMABLE if k in config}}
    device = resolve_device(config["device"])
    validate_config(config, device)  # e.g. fp16 or --sync-bn on a CPU: refused before any file is written
    distributed = init_distributed(device)
    if not config.get("out"):
        out = [str(default_out(kind, config["dataset"]))]
        if distributed:  # every rank must write to (and read from) rank 0's folder
            dist.broadcast_object_list(out, src=0)
        config["out"] = out[0]
    seed_everything(int(config["seed"]))
    data = load(config["dataset"], data_dir=config.get("data_dir"), download=bool(config.get("download")),
                limit=config.get("limit"), seed=int(config["seed"]), verify=bool(config.get("verify", True)),
                **module.data_options(config))
    # a bad or over-budget model configuration is refused before anything is written
    module.model_config(config, data)
    if hasattr(module, "validate"):
        module.validate(config, data)
    run = create_run(config["out"], config, resume=resume)  # rank 0 writes, the others read
    if resume:  # e.g. more epochs: recorded in config.json
        run.update_config({k: config[k] for k in RESUMABLE if k in config})
    trainer = module.TRAINER(run.config, data, run, device, quiet=quiet)
    summary = trainer.fit(resume=resume)
    summary["run"] = str(run.path)
    return summary
