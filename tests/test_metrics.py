"""The confusion matrix and its metrics, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from mirseg.metrics import ConfusionMatrix


def test_hand_computed_metrics():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    # rows = truth: class 0: [1, 1, 0]; class 1: [0, 3, 0]; class 2: [1, 0, 1]; the 255 pixel is ignored
    assert cm.mat.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
    m = cm.compute()
    assert m["IoU"] == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert m["Acc"] == pytest.approx([1 / 2, 1.0, 1 / 2])
    assert m["mIoU"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert m["aAcc"] == pytest.approx(5 / 7)


def test_absent_class_is_left_out_of_the_mean():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]))
    m = cm.compute()
    assert math.isnan(m["IoU"][2])
    assert m["mIoU"] == 1.0


def test_accumulates_across_batches_and_rejects_bad_labels():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    cm.update(torch.tensor([1]), torch.tensor([1]))
    assert cm.mat.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="label value 7"):
        cm.update(torch.tensor([0]), torch.tensor([7]))
