"""``dllab eval RUN``: one command for every model kind, dispatched on the run's ``kind``."""

from __future__ import annotations

from pathlib import Path

from dllab.runs import Run, RunFolderError, write_json
from dllab.train import kind_module
from dllab.utils import resolve_device


def evaluate_run(path: str | Path, options: dict | None = None) -> dict:
    """Recompute a run's test metrics and figures from its checkpoint; writes ``eval.json``.

    ``options`` are the ``dllab eval`` flags (checkpoint, device, data_dir, batch_size, tta,
    iw_samples, classifier, inception_weights, num_samples); each kind uses the ones it knows.
    """
    options = dict(options or {})
    run = Run.open(path)
    kind = run.config.get("kind")
    if not kind:
        raise RunFolderError(f"{path}: config.json names no model kind")
    name = options.get("checkpoint") or "best"
    if not run.has_checkpoint(name):
        alt = "last" if name == "best" else "best"
        if not run.has_checkpoint(alt):
            raise RunFolderError(f"{path} has no checkpoint (checkpoints/{name}.pt is missing)")
        options["checkpoint"] = alt
    device = resolve_device(options.get("device") or "auto")
    result = kind_module(kind).evaluate_run(run, device, options)
    write_json(run.path / "eval.json", result)
    return result
