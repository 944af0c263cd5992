"""GAN figures: training curves with the equilibrium values drawn in, fixed-noise progress
(a PNG strip and an animated GIF), the generated-class histogram and nearest training images.

Every function takes what it needs and an output path, and returns the path. Images are
(B, C, H, W) tensors in ``scale`` ("tanh": [-1, 1], the GAN's range; "unit"; "uint8").
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dllab.figures.common import grid_image, plt, save_figure
from dllab.losses.gan import EQUILIBRIUM
from dllab.metrics.gan import coverage_from_hist


def _smooth(ys: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (shorter window at the start), same length as ys."""
    ys = np.asarray(ys, dtype=float)
    if window <= 1 or len(ys) < 3:
        return ys
    c = np.cumsum(np.insert(ys, 0, 0.0))
    lo = np.maximum(0, np.arange(1, len(ys) + 1) - window)
    return (c[1:] - c[lo]) / (np.arange(1, len(ys) + 1) - lo)


def _series(train: list[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in train if r.get(key) is not None and "step" in r]
    if not pts:
        return np.array([]), np.array([])
    xs, ys = zip(*pts)
    return np.asarray(xs, float), np.asarray(ys, float)


def plot_gan_losses(records: Iterable[Mapping], path: str | os.PathLike, loss_kind: str = "bce",
                    smooth_window: int | None = None) -> Path:
    """Two panels over optimiser steps: (left) D loss (real + fake) and G loss, (right) D(x) and
    D(G(z)) (before and after the D step), each raw (faint) and moving-averaged, with the BCE
    equilibrium values (Goodfellow et al. 2014: D(x) = D(G(z)) = 1/2, D loss 2 ln 2, G loss
    ln 2) as labelled dashed lines in the legends.

    records: dicts from a run's metrics.jsonl; those with split="train" and a "step" are drawn
    (keys used: d_loss, g_loss, d_real, d_fake_before, d_fake_after; missing ones are skipped).
    loss_kind="hinge" leaves out the loss equilibrium lines (the hinge loss has none). The loss
    axis stops at the 99th percentile of the raw values, so rare spikes are cut off.
    Epoch boundaries are faint vertical lines when there are at most 30 epochs.
    """
    if loss_kind not in ("bce", "hinge"):
        raise ValueError(f"unknown loss_kind {loss_kind!r}; expected 'bce' or 'hinge'")
    train = sorted((r for r in records if r.get("split") == "train" and "step" in r),
                   key=lambda r: r["step"])
    if not any(r.get("d_loss") is not None or r.get("g_loss") is not None for r in train):
        raise ValueError("records hold no split='train' entries with a step and d_loss or g_loss")
    window = smooth_window or max(1, len(train) // 40)
    fig, (ax_loss, ax_prob) = plt.subplots(1, 2, figsize=(12, 4.3))

    colours = {"d_loss": "tab:blue", "g_loss": "tab:orange", "d_real": "tab:green",
               "d_fake_before": "tab:red", "d_fake_after": "tab:purple"}
    labels = {"d_loss": "D loss (real + fake)", "g_loss": "G loss",
              "d_real": "D(x), real", "d_fake_before": "D(G(z)) before D step",
              "d_fake_after": "D(G(z)) after D step"}

    def draw(ax, key):
        xs, ys = _series(train, key)
        if len(xs) == 0:
            return False
        if window > 1:
            ax.plot(xs, ys, color=colours[key], alpha=0.25, linewidth=0.8)
        ax.plot(xs, _smooth(ys, window), color=colours[key], linewidth=1.6,
                label=labels[key] + (f" (avg of {window})" if window > 1 else ""))
        return True

    for key in ("d_loss", "g_loss"):
        draw(ax_loss, key)
    # rare spikes would squash the curves: cap the axis at the 99th percentile of the raw values
    raw = np.concatenate([_series(train, key)[1] for key in ("d_loss", "g_loss")])
    raw = raw[np.isfinite(raw)]
    if raw.size:
        top = max(np.percentile(raw, 99) * 1.1, EQUILIBRIUM["d_loss"] * 1.15)
        bottom = min(0.0, float(raw.min()) * 1.1)
        ax_loss.set_ylim(bottom, top)
    if loss_kind == "bce":
        ax_loss.axhline(EQUILIBRIUM["d_loss"], color=colours["d_loss"], linestyle="--",
                        linewidth=1, label="D loss at equilibrium: 2 ln 2 = 1.386")
        ax_loss.axhline(EQUILIBRIUM["g_loss"], color=colours["g_loss"], linestyle="--",
                        linewidth=1, label="G loss at equilibrium: ln 2 = 0.693")
    ax_loss.set_title(f"losses ({loss_kind})")
    ax_loss.set_ylabel("loss")

    drew_prob = [draw(ax_prob, key) for key in ("d_real", "d_fake_before", "d_fake_after")]
    if any(drew_prob):
        ax_prob.axhline(0.5, color="black", linestyle="--", linewidth=1,
                        label="equilibrium: D(x) = D(G(z)) = 1/2")
        ax_prob.set_ylim(-0.02, 1.02)
        ax_prob.set_title("discriminator outputs (probability of 'real')")
    else:
        ax_prob.text(0.5, 0.5, "no D(x) / D(G(z)) in the records", ha="center", va="center",
                     transform=ax_prob.transAxes)
    ax_prob.set_ylabel("D output")

    starts = {}
    for r in train:
        if "epoch" in r:
            starts.setdefault(r["epoch"], r["step"])
    for ax in (ax_loss, ax_prob):
        if 1 < len(starts) <= 30:
            for step in sorted(starts.values())[1:]:
                ax.axvline(step, color="gray", alpha=0.3, linewidth=0.8, linestyle=":")
        ax.set_xlabel("step" + (" (faint vertical lines: epoch starts)"
                                if 1 < len(starts) <= 30 else ""))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def _load_grid(item, nrow: int, scale: str) -> np.ndarray:
    """A PNG path or a (B, C, H, W) tensor -> (H, W, 3) or (H, W) float array in [0, 1]."""
    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        return arr
    if isinstance(item, torch.Tensor) and item.dim() == 4:
        grid = grid_image(item, nrow=nrow, scale=scale)
        return grid[..., 0] if grid.shape[-1] == 1 else grid
    raise ValueError(f"expected an image path or a (B, C, H, W) tensor, got "
                     f"{tuple(item.shape) if isinstance(item, torch.Tensor) else type(item)}")


def _pick(n: int, max_items: int) -> list[int]:
    """At most max_items indices spread evenly over range(n), always with the first and last."""
    if n <= max_items:
        return list(range(n))
    return sorted({round(i * (n - 1) / (max_items - 1)) for i in range(max_items)})


def save_progress_strip(grids: Sequence, path: str | os.PathLike,
                        labels: Sequence[str] | None = None, nrow: int = 8, scale: str = "tanh",
                        max_columns: int = 8) -> Path:
    """The fixed-noise sample grids of successive epochs side by side in one PNG, so the same z
    can be followed through training (as dcgan's ``fixed_noise`` pictures).

    grids: PNG paths or (B, C, H, W) tensors, one per epoch; labels default to "epoch 1", ....
    More than ``max_columns`` grids are thinned evenly, keeping the first and the last.
    """
    grids = list(grids)
    if not grids:
        raise ValueError("grids is empty")
    if labels is None:
        labels = [f"epoch {i + 1}" for i in range(len(grids))]
    if len(labels) != len(grids):
        raise ValueError(f"{len(labels)} labels for {len(grids)} grids")
    if isinstance(max_columns, bool) or not isinstance(max_columns, int) or max_columns < 2:
        raise ValueError(f"max_columns={max_columns!r} must be an integer >= 2")
    idx = _pick(len(grids), max_columns)
    fig, axes = plt.subplots(1, len(idx), figsize=(2.6 * len(idx), 2.9), squeeze=False)
    for ax, i in zip(axes[0], idx):
        arr = _load_grid(grids[i], nrow, scale)
        ax.imshow(arr, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(labels[i], fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("samples from the same fixed noise over training", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def save_progress_gif(batches: Sequence[torch.Tensor], path: str | os.PathLike, nrow: int = 8,
                      scale: str = "tanh", labels: Sequence[str] | None = None,
                      duration_ms: int = 500, min_side: int = 320) -> Path:
    """An animated GIF (looping) of fixed-noise grids across epochs, one frame per batch.

    batches: (B, C, H, W) tensors in ``scale`` ([-1, 1] by default). Each frame is the image grid
    upscaled by an integer factor (nearest neighbour) to at least ``min_side`` pixels, under a
    caption bar with its label ("epoch 1", ... by default). The last frame is held 4x longer.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty")
    if labels is None:
        labels = [f"epoch {i + 1}" for i in range(len(batches))]
    if len(labels) != len(batches):
        raise ValueError(f"{len(labels)} labels for {len(batches)} batches")
    if isinstance(duration_ms, bool) or not isinstance(duration_ms, int) or duration_ms < 10:
        raise ValueError(f"duration_ms={duration_ms!r} must be an integer >= 10")
    frames = []
    for batch, label in zip(batches, labels):
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            got = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch)
            raise ValueError(f"each batch must be a (B, C, H, W) tensor, got {got}")
        grid = (grid_image(batch, nrow=nrow, scale=scale) * 255).round().astype(np.uint8)
        img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
        img = img.convert("RGB")
        factor = max(1, math.ceil(min_side / min(img.size)))
        img = img.resize((img.width * factor, img.height * factor), Image.NEAREST)
        bar = 18
        frame = Image.new("RGB", (img.width, img.height + bar), "white")
        frame.paste(img, (0, bar))
        ImageDraw.Draw(frame).text((4, 3), str(label), fill="black")
        frames.append(frame)
    size = frames[0].size
    if any(f.size != size for f in frames):
        raise ValueError("all batches must give grids of the same size (same B, C, H, W)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    durations = [duration_ms] * (len(frames) - 1) + [duration_ms * 4]
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=durations if len(frames) > 1 else duration_ms * 4)
    os.replace(tmp, path)
    return path


def plot_class_histogram(hist: Sequence[float], data_probs: Sequence[float] | None,
                         classes: Sequence[str], path: str | os.PathLike,
                         threshold: float = 0.5, title: str | None = None) -> Path:
    """Bar chart of the generated-class distribution (fraction of samples per predicted class)
    against the data's class distribution, with the coverage threshold of
    ``dllab.metrics.gan.class_coverage`` (classes below it are drawn red: dropped modes); the
    title gives the number of modes covered and KL(generated || data).

    hist: counts per class from a classifier's predictions on generated samples;
    data_probs: the data's class probabilities (None: uniform); classes: class names.
    """
    cov = coverage_from_hist(hist, data_probs, threshold)
    k = cov["num_classes"]
    if len(classes) != k:
        raise ValueError(f"{len(classes)} class names for a histogram of {k} classes")
    p, q = np.asarray(cov["class_probs"]), np.asarray(cov["data_probs"])
    x = np.arange(k)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * k + 2), 4.2))
    colours = ["tab:blue" if c else "tab:red" for c in cov["covered"]]
    ax.bar(x, p, width=0.7, color=colours, label="generated (red: below threshold)")
    ax.step(np.append(x - 0.5, k - 0.5), np.append(q, q[-1]), where="post", color="black",
            linewidth=1.5, label="data")
    ax.step(np.append(x - 0.5, k - 0.5), np.append(q, q[-1]) * threshold, where="post",
            color="gray", linestyle="--", linewidth=1,
            label=f"coverage threshold ({threshold:g} x data share)")
    for xi, count in zip(x, cov["class_hist"]):
        ax.annotate(str(count), (xi, p[xi]), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x, [str(c) for c in classes], rotation=45 if max(map(len, map(str, classes))) > 3
                  else 0)
    ax.set_ylabel("fraction of samples")
    ax.set_xlabel("predicted class")
    n = int(sum(cov["class_hist"]))
    ax.set_title(title or (f"{n} generated samples: {cov['modes_covered']}/{cov['num_modes']} "
                           f"modes covered, KL(gen || data) = {cov['kl_gen_data']:.3f} nats"))
    ax.set_ylim(0, max(p.max(), q.max()) * 1.18)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def plot_nearest_neighbours(fake: torch.Tensor, neighbours: torch.Tensor,
                            path: str | os.PathLike, distances=None, scale: str = "tanh",
                            neighbour_scale: str | None = None) -> Path:
    """Each generated sample (left column) next to its nearest training images (from
    ``dllab.metrics.gan.nearest_neighbours``), the memorisation check: if the rows look like
    copies, the generator memorised its training set (Theis et al. 2016 on the limits of this).

    fake: (N, C, H, W); neighbours: (N, k, C, H, W) or (N, C, H, W) for k=1, in
    ``neighbour_scale`` (default: ``scale``; e.g. "uint8" for raw training images);
    distances: (N, k) shown under each neighbour.
    """
    if not isinstance(fake, torch.Tensor) or fake.dim() != 4:
        raise ValueError(f"fake must be (N, C, H, W), got "
                         f"{tuple(fake.shape) if isinstance(fake, torch.Tensor) else type(fake)}")
    if not isinstance(neighbours, torch.Tensor) or neighbours.dim() not in (4, 5):
        raise ValueError("neighbours must be a (N, k, C, H, W) or (N, C, H, W) tensor")
    if neighbours.dim() == 4:
        neighbours = neighbours[:, None]
    n, k = neighbours.shape[:2]
    if n != fake.shape[0] or neighbours.shape[2:] != fake.shape[1:]:
        raise ValueError(f"neighbours {tuple(neighbours.shape)} do not match "
                         f"fake {tuple(fake.shape)}")
    if distances is not None:
        distances = np.asarray(torch.as_tensor(distances).detach().cpu()).reshape(n, -1)
        if distances.shape[1] != k:
            raise ValueError(f"distances have {distances.shape[1]} columns for k={k} neighbours")
    fig, axes = plt.subplots(n, k + 1, figsize=(1.25 * (k + 1) + 0.4, 1.3 * n + 0.5),
                             squeeze=False)
    for i in range(n):
        for j in range(k + 1):
            img = fake[i:i + 1] if j == 0 else neighbours[i, j - 1:j]
            arr = grid_image(img, nrow=1, scale=scale if j == 0 else (neighbour_scale or scale),
                             padding=0)
            ax = axes[i, j]
            ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                for side in ax.spines.values():
                    side.set_edgecolor("tab:red")
                    side.set_linewidth(2)
            if i == 0:
                ax.set_title("generated" if j == 0 else f"NN {j}", fontsize=9)
            if j > 0 and distances is not None:
                ax.set_xlabel(f"d={distances[i, j - 1]:.1f}", fontsize=7, labelpad=1)
    fig.suptitle("generated samples and their nearest training images", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
