"""Figure helpers shared by every model kind: line curves and image grids, written as PNGs.

matplotlib is used with the non-interactive Agg backend so figures render on machines with no
screen; every function takes an output path and returns it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically (temp file + rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def to_unit(images: torch.Tensor, scale: str = "unit") -> torch.Tensor:
    """Map a batch from a loader's value scale ("unit", "tanh" or "uint8") back to [0, 1]."""
    images = images.detach().float().cpu()
    if scale == "tanh":
        images = (images + 1) / 2
    elif scale == "uint8":
        images = images / 255.0
    elif scale != "unit":
        raise ValueError(f"unknown scale {scale!r}; expected 'unit', 'tanh' or 'uint8'")
    return images.clamp(0, 1)


def grid_image(images: torch.Tensor, nrow: int = 8, scale: str = "unit", padding: int = 2):
    """An (H, W, C) float array in [0, 1] tiling a (B, C, H, W) batch, ready for ``imshow``."""
    grid = make_grid(to_unit(images, scale), nrow=nrow, padding=padding, pad_value=1.0)
    return grid.permute(1, 2, 0).numpy()


def save_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    nrow: int = 8,
    scale: str = "unit",
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Save a (B, C, H, W) batch as one PNG grid, ``nrow`` images per row, with an optional title."""
    grid = grid_image(images, nrow=nrow, scale=scale)
    h, w = grid.shape[:2]
    fig, ax = plt.subplots(figsize=(max(2.0, w / 60), max(2.0, h / 60) + (0.4 if title else 0)))
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        n_rows = (len(images) + nrow - 1) // nrow
        cell = h / n_rows
        ax.set_yticks([cell * (i + 0.5) for i in range(len(row_labels))], list(row_labels))
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def plot_curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    xlabel: str = "step",
    ylabel: str = "",
    title: str | None = None,
    hlines: Mapping[str, float] | None = None,
    logy: bool = False,
) -> Path:
    """Plot named (x, y) series on one axis; ``hlines`` draws labelled reference levels."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (xs, ys) in series.items():
        if len(xs):
            ax.plot(list(xs), list(ys), label=label, marker="o" if len(xs) < 30 else None,
                    markersize=3)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="gray")
        ax.annotate(label, xy=(1.0, y), xycoords=("axes fraction", "data"), ha="right",
                    va="bottom", fontsize=8, color="dimgray")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    return save_figure(fig, path)
