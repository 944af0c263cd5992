"""Training entry points, one module per model kind, and :func:`train` that runs any of them.

Each kind's module (``dllab.train.classifier``, ``.vae``, ``.dcgan``) provides:

- ``METRICS``: its metric names (:class:`MetricNames`), declared once for sweep, compare, report;
- ``CONFIG``: its typed configuration, a :class:`dllab.config.TrainConfig` dataclass whose fields
  are its settings (defaults, bounds, help) and make its ``dllab train KIND`` flags;
- ``data_options(config) -> dict``: extra keyword arguments for :func:`dllab.data.load`;
- ``model_config(config, data)``: the model's config dataclass (raises ValueError when bad), and
  optionally ``validate(config, data)`` for further checks, both run before a folder is written
  (``config`` is the typed ``CONFIG``), and ``check_new_run(config)`` for checks of a new run's
  settings only (what a resumed run cannot change, so an older run is not stranded by them);
- a :class:`dllab.engine.Trainer` subclass named ``TRAINER``;
- ``load_model(state)``: the model of a checkpoint, the one loader that train, eval,
  :func:`load_run` and the DCGAN's classifier features use;
- ``evaluate_run(run, device, options) -> dict``: what ``dllab eval RUN`` does for that kind.

:func:`train` runs a kind and returns its :class:`dllab.runs.Run`; :func:`load_run` rebuilds a
run's model from its folder.

:func:`train_parser` and :func:`add_train_arguments` build a kind's flags from its ``CONFIG``; the
CLI and the sweep both use them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

from dllab import config as config_lib
from dllab.runs import Run, check_run_folder, unfinished_summary

KINDS = ("classifier", "vae", "dcgan")


@dataclasses.dataclass(frozen=True)
class MetricNames:
    """The metric names a kind declares once (its ``METRICS``); sweep, compare and report read them.

    ``headline``: ``summary.json`` keys worth a table column, most important first.
    ``curves``: keys of the per-epoch test records of ``metrics.jsonl`` worth plotting, the first
    being the one a sweep overlays. ``cost``: size and cost columns, shown after the metrics.
    ``tests/test_train.py`` checks that a real run of each kind writes every one of them.
    """

    headline: tuple[str, ...]
    curves: tuple[str, ...]
    cost: tuple[str, ...] = ("params", "epochs", "train_seconds", "images_per_second")


def kind_module(kind: str) -> ModuleType:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")
    return importlib.import_module(f"dllab.train.{kind}")


def config_class(kind: str) -> type[config_lib.TrainConfig]:
    """The typed configuration of ``kind`` (e.g. ``ClassifierTrainConfig``)."""
    return kind_module(kind).CONFIG


def metric_names(kind: str) -> MetricNames:
    """What ``kind`` declares about its metrics (see :class:`MetricNames`)."""
    return kind_module(kind).METRICS


def defaults(kind: str) -> dict:
    """Every setting of ``kind`` with its declared default (and ``kind`` itself)."""
    return {**config_lib.defaults(config_class(kind)), "kind": kind}


def add_train_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    """``kind``'s settings as flags (from its ``CONFIG``), plus ``--resume`` and ``--quiet``."""
    config_lib.add_arguments(parser, config_class(kind), f"{kind} options")
    runs = next(g for g in parser._action_groups if g.title == config_lib.RUN_FOLDER)
    runs.add_argument("--resume", action="store_true",
                      help="continue the run in --out from checkpoints/last.pt (default: off)")
    runs.add_argument("--quiet", action="store_true", help="no progress bars (default: off)")


def train_parser(kind: str) -> config_lib.Parser:
    """The parser of ``dllab train KIND``'s flags on their own (what the sweep checks runs with)."""
    parser = config_lib.Parser(prog=f"dllab train {kind}")
    add_train_arguments(parser, kind)
    return parser


def given_settings(kind: str, argv: list[str]) -> set[str]:
    """The settings that ``argv`` (``dllab train KIND``'s flags) sets explicitly, defaults aside:
    what a resume applies, the rest keeping the run's saved values."""
    parser = train_parser(kind)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"resume", "quiet"}


def command_line_config(kind: str, args: argparse.Namespace, argv: list[str], *, resume: bool) -> dict:
    """The settings of ``kind``'s parsed flags ``args`` (parsed from ``argv``): all of them for a
    new run; only those ``argv`` gives when the run resumes or names a ``--preset`` (the others
    keep the run's saved values, or take the preset's)."""
    config = config_lib.config_from_args(config_class(kind), args)
    if resume or config.get("preset"):
        given = given_settings(kind, argv)
        config = {k: v for k, v in config.items() if k in given}
    return config


def _resumed_config(kind: str, given: dict) -> tuple[dict, dict]:
    """(config, changes) of the run in ``given["out"]`` resumed with the settings in ``given``."""
    from dllab.runs import RunFolderError, read_json

    out = given.pop("out", None)
    if not out:
        raise ValueError("--resume needs --out RUN, the folder of the run to continue")
    saved_path = Path(out) / "config.json"
    if not saved_path.exists():
        raise RunFolderError(f"--resume: no run to resume in {out} (no config.json)")
    saved = read_json(saved_path)
    if not isinstance(saved, dict) or not isinstance(saved.get("kind"), str):
        raise RunFolderError(f"--resume: {out} is not a dllab run (its config.json names no kind)")
    if saved.get("kind") != kind:
        raise ValueError(f"--resume: {out} holds a {saved.get('kind')!r} run, not {kind!r}")
    declared = defaults(kind)
    base = {**declared, **saved}  # a setting added to dllab since the run began: its default
    unknown = sorted(k for k in given if k not in declared)
    if unknown:
        raise ValueError(f"--resume: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                         f"{kind} settings")
    given = config_lib.checked_settings(config_class(kind), given)  # e.g. epochs="3" is refused
    if given.get("precision") == "auto":  # the run recorded what auto picked when it began
        given.pop("precision")
    changes = {k: v for k, v in given.items() if base.get(k) != v}
    fixed = [k for k in changes if k not in config_lib.resumable(config_class(kind))]
    if fixed:
        def had(k: str) -> str:
            return "the run began without it" if base.get(k) is None else f"the run has {base.get(k)!r}"

        flags = ", ".join(f"{config_lib.flag_name(k)} ({had(k)}, given {changes[k]!r})" for k in fixed)
        can = ", ".join(config_lib.flag_name(k) for k in config_lib.resumable(config_class(kind)))
        preset = ("; --preset chooses a new run's settings, and a resumed run keeps those it began with"
                  if "preset" in fixed else "")
        from dllab.runs import never_trained

        if never_trained(out) is not None:  # nothing to continue: the plain command takes new settings
            preset += ("; it saved no checkpoint, so the same command without --resume begins it again "
                       "with the settings given")
        raise ValueError(f"--resume cannot change {flags} of the run in {out}{preset} (only {can} can "
                         "change when a run is resumed; start a new run for the others)")
    return {**base, **changes, "out": str(Path(out))}, changes


def check_new_run(kind: str, config: config_lib.TrainConfig) -> None:
    """A new run's settings, checked by ``kind``'s ``check_new_run`` where it has one (a ValueError
    naming a setting the others would ignore): by :func:`train`, and by a sweep for each of its runs
    before the first."""
    module = kind_module(kind)
    if hasattr(module, "check_new_run"):
        module.check_new_run(config)


def check_checkpoint_on_resume(run: Run) -> int:
    """The steps ``run`` logged that its resume starts over from (0 when it has ``last.pt`` to
    continue from, or logged none).

    A run that saved no checkpoint before it stopped (failed, interrupted, or killed outright, by
    the out-of-memory killer say, in its first epoch: :func:`dllab.runs.never_trained`) has
    nothing to continue: it starts over, its log and events cleared. A run that finished, reached
    the end of an epoch, or holds another checkpoint but lost ``last.pt`` is refused (a
    CheckpointError naming the file): starting it over would throw away training that its files
    say it did."""
    from dllab.checkpoint import CheckpointError
    from dllab.runs import never_trained

    if run.has_checkpoint("last"):
        return 0
    summary = run.summary()
    steps = max([r.get("step", 0) for r in run.metrics()] + [int(summary.get("steps", 0) or 0)])
    if steps == 0 or never_trained(run.path) is not None:
        return steps
    others = sorted(p.name for p in run.checkpoint_path("last").parent.glob("*.pt"))
    held = f" (it holds {', '.join(others)})" if others else ""
    raise CheckpointError(f"--resume: the run in {run.path} has trained {steps} steps (metrics.jsonl, "
                          f"summary.json), but {run.checkpoint_path('last')} is missing{held}, so it "
                          "cannot continue; put last.pt back, or start a new run with another --out")


def check_epochs_on_resume(run: Run, epochs: int) -> None:
    """Refuse to resume ``run`` for fewer ``epochs`` than its last.pt has trained (a ValueError
    naming both): it cannot untrain them, and stopping there would leave a model trained longer
    than its run says. Fewer epochs than planned, but no fewer than trained, is a new plan: the
    run trains up to it (a classifier's schedule re-planned for it) and says so."""
    completed, partial = run.trained()
    least = completed + partial
    if epochs >= least:
        return
    trained = f"{completed} epoch{'' if completed == 1 else 's'}" + (f" and part of epoch {least}" if partial else "")
    raise ValueError(f"--epochs {epochs}: the run in {run.path} has already trained {trained}; give --epochs "
                     f"{least} or more (without --epochs it keeps its plan of {run.config.get('epochs')})")


def default_out(kind: str, dataset: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = dataset.replace("folder:", "folder-").replace("/", "_").replace(os.sep, "_")
    return Path("runs") / f"{kind}-{safe}-{stamp}"


def train(kind: str, config: config_lib.TrainConfig | dict | None = None, *, resume: bool = False,
          quiet: bool = False) -> Run:
    """Train a model of ``kind`` with ``config`` and return its :class:`dllab.runs.Run`.

    ``config`` is the kind's typed config (``ClassifierTrainConfig(width=8)``) or a dict of
    settings (missing ones take their defaults; an unknown name or a bad value is a ValueError
    naming it, before anything is written; so is an ``out`` that is a file or a folder of other
    files: :func:`dllab.runs.check_run_folder`). The run's ``summary()`` holds the final metrics and
    ``status`` says whether it completed. With ``resume``, ``config`` (a dict) names the run to
    continue in ``"out"``, where it lies now (a copied or moved run continues in its new folder,
    which is the only one written), and holds only the settings to change: each keeps the run's
    saved value unless given, and a given value that differs is applied if the setting may change
    mid-run (:func:`dllab.config.resumable`) and refused otherwise (ValueError naming every such
    setting). ``epochs`` may go down as well as up, but not below the epochs last.pt has trained
    (:func:`check_epochs_on_resume`); a new plan is said in one line on stderr. Each change, a move
    included, is recorded in config.json's ``resumed`` list.
    """
    import torch
    import torch.distributed as dist

    from dllab.data import load
    from dllab.engine import create_run, init_distributed, validate_config
    from dllab.utils import resolve_device, resolve_precision, seed_everything

    module = kind_module(kind)
    cls = config_class(kind)
    given = dataclasses.asdict(config) if isinstance(config, config_lib.TrainConfig) else dict(config or {})
    if given.get("kind", kind) != kind:
        raise ValueError(f"the settings are for a {given['kind']!r} run, not {kind!r}")
    given.pop("kind", None)
    if not resume:
        given = with_preset(kind, given, typed=isinstance(config, config_lib.TrainConfig))
    changes: dict = {}
    lost_steps = 0  # steps logged by a run resumed without any checkpoint (it starts over)
    if resume:
        settings, changes = _resumed_config(kind, given)
        cfg = config_lib.from_mapping(cls, settings)
        done = Run.open(cfg.out)
        if not changes and done.complete and done.config.get("out") == cfg.out:
            return done  # nothing to continue and nothing to change: the run is left as it is
        lost_steps = check_checkpoint_on_resume(done)
        if "epochs" in changes:
            check_epochs_on_resume(done, cfg.epochs)
    else:
        cfg = config_lib.from_mapping(cls, given, strict=True)
    if not resume and cfg.out:  # a file, or a folder of someone's files: refused before the data is read
        check_run_folder(cfg.out)  # (by every rank, before torchrun's ranks meet and rank 0 writes)
    if not resume or "compile_mode" in changes:  # a mode given now, not one kept while compile is off
        config_lib.check_compile_mode(cfg.compile, cfg.compile_mode)
    if not resume:
        check_new_run(kind, cfg)
    device = resolve_device(cfg.device)
    validate_config(cfg, device)  # e.g. fp16 or --sync-bn on a CPU: refused before any file is written
    distributed = init_distributed(device)
    if not cfg.out:
        out = [str(default_out(kind, cfg.dataset))]
        if distributed:  # every rank must write to (and read from) rank 0's folder
            dist.broadcast_object_list(out, src=0)
        cfg = dataclasses.replace(cfg, out=out[0])
    seed_everything(cfg.seed)
    data = load(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, limit=cfg.limit,
                verify=cfg.verify, **module.data_options(cfg))
    # a bad or over-budget model configuration is refused before anything is written
    world = dist.get_world_size() if distributed else 1
    if cfg.batch_size > len(data.train_y) // world:
        raise ValueError(f"batch size {cfg.batch_size} is larger than the training set "
                         f"({len(data.train_y) // world} examples{' per rank' if world > 1 else ''}); "
                         "lower --batch-size or raise --limit")
    module.model_config(cfg, data)
    if hasattr(module, "validate"):
        module.validate(cfg, data)
    check_param_budget(kind, cfg, data)
    if cfg.precision == "auto":  # what auto picked here is what the run is (and resumes with)
        picked = {None: "fp32", torch.bfloat16: "bf16"}[resolve_precision("auto", device)]
        cfg = dataclasses.replace(cfg, precision=picked)
    run = create_run(cfg.out, {**dataclasses.asdict(cfg), "kind": kind}, resume=resume)  # rank 0 writes
    try:  # the run holds its folder's lock (Run.create) until it is closed
        if run.began_again is not None:  # said even with --quiet: a folder's old run is replaced
            _say_began_again(cfg.out, run.began_again)
        if resume:  # e.g. more epochs, or the folder it was moved to: recorded in config.json
            for key, value in defaults(kind).items():  # a setting added to dllab since the run began:
                run.config.setdefault(key, value)  # its default, so a change is recorded from that
            run.update_config({**changes, "out": cfg.out})
        try:
            trainer = module.TRAINER(run.config, data, run, device, quiet=quiet)
        except BaseException as e:  # (a signal, or a bug) said in summary.json, as fit says what stops it
            if not resume and run.writer and not run.summary():
                run.write_summary(unfinished_summary(
                    "interrupted" if isinstance(e, KeyboardInterrupt) else "failed", kind=kind,
                    dataset=cfg.dataset, epochs=0, epochs_planned=cfg.epochs, steps=0, error=e))
            raise
        # a run stopped before its first checkpoint (e.g. Ctrl-C while building) starts from the
        # beginning (Run.create cleared its log; check_checkpoint_on_resume refused the others)
        if lost_steps:  # said even with --quiet (a resume with no checkpoint: check_checkpoint_on_resume)
            print(f"dllab train: the run in {cfg.out} saved no checkpoint in its {lost_steps} steps; it starts "
                  "over from step 0", file=sys.stderr, flush=True)
        trainer.fit(resume=resume and run.has_checkpoint("last"))
    finally:  # fit closes the run where it ends; this releases the folder's lock on every other way out
        run.close()
    return run


def _say_began_again(out: str, old: dict) -> None:
    """One line on stderr: the run that stopped before its first checkpoint in ``out`` (what is
    known of it: :func:`dllab.runs.never_trained`) is replaced by the one beginning now."""
    steps = f" after {old['steps']} steps" if old.get("steps") else ""
    how = {"interrupted": "was interrupted", "unfinished": "was killed (it wrote no summary)"}.get(
        old.get("status"), old.get("status"))
    why = f" ({old['error']})" if old.get("error") else ""
    print(f"dllab train: {out} held a run that {how}{steps} before saving a checkpoint{why}; it begins "
          "again with the settings given", file=sys.stderr, flush=True)


def with_preset(kind: str, given: dict, *, typed: bool = False) -> dict:
    """``given`` with the settings of its ``preset`` (the kind's ``PRESETS``) filled in where it
    gives none: explicit settings win. ``typed``: ``given`` holds every setting (a typed config),
    and those at their declared default count as not given."""
    name = given.get("preset")
    if not name:
        return given
    presets = getattr(kind_module(kind), "PRESETS", {})
    if name not in presets:
        raise ValueError(f"unknown {kind} preset {name!r}; expected one of {', '.join(presets) or 'none'}")
    if typed:
        declared = defaults(kind)
        taken = sorted(k for k, v in presets[name].items() if given.get(k) == declared.get(k) != v)
        if taken:
            import warnings

            warnings.warn(f"preset {name!r}: {', '.join(taken)} left at their defaults in the typed config "
                          f"take the preset's values (pass a dict to give a default explicitly)", stacklevel=3)
        given = {k: v for k, v in given.items() if k == "preset" or declared.get(k) != v}
    return {**presets[name], **given}


def check_param_budget(kind: str, config: config_lib.TrainConfig, data) -> dict[str, int]:
    """The kind's parameter counts (``param_counts``, on the meta device); a ValueError naming
    them and the flags that size the model when they exceed ``config.max_params``."""
    module = kind_module(kind)
    counts = module.param_counts(config, data)
    total = sum(counts.values())
    if config.max_params is not None and total > config.max_params:
        parts = " + ".join(f"{name} {n:,}" for name, n in counts.items()) if len(counts) > 1 else ""
        raise ValueError(f"the {kind} has {total:,} parameters{f' ({parts})' if parts else ''}, more "
                         f"than --max-params {config.max_params:,}; reduce "
                         f"{' / '.join(module.TRAINER.size_flags)}")
    return counts


@dataclasses.dataclass
class LoadedRun:
    """A finished (or stopped) run with its model rebuilt: what :func:`load_run` returns.

    ``model`` is the run's model in eval mode on ``device``: the classifier (its weight average
    when it kept one), the VAE, or the DCGAN's generator (its average when it kept one).
    ``config`` is the run's typed config; ``extra`` the checkpoint's kind-specific facts (class
    names, and for a classifier the normalisation mean and std).
    """

    run: Run
    config: config_lib.TrainConfig
    model: "torch.nn.Module"
    checkpoint: str
    epoch: int
    extra: dict

    @property
    def classes(self) -> list[str]:
        return list(self.extra.get("classes", []))


def load_run(path: str | os.PathLike, checkpoint: str = "best", device: str = "cpu") -> LoadedRun:
    """Rebuild a run's model from its folder, with no flag repeated: the model's config is in the
    checkpoint. ``checkpoint`` is ``best`` (falling back to ``last``) or ``last``."""
    from dllab.runs import Run, RunFolderError
    from dllab.utils import resolve_device

    run = Run.open(path)
    kind = run.kind
    if kind not in KINDS:
        raise RunFolderError(f"{path}: config.json names no dllab model kind ({kind!r})")
    name = checkpoint
    if not run.has_checkpoint(name):
        name = "last" if checkpoint == "best" else checkpoint
        if not run.has_checkpoint(name):
            raise RunFolderError(f"{path} has no checkpoint (checkpoints/{checkpoint}.pt is missing)")
    state = run.load_checkpoint(name, map_location="cpu")
    model = kind_module(kind).load_model(state).to(resolve_device(device))
    return LoadedRun(run=run, config=config_lib.from_mapping(config_class(kind), run.config),
                     model=model, checkpoint=name, epoch=int(state["epoch"]), extra=dict(state["extra"]))
