"""GAN metrics: sample quality, diversity and mode collapse.

Two feature spaces, never to be confused:

* ``inception_metrics``: FID and Inception Score with the standard Inception-v3 network
  (torchmetrics / torch-fidelity). These are the numbers papers report. They need the network's
  weights file, which cannot be downloaded on an offline machine; dllab never downloads it.
* ``classifier_feature_metrics``: FID, improved precision/recall, class coverage and diversity in
  the feature space of a classifier trained with dllab (e.g. a ResNet's penultimate layer). The
  offline alternative: good for comparing runs with each other on the same classifier, NOT
  comparable with published FIDs. Every key it returns starts with ``clf_`` and the dict says
  ``"feature_space": "dllab-classifier (NOT Inception)"``.

The building blocks (``frechet_distance``, ``precision_recall``, ``class_coverage``,
``mean_pairwise_distance``, ``nearest_neighbours``) work on any (N, D) features, numpy or torch,
and compute in float64 on the CPU, chunked so 10k x 10k pairwise distances fit in memory.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

FEATURE_SPACE_CLASSIFIER = "dllab-classifier (NOT Inception)"
FEATURE_SPACE_INCEPTION = "Inception-v3 pool3 (torch-fidelity weights-inception-2015-12-05)"

INCEPTION_WEIGHTS_NAMES = (
    "weights-inception-2015-12-05-6726825d.pth",  # torch-fidelity's release name
    "pt_inception-2015-12-05-6726825d.pth",       # pytorch-fid's release name (same hash prefix)
)
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_WEIGHTS_ENV = "DLLAB_INCEPTION_WEIGHTS"


# ----------------------------------------------------------------------------- helpers

def _as_features(x, name: str) -> torch.Tensor:
    """(N, ...) numpy/torch -> (N, D) float64 CPU tensor; images are flattened."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    t = t.detach().to("cpu", torch.float64)
    if t.dim() < 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, D) or (N, C, H, W) with N >= 1, "
                         f"got {tuple(t.shape)}")
    t = t.reshape(t.shape[0], -1)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def _check_chunk(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")


def _check_k(k: int, n: int, what: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer")
    if n < k + 1:
        raise ValueError(f"{what} has {n} samples; k={k} nearest neighbours (excluding the "
                         f"sample itself) need at least {k + 1}")


def _kth_nn_radii(x: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row, (N,) float64."""
    radii = torch.empty(x.shape[0], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk_size):
        d = torch.cdist(x[start:start + chunk_size], x)  # (chunk, N)
        # the smallest is the point itself (0); the (k+1)-th smallest is the k-th neighbour
        radii[start:start + chunk_size] = d.topk(k + 1, dim=1, largest=False).values[:, -1]
    return radii


def _mutual_ball_membership(fake: torch.Tensor, real: torch.Tensor, fake_radii: torch.Tensor,
                            real_radii: torch.Tensor, chunk_size: int) -> tuple[float, float]:
    """(fraction of fake rows inside some real ball, fraction of real rows inside some fake
    ball), from one pass over the fake x real distance matrix, ``chunk_size`` fake rows at a
    time."""
    fake_inside = 0
    real_inside = torch.zeros(real.shape[0], dtype=torch.bool)
    for start in range(0, fake.shape[0], chunk_size):
        d = torch.cdist(fake[start:start + chunk_size], real)  # (chunk, N_real)
        fake_inside += int((d <= real_radii[None, :]).any(dim=1).sum())
        real_inside |= (d <= fake_radii[start:start + chunk_size, None]).any(dim=0)
    return fake_inside / fake.shape[0], float(real_inside.double().mean())


# ----------------------------------------------------------------------------- FID

def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, float64; the covariance is the
    unbiased one (divides by N - 1), as in the reference FID code (Heusel et al. 2017)."""
    f = _as_features(features, "features").numpy()
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues < 0 from
    rounding are clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

        d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2}).

    Heusel et al. (2017), "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium" (the FID when the Gaussians are fitted to Inception features; Dowson &
    Landau 1982 for the formula). Numerically careful: float64, and the trace term computed as
    tr((s1^{1/2} s2 s1^{1/2})^{1/2}) = sum of square roots of the eigenvalues of a symmetric PSD
    matrix (it has the same eigenvalues as s1 s2), so there is no complex sqrtm to repair and no
    regularising epsilon is needed for singular covariances (fewer samples than dimensions).
    Tiny negative results from rounding are returned as 0.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, "
                         f"sigma2 {s2.shape}; expected (D,), (D,), (D, D), (D, D)")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or Inf")
    root1 = _sqrt_psd(s1)
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(value, 0.0))


def fid_from_features(real_feats, fake_feats) -> float:
    """FID (Heusel et al. 2017) between two sets of (N, D) features: the Fréchet distance of the
    Gaussians fitted to each (``feature_statistics``). Biased upwards for small N (Chong & Forsyth
    2020, "Effectively Unbiased FID"): compare runs only at the same N."""
    return frechet_distance(*feature_statistics(real_feats), *feature_statistics(fake_feats))


# ----------------------------------------------------------------------------- precision / recall

def precision_recall(real_feats, fake_feats, k: int = 3,
                     chunk_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall -> (precision, recall), each in [0, 1].

    Kynkäänniemi et al. (2019), "Improved Precision and Recall Metric for Assessing Generative
    Models": each set approximates its manifold by the union of balls around its samples,
    of radius the distance to the sample's k-th nearest neighbour in the same set (k=3 in the
    paper). precision = fraction of fake samples inside the real manifold (quality);
    recall = fraction of real samples inside the fake manifold (coverage; mode collapse drives it
    to 0). Distances are Euclidean in float64, computed ``chunk_size`` rows at a time (three
    N x N passes: real-real and fake-fake for the radii, fake-real for both fractions; about a
    minute for 10k x 10k 512-d features on 2 CPU cores).
    """
    _check_chunk(chunk_size)
    real, fake = _as_features(real_feats, "real_feats"), _as_features(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]}, fake {fake.shape[1]}")
    _check_k(k, real.shape[0], "real_feats")
    _check_k(k, fake.shape[0], "fake_feats")
    real_radii = _kth_nn_radii(real, k, chunk_size)
    fake_radii = _kth_nn_radii(fake, k, chunk_size)
    return _mutual_ball_membership(fake, real, fake_radii, real_radii, chunk_size)


# ----------------------------------------------------------------------------- modes, diversity

def class_coverage(pred_labels, num_classes: int, data_class_probs=None, threshold: float = 0.5,
                   smoothing: float = 1e-6) -> dict:
    """Mode coverage of generated samples, from a classifier's predicted labels.

    The stacked-MNIST protocol of Metz et al. (2017), "Unrolled Generative Adversarial
    Networks", and Srivastava et al. (2017), "VEEGAN": classify generated samples with a
    pretrained classifier, count the modes (classes) generated and the KL divergence between the
    generated and the data class distributions.

    Definitions used here:
      class_hist[c]  = number of samples predicted as class c; class_probs = class_hist / N.
      data_probs     = ``data_class_probs`` (normalised), uniform if None.
      covered[c]     = class_probs[c] >= threshold * data_probs[c] and data_probs[c] > 0, i.e. the
                       class gets at least ``threshold`` (default half) of its share under the data;
                       for uniform data that is >= 1 / (2 * num_classes) of the samples.
      modes_covered  = sum(covered), out of num_modes = number of classes with data_probs > 0.
      kl_gen_data    = KL(generated || data) = sum_c p_c log(p_c / q_c) in nats, with both
                       distributions smoothed as (p + smoothing) / (1 + num_classes * smoothing)
                       so it stays finite when the generator puts mass on a class the data lacks.
                       0 iff the class frequencies match; a generator that drops m of K
                       equally likely classes evenly scores log(K / (K - m)).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    labels = torch.as_tensor(np.asarray(pred_labels) if not isinstance(pred_labels, torch.Tensor)
                             else pred_labels).detach().cpu().reshape(-1)
    if labels.numel() == 0:
        raise ValueError("pred_labels is empty")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"pred_labels must be integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"pred_labels must be in [0, {num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    hist = torch.bincount(labels.long(), minlength=num_classes).numpy()
    return coverage_from_hist(hist, data_class_probs, threshold, smoothing)


def coverage_from_hist(class_hist, data_class_probs=None, threshold: float = 0.5,
                       smoothing: float = 1e-6) -> dict:
    """``class_coverage`` from a histogram of generated-class counts (length num_classes)."""
    hist = np.asarray(class_hist, np.float64).reshape(-1)
    num_classes = hist.shape[0]
    if num_classes == 0 or (hist < 0).any() or not np.isfinite(hist).all() or hist.sum() <= 0:
        raise ValueError(f"class_hist must be non-negative counts with a positive sum, "
                         f"got {hist.tolist()}")
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"threshold={threshold!r} must be in (0, 1]")
    if not (isinstance(smoothing, (int, float)) and smoothing >= 0):
        raise ValueError(f"smoothing={smoothing!r} must be >= 0")
    p = hist / hist.sum()
    if data_class_probs is None:
        q = np.full(num_classes, 1.0 / num_classes)
    else:
        q = np.asarray(data_class_probs, np.float64).reshape(-1)
        if q.shape != (num_classes,) or (q < 0).any() or not np.isfinite(q).all() or q.sum() <= 0:
            raise ValueError(f"data_class_probs must be {num_classes} non-negative numbers with a "
                             f"positive sum, got {np.asarray(data_class_probs).tolist()}")
        q = q / q.sum()
    covered = (q > 0) & (p >= threshold * q)
    ps = (p + smoothing) / (1 + num_classes * smoothing)
    qs = (q + smoothing) / (1 + num_classes * smoothing)
    nz = ps > 0
    with np.errstate(divide="ignore"):
        kl = float(np.sum(ps[nz] * np.log(ps[nz] / qs[nz])))
    return {
        "modes_covered": int(covered.sum()),
        "num_modes": int((q > 0).sum()),
        "num_classes": num_classes,
        "covered": covered.tolist(),
        "class_hist": [int(round(h)) for h in hist],
        "class_probs": p.tolist(),
        "data_probs": q.tolist(),
        "kl_gen_data": kl,
        "threshold": float(threshold),
    }


def mean_pairwise_distance(feats, chunk_size: int = 1024) -> float:
    """Mean Euclidean distance over all pairs i != j of (N, D) features (or flattened images).

    A within-batch diversity check: a collapsed generator gives a value far below the same
    statistic on real images. (Odena, Olah & Shlens 2017, "Conditional Image Synthesis with
    Auxiliary Classifier GANs", compare mean pairwise MS-SSIM of samples and of real
    images for the same purpose; this is the Euclidean analogue, usable in any feature space.)
    """
    _check_chunk(chunk_size)
    x = _as_features(feats, "feats")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 samples for pairwise distances, got {n}")
    total = 0.0
    for start in range(0, n, chunk_size):
        d = torch.cdist(x[start:start + chunk_size], x)  # (chunk, N)
        idx = torch.arange(d.shape[0])
        d[idx, start + idx] = 0.0  # exact zero on the diagonal (cdist's matmul path rounds)
        total += float(d.sum())
    return total / (n * (n - 1))


def nearest_neighbours(query, reference, k: int = 1,
                       chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row, its k nearest reference rows -> (indices (N, k) int64, distances
    (N, k) float64), nearest first; images are flattened, so this is pixel space for images and
    feature space for features.

    The memorisation check of Theis, van den Oord & Bethge (2016), "A Note on the Evaluation of
    Generative Models": show each generated sample next to its nearest training
    images. They stress its limits: Euclidean pixel distance is a poor perceptual distance, and
    passing the check does not rule out memorisation of small changes.
    """
    _check_chunk(chunk_size)
    q, ref = _as_features(query, "query"), _as_features(reference, "reference")
    if q.shape[1] != ref.shape[1]:
        raise ValueError(f"query has {q.shape[1]} dims per sample, reference {ref.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= ref.shape[0]:
        raise ValueError(f"k={k!r} must be an integer in [1, {ref.shape[0]}] (reference size)")
    idx = torch.empty(q.shape[0], k, dtype=torch.int64)
    dist = torch.empty(q.shape[0], k, dtype=torch.float64)
    for start in range(0, q.shape[0], chunk_size):
        d = torch.cdist(q[start:start + chunk_size], ref)  # (chunk, M)
        top = d.topk(k, dim=1, largest=False)  # sorted, nearest first
        idx[start:start + chunk_size] = top.indices
        dist[start:start + chunk_size] = top.values
    return idx, dist


# ----------------------------------------------------------------------------- classifier space

@torch.no_grad()
def apply_batched(fn: Callable, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``fn`` on ``images`` in batches of ``batch_size``, the outputs as one (N, -1) float64 CPU tensor."""
    outs = [fn(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    return torch.cat([torch.as_tensor(o).detach().to("cpu", torch.float64).reshape(o.shape[0], -1)
                      for o in outs])


def classifier_feature_metrics(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    real_images: torch.Tensor,
    fake_images: torch.Tensor,
    data_class_probs: Sequence[float] | None = None,
    k: int = 3,
    batch_size: int = 256,
    coverage_threshold: float = 0.5,
    real_features: torch.Tensor | None = None,
    head_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """FID, improved precision/recall, class coverage/KL and pairwise distances in the feature
    space of a dllab classifier -- the offline stand-in for Inception-based metrics.

    feature_fn(images) -> (B, D) features (e.g. a trained dllab ResNet's penultimate layer,
        ``model.features``); logits_fn(images) -> (B, num_classes) (the same model's forward), or
        None to skip the class metrics. Both are called under ``torch.no_grad()`` on batches of
        ``batch_size`` images exactly as given, so they must do any rescaling themselves (GAN
        images are in [-1, 1]; a classifier usually wants the "standard" scale) and put the
        model in eval mode.
    data_class_probs: the reference class distribution for coverage/KL; None uses the
        classifier's predicted class frequencies on ``real_images`` (so its biases cancel).
    real_features: ``apply_batched(feature_fn, real_images)`` computed before (a run scores its
        samples against the same real images every epoch: they need their features once).
    head_fn(features) -> logits: the classifier's last layer; given, the logits of the fake
        images come from their features instead of a second pass of the images.

    Returns a dict whose keys all start with ``clf_`` (clf_fid, clf_precision, clf_recall,
    clf_modes_covered, clf_num_modes, clf_class_hist, clf_class_probs, clf_data_probs,
    clf_kl_gen_data, clf_pairwise_fake, clf_pairwise_real, clf_num_real, clf_num_fake) plus
    ``"feature_space": "dllab-classifier (NOT Inception)"``. Sources: ``fid_from_features``
    (Heusel et al. 2017), ``precision_recall`` (Kynkäänniemi et al. 2019), ``class_coverage``
    (Metz et al. 2017; Srivastava et al. 2017), ``mean_pairwise_distance``. These numbers depend
    on the classifier: compare runs only under the same one, never with published FIDs.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    for name, x in (("real_images", real_images), ("fake_images", fake_images)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a (N, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
    if real_images.shape[1:] != fake_images.shape[1:]:
        raise ValueError(f"real images {tuple(real_images.shape[1:])} and fake images "
                         f"{tuple(fake_images.shape[1:])} differ in shape")
    real_f = apply_batched(feature_fn, real_images, batch_size) if real_features is None else real_features
    fake_f = apply_batched(feature_fn, fake_images, batch_size)
    precision, recall = precision_recall(real_f, fake_f, k=k)
    out = {
        "feature_space": FEATURE_SPACE_CLASSIFIER,
        "clf_fid": fid_from_features(real_f, fake_f),
        "clf_precision": precision,
        "clf_recall": recall,
        "clf_pairwise_fake": mean_pairwise_distance(fake_f),
        "clf_pairwise_real": mean_pairwise_distance(real_f),
        "clf_num_real": int(real_images.shape[0]),
        "clf_num_fake": int(fake_images.shape[0]),
        "clf_feature_dim": int(real_f.shape[1]),
    }
    if logits_fn is not None:
        fake_logits = (apply_batched(logits_fn, fake_images, batch_size) if head_fn is None
                       else apply_batched(head_fn, fake_f, batch_size))
        num_classes = fake_logits.shape[1]
        if data_class_probs is None:
            real_pred = apply_batched(logits_fn, real_images, batch_size).argmax(1)
            data_class_probs = torch.bincount(real_pred, minlength=num_classes).double().numpy()
        cov = class_coverage(fake_logits.argmax(1), num_classes, data_class_probs,
                             threshold=coverage_threshold)
        for key in ("modes_covered", "num_modes", "num_classes", "class_hist", "class_probs",
                    "data_probs", "kl_gen_data"):
            out[f"clf_{key}"] = cov[key]
    return out


# ----------------------------------------------------------------------------- Inception

class InceptionWeightsMissing(FileNotFoundError):
    """The Inception-v3 weights for FID/IS are not on this machine (dllab never downloads them)."""


def find_inception_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """Locate the Inception weights: ``weights_path`` if given, else $DLLAB_INCEPTION_WEIGHTS,
    else either release name in torch hub's cache (``torch.hub.get_dir()/checkpoints``).
    Raises ``InceptionWeightsMissing`` with instructions when none exists."""
    if weights_path is not None:
        candidates = [Path(weights_path)]
    elif os.environ.get(INCEPTION_WEIGHTS_ENV):
        candidates = [Path(os.environ[INCEPTION_WEIGHTS_ENV])]
    else:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        candidates = [hub / name for name in INCEPTION_WEIGHTS_NAMES]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise InceptionWeightsMissing(
        f"Inception-v3 weights for FID/IS not found (looked for: {tried}). Download "
        f"'{INCEPTION_WEIGHTS_NAMES[0]}' (about 92 MB, torch-fidelity's GitHub release: "
        f"{INCEPTION_WEIGHTS_URL}; pytorch-fid publishes it as '{INCEPTION_WEIGHTS_NAMES[1]}') on "
        f"a machine with internet, then pass weights_path=..., set ${INCEPTION_WEIGHTS_ENV}, or "
        f"put it in {Path(torch.hub.get_dir()) / 'checkpoints'}. dllab does not download it. "
        f"Offline alternative: classifier_feature_metrics (FID/precision/recall in a trained "
        f"dllab classifier's feature space, not comparable with published FIDs).")


def _to_uint8_rgb(images: torch.Tensor, scale: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
        raise ValueError(f"images must be a (N, 1 or 3, H, W) tensor, got {got}")
    x = images.detach().float()
    if scale == "tanh":
        x = (x + 1) * 127.5
    elif scale == "unit":
        x = x * 255.0
    elif scale != "uint8":
        raise ValueError(f"unknown scale {scale!r}; expected 'tanh', 'unit' or 'uint8'")
    x = x.round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def inception_metrics(fake_images: torch.Tensor, real_images: torch.Tensor,
                      weights_path: str | os.PathLike | None = None, scale: str = "tanh",
                      batch_size: int = 50, splits: int = 10,
                      device: torch.device | str | None = None) -> dict:
    """FID (Heusel et al. 2017) and Inception Score (Salimans et al. 2016, "Improved Techniques
    for Training GANs") with the standard TF-ported Inception-v3 network, through
    torchmetrics' ``FrechetInceptionDistance(feature=2048)`` and ``InceptionScore`` (which use
    torch-fidelity's feature extractor, so the numbers match torch-fidelity's and the original
    TensorFlow code's).

    Images are (N, 1 or 3, H, W) in ``scale`` ("tanh": [-1, 1], "unit": [0, 1], "uint8");
    grey images are repeated to 3 channels and everything is resized to 299x299 by the metric.
    Published FIDs use 50k generated images against the training set; small N biases FID upward.
    IS uses ``splits`` splits of the fake images. Returns {"inception_fid", "inception_is_mean",
    "inception_is_std", "inception_num_real", "inception_num_fake", "feature_space"}.

    The weights file is unpickled by torch-fidelity (``torch.load(weights_only=False)``): use only
    the file from its release. Raises ``InceptionWeightsMissing`` (see ``find_inception_weights``)
    when the weights are not on disk, before touching the images.
    """
    path = find_inception_weights(weights_path)
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception comes from it)
        from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
        from torchmetrics.image.inception import InceptionScore
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"inception_metrics needs torchmetrics and torch-fidelity "
                          f"(pip install 'dllab[metrics]'): {e}") from e
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    fake, real = _to_uint8_rgb(fake_images, scale), _to_uint8_rgb(real_images, scale)
    if fake.shape[0] < max(2, splits) or real.shape[0] < 2:
        raise ValueError(f"need at least max(2, splits={splits}) fake and 2 real images, got "
                         f"{fake.shape[0]} fake and {real.shape[0]} real")
    device = torch.device(device) if device is not None else torch.device("cpu")
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path),
                                   normalize=False).to(device)
    logits_net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                                    feature_extractor_weights_path=str(path))
    with warnings.catch_warnings():  # "will save all extracted features in buffer": we know
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        iscore = InceptionScore(feature=logits_net, splits=splits).to(device)
    for i in range(0, real.shape[0], batch_size):
        fid.update(real[i:i + batch_size].to(device), real=True)
    for i in range(0, fake.shape[0], batch_size):
        batch = fake[i:i + batch_size].to(device)
        fid.update(batch, real=False)
        iscore.update(batch)
    is_mean, is_std = iscore.compute()
    return {
        "feature_space": FEATURE_SPACE_INCEPTION,
        "inception_fid": float(fid.compute()),
        "inception_is_mean": float(is_mean),
        "inception_is_std": float(is_std),
        "inception_num_real": int(real.shape[0]),
        "inception_num_fake": int(fake.shape[0]),
    }


__all__ = [
    "FEATURE_SPACE_CLASSIFIER", "InceptionWeightsMissing", "class_coverage", "coverage_from_hist",
    "classifier_feature_metrics", "feature_statistics", "fid_from_features",
    "find_inception_weights", "frechet_distance", "inception_metrics", "mean_pairwise_distance",
    "nearest_neighbours", "precision_recall",
]
