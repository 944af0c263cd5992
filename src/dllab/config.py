"""Typed training configurations: each setting declared once, with its type, default, bounds and help.

A model kind's configuration is a dataclass that extends :class:`TrainConfig` (the settings every
kind has) with its own fields and its own defaults (``dllab.train.classifier.ClassifierTrainConfig``
and its siblings). From that one declaration come:

- the ``dllab train KIND`` flags (:func:`add_arguments`): every field is a flag with its help text
  and its true default; a boolean is a ``--x/--no-x`` pair, so ``--no-augment`` reads right
  whatever the kind's default;
- the defaults a run starts from (:func:`defaults`), which are exactly what the command line
  gives when no flag is passed (a test checks this for every kind and every setting);
- which settings may change when a run is resumed (``resumable`` fields, :func:`resumable`).

The run's ``config.json`` and its checkpoints store the configuration as a plain dict of these
fields (plus ``kind`` and the run's history); :func:`from_mapping` turns such a dict (or the
settings a Python caller passes) back into the typed config, checking every value against its
field's type, bounds and choices, and the trainers read that typed config.

This module sits at the bottom of the package (it imports nothing of dllab at import time), so
that the trainers, the sweep and the CLI can all use it. Value types used as ``type=`` raise
``argparse.ArgumentTypeError`` naming the offending value; :class:`Parser` turns that into one line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import os
from collections.abc import Callable
from typing import Any

EXIT_USAGE = 2

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: torch.compile's modes (``--compile-mode``); the two that record CUDA graphs on a GPU:
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Ends each option's help with its default, once: not where the help already says it, not
    for a ``None`` default (whose meaning the help gives), and switches read ``on``/``off``."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "(default" in text or action.default is None
                or action.default is argparse.SUPPRESS or text is argparse.SUPPRESS):
            return text
        if isinstance(action.default, bool):
            return f"{text} (default: {'on' if action.default else 'off'})"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``dllab train: error: ...``) and defaults in every help line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- value types: each names the offending value ---------------------------------------------
def _parse(text: str, cast, what: str):
    """``cast(text)``, or an argparse error naming the text that is not a valid ``what``."""
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {what} {text!r}") from None


def path_text(text: str) -> str:
    """A file or folder path: not empty (``--out ""`` meant the default folder, unsaid)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return text


def positive_int(text: str) -> int:
    value = _parse(text, int, "integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = _parse(text, int, "integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _parse(text, float, "number")
    if not 0 < value < float("inf"):  # also false for NaN
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = _parse(text, float, "number")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def unit_float(text: str) -> float:
    value = nonnegative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def dataset_name(text: str) -> str:
    """A dataset name as ``dllab.data.load`` takes it (aliases such as ``mnist-5k`` and
    ``fashion`` included), kept as written."""
    from dllab.data import DATASETS
    from dllab.data.registry import _canonical

    if text.startswith("folder:") and len(text) > len("folder:"):
        return text
    try:
        _canonical(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown dataset {text!r}; choose from {', '.join(DATASETS)} or folder:PATH") from None
    return text


# ---- declaring settings ------------------------------------------------------------------------
def setting(default: Any, help: str, *, type: Callable[[str], Any] | None = None,
            choices: tuple | None = None, group: str | None = None, resumable: bool = False,
            default_text: str | None = None) -> Any:
    """A dataclass field that is also a ``dllab train`` flag.

    ``type`` parses the flag's text (one of the value types above; plain ``str`` when omitted and
    the default is not a bool); ``choices`` restricts it; ``group`` titles its section in
    ``--help`` (default: the kind's options); ``resumable`` says whether ``--resume`` may change
    it; ``default_text`` describes a ``None`` default in words.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "type": type, "choices": choices, "group": group, "resumable": resumable,
        "default_text": default_text})


DATA, TRAINING, RUN_FOLDER = "data", "training", "run folder"


@dataclasses.dataclass
class TrainConfig:
    """The settings every model kind has. A kind's config extends it and may change its defaults."""

    # data
    dataset: str = setting("mnist5k", "dataset name (see `dllab datasets`) or folder:PATH for an "
                           "ImageFolder tree", type=dataset_name, group=DATA)
    data_dir: str | None = setting(None, "where datasets live", type=path_text, group=DATA, resumable=True,
                                   default_text="$DLLAB_DATA or ~/.cache/dllab/data")
    download: bool = setting(False, "download the dataset if it is missing", group=DATA)
    limit: int | None = setting(None, "use only the first N training and N test examples (smoke runs)",
                                type=positive_int, group=DATA, default_text="all")
    augment: bool = setting(True, "training-time data augmentation (crops; flips where the dataset "
                            "allows them)", group=DATA)
    verify: bool = setting(True, "check the md5 of dataset files (--no-verify: for files you trust "
                           "that differ from the official ones)", group=DATA)
    # training
    epochs: int = setting(5, "epochs to train", type=positive_int, group=TRAINING, resumable=True)
    batch_size: int = setting(128, "batch size per process", type=positive_int, group=TRAINING)
    lr: float = setting(1e-3, "peak learning rate", type=positive_float, group=TRAINING)
    seed: int = setting(0, "random seed (same seed, same numbers on CPU)", type=nonnegative_int,
                        group=TRAINING)
    device: str = setting("auto", "where to train (auto: cuda, else mps, else cpu)", choices=DEVICES,
                          group=TRAINING, resumable=True)
    precision: str = setting("auto", "autocast dtype; auto = bf16 on GPUs and on CPUs with "
                             "AMX/AVX512-BF16, else fp32 ($DLLAB_AUTO_PRECISION=fp32|bf16 overrides "
                             "what auto picks)", choices=PRECISIONS, group=TRAINING)
    channels_last: bool = setting(False, "use the channels_last memory format", group=TRAINING)
    compile: bool = setting(False, "torch.compile the model(s): minutes to build, then faster steps "
                            "for the classifier and DCGAN on a CPU (see benchmarks/train_throughput.py)",
                            group=TRAINING, resumable=True)
    compile_mode: str = setting("default", "torch.compile's mode (needs --compile): default; "
                                "reduce-overhead records CUDA graphs (one launch per step on a GPU; "
                                "the training batches have one shape, as the last partial batch is "
                                "dropped); max-autotune searches kernel configurations (long builds) "
                                "and records CUDA graphs; max-autotune-no-cudagraphs searches without "
                                "them. On a CPU there are no CUDA graphs", choices=COMPILE_MODES,
                                group=TRAINING, resumable=True)
    sync_bn: bool = setting(False, "under torchrun, convert BatchNorm layers to SyncBatchNorm (GPUs)",
                            group=TRAINING)
    max_params: int | None = setting(None, "refuse, before anything is written, a model with more "
                                     "parameters than this (G + D for the DCGAN)", type=positive_int,
                                     group=TRAINING, default_text="no limit")
    grad_clip: float = setting(0.0, "clip the gradient norm of each optimiser's parameters to this "
                               "before its step (0: off); the logged gradient norms are before "
                               "clipping", type=nonnegative_float, group=TRAINING)
    on_alarm: str = setting("warn", "when an alarm fires (posterior or mode collapse, divergence, "
                            "past the best FID; see dllab.metrics.alarms): warn, or stop the run "
                            "with its checkpoint", choices=("warn", "stop"), group=TRAINING,
                            resumable=True)
    max_nonfinite: int = setting(20, "stop after this many consecutive NaN/inf losses (each such step "
                                 "is skipped; counted on the device, the row is checked at each "
                                 "checkpoint and at least every 50 steps)", type=positive_int,
                                 group=TRAINING, resumable=True)
    # run folder
    out: str | None = setting(None, "run folder: a new or empty folder, or with --resume the run to "
                              "continue", type=path_text, group=RUN_FOLDER,
                              default_text="runs/KIND-DATASET-TIMESTAMP")
    log_every: int = setting(10, "log training metrics every N steps", type=positive_int,
                             group=RUN_FOLDER, resumable=True)
    checkpoint_every: int = setting(0, "also save last.pt every N steps (0: only at the end of each "
                                    "epoch)", type=nonnegative_int, group=RUN_FOLDER, resumable=True)


def check_compile_mode(compile: bool, compile_mode: str) -> None:
    """``--compile-mode`` names torch.compile's mode, so another mode than the default given without
    ``--compile`` would be ignored: a ValueError naming the way out (a sweep over the modes
    would otherwise train the same uncompiled run twice). A resumed run may turn ``--compile``
    off and keep its mode for later; only a mode given then is checked."""
    if compile_mode != "default" and not compile:
        raise ValueError(f"--compile-mode {compile_mode} is torch.compile's mode, and the models are not "
                         "compiled: add --compile, or leave --compile-mode out")


def fields(cls: type[TrainConfig]) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


def defaults(cls: type[TrainConfig]) -> dict:
    """Every setting of ``cls`` with its declared default, as a plain dict."""
    return dataclasses.asdict(cls())


def resumable(cls: type[TrainConfig]) -> tuple[str, ...]:
    """The settings that ``--resume`` may change (the others must match the saved run)."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("resumable"))


def flag_name(name: str) -> str:
    """The command-line flag of the setting ``name`` (``batch_size`` -> ``--batch-size``)."""
    return "--" + name.replace("_", "-")


def _default_text(f: dataclasses.Field) -> str:
    if f.metadata.get("default_text") is not None:
        return f.metadata["default_text"]
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return str(f.default)


class Toggle(argparse.Action):
    """``--x`` sets True, ``--no-x`` sets False (one help line for both)."""

    def __init__(self, option_strings, dest, default=None, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no-"))


def add_arguments(parser: argparse.ArgumentParser, cls: type[TrainConfig], own_group: str) -> None:
    """One flag per field of ``cls``, in argument groups by the fields' ``group`` (``own_group``
    for the kind's own fields). Help lines end with the true default (so :class:`Parser`'s
    formatter adds none); booleans get ``--x`` to turn them on and ``--no-x`` to turn them off (a
    field already named ``no_x``, an ablation switch, is the one flag ``--no-x``)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(cls):
        title = f.metadata.get("group") or own_group
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        g, meta, flag = groups[title], f.metadata, flag_name(f.name)
        text = f"{meta['help']} (default: {_default_text(f)})"
        if isinstance(f.default, bool):
            if f.name.startswith("no_"):  # an ablation switch named for what it removes
                g.add_argument(flag, dest=f.name, action="store_true", default=f.default, help=text)
            else:
                g.add_argument(flag, "--no-" + flag[2:], dest=f.name, action=Toggle, default=f.default,
                               help=text)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": text}
        if meta.get("type") is not None:
            kwargs["type"] = meta["type"]
        if meta.get("choices") is not None:
            kwargs["choices"] = meta["choices"]
        g.add_argument(flag, **kwargs)


def config_from_args(cls: type[TrainConfig], args: argparse.Namespace) -> dict:
    """The settings of ``cls`` from parsed arguments, as the plain dict a run stores."""
    return {f.name: getattr(args, f.name) for f in fields(cls)}


def from_mapping(cls: type[TrainConfig], mapping: dict, *, strict: bool = False) -> TrainConfig:
    """The typed config ``cls`` of the settings in ``mapping``, missing ones at their defaults.

    Each value is checked as its flag would check it (type, bounds, choices): a ``ValueError``
    names the setting and the value. ``strict`` refuses keys that are not settings of ``cls`` (a
    Python caller's typo); otherwise they are ignored (config.json also holds ``kind``, the
    environment and the resume history).
    """
    return cls(**checked_settings(cls, mapping, strict=strict))


def checked_settings(cls: type[TrainConfig], mapping: dict, *, strict: bool = False) -> dict:
    """The settings of ``cls`` in ``mapping``, each checked as its flag would check it (see
    :func:`from_mapping`); other keys are refused with ``strict`` and dropped otherwise."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(k for k in mapping if k not in known)
    if strict and unknown:
        raise ValueError(f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not "
                         f"{cls.__name__} settings")
    return {name: _checked(known[name], value) for name, value in mapping.items() if name in known}


def _checked(f: dataclasses.Field, value: Any) -> Any:
    """``value`` for the setting ``f``, as its flag would parse it; ValueError naming both."""
    meta, what = f.metadata, f"{f.name}={value!r}"
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)  # numpy integers, say
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
    if value is None:
        if f.default is None:
            return None
        raise ValueError(f"{what}: {f.name} cannot be None")
    if isinstance(f.default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{what}: {f.name} is a switch, True or False")
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{what}: {f.name} takes a {type(f.default).__name__ if f.default is not None else 'value'}")
    if meta.get("type") is path_text and not isinstance(value, str):  # a path, not a number made one
        raise ValueError(f"{what}: {f.name} takes a string")
    if meta.get("type") is not None:
        try:
            value = meta["type"](str(value))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise ValueError(f"{what}: {e}") from None
    elif isinstance(f.default, float) and isinstance(value, int):
        value = float(value)
    elif (isinstance(f.default, str) or f.default is None) and not isinstance(value, str):
        raise ValueError(f"{what}: {f.name} takes a string")
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ValueError(f"{what}: choose from {', '.join(map(str, meta['choices']))}")
    return value


def redefault(name: str, default: Any) -> Any:
    """A :class:`TrainConfig` setting with another default for one kind (its help, type and
    bounds unchanged)."""
    return dataclasses.field(default=default, metadata=TrainConfig.__dataclass_fields__[name].metadata)
