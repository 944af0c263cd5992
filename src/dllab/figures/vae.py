"""VAE figures, written as PNGs: training curves, reconstructions, samples at several temperatures,
t-SNE of the latent means, latent interpolations, the 2-D latent manifold and rate-distortion.

Every function takes what it needs and an output path, and returns the path.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from dllab.figures.common import grid_image, plt, save_figure, save_image_grid


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _smooth(ys: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (shorter window at the start), same length as ys."""
    ys = np.asarray(ys, dtype=float)
    if window <= 1 or len(ys) < 3:
        return ys
    c = np.cumsum(np.insert(ys, 0, 0.0))
    out = np.empty_like(ys)
    for i in range(len(ys)):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def plot_vae_curves(records: Iterable[Mapping], path: str | os.PathLike) -> Path:
    """Train and test loss, reconstruction and KL (nats per image) side by side on one figure.

    records: the dicts of a run's metrics.jsonl. Train ones have split="train", step, epoch, loss,
    recon, kl; test ones split="test", epoch, loss, recon, kl, elbo (and optionally step). The x
    axis is the optimiser step, each test point drawn at the last train step of its epoch (or its
    own "step"); if a test epoch has no train record to anchor it, everything is drawn per epoch,
    train values averaged over the epoch. Noisy per-step train curves get a moving average on top.
    """
    records = list(records)
    train = [r for r in records if r.get("split") == "train"]
    test = [r for r in records if r.get("split") == "test"]
    if not train and not test:
        raise ValueError("records hold no split='train' or split='test' entries")
    last_step = {}
    for r in train:
        if "step" in r and "epoch" in r:
            last_step[r["epoch"]] = max(last_step.get(r["epoch"], r["step"]), r["step"])
    by_step = all("step" in r for r in train) and all(
        "step" in r or r.get("epoch") in last_step for r in test) and bool(train)
    if by_step:
        xlabel = "step"
        train_x = [r["step"] for r in train]
        test_x = [r["step"] if "step" in r else last_step[r["epoch"]] for r in test]
        train_rows = train
    else:
        xlabel = "epoch"
        groups = defaultdict(list)
        for r in train:
            groups[r.get("epoch", 0)].append(r)
        train_x = sorted(groups)
        train_rows = [{k: float(np.mean([g[k] for g in groups[e] if k in g]))
                       for k in ("loss", "recon", "kl") if any(k in g for g in groups[e])}
                      for e in train_x]
        test_x = [r.get("epoch", i) for i, r in enumerate(test)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("loss", "loss (objective)"), ("recon", "reconstruction -log p(x|z)"),
              ("kl", "KL(q(z|x) || p(z))")]
    window = max(1, len(train_rows) // 25)
    for ax, (key, title) in zip(axes, panels):
        xs = [x for x, r in zip(train_x, train_rows) if key in r]
        ys = [r[key] for r in train_rows if key in r]
        if xs:
            if window > 1:
                ax.plot(xs, ys, color="C0", alpha=0.25, linewidth=0.8)
                ax.plot(xs, _smooth(ys, window), color="C0",
                        label=f"train (moving avg of {window})")
            else:
                ax.plot(xs, ys, color="C0", marker="o" if len(xs) < 30 else None, markersize=3,
                        label="train")
        txs = [x for x, r in zip(test_x, test) if key in r]
        tys = [r[key] for r in test if key in r]
        if txs:
            ax.plot(txs, tys, color="C1", marker="o", markersize=4, label="test")
        if key == "loss":
            exs = [x for x, r in zip(test_x, test) if "elbo" in r]
            eys = [-r["elbo"] for r in test if "elbo" in r]
            if exs and any(abs(e - r.get("loss", e)) > 1e-6 * max(1.0, abs(e))
                           for e, r in zip(eys, [r for r in test if "elbo" in r])):
                ax.plot(exs, eys, color="C2", linestyle="--", marker="s", markersize=3,
                        label="test -ELBO")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("nats per image")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("VAE training curves (per-image sums, batch-averaged)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_reconstructions(x: torch.Tensor, x_rec: torch.Tensor, path: str | os.PathLike,
                         nrow: int | None = None, title: str | None = None) -> Path:
    """Fixed test images (B, C, H, W) in [0, 1] with their reconstructions below them.

    Rows alternate: ``nrow`` inputs, then the same ``nrow`` reconstructions, labelled on the left.
    """
    if x.shape != x_rec.shape:
        raise ValueError(f"x shape {tuple(x.shape)} != x_rec shape {tuple(x_rec.shape)}")
    n = len(x)
    nrow = nrow or min(n, 8)
    rows, labels = [], []
    for start in range(0, n, nrow):
        a, b = x[start:start + nrow], x_rec[start:start + nrow]
        pad = nrow - len(a)
        if pad:  # blank cells so the pair stays aligned in the grid
            a = torch.cat([a, torch.ones(pad, *a.shape[1:], dtype=a.dtype, device=a.device)])
            b = torch.cat([b, torch.ones(pad, *b.shape[1:], dtype=b.dtype, device=b.device)])
        rows += [a.detach().float().cpu(), b.detach().float().cpu()]
        labels += ["input", "recon"]
    grid = torch.cat(rows)
    return save_image_grid(grid, path, nrow=nrow, row_labels=labels,
                           title=title or "Test images (input) and reconstructions (decoded mean)")


@torch.no_grad()
def plot_samples(model, path: str | os.PathLike, n: int = 64,
                 temperatures: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5),
                 generator: torch.Generator | None = None) -> Path:
    """One grid of ``n`` prior samples per temperature T (z ~ N(0, T^2 I)), side by side.

    Shows the decoder's mean images (Bernoulli probabilities or Gaussian means), not pixel draws.
    Each temperature uses a fresh draw from ``generator``.
    """
    if not temperatures:
        raise ValueError("temperatures is empty")
    was_training = model.training
    model.eval()
    try:
        batches = [model.sample(n, temperature=float(t), generator=generator).cpu()
                   for t in temperatures]
    finally:
        model.train(was_training)
    nrow = max(1, int(math.ceil(math.sqrt(n))))
    fig, axes = plt.subplots(1, len(temperatures), figsize=(3.2 * len(temperatures), 3.6),
                             squeeze=False)
    for ax, t, imgs in zip(axes[0], temperatures, batches):
        grid = grid_image(imgs, nrow=nrow)
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0,
                  vmax=1, interpolation="nearest")
        ax.set_title(f"T = {t:g}")
        ax.axis("off")
    fig.suptitle("Samples from the prior with its std scaled by T (decoder mean images)")
    fig.tight_layout()
    return save_figure(fig, path)


def _scatter_by_label(ax, pts: np.ndarray, labels: np.ndarray, class_names) -> None:
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        sel = labels == c
        name = class_names[int(c)] if class_names is not None else str(c)
        ax.scatter(pts[sel, 0], pts[sel, 1], s=6, alpha=0.75, color=cmap(i % cmap.N),
                   label=name, linewidths=0)


def plot_tsne(z, labels, path: str | os.PathLike, perplexities: Sequence[float] = (5, 30, 50),
              seed: int = 0, class_names: Sequence[str] | None = None,
              threads: int | None = 1) -> Path:
    """t-SNE (van der Maaten & Hinton 2008; scikit-learn) of latent means, coloured by label.

    One panel per perplexity: clusters and gaps that change with perplexity are partly t-SNE's own
    doing (Wattenberg et al. 2016, "How to Use t-SNE Effectively"). If the latents are 2-D, a
    first panel shows the raw latent space. z: (N, L) array or tensor; labels: (N,) ints.

    ``threads`` caps scikit-learn's OpenMP threads (None: its default, all cores). One thread is
    the default because OpenMP spin-waiting on a busy shared CPU is ruinous: 600 points took 42 s
    with 2 threads and 1.7 s with 1 on this project's loaded 2-core machine.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    z = z.detach().cpu().numpy() if isinstance(z, torch.Tensor) else np.asarray(z)
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if z.ndim != 2 or len(z) != len(labels):
        raise ValueError(f"z must be (N, L) with N = len(labels)={len(labels)}, got {z.shape}")
    for p in perplexities:
        if not 0 < p < len(z):
            raise ValueError(f"perplexity={p} must be in (0, N={len(z)})")
    panels = []
    if z.shape[1] == 2:
        panels.append(("raw latent means (z1, z2)", z))
    for p in perplexities:
        with threadpool_limits(limits=threads):
            emb = TSNE(n_components=2, perplexity=float(p), init="pca", random_state=seed
                       ).fit_transform(z.astype(np.float32))
        panels.append((f"t-SNE, perplexity {p:g}", emb))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.2, 4.4), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels):
        _scatter_by_label(ax, pts, labels, class_names)
        ax.set_title(title)
        if title.startswith("raw"):
            ax.set_xlabel("z1")
            ax.set_ylabel("z2")
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    handles, names = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", markerscale=3, fontsize=8, title="label")
    fig.suptitle(f"Latent means of {len(z)} images (L = {z.shape[1]})")
    fig.tight_layout(rect=(0, 0, 1 - 1.0 / (4.2 * len(panels) + 1.2), 1))
    return save_figure(fig, path)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of a and b (White 2016, "Sampling Generative Networks").

    a, b: (P, L); t: (T,). Returns (P, T, L); falls back to lerp where a and b are (anti)parallel.
    """
    a_n = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b_n = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    omega = torch.acos((a_n * b_n).sum(-1).clamp(-1, 1))[:, None, None]  # (P, 1, 1)
    t = t[None, :, None]  # (1, T, 1)
    so = torch.sin(omega)
    lerp = (1 - t) * a[:, None] + t * b[:, None]
    safe = so.abs() > 1e-6
    so = torch.where(safe, so, torch.ones_like(so))
    out = torch.sin((1 - t) * omega) / so * a[:, None] + torch.sin(t * omega) / so * b[:, None]
    return torch.where(safe, out, lerp)


@torch.no_grad()
def plot_interpolation(model, x_a: torch.Tensor, x_b: torch.Tensor, path: str | os.PathLike,
                       steps: int = 10, labels_a: Sequence | None = None,
                       labels_b: Sequence | None = None) -> Path:
    """Decoded linear and spherical (slerp) paths between the latent means of image pairs.

    x_a, x_b: (P, C, H, W) images in [0, 1] (e.g. of two different classes). Each pair gives two
    rows, "lerp" and "slerp", of ``steps`` decoded means from mu(x_a) to mu(x_b), framed by the
    input images themselves in the first and last columns.
    """
    if x_a.dim() == 3:
        x_a, x_b = x_a[None], x_b[None]
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a shape {tuple(x_a.shape)} != x_b shape {tuple(x_b.shape)}")
    if steps < 2:
        raise ValueError(f"steps={steps} must be >= 2")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        mu_a, _ = model.encode(x_a.to(device).float())  # (P, L)
        mu_b, _ = model.encode(x_b.to(device).float())
        t = torch.linspace(0, 1, steps, device=device, dtype=mu_a.dtype)
        P, L = mu_a.shape
        paths = {"lerp": (1 - t)[None, :, None] * mu_a[:, None] + t[None, :, None] * mu_b[:, None],
                 "slerp": slerp(mu_a, mu_b, t)}  # each (P, steps, L)
        rows, names = [], []
        for p in range(P):
            tag = f"{p + 1}"
            if labels_a is not None and labels_b is not None:
                tag += f": {labels_a[p]}→{labels_b[p]}"
            for kind, zs in paths.items():
                loc, _ = model.decode(zs[p])
                imgs = model.mean_image(loc).float().cpu()  # (steps, C, H, W)
                ends = x_a[p:p + 1].float().cpu(), x_b[p:p + 1].float().cpu()
                rows.append(torch.cat([ends[0], imgs, ends[1]]))  # (steps + 2, C, H, W)
                names.append(f"{tag} {kind}")
    finally:
        model.train(was_training)
    return save_image_grid(torch.cat(rows), path, nrow=steps + 2, row_labels=names,
                           title="Latent interpolation (first/last column: the input images)")


@torch.no_grad()
def plot_manifold(model, path: str | os.PathLike, n: int = 20) -> Path:
    """Decoded means over an n x n grid of 2-D latents at Gaussian quantiles.

    As in Kingma & Welling (2014), fig. 4: linearly spaced points of the unit square (here
    0.05..0.95) mapped through the inverse normal CDF, so the grid covers the prior's mass evenly.
    Needs latent_dim == 2.
    """
    latent_dim = model.config.latent_dim
    if latent_dim != 2:
        raise ValueError(f"plot_manifold needs latent_dim=2, got latent_dim={latent_dim}")
    if n < 2:
        raise ValueError(f"n={n} must be >= 2")
    device = _model_device(model)
    q = torch.linspace(0.05, 0.95, n, dtype=torch.float64)
    values = torch.distributions.Normal(0.0, 1.0).icdf(q).float()  # (n,)
    z1, z2 = torch.meshgrid(values, values.flip(0), indexing="xy")  # rows: z2 high -> low
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=1).to(device)  # (n*n, 2)
    was_training = model.training
    model.eval()
    try:
        loc, _ = model.decode(z)
        imgs = model.mean_image(loc).float().cpu()  # (n*n, C, H, W)
    finally:
        model.train(was_training)
    grid = grid_image(imgs, nrow=n, padding=0)
    h, w = grid.shape[:2]
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ticks = list(range(0, n, max(1, n // 5)))
    cell_w, cell_h = w / n, h / n
    ax.set_xticks([(i + 0.5) * cell_w for i in ticks], [f"{values[i]:.2f}" for i in ticks])
    ax.set_yticks([(i + 0.5) * cell_h for i in ticks], [f"{values.flip(0)[i]:.2f}" for i in ticks])
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title("Learned 2-D manifold: decoder means at Gaussian quantiles of z")
    return save_figure(fig, path)


def _pick(row: Mapping, *keys: str) -> float:
    for k in keys:
        if k in row:
            return float(row[k])
    raise ValueError(f"row {dict(row)!r} has none of the keys {keys}")


def plot_rate_distortion(rows: Iterable[Mapping], path: str | os.PathLike) -> Path:
    """Distortion (reconstruction NLL) against rate (KL) across runs, each point labelled with beta.

    rows: one dict per run with "beta" and the rate ("test_kl", "kl" or "rate") and distortion
    ("test_recon", "recon" or "distortion") in nats per image. Dashed grey lines are constant
    -ELBO = rate + distortion (Alemi et al. 2018, "Fixing a Broken ELBO", fig. 1): points on
    one line have equal ELBO however they trade rate for distortion.
    """
    pts = sorted(((_pick(r, "test_kl", "kl", "rate"), _pick(r, "test_recon", "recon", "distortion"),
                   r.get("beta")) for r in rows), key=lambda p: p[0])
    if not pts:
        raise ValueError("rows is empty")
    rate = np.array([p[0] for p in pts])
    dist = np.array([p[1] for p in pts])
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    ax.plot(rate, dist, "-o", color="C0", markersize=5)
    for r, d, beta in pts:
        label = f"-ELBO {r + d:.1f}" if beta is None else f"β={float(beta):g}  (-ELBO {r + d:.1f})"
        ax.annotate(label, (r, d), textcoords="offset points", xytext=(5, 5), fontsize=8)
    lo_r, hi_r = rate.min(), rate.max()
    lo_d, hi_d = dist.min(), dist.max()
    span = max(hi_r - lo_r, hi_d - lo_d, 1.0)
    ax.set_xlim(max(0.0, lo_r - 0.1 * span), hi_r + 0.3 * span)
    ax.set_ylim(lo_d - 0.1 * span, hi_d + 0.15 * span)
    xs = np.linspace(*ax.get_xlim(), 50)
    for total in sorted({round(r + d, 1) for r, d in zip(rate, dist)}):
        ax.plot(xs, total - xs, linestyle="--", color="gray", linewidth=0.7, alpha=0.6)
    ax.set_xlabel("rate: KL(q(z|x) || p(z))  [nats per image]")
    ax.set_ylabel("distortion: -E_q log p(x|z)  [nats per image]")
    ax.set_title("Rate-distortion across runs (dashed: constant -ELBO)")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
