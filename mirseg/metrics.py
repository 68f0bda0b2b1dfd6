"""Segmentation metrics from one confusion matrix: IoU, mIoU, mAcc, aAcc (mmseg's definitions)."""

from __future__ import annotations

import numpy as np
import torch

from mirseg.constants import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` matrix, rows = ground truth, columns = prediction.

    Pixels labelled ``IGNORE_INDEX`` are skipped. Metrics follow mmsegmentation: per-class
    IoU = TP / (TP + FP + FN) and Acc = TP / (TP + FN); mIoU and mAcc are nan-means, so a class
    with no ground-truth pixel and no prediction is left out; aAcc = sum TP / labelled pixels.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` integer tensors of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape")
        k = self.num_classes
        target = target.reshape(-1).to(torch.int64)
        pred = pred.reshape(-1).to(torch.int64)
        keep = target != IGNORE_INDEX
        target, pred = target[keep], pred[keep]
        if target.numel() and int(target.max()) >= k:
            raise ValueError(f"label value {int(target.max())} >= num_classes {k} (and not {IGNORE_INDEX})")
        idx = target * k + pred
        self.mat += torch.bincount(idx.cpu(), minlength=k * k).reshape(k, k)

    def merge(self, other: torch.Tensor) -> None:
        """Add another matrix (e.g. all-reduced across processes)."""
        self.mat += other.to(self.mat)

    def compute(self) -> dict[str, float | list[float]]:
        """``{"mIoU", "mAcc", "aAcc"}`` as floats in [0, 1] and ``"IoU"``, ``"Acc"`` per class (nan = absent)."""
        mat = self.mat.double()
        tp = mat.diag()
        gt = mat.sum(1)
        pred = mat.sum(0)
        union = gt + pred - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = (tp / union).numpy()
            acc = (tp / gt).numpy()
        total = float(gt.sum())
        return {
            "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "mAcc": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
            "aAcc": float(tp.sum() / total) if total else float("nan"),
            "IoU": [float(v) for v in iou],
            "Acc": [float(v) for v in acc],
        }
