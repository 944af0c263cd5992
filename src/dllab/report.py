"""Reports of run folders: a self-contained HTML page, a Markdown twin, and a terminal table.

``dllab report RUN [RUN ...]`` writes one HTML file that needs nothing but itself to be viewed:
every figure is embedded as a base64 ``data:`` URI, there is no JavaScript at all, and a strict
Content-Security-Policy (``default-src 'none'; img-src data:; style-src 'unsafe-inline'``) forbids
scripts and network fetches even if something slipped through. Every string that comes from a run
folder (its name, config keys and values, metric names, figure file names) is HTML-escaped, so a
run named ``<script>...`` shows as text. The Markdown twin has the same sections and refers to the
runs' PNGs by paths relative to the ``.md`` file.

``dllab compare RUN [RUN ...] [--sort METRIC] [--desc]`` prints the runs' scalar summary metrics as
an aligned plain-text table.

Sections of a report: the runs at a glance; for several runs a comparison table (one per model
kind) and overlaid per-epoch test curves of the metrics runs of the same kind share; then per run
the summary metrics (scalars in a table, nested values in collapsible details), ``eval.json`` when
present, every figure with a one-line caption saying what to look for, and the config.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dllab.checkpoint import atomic_write_bytes
from dllab.runs import (COMPLETE, CorruptRunFileError, RunFolderError, file_in_the_way, read_json,
                        read_metrics, run_status)

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

# Metrics shown first (each kind's headline metrics, as the kinds declare them in their METRICS) and
# last (their size and cost columns, and the engine's own counts); everything else keeps the
# order the trainer wrote.
ENGINE_COUNTS = ("nonfinite_steps_skipped", "world_size", "steps")


def _declared(part: str) -> tuple[str, ...]:
    from dllab.train import KINDS, metric_names

    return tuple(dict.fromkeys(name for kind in KINDS for name in getattr(metric_names(kind), part)))


# Keys of metrics.jsonl records that are coordinates, not metrics.
RECORD_AXES = ("split", "step", "epoch", "time")
FIGURE_TYPES = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg",
                ".jpeg": "image/jpeg", ".webp": "image/webp"}
# Test-record metrics overlaid first: each kind's declared curves (at most this many per kind).
MAX_OVERLAYS_PER_KIND = 4
WIDE_FIGURE = 1.9  # figures wider than this (width / height) span the whole row
# Summary entries that label a run rather than measure it: not columns of comparison tables.
LABEL_KEYS = ("run", "kind", "status", "error")  # error: shown with the run's state, not a column

# (substring of the lower-cased file stem, caption): the first match wins; kind-specific lists are
# searched before the shared one. Captions say what to look for, in one line.
CAPTIONS: dict[str, list[tuple[str, str]]] = {
    "classifier": [
        ("curves", "Loss and accuracy over training, train and test: a train/test gap that keeps "
                   "widening means over-fitting; a test curve still rising means more epochs "
                   "would help."),
    ],
    "vae": [
        ("curves", "ELBO terms over training: reconstruction error should fall while KL settles; a KL "
                   "near zero means posterior collapse (the decoder ignores z)."),
        ("samples", "Decoded draws from the prior N(0, I): they should look like data, with "
                    "variety, not noise or one repeated blob."),
    ],
    "dcgan": [
        ("samples", "Generator samples from random noise: look for variety across classes; many "
                    "near-identical images mean mode collapse."),
        ("loss", "Generator and discriminator losses: neither should go to zero; D loss near 0 "
                 "means D won and G gets no useful gradient."),
    ],
    "": [
        ("lr_schedule", "Learning rate per step: check the warm-up and decay have the shape the "
                        "schedule promises and end where expected."),
        ("confusion", "Confusion matrix (rows: true class, columns: predicted): bright off-diagonal "
                      "cells show which classes get mixed up."),
        ("reliability", "Reliability diagram: accuracy against confidence per bin; bars below the "
                        "diagonal mean over-confidence (the gap is the ECE)."),
        ("mistake", "The test images misclassified with the highest confidence: look for label "
                    "noise or genuinely ambiguous images."),
        ("reconstruction", "Test images above their reconstructions: blur is expected from a VAE; "
                           "the wrong digit or class is not."),
        ("tsne", "t-SNE of the latent means coloured by class: separate clusters mean the latent "
                 "space organises the classes without ever seeing labels."),
        ("interpolation", "Decodes along a path between two latent codes: smooth, plausible "
                          "in-between images mean a continuous latent space."),
        ("manifold", "Decodes of a grid over two latent dimensions: shows what each direction of "
                     "the latent space changes in the image."),
        ("rate_distortion", "Rate (KL) against distortion (reconstruction) across runs: the "
                            "trade-off that beta moves along."),
        ("progress", "Samples from the same fixed noise as training went on: they should sharpen "
                     "epoch by epoch without collapsing to one shape."),
        ("class_hist", "Classes of generated samples as judged by a classifier: a flat histogram "
                       "means every class (mode) is generated."),
        ("histogram", "Distribution shown per bin: look for missing bins and heavy skew."),
        ("nearest", "Generated samples beside their nearest training images: exact copies would "
                    "mean the generator memorised the data."),
        ("neighbo", "Generated samples beside their nearest training images: exact copies would "
                    "mean the generator memorised the data."),
        ("samples", "Samples drawn from the model: they should look like data and vary."),
        ("curves", "Training curves: is the test metric still improving or flat, and how "
                   "far apart are train and test?"),
        ("loss", "Loss per step or epoch: it should fall and then flatten; spikes or NaNs mean "
                 "the learning rate is too high."),
    ],
}
GENERIC_CAPTION = "A figure this run wrote (no caption is known for this file name)."
EVAL_PREFIX = "eval_"


# ---- reading runs ----------------------------------------------------------------------------
@dataclass
class RunData:
    """Everything a report shows about one run folder."""

    path: Path
    label: str
    config: dict
    summary: dict
    records: list[dict]
    eval: dict | None
    figures: list[Path] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return str(self.config.get("kind", ""))

    @property
    def status(self) -> str:
        """As :attr:`dllab.runs.Run.status`: complete, interrupted, failed or unfinished."""
        return run_status(self.config, self.summary)

    @property
    def alarms(self) -> list[dict]:
        """The alarms the run sounded (summary.json's ``alarms``; metrics.jsonl's while it runs)."""
        fired = self.summary.get("alarms")
        if not isinstance(fired, list):
            fired = [r for r in self.records if r.get("split") == "alarm"]
        return [a for a in fired if isinstance(a, dict)]

    @property
    def state(self) -> str:
        """The status in words, with how far an unfinished run got: "interrupted at epoch 2 of 5"."""
        if self.status == COMPLETE:
            return COMPLETE
        # the last test record says how far it got when the summary does not: there is none yet,
        # or it is a finished run's, resumed for more epochs (config.json holds the new plan) and
        # killed before it wrote another
        tested = max((r.get("epoch", 0) for r in self.records if r.get("split") == "test"), default=0)
        epochs = self.summary.get("epochs")
        epochs = max(epochs, tested) if isinstance(epochs, (int, float)) else tested
        planned = (self.summary.get("epochs_planned") if self.summary.get("status") != COMPLETE else None)
        planned = planned if planned is not None else self.config.get("epochs", "?")
        return f"{self.status} at epoch {format_value(epochs)} of {format_value(planned)}"


def _read_json_file(path: Path, what: str) -> Any:
    try:
        return read_json(path)
    except CorruptRunFileError as e:
        raise CorruptRunFileError(f"{e}; the {what} cannot be read") from e.__cause__


def load_run(path: str | os.PathLike, label: str | None = None) -> RunData:
    """Read a run folder; :class:`RunFolderError` when it is missing or not a dllab run."""
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"run folder {path} does not exist")
    if not path.is_dir():
        raise RunFolderError(f"{path} is not a folder (expected a dllab run folder)")
    if not (path / "config.json").is_file():
        raise RunFolderError(f"{path} is not a dllab run folder (no config.json)")
    config = _read_json_file(path / "config.json", "config")
    if not isinstance(config, dict):
        raise RunFolderError(f"{path / 'config.json'} holds {type(config).__name__}, not an object")
    if not isinstance(config.get("kind"), str):
        raise RunFolderError(f"{path} is not a dllab run folder (its config.json names no kind)")
    summary = {}
    if (path / "summary.json").is_file():
        summary = _read_json_file(path / "summary.json", "summary")
        if not isinstance(summary, dict):
            raise RunFolderError(f"{path / 'summary.json'} holds {type(summary).__name__}, "
                                 "not an object")
    ev = None
    if (path / "eval.json").is_file():
        ev = _read_json_file(path / "eval.json", "evaluation")
        if not isinstance(ev, dict):
            ev = {"eval": ev}
    records = [r for r in read_metrics(path) if isinstance(r, dict)]
    fig_dir = path / "figures"
    figures = []
    if fig_dir.is_dir():
        figures = [p for p in fig_dir.iterdir()
                   if p.is_file() and p.suffix.lower() in FIGURE_TYPES and not p.name.startswith(".")]
    run = RunData(path=path, label=label or path.name or str(path), config=config,
                  summary=summary, records=records, eval=ev)
    run.figures = sorted(figures, key=lambda p: _figure_order(p.name, run.kind))
    return run


def run_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Short unique labels: the folder names, with parent folders or ``#n`` added to break ties."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    labels = [p[-1] for p in parts]
    for name in set(labels):
        idx = [i for i, lab in enumerate(labels) if lab == name]
        if len(idx) < 2:
            continue
        for depth in range(2, max(len(parts[i]) for i in idx) + 1):
            longer = [Path(*parts[i][-depth:]).as_posix() for i in idx]
            if len(set(longer)) == len(longer):
                for i, lab in zip(idx, longer):
                    labels[i] = lab
                break
    seen: dict[str, int] = {}
    out = []
    for lab in labels:  # the same folder given twice
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}#{seen[lab]}")
    return out


def load_runs(paths: Sequence[str | os.PathLike]) -> list[RunData]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("no run folders given")
    return [load_run(p, lab) for p, lab in zip(paths, run_labels(paths))]


# ---- values and metrics ----------------------------------------------------------------------
def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): something a table can sort numerically."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def format_value(value: Any) -> str:
    """Floats to 4 significant digits, ints in full, bools as true/false, nested values as JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def order_metrics(keys: Iterable[str]) -> list[str]:
    """Important metrics first (test accuracy, loss, ELBO, FID, ...), cost and size last."""
    keys = list(dict.fromkeys(keys))
    first = [k for k in _declared("headline") if k in keys]
    last = [k for k in (*ENGINE_COUNTS, *_declared("cost")) if k in keys and k not in first]
    middle = [k for k in keys if k not in first and k not in last]
    return first + middle + last


def scalar_metrics(summary: Mapping) -> dict:
    return {str(k): v for k, v in summary.items() if is_scalar(v)}


def nested_metrics(summary: Mapping) -> dict:
    return {str(k): v for k, v in summary.items() if not is_scalar(v)}


def numbers_then_text(keys: Iterable[str], values: Iterable[Mapping]) -> list[str]:
    """``keys`` in :func:`order_metrics` order, those holding numbers before the text-valued ones."""
    ordered = order_metrics(keys)
    numeric = {k for v in values for k, x in v.items() if is_number(x)}
    return [k for k in ordered if k in numeric] + [k for k in ordered if k not in numeric]


def union_metrics(runs: Sequence[RunData]) -> list[str]:
    """Scalar summary keys of any run, ordered: numeric ones by :func:`order_metrics`, then text
    ones (dataset, device, ...); run labels and kinds are left out."""
    keys: list[str] = []
    for run in runs:
        keys.extend(k for k in scalar_metrics(run.summary) if k not in LABEL_KEYS)
    return numbers_then_text(keys, [run.summary for run in runs])


def flatten_config(config: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``[("a.b", 1)]``; lists stay whole."""
    rows = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows.extend(flatten_config(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def caption_for(name: str, kind: str = "") -> str:
    """A one-line "what to look for" caption for a figure file name (matched by substring)."""
    stem = Path(name).stem.lower()
    from_eval = stem.startswith(EVAL_PREFIX)
    if from_eval:
        stem = stem[len(EVAL_PREFIX):]
    text = GENERIC_CAPTION
    for key in (kind, ""):
        match = next((cap for sub, cap in CAPTIONS.get(key, []) if sub in stem), None)
        if match is not None:
            text = match
            break
    return f"Recomputed by dllab eval from a checkpoint. {text}" if from_eval else text


def _figure_order(name: str, kind: str) -> tuple:
    stem = Path(name).stem.lower()
    from_eval = stem.startswith(EVAL_PREFIX)
    stem = stem.removeprefix(EVAL_PREFIX)
    subs = [sub for sub, _ in CAPTIONS.get(kind, [])] + [sub for sub, _ in CAPTIONS[""]]
    rank = next((i for i, sub in enumerate(subs) if sub in stem), len(subs))
    return (from_eval, rank, name)


def _image_type(path: Path) -> str | None:
    """The MIME type the file's first bytes prove, or None (so a broken file is never embedded)."""
    with open(path, "rb") as f:
        head = f.read(12)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) read from a PNG's IHDR or a GIF's screen descriptor; None for others."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    return None


def data_uri(path: Path) -> str | None:
    mime = _image_type(path)
    if mime is None:
        return None
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# ---- overlaid curves -------------------------------------------------------------------------
def kind_groups(runs: Sequence[RunData]) -> dict[str, list[RunData]]:
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(run.kind, []).append(run)
    return groups


def _test_series(run: RunData, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in run.records:
        if r.get("split") == "test" and is_number(r.get(key)):
            x = r.get("epoch", r.get("step"))
            if is_number(x):
                xs.append(x)
                ys.append(r[key])
    return xs, ys


def shared_test_metrics(runs: Sequence[RunData]) -> list[str]:
    """Numeric keys of the test records that every run in ``runs`` logged."""
    common = None
    for run in runs:
        keys = {k for r in run.records if r.get("split") == "test"
                for k, v in r.items() if k not in RECORD_AXES and is_number(v)}
        common = keys if common is None else common & keys
    if not common:
        return []
    declared = _declared("curves")
    return [k for k in declared if k in common] + sorted(common - set(declared))


def _mpl_text(text: str) -> str:
    """matplotlib reads ``$...$`` as math; run names are plain text."""
    return text.replace("$", r"\$")


def _safe_filename(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "x"


@dataclass
class Overlay:
    kind: str
    metric: str
    path: Path


def plot_overlays(runs: Sequence[RunData], out_dir: Path) -> list[Overlay]:
    """Per kind with two or more runs: one PNG per shared test metric, one line per run."""
    from dllab.figures.common import plot_curves

    overlays = []
    for kind, group in kind_groups(runs).items():
        if len(group) < 2:
            continue
        for metric in shared_test_metrics(group)[:MAX_OVERLAYS_PER_KIND]:
            series = {_mpl_text(run.label): _test_series(run, metric) for run in group}
            name = f"compare_{_safe_filename(kind or 'runs')}_{_safe_filename(metric)}.png"
            path = plot_curves(series, out_dir / name, xlabel="epoch",
                               ylabel=_mpl_text(f"test {metric}"),
                               title=_mpl_text(f"{kind or 'runs'}: test {metric} per epoch"))
            overlays.append(Overlay(kind, metric, path))
    return overlays


def overlay_caption(overlay: Overlay) -> str:
    return (f"Test {overlay.metric} per epoch of every {overlay.kind or 'run'} run, overlaid: "
            "same axes, so the better curve and the run that is still improving are easy to spot.")


# ---- HTML ------------------------------------------------------------------------------------
STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       margin: 0 auto; padding: 24px 32px 60px; max-width: 1180px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 21px; margin: 36px 0 8px;
     padding-top: 12px; border-top: 2px solid #e3e3e8; } h3 { font-size: 16px; margin: 22px 0 8px; }
.meta { color: #666; font-size: 13px; } code { font-size: 13px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13.5px; }
th, td { border: 1px solid #dcdce2; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #f3f3f7; font-weight: 600; } td.num { text-align: right;
     font-variant-numeric: tabular-nums; } td.missing { color: #aaa; text-align: center; }
.figs { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 18px;
        grid-auto-flow: row dense; }
figure { margin: 0; padding: 10px; border: 1px solid #e3e3e8; border-radius: 6px; }
figure.wide-fig { grid-column: 1 / -1; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { font-size: 13px; color: #444; margin-top: 6px; }
figcaption b { color: #1d1d1f; } details { margin: 6px 0; } summary { cursor: pointer; }
pre { background: #f6f6f9; padding: 8px; overflow-x: auto; font-size: 12.5px; }
.warn { color: #a33; } .wide { overflow-x: auto; } .wide table { white-space: nowrap; }
.glance { display: flex; gap: 18px; align-items: flex-start; padding: 12px 0;
          border-bottom: 1px solid #e3e3e8; }
.glance .text { flex: 1 1 auto; min-width: 0; } .glance .pic { flex: 0 0 380px; }
.glance .pic figure { padding: 6px; } .glance .pic figcaption { font-size: 12px; }
.glance .head { font-size: 18px; margin: 2px 0 6px; } .glance .kind { font-weight: 600; }
.pass { color: #17663a; font-weight: 600; } .fail { color: #a33; font-weight: 600; }
td .key, th .key { color: #888; font-weight: 400; font-size: 12px; }
"""

#: A metric's name in words, for the report's tables (the key is shown beside it, smaller)
METRIC_WORDS = {
    "test_acc": "test accuracy", "test_loss": "test loss", "ece": "calibration error (ECE)",
    "test_elbo": "test ELBO (nats per image)", "test_recon": "reconstruction (nats per image)",
    "test_kl": "KL (nats per image)", "bits_per_dim": "bits per dimension",
    "active_units": "active latent units", "knn_acc": "k-NN accuracy of the latent means",
    "iw_log_likelihood": "IWAE log-likelihood", "clf_fid": "FID (classifier features)",
    "clf_precision": "precision (classifier features)", "clf_recall": "recall (classifier features)",
    "clf_modes_covered": "classes covered", "clf_kl_gen_data": "KL(generated || data classes)",
    "params": "parameters", "params_generator": "generator parameters",
    "params_discriminator": "discriminator parameters", "epochs": "epochs trained",
    "epochs_planned": "epochs planned", "steps": "optimiser steps",
    "train_seconds": "training time (s)", "images_per_second": "images per second",
    "nonfinite_steps_skipped": "steps skipped (non-finite loss)", "status": "status",
    "precision": "arithmetic precision", "world_size": "processes", "device": "device",
    "dataset": "dataset", "kind": "model kind",
}

#: The picture that says the most about a run of each kind, first found first
GLANCE_FIGURES = {"classifier": ("confusion_matrix.png", "curves.png"),
                  "vae": ("tsne.png", "samples.png", "reconstructions.png"),
                  "dcgan": ("samples.png", "progress_strip.png")}
KIND_WORDS = {"classifier": "Classifier (ResNet-18)", "vae": "VAE", "dcgan": "DCGAN"}


def esc(value: Any) -> str:
    """HTML-escape anything (quotes too, so it is safe in attributes)."""
    return html.escape(value if isinstance(value, str) else format_value(value), quote=True)


def _anchor(index: int) -> str:
    return f"run-{index + 1}"


def _html_cell(value: Any, missing: bool = False) -> str:
    if missing:
        return '<td class="missing">&ndash;</td>'
    cls = ' class="num"' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
    return f"<td{cls}>{esc(format_value(value))}</td>"


def _html_key(key: str) -> str:
    """A metric's words with its key beside them (the key alone when it has no words)."""
    words = METRIC_WORDS.get(key)
    return f'{esc(words)} <span class="key">{esc(key)}</span>' if words else esc(key)


def _html_kv_table(rows: Iterable[tuple[str, Any]], head: tuple[str, str]) -> str:
    out = [f"<table><tr><th>{esc(head[0])}</th><th>{esc(head[1])}</th></tr>"]
    out += [f"<tr><th>{_html_key(k)}</th>{_html_cell(v)}</tr>" for k, v in rows]
    out.append("</table>")
    return "\n".join(out)


def _html_nested(values: Mapping) -> str:
    out = []
    for key, value in values.items():
        if isinstance(value, Mapping) and value and all(is_scalar(v) for v in value.values()):
            body = _html_kv_table(((str(k), v) for k, v in value.items()), ("key", "value"))
        else:
            body = f"<pre>{esc(json.dumps(value, indent=2, default=str))}</pre>"
        out.append(f"<details><summary>{esc(key)}</summary>\n{body}\n</details>")
    return "\n".join(out)


def _html_metrics_block(values: Mapping, empty: str) -> str:
    scalars, nested = scalar_metrics(values), nested_metrics(values)
    if not values:
        return f'<p class="meta">{esc(empty)}</p>'
    parts = []
    if scalars:
        parts.append(_html_kv_table(((k, scalars[k]) for k in numbers_then_text(scalars, [scalars])),
                                    ("metric", "value")))
    if nested:
        parts.append(_html_nested(nested))
    return "\n".join(parts)


def _html_compare_table(runs: Sequence[RunData], anchors: Mapping[int, str]) -> str:
    metrics = union_metrics(runs)
    status = any(run.status != COMPLETE for run in runs)  # a status column only when it says something
    out = ["<table><tr><th>run</th>" + ("<th>status</th>" if status else "")
           + "".join(f"<th>{esc(m)}</th>" for m in metrics) + "</tr>"]
    for run in runs:
        cells = [_html_cell(run.summary.get(m), missing=m not in run.summary) for m in metrics]
        out.append(f'<tr><th><a href="#{anchors[id(run)]}">{esc(run.label)}</a></th>'
                   + (f"<td>{esc(run.state)}</td>" if status else "") + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _html_figure(path: Path, title: str, caption: str) -> str:
    uri = data_uri(path)
    if uri is None:
        return (f'<figure><p class="warn">{esc(title)}: not embedded, the file is not a PNG, GIF, '
                f"JPEG or WebP image.</p></figure>")
    size = image_size(path)
    wide = ' class="wide-fig"' if size and size[1] and size[0] / size[1] > WIDE_FIGURE else ""
    return (f'<figure{wide}><img src="{uri}" alt="{esc(title)}">'
            f"<figcaption><b>{esc(title)}</b>: {esc(caption)}</figcaption></figure>")


def headline_words(run: RunData) -> str:
    """The run's result in one sentence, in words."""
    s, c = run.summary, run.config

    def num(key):
        v = s.get(key)
        return v if is_number(v) else None

    if run.kind == "classifier" and num("test_acc") is not None:
        return f"{num('test_acc'):.1%} test accuracy on {c.get('dataset', '?')}" + (
            f" (calibration error {num('ece'):.3f})" if num("ece") is not None else "")
    if run.kind == "vae" and num("test_elbo") is not None:
        bits = [f"test ELBO {num('test_elbo'):.1f} nats per image"]
        if num("active_units") is not None:
            bits.append(f"{num('active_units'):.0f} of {c.get('latent_dim', '?')} latent units active")
        if num("knn_acc") is not None:
            bits.append(f"k-NN accuracy of the latent means {num('knn_acc'):.2f}")
        return "; ".join(bits)
    if run.kind == "dcgan":
        if num("clf_fid") is None:
            return "samples only (no --classifier-run, so no quality numbers)"
        return (f"FID {num('clf_fid'):.1f} in a dllab classifier's features (not Inception), "
                f"{num('clf_modes_covered'):.0f} of {num('clf_num_classes') or 10:.0f} classes covered")
    return "no final numbers yet" if run.status != COMPLETE else "no headline metric"


def glance_figure(run: RunData) -> Path | None:
    names = {p.name: p for p in run.figures}
    return next((names[n] for n in GLANCE_FIGURES.get(run.kind, ()) if n in names), None)


def verdicts(run: RunData) -> list:
    """The claims of ``claims.json`` that apply to the run, judged (empty when none applies)."""
    from dllab.metrics.claims import judge

    return judge(run.config, run.summary) if run.summary else []


def _html_glance(run: RunData, anchor: str) -> str:
    lines = [f'<div class="glance"><div class="text"><div class="kind"><a href="#{anchor}">'
             f"{esc(KIND_WORDS.get(run.kind, run.kind or 'run'))}: {esc(run.label)}</a></div>",
             f'<div class="head">{esc(headline_words(run))}</div>']
    if run.status != COMPLETE:
        lines.append(f'<div class="fail">{esc(run.state)}: not final</div>')
    for v in verdicts(run):
        mark = {True: '<span class="pass">pass</span>', False: '<span class="fail">FAIL</span>',
                None: '<span class="meta">not measured</span>'}[v.passed]
        lines.append(f"<div>{mark} {esc(METRIC_WORDS.get(v.claim.metric, v.claim.metric))} "
                     f"{esc(format_value(v.value) if v.value is not None else '-')}, expected "
                     f"{esc(v.claim.range_text())} <span class=\"meta\">({esc(v.claim.source)})</span></div>")
    for alarm in run.alarms:
        lines.append(f'<div class="fail">ALARM after epoch {esc(str(alarm.get("epoch", "?")))}: '
                     f'{esc(str(alarm.get("message", "")))}</div>')
    lines.append("</div>")
    fig = glance_figure(run)
    if fig is not None:
        lines.append(f'<div class="pic">{_html_figure(fig, fig.name, caption_for(fig.name, run.kind))}</div>')
    lines.append("</div>")
    return "\n".join(lines)


def _run_headline(run: RunData) -> str:
    c = run.config
    bits = [run.state.upper() if run.status != COMPLETE else COMPLETE,
            f"kind {c.get('kind', '?')}", f"dataset {c.get('dataset', '?')}"]
    for key in ("epochs", "seed", "device", "created"):
        if key in c and is_scalar(c[key]):
            bits.append(f"{key} {format_value(c[key])}")
    n_test = sum(1 for r in run.records if r.get("split") == "test")
    bits.append(f"{len(run.records)} metric records ({n_test} test)")
    return " · ".join(bits)


def render_html(runs: Sequence[RunData], overlays: Sequence[Overlay], generated: str) -> str:
    """The report page. Every run-folder string passes through :func:`esc`."""
    from dllab import __version__

    anchors = {id(run): _anchor(i) for i, run in enumerate(runs)}
    title = "dllab report: " + ", ".join(run.label for run in runs)
    body = [f"<h1>{esc(title)}</h1>",
            f'<p class="meta">Generated {esc(generated)} by dllab {esc(__version__)} from '
            f"{len(runs)} run folder{'s' if len(runs) != 1 else ''}. Self-contained: figures are "
            "embedded, no scripts, no network.</p>"]
    body.append('<h2 id="glance">At a glance</h2>')
    body += [_html_glance(run, anchors[id(run)]) for run in runs]
    body.append('<h2 id="details">Details</h2>')
    body.append("<ul>" + "".join(
        f'<li><a href="#{anchors[id(run)]}">{esc(run.label)}</a> '
        f'<span class="meta">({esc(run.kind or "unknown kind")}, {esc(str(run.path))})</span></li>'
        for run in runs) + "</ul>")
    if len(runs) > 1:
        body.append('<h2 id="comparison">Comparison</h2>')
        groups = kind_groups(runs)
        for kind, group in groups.items():
            if len(groups) > 1:
                body.append(f"<h3>{esc(kind or 'unknown kind')} runs</h3>")
            body.append(f'<div class="wide">{_html_compare_table(group, anchors)}</div>')
        if overlays:
            body.append("<h3>Overlaid test curves</h3>")
            body.append('<div class="figs">' + "\n".join(
                _html_figure(o.path, f"{o.kind or 'runs'}: test {o.metric}", overlay_caption(o))
                for o in overlays) + "</div>")
        else:
            body.append('<p class="meta">No overlaid curves: no two runs of the same kind share a '
                        "test metric logged per epoch.</p>")
    for run in runs:
        body.append(f'<h2 id="{anchors[id(run)]}">{esc(run.label)}</h2>')
        body.append(f'<p class="meta">{esc(_run_headline(run))}<br>folder: '
                    f"<code>{esc(str(run.path))}</code></p>")
        body.append("<h3>Summary</h3>")
        if run.status != COMPLETE:
            error = f" {run.summary['error']}." if isinstance(run.summary.get("error"), str) else ""
            body.append(f'<p class="warn">This run is {esc(run.state)}: its numbers are not final.'
                        f"{esc(error)} (Finish it with <code>dllab train {esc(run.kind or 'KIND')} "
                        f"--resume --out {esc(str(run.path))}</code>.)</p>")
        for alarm in run.alarms:
            body.append(f'<p class="warn">ALARM after epoch {esc(str(alarm.get("epoch", "?")))}: '
                        f'{esc(str(alarm.get("message", alarm.get("alarm", ""))))}</p>')
        body.append(_html_metrics_block(run.summary, "No summary.json: the run has not finished "
                                        "(resume it with --resume)."))
        if run.eval is not None:
            body.append("<h3>Evaluation (eval.json)</h3>")
            body.append(_html_metrics_block(run.eval, "eval.json is empty."))
        body.append("<h3>Figures</h3>")
        shown = glance_figure(run)  # embedded once, at the top
        if shown is not None:
            body.append(f'<p class="meta">{esc(shown.name)} is shown at the top (At a glance).</p>')
        if [p for p in run.figures if p != shown]:
            body.append('<div class="figs">' + "\n".join(
                _html_figure(p, p.name, caption_for(p.name, run.kind)) for p in run.figures if p != shown)
                + "</div>")
        elif shown is None:
            body.append('<p class="meta">No figures in figures/.</p>')
        config = {k: v for k, v in run.config.items() if k != "environment"}
        body.append("<h3>Config</h3>")
        body.append("<details><summary>all settings</summary>\n"
                    + _html_kv_table(flatten_config(config), ("setting", "value")) + "\n</details>")
        env = run.config.get("environment")
        if isinstance(env, Mapping):
            body.append("<details><summary>environment</summary>\n"
                        + _html_kv_table(flatten_config(env), ("item", "value")) + "\n</details>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            '<meta name="referrer" content="no-referrer">\n'
            f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# ---- Markdown --------------------------------------------------------------------------------
def md_text(value: Any) -> str:
    """Run-folder text made inert in Markdown: HTML-escaped, table pipes and newlines neutralised."""
    text = value if isinstance(value, str) else format_value(value)
    text = re.sub(r"([\\`*\[\]|])", r"\\\1", html.escape(text, quote=False))
    return " ".join(text.splitlines())


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out + [""]


def _md_fence(text: str, lang: str = "") -> list[str]:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + lang, text, fence, ""]


def _inert_json(value: Any) -> str:
    """Indented JSON with <, > and & written as \\u escapes: the same JSON, but no markup even
    for a Markdown converter that ignores code fences."""
    text = json.dumps(value, indent=2, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _md_link_path(target: Path, md_dir: Path) -> str:
    rel = os.path.relpath(os.path.abspath(target), os.path.abspath(md_dir))
    return urllib.parse.quote(Path(rel).as_posix(), safe="/._-~")


def _md_metrics_block(values: Mapping, empty: str) -> list[str]:
    if not values:
        return [f"_{md_text(empty)}_", ""]
    scalars, nested = scalar_metrics(values), nested_metrics(values)
    out = []
    if scalars:
        out += _md_table(["metric", "value"], ([md_text(k), md_text(format_value(scalars[k]))]
                                               for k in numbers_then_text(scalars, [scalars])))
    for key, value in nested.items():
        out += [f"**{md_text(key)}**", ""]
        if isinstance(value, Mapping) and value and all(is_scalar(v) for v in value.values()):
            out += _md_table(["key", "value"], ([md_text(str(k)), md_text(format_value(v))]
                                                for k, v in value.items()))
        else:
            out += _md_fence(_inert_json(value), "json")
    return out


def _md_figure(path: Path, title: str, caption: str, md_dir: Path) -> list[str]:
    return [f"![{md_text(title)}]({_md_link_path(path, md_dir)})", "",
            f"*{md_text(title)}*: {md_text(caption)}", ""]


def render_markdown(runs: Sequence[RunData], overlays: Sequence[Overlay], generated: str,
                    md_dir: Path) -> str:
    """The same sections as the HTML; figures are relative links to the runs' own files."""
    from dllab import __version__

    lines = ["# dllab report: " + ", ".join(md_text(run.label) for run in runs), "",
             f"Generated {md_text(generated)} by dllab {md_text(__version__)} from {len(runs)} "
             f"run folder{'s' if len(runs) != 1 else ''}.", ""]
    lines += ["## At a glance", ""]
    for run in runs:
        lines.append(f"- **{md_text(KIND_WORDS.get(run.kind, run.kind or 'run'))}: {md_text(run.label)}**: "
                     f"{md_text(headline_words(run))}"
                     + ("" if run.status == COMPLETE else f" ({md_text(run.state)}: not final)"))
        for v in verdicts(run):
            mark = {True: "pass", False: "**FAIL**", None: "not measured"}[v.passed]
            lines.append(f"  - {mark}: {md_text(METRIC_WORDS.get(v.claim.metric, v.claim.metric))} "
                         f"{md_text(format_value(v.value) if v.value is not None else '-')}, expected "
                         f"{md_text(v.claim.range_text())} ({md_text(v.claim.source)})")
        lines += [f"  - **ALARM** after epoch {md_text(str(a.get('epoch', '?')))}: "
                  f"{md_text(str(a.get('message', '')))}" for a in run.alarms]
    lines += ["", "## Details", ""]
    lines += [f"- **{md_text(run.label)}** ({md_text(run.kind or 'unknown kind')}): "
              f"{md_text(str(run.path))}" for run in runs] + [""]
    if len(runs) > 1:
        lines += ["## Comparison", ""]
        groups = kind_groups(runs)
        for kind, group in groups.items():
            if len(groups) > 1:
                lines += [f"### {md_text(kind or 'unknown kind')} runs", ""]
            metrics = union_metrics(group)
            status = any(run.status != COMPLETE for run in group)
            lines += _md_table(["run", *(["status"] if status else []), *(md_text(m) for m in metrics)],
                               ([md_text(run.label), *([md_text(run.state)] if status else [])]
                                + [md_text(format_value(run.summary[m]))
                                                        if m in run.summary else "–"
                                                        for m in metrics] for run in group))
        if overlays:
            lines += ["### Overlaid test curves", ""]
            for o in overlays:
                lines += _md_figure(o.path, f"{o.kind or 'runs'}: test {o.metric}",
                                    overlay_caption(o), md_dir)
    for run in runs:
        lines += [f"## {md_text(run.label)}", "", md_text(_run_headline(run)), "",
                  f"Folder: {md_text(str(run.path))}", "", "### Summary", ""]
        if run.status != COMPLETE:
            lines += [f"**This run is {md_text(run.state)}: its numbers are not final.**", ""]
        lines += [f"**ALARM after epoch {md_text(str(a.get('epoch', '?')))}:** "
                  f"{md_text(str(a.get('message', a.get('alarm', ''))))}" for a in run.alarms]
        lines += [""] if run.alarms else []
        lines += _md_metrics_block(run.summary, "No summary.json: the run has not finished.")
        if run.eval is not None:
            lines += ["### Evaluation (eval.json)", ""]
            lines += _md_metrics_block(run.eval, "eval.json is empty.")
        lines += ["### Figures", ""]
        for p in run.figures:
            lines += _md_figure(p, p.name, caption_for(p.name, run.kind), md_dir)
        if not run.figures:
            lines += ["_No figures in figures/._", ""]
        lines += ["### Config", ""]
        config = {k: v for k, v in run.config.items() if k != "environment"}
        lines += _md_table(["setting", "value"], ([md_text(k), md_text(format_value(v))]
                                                  for k, v in flatten_config(config)))
        env = run.config.get("environment")
        if isinstance(env, Mapping):
            lines += ["Environment:", ""]
            lines += _md_table(["item", "value"], ([md_text(k), md_text(format_value(v))]
                                                   for k, v in flatten_config(env)))
    return "\n".join(lines).rstrip() + "\n"


# ---- entry points ----------------------------------------------------------------------------
def report_paths(runs: Sequence[str], out: str | os.PathLike | None) -> tuple[Path, Path]:
    """(html, md): ``out`` (a folder, or a name without a suffix, gets report.html inside), else
    RUN/report.html for one run and ./report.html for several; the Markdown sits beside the HTML
    with the same stem."""
    if out is None:
        html_path = Path(runs[0]) / "report.html" if len(runs) == 1 else Path("report.html")
    else:
        html_path = Path(out)
        if html_path.is_dir() or str(out).endswith(("/", os.sep)) or not html_path.suffix:
            html_path = html_path / "report.html"
    if html_path.suffix.lower() == ".md":
        raise ValueError(f"--out {out} ends in .md; give the HTML file (the Markdown goes beside it)")
    blocker = file_in_the_way(html_path.parent)
    if blocker is not None:
        raise ValueError(f"--out {out}: {blocker} is a file, not a folder, so {html_path} cannot be written there")
    if html_path.is_dir():
        raise ValueError(f"--out {out}: {html_path} is a folder; give another file name")
    md_path = md_path_of(html_path)
    for path, mark in ((html_path, b"<title>dllab report: "), (md_path, b"# dllab report: ")):
        if path.is_dir() or (path.exists() and not _is_report(path, mark)):
            raise ValueError(f"--out {out}: {path} exists and is not a dllab report, so it is not overwritten; "
                             "give another file name")
    return html_path, md_path


def md_path_of(html_path: Path) -> Path:
    """The Markdown twin beside a report's HTML file: the same stem, ``.md``."""
    return html_path.with_suffix(".md") if html_path.suffix else html_path.with_name(html_path.name + ".md")


def _is_report(path: Path, mark: bytes) -> bool:
    """Whether the file ``path`` is a report dllab wrote (its head holds ``mark``): the only kind
    of existing file ``dllab report`` writes over (a run's summary.json or the user's notes are not)."""
    try:
        with open(path, "rb") as f:
            return mark in f.read(4096)
    except OSError:
        return False


def write_report(runs: list[str], out: str | None) -> tuple[Path, Path]:
    """Write the HTML report and its Markdown twin for ``runs``; returns (html_path, md_path).

    Overlaid curves for several runs are PNGs in ``<stem>_figures/`` beside the report (the HTML
    embeds them; the Markdown links to them).
    """
    data = load_runs(runs)
    html_path, md_path = report_paths([str(r) for r in runs], out)
    overlays = []
    if len(data) > 1:
        overlays = plot_overlays(data, html_path.parent / f"{html_path.stem}_figures")
    generated = _dt.datetime.now().isoformat(timespec="seconds")
    page = render_html(data, overlays, generated)
    text = render_markdown(data, overlays, generated, md_path.parent)
    atomic_write_bytes(html_path, lambda f: f.write(page.encode("utf-8")))
    atomic_write_bytes(md_path, lambda f: f.write(text.encode("utf-8")))
    return html_path, md_path


def _sort_key(value: Any, descending: bool) -> tuple:
    """Numbers first (in the asked order), then other values (as text), then missing ones."""
    if is_number(value):
        return (0, -value if descending else value, "")
    if value is None:
        return (2, 0, "")
    return (1, 0, format_value(value))


def compare_table(runs: list[str], sort: str | None = None, descending: bool = False) -> str:
    """An aligned plain-text table: run, kind and the union of the runs' scalar summary metrics.

    ``sort`` names a column (a metric, ``run`` or ``kind``); runs missing it go last either way.
    """
    data = load_runs(runs)
    metrics = union_metrics(data)
    # a status column once any run is not complete (interrupted at epoch 2 of 5, failed, ...)
    status = ["status"] if any(run.status != COMPLETE for run in data) else []
    columns = ["run", "kind", *status, *metrics]
    rows = [{**scalar_metrics(run.summary), "run": run.label, "kind": run.kind or None, "status": run.state}
            for run in data]
    if sort is not None:
        if sort not in columns:
            raise ValueError(f"unknown sort metric {sort!r}; available: {', '.join(columns)}")
        rows.sort(key=lambda r: _sort_key(r.get(sort), descending))
    cells = [[("-" if c not in r or r[c] is None else format_value(r[c])) for c in columns]
             for r in rows]
    numeric = [any(is_number(r.get(c)) for r in rows) and c not in LABEL_KEYS for c in columns]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(columns), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


# ---- screenshots (README picture, browser test) ----------------------------------------------
def chromium_command(url: str, user_data_dir: str | os.PathLike, *extra: str,
                     binary: str | None = None) -> list[str]:
    """A headless Chromium command line that touches no network and no user profile."""
    binary = binary or shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--hide-scrollbars", f"--user-data-dir={user_data_dir}", *extra, url]


def screenshot(html_path: str | os.PathLike, png_path: str | os.PathLike, *,
               window: tuple[int, int] = (1200, 2000), width: int | None = 800,
               timeout: float = 60.0) -> Path:
    """Screenshot a report with headless Chromium; ``width`` resizes it (PIL) to keep it small."""
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        raise FileNotFoundError("chromium is not installed (Debian: apt-get install chromium)")
    html_path, png_path = Path(html_path).resolve(), Path(png_path)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "shot.png"
        cmd = chromium_command(html_path.as_uri(), Path(tmp) / "profile",
                               f"--screenshot={raw}", f"--window-size={window[0]},{window[1]}")
        subprocess.run(cmd, check=True, timeout=timeout, capture_output=True)
        from PIL import Image

        image = Image.open(raw).convert("RGB")
        if width is not None and image.width > width:
            image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        image = image.quantize(colors=256)  # a palette PNG: a third of the size, same look
        atomic_write_bytes(png_path, lambda f: image.save(f, format="PNG", optimize=True))
    return png_path


__all__ = ["RunData", "load_run", "load_runs", "write_report", "compare_table", "caption_for",
           "render_html", "render_markdown", "format_value", "order_metrics", "screenshot",
           "chromium_command", "CSP"]
