"""Classification metrics (against hand-computed cases, sklearn and torchmetrics) and the
classifier figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dllab.figures.classifier import (
    plot_confident_mistakes,
    plot_confusion_matrix,
    plot_lr_schedule,
    plot_reliability,
    plot_training_curves,
)
from dllab.metrics.classification import (
    accuracy,
    confusion_matrix,
    evaluate_classifier,
    expected_calibration_error,
    most_confident_mistakes,
    per_class_accuracy,
)

# ----------------------------------------------------------------------------- accuracy


def test_accuracy_by_hand():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 1, 1, 1])
    assert accuracy(logits, targets) == 0.75
    assert accuracy(torch.tensor([0, 1, 0, 1]), targets) == 0.75


def test_per_class_accuracy_by_hand():
    preds = torch.tensor([0, 1, 0, 1, 2])
    targets = torch.tensor([0, 1, 1, 1, 1])
    got = per_class_accuracy(preds, targets, num_classes=4)
    assert got[0] == 1.0 and got[1] == 0.5 and math.isnan(got[2]) and math.isnan(got[3])
    # Class 2 is predicted once but never true: its recall is undefined, not 0.


def test_confusion_matrix_matches_sklearn():
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 7, (500,), generator=g)
    preds = torch.where(torch.rand(500, generator=g) < 0.6, targets,
                        torch.randint(0, 7, (500,), generator=g))
    got = confusion_matrix(preds, targets, 7)
    expected = sk_confusion_matrix(targets.numpy(), preds.numpy(), labels=list(range(7)))
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), expected)
    # Rows are true classes: row sums are the class counts.
    assert got.sum(1).tolist() == torch.bincount(targets, minlength=7).tolist()
    # Per-class accuracy is the diagonal over the row sums.
    torch.testing.assert_close(per_class_accuracy(preds, targets, 7),
                               torch.tensor(expected.diagonal() / expected.sum(1)))


def test_confusion_matrix_rows_true_columns_predicted():
    cm = confusion_matrix(torch.tensor([2, 2, 0]), torch.tensor([0, 0, 1]), 3)
    assert cm.tolist() == [[0, 0, 2], [1, 0, 0], [0, 0, 0]]


@pytest.mark.parametrize("call,fragment", [
    (lambda: confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 3), r"\[0, 5\]"),
    (lambda: confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, -1]), 3), r"\[-1, 0\]"),
    (lambda: confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 0), "num_classes"),
    (lambda: accuracy(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long)), r"\(3,\)"),
    (lambda: accuracy(torch.zeros(3, 2), torch.zeros(3)), "float32"),
    (lambda: expected_calibration_error(torch.rand(4, 3), torch.zeros(4, dtype=torch.long), 0),
     "n_bins"),
    (lambda: most_confident_mistakes(torch.rand(4, 3), torch.zeros(4, dtype=torch.long), -1),
     "-1"),
])
def test_bad_inputs_raise(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


# ----------------------------------------------------------------------------- calibration


def test_ece_of_perfectly_calibrated_set_is_zero():
    # 10 examples at confidence 0.8, 8 of them right; 5 at confidence 0.6, 3 of them right.
    probs = torch.tensor([[0.8, 0.2]] * 10 + [[0.4, 0.6]] * 5, dtype=torch.float64)
    targets = torch.tensor([0] * 8 + [1] * 2 + [1] * 3 + [0] * 2)
    ece, bins = expected_calibration_error(probs, targets)
    assert ece == pytest.approx(0.0, abs=1e-12)
    assert sum(bins["count"]) == 15 and len(bins["count"]) == 15
    # Confidence 1 and always right is also calibrated.
    assert expected_calibration_error(torch.eye(3), torch.arange(3))[0] == 0.0


def test_ece_two_bins_by_hand():
    probs = torch.tensor([
        [0.40, 0.30, 0.30],  # conf 0.40, right  -> bin (0, 0.5]
        [0.45, 0.35, 0.20],  # conf 0.45, wrong  -> bin (0, 0.5]
        [0.90, 0.05, 0.05],  # conf 0.90, right  -> bin (0.5, 1]
        [0.10, 0.70, 0.20],  # conf 0.70, wrong  -> bin (0.5, 1]
        [0.20, 0.20, 0.60],  # conf 0.60, right  -> bin (0.5, 1]
    ], dtype=torch.float64)
    targets = torch.tensor([0, 1, 0, 2, 2])
    ece, bins = expected_calibration_error(probs, targets, n_bins=2)
    # bin 1: acc 1/2, conf 0.425, weight 2/5; bin 2: acc 2/3, conf 2.2/3, weight 3/5
    expected = 2 / 5 * abs(0.5 - 0.425) + 3 / 5 * abs(2 / 3 - 2.2 / 3)
    assert expected == pytest.approx(0.07)
    assert ece == pytest.approx(expected, abs=1e-12)
    assert bins["ece"] == ece and bins["n_bins"] == 2
    assert bins["edges"] == [0.0, 0.5, 1.0]
    assert bins["count"] == [2, 3]
    assert bins["accuracy"] == pytest.approx([0.5, 2 / 3])
    assert bins["confidence"] == pytest.approx([0.425, 2.2 / 3])


def test_ece_bins_are_closed_on_the_right():
    # Guo et al.'s bins are ((m-1)/M, m/M]: confidence 0.5 belongs to the first of two bins.
    probs = torch.tensor([[0.5, 0.5], [0.75, 0.25]])
    _, bins = expected_calibration_error(probs, torch.tensor([0, 1]), n_bins=2)
    assert bins["count"] == [1, 1]
    _, bins = expected_calibration_error(probs, torch.tensor([0, 1]), n_bins=4)
    assert bins["count"] == [0, 1, 1, 0]
    assert math.isnan(bins["accuracy"][0]) and math.isnan(bins["confidence"][3])


def test_ece_matches_torchmetrics():
    from torchmetrics.functional.classification import multiclass_calibration_error

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 5, generator=g) * 2
    targets = torch.randint(0, 5, (400,), generator=g)
    probs = logits.softmax(1)
    ece, _ = expected_calibration_error(probs, targets, n_bins=15)
    expected = multiclass_calibration_error(probs, targets, num_classes=5, n_bins=15, norm="l1")
    assert ece == pytest.approx(expected.item(), abs=1e-6)
    assert ece > 0.05  # random logits are badly calibrated, so this is not 0 == 0


def test_most_confident_mistakes():
    probs = torch.tensor([
        [0.9, 0.1],   # 0: right
        [0.6, 0.4],   # 1: wrong, conf 0.6
        [0.05, 0.95],  # 2: wrong, conf 0.95
        [0.2, 0.8],   # 3: right
        [0.3, 0.7],   # 4: wrong, conf 0.7
    ])
    targets = torch.tensor([0, 1, 0, 1, 0])
    assert most_confident_mistakes(probs, targets, 2).tolist() == [2, 4]
    assert most_confident_mistakes(probs, targets, 10).tolist() == [2, 4, 1]
    assert most_confident_mistakes(probs, targets, 0).tolist() == []


# ----------------------------------------------------------------------------- evaluate


def _toy_problem(n=50, num_classes=4, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, num_classes))
    loader = [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]
    return model, loader, x, y


def test_evaluate_classifier_matches_direct_computation():
    model, loader, x, y = _toy_problem()
    model.train()
    res = evaluate_classifier(model, loader, "cpu", num_classes=4)
    assert model.training  # mode restored
    model.eval()  # no dropout: the same function evaluate_classifier used
    with torch.no_grad():
        logits = model(x)
    assert res["n"] == 50
    assert res["test_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert res["test_acc"] == pytest.approx(accuracy(logits, y))
    assert res["confusion"] == confusion_matrix(logits, y, 4).tolist()
    ece, bins = expected_calibration_error(logits.softmax(1), y)
    assert res["ece"] == pytest.approx(ece) and res["ece_bins"]["count"] == bins["count"]
    np.testing.assert_allclose(res["per_class_acc"], per_class_accuracy(logits, y, 4).numpy())
    torch.testing.assert_close(res["probs"], logits.softmax(1))
    assert torch.equal(res["targets"], y)
    assert isinstance(res["test_loss"], float) and isinstance(res["per_class_acc"], list)
    assert isinstance(res["confusion"][0][0], int)
    # The returned tensors are ordinary tensors (not inference tensors): usable in autograd code.
    assert not res["probs"].is_inference()
    res["probs"].mul_(1.0)


def test_evaluate_classifier_tta_flip():
    model, loader, x, y = _toy_problem()
    model.eval()
    res = evaluate_classifier(model, loader, torch.device("cpu"), num_classes=4, tta_flip=True)
    with torch.no_grad():
        probs = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
    torch.testing.assert_close(res["probs"], probs)
    assert res["test_loss"] == pytest.approx(F.nll_loss(probs.log(), y).item(), rel=1e-6)
    # A flip-invariant model gives the same answer with and without TTA.
    sym = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 4))
    a = evaluate_classifier(sym, loader, "cpu", 4, tta_flip=True)
    b = evaluate_classifier(sym, loader, "cpu", 4, tta_flip=False)
    torch.testing.assert_close(a["probs"], b["probs"])
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-6)


def test_evaluate_classifier_bf16_autocast():
    model, loader, x, y = _toy_problem()
    ref = evaluate_classifier(model, loader, "cpu", 4)
    res = evaluate_classifier(model, loader, "cpu", 4, autocast_dtype=torch.bfloat16)
    assert res["probs"].dtype == torch.float32
    assert res["test_loss"] == pytest.approx(ref["test_loss"], rel=0.05)
    assert not torch.equal(res["probs"], ref["probs"])  # bf16 really was used


def test_evaluate_classifier_bad_inputs():
    model, loader, _, _ = _toy_problem()
    with pytest.raises(ValueError, match=r"\(16, 4\)"):
        evaluate_classifier(model, loader, "cpu", num_classes=5)
    with pytest.raises(ValueError, match="no batches"):
        evaluate_classifier(model, [], "cpu", num_classes=4)


# ----------------------------------------------------------------------------- figures


def _assert_png(path):
    assert path.exists() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] > 100 and im.size[1] > 100


def test_plot_confusion_matrix(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (300,), generator=g)
    p = torch.where(torch.rand(300, generator=g) < 0.7, y, torch.randint(0, 10, (300,), generator=g))
    cm = confusion_matrix(p, y, 10)
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
    _assert_png(plot_confusion_matrix(cm, classes, tmp_path / "cm.png"))
    _assert_png(plot_confusion_matrix(torch.zeros(30, 30, dtype=torch.long).tolist(),
                                      [str(i) for i in range(30)], tmp_path / "cm30.png"))
    with pytest.raises(ValueError, match="3 class names"):
        plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "bad.png")


def test_plot_reliability(tmp_path):
    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(500, 10, generator=g) * 3).softmax(1)
    y = torch.where(torch.rand(500, generator=g) < 0.6, probs.argmax(1),
                    torch.randint(0, 10, (500,), generator=g))
    _, bins = expected_calibration_error(probs, y)
    _assert_png(plot_reliability(bins, tmp_path / "rel.png"))
    with pytest.raises(ValueError, match="missing"):
        plot_reliability({"ece": 0.1}, tmp_path / "bad.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_plot_confident_mistakes(tmp_path, channels):
    g = torch.Generator().manual_seed(0)
    mean, std = [0.5] * channels, [0.25] * channels
    images = torch.randn(10, channels, 28, 28, generator=g)  # "standard" scale
    path = plot_confident_mistakes(images, [0] * 10, [1] * 10, torch.rand(10, generator=g),
                                   ["cat", "dog"], tmp_path / "mistakes.png", mean=mean, std=std,
                                   ncol=5)
    _assert_png(path)
    _assert_png(plot_confident_mistakes(images[:0], [], [], [], ["cat", "dog"],
                                        tmp_path / "none.png", mean=mean, std=std))
    _assert_png(plot_confident_mistakes((images * 40 + 128).clamp(0, 255), [0] * 10, [1] * 10,
                                        [0.9] * 10, ["cat", "dog"], tmp_path / "u8.png",
                                        scale="uint8"))
    with pytest.raises(ValueError, match="mean and std"):
        plot_confident_mistakes(images, [0] * 10, [1] * 10, [0.9] * 10, ["cat", "dog"],
                                tmp_path / "bad.png")


def _fake_records(epochs=4, steps_per_epoch=20, log_every=5, fractional=True):
    """Records as dllab.engine writes them: train epoch = epochs completed (fractional)."""
    records, step = [], 0
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            step += 1
            if step % log_every:
                continue
            loss = 2.3 * math.exp(-step / 30) + 0.1 * math.sin(step)
            records.append({"split": "train", "step": step,
                            "epoch": epoch + (i + 1) / steps_per_epoch if fractional else epoch + 1,
                            "loss": loss, "acc": 1 - loss / 2.5,
                            "lr": 0.1 * 0.5 * (1 + math.cos(math.pi * step / (epochs * steps_per_epoch)))})
        records.append({"split": "test", "epoch": epoch + 1, "step": step,
                        "loss": 2.3 * math.exp(-step / 35) + 0.1, "acc": 0.9 - 0.5 / (epoch + 1)})
    return records


def test_plot_training_curves_and_lr(tmp_path):
    records = _fake_records()
    _assert_png(plot_training_curves(records, tmp_path / "curves.png"))
    _assert_png(plot_training_curves(_fake_records(fractional=False), tmp_path / "whole.png"))
    _assert_png(plot_lr_schedule(records, tmp_path / "lr.png"))
    # Loss only (no accuracy), one record per epoch, and a re-logged (resumed) step.
    loss_only = [{k: v for k, v in r.items() if k != "acc"} for r in records[::5]]
    _assert_png(plot_training_curves(loss_only + loss_only[-1:], tmp_path / "loss.png"))
    with pytest.raises(ValueError, match="lr"):
        plot_lr_schedule([r for r in records if r["split"] == "test"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no train or test records"):
        plot_training_curves([{"split": "train", "step": 1, "epoch": 0}], tmp_path / "bad.png")
