"""Classification metrics: accuracy, per-class accuracy, confusion matrix, calibration, mistakes.

Pure functions on tensors (any device; results come back on the CPU), plus
:func:`evaluate_classifier`, which runs a model over a test loader and returns them all in one dict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F


def _check_targets(targets: torch.Tensor, n: int, num_classes: int | None = None) -> torch.Tensor:
    """Validate an integer target vector of length ``n`` (and range, given ``num_classes``)."""
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must have shape ({n},), got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if num_classes is not None and n and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"targets must lie in [0, {num_classes}), got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    return targets


def _predictions(logits_or_preds: torch.Tensor) -> torch.Tensor:
    """Predicted classes: argmax over dim 1 of (N, C) scores, or an (N,) vector of indices as is."""
    if logits_or_preds.dim() == 2:
        return logits_or_preds.argmax(dim=1)
    if logits_or_preds.dim() == 1 and not logits_or_preds.dtype.is_floating_point:
        return logits_or_preds
    raise ValueError("expected (N, C) logits/probabilities or (N,) integer predictions, got "
                     f"shape {tuple(logits_or_preds.shape)} dtype {logits_or_preds.dtype}")


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]: the fraction of rows of ``logits`` (N, C) whose argmax equals the
    target; ``logits`` may also be (N,) integer predictions. NaN for an empty batch."""
    preds = _predictions(logits)
    _check_targets(targets, preds.shape[0])
    if preds.numel() == 0:
        return float("nan")
    return (preds == targets.to(preds.device)).double().mean().item()


def per_class_accuracy(logits_or_preds: torch.Tensor, targets: torch.Tensor,
                       num_classes: int) -> torch.Tensor:
    """Accuracy of each true class (recall), float64 (num_classes,); NaN for a class with no
    examples. Equals the diagonal of the row-normalised confusion matrix."""
    cm = confusion_matrix(_predictions(logits_or_preds), targets, num_classes)
    totals = cm.sum(dim=1)
    return cm.diag().double() / totals.double()  # 0 / 0 = NaN for absent classes


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 (num_classes, num_classes) counts: entry [i, j] is the number of examples of true
    class i predicted as class j (rows true, columns predicted, as in
    ``sklearn.metrics.confusion_matrix``). ``preds`` may also be (N, C) scores (argmax is taken)."""
    _check_num_classes(num_classes)
    preds = _predictions(preds).cpu().long()
    targets = _check_targets(targets.cpu(), preds.shape[0], num_classes).long()
    if preds.numel() and (preds.min() < 0 or preds.max() >= num_classes):
        raise ValueError(f"predictions must lie in [0, {num_classes}), got values in "
                         f"[{int(preds.min())}, {int(preds.max())}]")
    flat = torch.bincount(targets * num_classes + preds, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes)


def _check_probs(probs: torch.Tensor) -> torch.Tensor:
    if probs.dim() != 2 or not probs.dtype.is_floating_point:
        raise ValueError(f"probs must be a float (N, C) tensor, got shape {tuple(probs.shape)} "
                         f"dtype {probs.dtype}")
    return probs


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor,
                               n_bins: int = 15) -> tuple[float, dict]:
    """Expected calibration error and the reliability-diagram bins.

    Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017
    (https://arxiv.org/abs/1706.04599), eq. (3): the confidence of an example is its largest
    predicted probability; examples go into ``n_bins`` equal-width bins
    B_m = ((m - 1) / M, m / M], and

        ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|

    with acc(B_m) the fraction of correct predictions in the bin and conf(B_m) the mean confidence.

    ``probs`` is (N, C) probabilities (softmax outputs), ``targets`` (N,) class indices. Returns
    ``(ece, bins)``; ``bins`` holds plain Python values for
    :func:`dllab.figures.classifier.plot_reliability` (``evaluate_classifier`` returns it as
    "ece_bins"): ``{"ece": float, "n_bins": M, "edges": [M + 1 floats], "accuracy": [M floats],
    "confidence": [M floats], "count": [M ints]}``. An empty bin has count 0 and accuracy =
    confidence = NaN (Python's json writes these as NaN).
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    probs = _check_probs(probs).detach().cpu().double()
    targets = _check_targets(targets.cpu(), probs.shape[0], probs.shape[1])
    if probs.shape[0] == 0:
        raise ValueError("expected_calibration_error needs at least one example, got N=0")
    conf, preds = probs.max(dim=1)
    correct = (preds == targets).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bucketize(right=False) gives i with edges[i] < conf <= edges[i + 1], i.e. the (lo, hi] bins.
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    count = torch.bincount(idx, minlength=n_bins).double()
    sum_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    sum_acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    ece = (sum_acc - sum_conf).abs().sum().item() / probs.shape[0]
    bin_acc = sum_acc / count  # NaN where count == 0
    bin_conf = sum_conf / count
    bins = {
        "ece": ece,
        "n_bins": n_bins,
        "edges": edges.tolist(),
        "accuracy": bin_acc.tolist(),
        "confidence": bin_conf.tolist(),
        "count": [int(c) for c in count.tolist()],
    }
    return ece, bins


def most_confident_mistakes(probs: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, at most ``k``) of the misclassified examples, most confident first.

    The confidence of a mistake is the probability the model gave its (wrong) predicted class,
    ``probs.max(dim=1)``. Fewer than ``k`` indices come back when there are fewer mistakes.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    probs = _check_probs(probs).detach().cpu()
    targets = _check_targets(targets.cpu(), probs.shape[0], probs.shape[1])
    conf, preds = probs.max(dim=1)
    wrong = (preds != targets).nonzero(as_tuple=True)[0]
    order = torch.argsort(conf[wrong], descending=True, stable=True)
    return wrong[order[:k]]


def evaluate_classifier(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    num_classes: int,
    tta_flip: bool = False,
    autocast_dtype: torch.dtype | None = None,
    n_bins: int = 15,
) -> dict:
    """Evaluate a classifier on every batch of ``loader`` (an iterable of (x, y) batches).

    Runs ``model`` in eval mode under ``torch.inference_mode`` (its train/eval mode is restored
    afterwards), optionally under ``torch.autocast(device.type, dtype=autocast_dtype)``; logits
    are gathered as float32 on the CPU. With ``tta_flip=True`` the prediction is the mean of the
    softmax of the image and of its horizontal flip (``x.flip(-1)``), and the loss is the negative
    log of that averaged probability.

    Returns::

        {"test_loss": mean cross-entropy per example (nats), "test_acc": top-1 accuracy in [0, 1],
         "per_class_acc": [num_classes floats, NaN for a class absent from the test set],
         "confusion": [[int]] rows true / columns predicted, "ece": 15-bin ECE (Guo et al. 2017),
         "ece_bins": the reliability-diagram bins of expected_calibration_error,
         "n": number of examples,
         "probs": float32 (N, num_classes) CPU tensor, "targets": int64 (N,) CPU tensor}

    Indices into ``probs``/``targets`` follow the loader's order, so use an unshuffled loader to
    map :func:`most_confident_mistakes` back to images.
    """
    _check_num_classes(num_classes)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    all_probs, all_targets, losses = [], [], []
    try:
        with torch.inference_mode(), autocast:
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                logits = model(x).float()
                if logits.dim() != 2 or logits.shape[1] != num_classes:
                    raise ValueError(f"model output has shape {tuple(logits.shape)}; expected "
                                     f"(N, {num_classes})")
                if tta_flip:
                    probs = (logits.softmax(1) + model(x.flip(-1)).float().softmax(1)) / 2
                    loss = F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum")
                else:
                    probs = logits.softmax(1)
                    loss = F.cross_entropy(logits, y, reduction="sum")
                losses.append(loss.double().cpu())
                all_probs.append(probs.cpu())
                all_targets.append(y.cpu())
    finally:
        model.train(was_training)
    if not all_targets:
        raise ValueError("the loader yielded no batches")
    probs = torch.cat(all_probs)
    targets = torch.cat(all_targets).long()
    n = targets.shape[0]
    cm = confusion_matrix(probs.argmax(1), targets, num_classes)
    ece, bins = expected_calibration_error(probs, targets, n_bins=n_bins)
    return {
        "test_loss": torch.stack(losses).sum().item() / n,
        "test_acc": cm.diag().sum().item() / n,
        "per_class_acc": per_class_accuracy(probs, targets, num_classes).tolist(),
        "confusion": cm.tolist(),
        "ece": ece,
        "ece_bins": bins,
        "n": n,
        "probs": probs,
        "targets": targets,
    }
