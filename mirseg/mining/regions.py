"""Per-region statistics in one vectorised pass (``bincount`` over the label map, never a loop over labels),
and the pixel budget that turns ranked regions into what a labeller is shown (:func:`take_budget`).

The original looped over superpixel labels with a full-image comparison each (O(K*H*W), and it
skipped the last label, algorithms.md §1.5); one ``bincount`` is O(H*W) whatever K is.
NumPy's ``bincount`` is used rather than ``torch.bincount``: about 10x faster on CPU for weighted
counts (1.3 ms against 16 ms on 512x1024).
"""

from __future__ import annotations

import numpy as np
import torch

from mirseg.errors import ConfigError


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


def check_budget(budget: float) -> float:
    """``region_budget`` as a float in (0, 1], or a ConfigError naming the key."""
    if not 0 < budget <= 1:
        raise ConfigError(f"region_budget is the share of an image's pixels a mask covers: in (0, 1], got {budget} "
                          f"(e.g. region_budget=0.022 for 2.2 %)")
    return float(budget)


def take_budget(labels: np.ndarray, order: np.ndarray | list[int], budget: float) -> np.ndarray:
    """The regions of ``labels`` (H, W) taken best first until they cover ``budget`` of the pixels.

    ``order``: region labels, best first (labels not listed are never taken). The cut is the
    prefix whose pixel count is closest to ``budget * H * W`` (the shortest prefix that reaches
    it, or one region less when that is closer; at least one region), so the share is off by at
    most half a region. Returns (H, W) int32: 0 outside, i + 1 inside the i-th region taken.
    """
    budget = check_budget(budget)
    labels = _numpy(labels)
    k = int(labels.max()) + 1 if labels.size else 0
    counts = np.bincount(labels.reshape(-1).astype(np.int64, copy=False), minlength=k)  # (K,)
    order = np.asarray(order, dtype=np.int64).reshape(-1)
    if order.size and (order.min() < 0 or order.max() >= k):
        raise ValueError(f"region order must list labels in 0..{k - 1}, got {order.min()}..{order.max()}")
    order = order[counts[order] > 0]  # an empty region adds nothing and would leave a gap in the ids
    out = np.zeros(labels.shape, np.int32)
    if order.size == 0:
        return out
    cum = np.cumsum(counts[order])  # (n,) pixels covered by the first i + 1 regions
    target = budget * labels.size
    n = min(int(np.searchsorted(cum, target, side="left")) + 1, order.size)  # shortest prefix reaching target
    if n > 1 and target - cum[n - 2] < cum[n - 1] - target:  # one region less is strictly closer
        n -= 1
    lut = np.zeros(k, np.int32)
    lut[order[:n]] = np.arange(1, n + 1, dtype=np.int32)
    return lut[labels]


__all__ = ["check_budget", "region_means", "region_modes", "take_budget"]
