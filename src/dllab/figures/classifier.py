"""Figures for a classifier run: confusion matrix, reliability diagram, confident mistakes,
training curves and the learning-rate schedule. Each function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator, PercentFormatter

from dllab.figures.common import plot_curves, plt, save_figure, to_unit


def _as_matrix(cm) -> np.ndarray:
    cm = cm.detach().cpu().numpy() if isinstance(cm, torch.Tensor) else np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {cm.shape}")
    return cm


def plot_confusion_matrix(cm, classes: Sequence[str], path: str | os.PathLike,
                          title: str | None = None) -> Path:
    """Confusion matrix (rows true class, columns predicted), coloured by the fraction of each true
    class (rows normalised), with the raw counts written in the cells when there are <= 20 classes.

    ``cm`` is a (C, C) tensor, array or list of lists of counts, e.g. ``evaluate_classifier(...)
    ["confusion"]``.
    """
    cm = _as_matrix(cm)
    c = cm.shape[0]
    if len(classes) != c:
        raise ValueError(f"got {len(classes)} class names for a {c}x{c} confusion matrix")
    totals = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)
    size = max(4.5, 0.55 * c + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, format=PercentFormatter(1.0),
                 label="fraction of the true class")
    if c <= 20:
        fontsize = 9 if c <= 10 else 7
        for i in range(c):
            for j in range(c):
                if cm[i, j] or i == j:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=fontsize,
                            color="white" if frac[i, j] > 0.5 else "black")
    ticks = np.arange(c)
    ax.set_xticks(ticks, list(classes), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, list(classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    n = int(cm.sum())
    acc = np.trace(cm) / n if n else float("nan")
    ax.set_title(title or f"Confusion matrix: accuracy {acc:.2%} of {n:,} (rows normalised)")
    return save_figure(fig, path)


def plot_reliability(bins: Mapping, path: str | os.PathLike, title: str | None = None) -> Path:
    """Reliability diagram (Guo et al. 2017, figure 1): accuracy against confidence per bin, with
    the gap to the diagonal shaded and the ECE in the title; below it, the share of examples in
    each confidence bin with the overall accuracy and mean confidence marked.

    ``bins`` is the dict returned by ``expected_calibration_error`` (also ``evaluate_classifier
    (...)["ece_bins"]``): keys ece, edges, accuracy, confidence, count.
    """
    missing = {"ece", "edges", "accuracy", "confidence", "count"} - set(bins)
    if missing:
        raise ValueError(f"bins is missing {sorted(missing)}; pass expected_calibration_error's "
                         "second return value")
    edges = np.asarray(bins["edges"], dtype=float)
    acc = np.asarray(bins["accuracy"], dtype=float)
    conf = np.asarray(bins["confidence"], dtype=float)
    count = np.asarray(bins["count"], dtype=float)
    n = count.sum()
    if n == 0:
        raise ValueError("all reliability bins are empty")
    lo, width = edges[:-1], np.diff(edges)
    filled = count > 0

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(lo[filled], acc[filled], width=width[filled], align="edge", color="tab:blue",
           edgecolor="black", linewidth=0.6, label="accuracy")
    ax.bar(lo[filled], conf[filled] - acc[filled], bottom=acc[filled], width=width[filled],
           align="edge", facecolor="none", edgecolor="tab:red", hatch="///", linewidth=1.0,
           label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy in bin")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"Reliability diagram: ECE = {bins['ece']:.2%} ({len(count)} bins)")

    hist.bar(lo, count / n, width=width, align="edge", color="gray", edgecolor="black",
             linewidth=0.6)
    mean_acc = float(np.nansum(acc * count) / n)
    mean_conf = float(np.nansum(conf * count) / n)
    hist.axvline(mean_acc, color="tab:blue", linestyle="--", linewidth=1.2,
                 label=f"accuracy {mean_acc:.1%}")
    hist.axvline(mean_conf, color="tab:red", linestyle=":", linewidth=1.5,
                 label=f"mean confidence {mean_conf:.1%}")
    hist.set_ylabel("share of\nexamples")
    hist.set_xlabel("confidence (largest softmax probability)")
    hist.yaxis.set_major_formatter(PercentFormatter(1.0))
    hist.legend(loc="upper left", fontsize=8)
    hist.grid(alpha=0.3)
    return save_figure(fig, path)


def _unnormalise(images: torch.Tensor, scale: str, mean, std) -> torch.Tensor:
    """Map a loader's batch back to [0, 1] for display ("standard" needs the dataset mean/std)."""
    if scale != "standard":
        return to_unit(images, scale)
    if mean is None or std is None:
        raise ValueError("scale='standard' images need the dataset's mean and std to un-normalise")
    images = images.detach().float().cpu()
    c = images.shape[1]
    mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
    std = torch.as_tensor(std, dtype=torch.float32).flatten()
    if mean.numel() not in (1, c) or std.numel() not in (1, c):
        raise ValueError(f"mean/std need 1 or {c} values for {c}-channel images, got "
                         f"{mean.numel()} and {std.numel()}")
    return (images * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).clamp(0, 1)


def plot_confident_mistakes(
    images: torch.Tensor,
    true: Sequence[int] | torch.Tensor,
    pred: Sequence[int] | torch.Tensor,
    conf: Sequence[float] | torch.Tensor,
    classes: Sequence[str],
    path: str | os.PathLike,
    scale: str = "standard",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    ncol: int = 8,
    title: str | None = None,
) -> Path:
    """Grid of misclassified images captioned "true→pred (p)", p the predicted class's probability.

    ``images`` is a (K, C, H, W) batch in the loader's ``scale`` ("standard" needs ``mean`` and
    ``std``, e.g. ``data.mean``/``data.std``; "unit", "tanh" and "uint8" need nothing). Typical use::

        idx = most_confident_mistakes(res["probs"], res["targets"], 24)
        plot_confident_mistakes(data.test_x[idx], res["targets"][idx],
                                res["probs"][idx].argmax(1), res["probs"][idx].max(1).values,
                                data.classes, path, scale="uint8")
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (K, C, H, W), got shape {tuple(images.shape)}")
    k = images.shape[0]
    true, pred = [int(t) for t in true], [int(p) for p in pred]
    conf = [float(p) for p in conf]
    if not (len(true) == len(pred) == len(conf) == k):
        raise ValueError(f"got {k} images but {len(true)} true labels, {len(pred)} predictions "
                         f"and {len(conf)} confidences")
    if ncol < 1:
        raise ValueError(f"ncol must be positive, got {ncol}")
    shown = _unnormalise(images, scale, mean, std)
    ncol = max(1, min(ncol, k))
    nrow = max(1, math.ceil(k / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.7 * ncol, 1.95 * nrow + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= k:
            continue
        img = shown[i].permute(1, 2, 0).numpy()
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(img, interpolation="nearest")
        ax.set_title(f"{classes[true[i]]}→{classes[pred[i]]}\n({conf[i]:.2f})", fontsize=8,
                     color="firebrick")
    if k == 0:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle(title or "Most confident mistakes: true→predicted (probability)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _dedupe(records: Sequence[Mapping], split: str, key: str) -> list[Mapping]:
    """Records of one split with a later record replacing an earlier one with the same ``key``
    (a resumed run re-logs the steps after its last checkpoint), sorted by ``key``."""
    latest = {}
    for r in records:
        if r.get("split") == split and r.get(key) is not None:
            latest[r[key]] = r
    return [latest[k] for k in sorted(latest)]


def _train_positions(train: Sequence[Mapping]) -> tuple[list[float], list[int]]:
    """x position (epochs completed) and whole epoch of each train record.

    The engine logs fractional epochs for train records (epoch 1.25 = a quarter into the second
    epoch) and whole epochs completed for test records, so x = epoch and the record belongs to
    epoch ceil(x). Records logged with whole epochs only (several per epoch) are spread evenly
    over (epoch - 1, epoch] in step order.
    """
    epochs = [float(r["epoch"]) for r in train]
    if any(e != int(e) for e in epochs):
        return epochs, [math.ceil(e - 1e-9) for e in epochs]
    xs, count, seen = [], {}, {}
    for e in epochs:
        count[e] = count.get(e, 0) + 1
    for e in epochs:
        seen[e] = seen.get(e, 0) + 1
        xs.append(e - 1 + seen[e] / count[e])
    return xs, [int(e) for e in epochs]


def plot_training_curves(records: Sequence[Mapping], path: str | os.PathLike,
                         title: str | None = None) -> Path:
    """Loss and accuracy against epoch, train and test on one panel each, from metrics.jsonl.

    ``records`` are the dicts of a run's metrics.jsonl: train records (split="train": step, epoch,
    loss, acc, lr), test records (split="test": epoch, step, loss, acc); other splits with an epoch
    (e.g. "val") are drawn like test. The x axis is epochs completed: a faint line shows every
    logged train record, a marker at each whole epoch e the mean of epoch e's train records, and a
    marker the test value measured after epoch e. When a record is logged twice (a resumed run
    repeats the steps after its last checkpoint) the later one is used. The loss axis turns
    logarithmic when the loss spans more than a factor of 30. A panel is left out when no record
    has its field.
    """
    records = [r for r in records if isinstance(r, Mapping)]
    train = _dedupe(records, "train", "step")
    if any(r.get("epoch") is None for r in train):
        raise ValueError("train records need an 'epoch' field")
    evals = {s: _dedupe(records, s, "epoch")
             for s in sorted({str(r.get("split")) for r in records} - {"train", "None"})}
    evals = {s: rs for s, rs in evals.items() if rs}
    fields = [f for f in ("loss", "acc")
              if any(r.get(f) is not None for r in train + sum(evals.values(), []))]
    if not fields:
        raise ValueError("no train or test records with 'loss' or 'acc' to plot")
    xs, whole = _train_positions(train) if train else ([], [])

    fig, axes = plt.subplots(1, len(fields), figsize=(6.0 * len(fields), 4.2), squeeze=False)
    colors = {"train": "tab:blue", "test": "tab:orange"}
    for ax, field in zip(axes.flat, fields):
        values = []
        pts = [(x, float(r[field]), e) for x, e, r in zip(xs, whole, train)
               if r.get(field) is not None]
        if pts:
            by_epoch: dict = {}
            for _, v, e in pts:
                by_epoch.setdefault(e, []).append(v)
            if len(pts) > len(by_epoch):  # more than one record per epoch: show them faintly
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors["train"],
                        alpha=0.35, linewidth=0.8, label="train (each logged step)")
            epochs = sorted(by_epoch)
            ax.plot(epochs, [np.mean(by_epoch[e]) for e in epochs], color=colors["train"],
                    marker="o", markersize=4, label="train (epoch mean)")
            values += [p[1] for p in pts]
        for i, (split, rs) in enumerate(evals.items()):
            ev = [(float(r["epoch"]), float(r[field])) for r in rs if r.get(field) is not None]
            if ev:
                ax.plot(*zip(*ev), color=colors.get(split, f"C{i + 2}"), marker="s",
                        markersize=4, label=split)
                values += [v for _, v in ev]
        ax.set_xlabel("epochs completed")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if field == "acc":
            ax.set_ylabel("accuracy")
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        else:
            ax.set_ylabel("cross-entropy loss (nats)")
            finite = [v for v in values if math.isfinite(v)]
            if finite and min(finite) > 0 and max(finite) / min(finite) > 30:
                ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        ax.set_title({"loss": "Loss", "acc": "Accuracy"}[field])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_lr_schedule(records: Sequence[Mapping], path: str | os.PathLike,
                     title: str | None = None) -> Path:
    """Learning rate against optimizer step, from the train records of metrics.jsonl."""
    train = [r for r in _dedupe(records, "train", "step") if r.get("lr") is not None]
    if not train:
        raise ValueError("no train records with an 'lr' field")
    steps = [r["step"] for r in train]
    lrs = [float(r["lr"]) for r in train]
    return plot_curves({"learning rate": (steps, lrs)}, path, xlabel="step",
                       ylabel="learning rate", title=title or "Learning-rate schedule")
