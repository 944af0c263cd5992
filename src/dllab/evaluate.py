"""``dllab eval RUN``: one command for every model kind, dispatched on the run's ``kind``."""

from __future__ import annotations

from pathlib import Path

from dllab.runs import Run, RunFolderError, write_json
from dllab.train import KINDS, kind_module
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
    check_options(kind, options, path)
    device = resolve_device(options.get("device") or "auto")
    result = kind_module(kind).evaluate_run(run, device, options)
    write_json(run.path / "eval.json", result)
    return result


def check_options(kind: str, options: dict, path: str | Path) -> None:
    """Refuse an option that only another kind uses (``--iw-samples`` for a classifier run, say),
    which would otherwise be ignored without a word: a ValueError naming it and its kind. An
    option counts as given when it is neither None nor False (the flags' "not given")."""
    for other in KINDS:
        if other == kind:
            continue
        given = [name for name in kind_module(other).EVAL_OPTIONS
                 if name not in kind_module(kind).EVAL_OPTIONS and options.get(name) not in (None, False)]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"{flags} {'is' if len(given) == 1 else 'are'} for {other} runs; {path} is a "
                             f"{kind} run, which does not use {'it' if len(given) == 1 else 'them'}")
