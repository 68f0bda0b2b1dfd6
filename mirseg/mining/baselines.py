"""Baselines: an image score reduced from a per-pixel uncertainty map, and seeded random scores.

The original image had no baseline at all (algorithms.md §3); active learning results only mean
something next to random and plain uncertainty sampling, so ``random``, ``entropy``, ``margin``
and ``least_confidence`` are mining algorithms here. Their image score reduces the pixel map
(:mod:`mirseg.mining.uncertainty`) with ``reduction``:

- ``mean``: the average (the classic image-level uncertainty sampling);
- ``max``: the single most uncertain pixel;
- ``sum``: the total, which favours large images (use with a fixed working size);
- ``topk``: the mean of the ``topk_percent`` % most uncertain pixels, between mean and max.

Random scores come from a hash of (seed, candidate path), not from a generator consumed in list
order, so a candidate gets the same score whatever the order or the size of the pool.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch

from mirseg.errors import ConfigError
from mirseg.mining._names import lookup

REDUCTIONS = ("mean", "max", "sum", "topk")


def check_reduction(reduction: str) -> str:
    """The lower-case reduction name, or a ConfigError with a "did you mean" hint."""
    return lookup("reduction", reduction, REDUCTIONS)


def _top_count(n: int, percent: float) -> int:
    if not 0 < percent <= 100:
        raise ConfigError(f"topk_percent must be in (0, 100], got {percent}")
    return max(1, math.ceil(n * percent / 100))


def reduce(pixel_scores: torch.Tensor, reduction: str = "mean", topk_percent: float = 10.0) -> float:
    """One image score from a per-pixel map (H, W) (any shape: all elements count)."""
    key = check_reduction(reduction)
    flat = pixel_scores.detach().reshape(-1).double()
    if flat.numel() == 0:
        raise ValueError("cannot reduce an empty score map")
    if key == "mean":
        return float(flat.mean())
    if key == "max":
        return float(flat.max())
    if key == "sum":
        return float(flat.sum())
    return float(torch.topk(flat, _top_count(flat.numel(), topk_percent), sorted=False).values.mean())


def hashed_uniform(keys: Sequence[str], seed: int = 0) -> np.ndarray:
    """``(N,)`` float64 in (0, 1), one per key, from BLAKE2b of ``"<seed>:<key>"``: seeded, order-independent."""
    out = np.empty(len(keys), np.float64)
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
        out[i] = (int.from_bytes(digest[:7], "big") + 0.5) / 2.0**56  # 56 bits fit a float64 exactly
    return out


def random_scores(keys: Sequence[str], seed: int = 0) -> np.ndarray:
    """The ``random`` baseline: a uniform score in (0, 1) per candidate path."""
    return hashed_uniform(keys, seed)


__all__ = ["REDUCTIONS", "check_reduction", "hashed_uniform", "random_scores", "reduce"]
