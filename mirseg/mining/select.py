"""Turning image scores into a selection: hard top-N, or power sampling for batch diversity.

A hard top-N takes the N highest scores; when near-duplicate images score alike (consecutive video
frames, the same scene twice) they are all taken together. **Power sampling** draws N images
without replacement with probability proportional to ``score ** beta`` instead: beta = 0 is
random selection, larger beta approaches top-N (see Kirsch et al., "Stochastic Batch
Acquisition", 2023, for why this simple trick competes with costly diversity methods).

It is implemented with Efraimidis-Spirakis keys: candidate i gets ``log(u_i) / w_i`` with
``u_i`` uniform in (0, 1) and ``w_i = score_i ** beta``; sorting by key, largest first, is a
weighted sampling without replacement, so *every prefix* of that order is a valid sample of its
size (the first pick is i with probability exactly ``w_i / sum w``). The uniforms come from
:func:`mirseg.mining.baselines.hashed_uniform` of (seed, candidate key) when keys are given, so the
draw of a candidate does not depend on the order of the pool; otherwise from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from mirseg.errors import ConfigError
from mirseg.mining.baselines import hashed_uniform


def _scores(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s


def rank(scores: Sequence[float] | np.ndarray, keys: Sequence[str] | None = None) -> np.ndarray:
    """Indices ordered by score, highest first; ties by key (then by index), so the order is reproducible."""
    s = _scores(scores)
    tie = np.arange(s.size) if keys is None else np.argsort(np.argsort(np.asarray(keys, dtype=object), kind="stable"),
                                                          kind="stable")
    return np.lexsort((tie, -s))  # last key is primary


def power_order(scores: Sequence[float] | np.ndarray, beta: float = 1.0, seed: int = 0,
                keys: Sequence[str] | None = None) -> np.ndarray:
    """All indices in Efraimidis-Spirakis order for weights ``score ** beta``: each prefix is a power sample.

    Candidates of weight 0 come after every positive one, among themselves in :func:`rank` order.
    """
    s = _scores(scores)
    if np.any(s < 0):
        raise ValueError("power sampling needs scores >= 0")
    if beta < 0:
        raise ConfigError(f"power_beta must be >= 0, got {beta}")
    if keys is not None and len(keys) != s.size:
        raise ValueError(f"{len(keys)} keys for {s.size} scores")
    u = hashed_uniform(keys, seed) if keys is not None else np.random.default_rng(seed).random(s.size)
    u = np.clip(u, np.finfo(np.float64).tiny, 1.0)  # log(0) guard for the generator branch
    w = s**beta  # 0 ** 0 = 1: beta 0 is uniform sampling, zero scores included
    with np.errstate(divide="ignore"):
        key = np.where(w > 0, np.log(u) / np.where(w > 0, w, 1.0), -np.inf)  # (N,) in (-inf, 0]
    tie = rank(s, keys)  # secondary order: by score, then key
    pos = np.empty(s.size, np.int64)
    pos[tie] = np.arange(s.size)
    return np.lexsort((pos, -key))


def select(scores: Sequence[float] | np.ndarray, n: int, method: Literal["top", "power"] = "top", beta: float = 1.0,
           seed: int = 0, keys: Sequence[str] | None = None) -> np.ndarray:
    """Indices of ``n`` selected candidates (all when ``n`` exceeds the pool), in selection order."""
    if method == "top":
        order = rank(scores, keys)
    elif method == "power":
        order = power_order(scores, beta, seed, keys)
    else:
        raise ConfigError(f"sampling: unknown method {method!r}; use 'top' or 'power'")
    return order[:max(0, int(n))]


__all__ = ["power_order", "rank", "select"]
