"""RSAL: superpixel uncertainty with class balance (Cai et al., "Revisiting Superpixels for Active Learning
in Semantic Segmentation with Realistic Annotation Costs", CVPR 2021), as the YMIR image ranks images with it.

RSAL is two-pass by nature: class shares and the threshold are pool-wide. So it is split into

1. :func:`summarize`, per image: the mean uncertainty and the dominant predicted class of every
   superpixel, a few KB (``(K,)`` float32 + ``(K,)`` int16), so memory is flat in the pool size;
2. :func:`score_pool`, over all summaries: class weights, the threshold, and each image's score
   and chosen superpixels.

Per image and superpixel j: ``s_j`` = mean per-pixel uncertainty (BvSB ``p2/p1`` by default) and
``c_j`` = the most frequent argmax class. With ``class_balance`` every ``s_j`` is multiplied by
``w_c = exp(-n_c / N)``, ``n_c`` the number of superpixels of the pool whose dominant class is c,
N their total (the official code's ``is_bal``). An image takes its ``topk`` best superpixels,
then every further one scoring at least the threshold tau; its score is the **sum** of the taken
scores (so an image with many valuable regions ranks high). The labeller is shown whole
superpixels in the same order, as many as cover ``region_budget`` of the image
(:func:`mirseg.mining.regions.take_budget` over :attr:`RsalPool.ranked`).

How this differs from the original image (algorithms.md §1.5-1.7, §8):

- every superpixel is scored (the original never scored the highest label);
- **threshold.** The original took ``numpy.percentile(all scores, round(100 * max(0.8, 1 - K*k/R)))``
  (K = ``max_kept_mining_image``, k = ``topk``, R = number of superpixels in the pool): about K*k
  superpixels above tau, never more than 20 %. ``round`` reaches 100 for large pools (tau = the
  maximum, so nothing beyond the top k counts) and the percentile interpolates. Here tau is the
  m-th largest score exactly, ``m = max(1, min(K*k, floor(0.2 R)))``: the same intent, no rounding
  and no interpolation, and independent of the order of the candidates;
- like the YMIR port (and unlike the official code) scores are not min-max normalised over the pool:
  BvSB means are already in [0, 1] and comparable across images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from mirseg.errors import ConfigError
from mirseg.mining.regions import region_means, region_modes
from mirseg.mining.uncertainty import uncertainty_map

MAX_SHARE = 0.2  # the original's percentile floor of 80: at most 20 % of the pool's superpixels pass tau


@dataclass(frozen=True)
class RsalSummary:
    """What RSAL keeps of one image: one entry per superpixel (label j = index j)."""

    scores: np.ndarray  # (K,) float32 mean per-pixel uncertainty
    classes: np.ndarray  # (K,) int16 dominant predicted class


def summarize(proba: torch.Tensor, labels: np.ndarray, uncertainty: str = "bvsb") -> RsalSummary:
    """Per-superpixel mean uncertainty and dominant class of ``proba`` (C, H, W) over ``labels`` (h, w).

    ``labels`` are consecutive 0..K-1, at the probabilities' size or on a coarser grid of the same
    image (:func:`mirseg.mining.superpixels.superpixel_grid` with ``cell > 0``). On a coarser grid
    the statistics are taken there: the uncertainty map is area-averaged into each grid cell (so a
    superpixel's mean is the mean over the working pixels it covers, up to fractional cell
    borders) and the argmax is sampled at each cell's centre. That is what the label map resolves
    anyway, and it avoids enlarging the map to H x W for two bincounts (~20 ms at 1024x2048).
    """
    if proba.dim() != 3:
        raise ValueError(f"RSAL summarises one image: probabilities (C, H, W), got {tuple(proba.shape)}")
    h, w = labels.shape
    big_h, big_w = proba.shape[1:]
    if h > big_h or w > big_w:
        raise ValueError(f"superpixel map {labels.shape} is larger than the probabilities {(big_h, big_w)}")
    u, stats = uncertainty_map(proba, uncertainty)  # (H, W) each; stats.index is the argmax
    index = stats.index
    if (h, w) != (big_h, big_w):
        u = cv2.resize(u.cpu().numpy(), (w, h), interpolation=cv2.INTER_AREA)  # (h, w) cell means
        ys = ((np.arange(h) + 0.5) * big_h / h).astype(np.int64)  # cell centres
        xs = ((np.arange(w) + 0.5) * big_w / w).astype(np.int64)
        index = index.cpu().numpy()[np.ix_(ys, xs)]  # (h, w)
    k = int(labels.max()) + 1
    means, _ = region_means(u, labels, k)
    modes = region_modes(index, labels, proba.shape[0], k)
    return RsalSummary(means.astype(np.float32), modes.astype(np.int16))


def class_weights(summaries: Sequence[RsalSummary], num_classes: int) -> np.ndarray:
    """``w_c = exp(-n_c / N)`` over the dominant classes of all superpixels of the pool: ``(C,)`` float64."""
    counts = np.zeros(num_classes, np.int64)
    for s in summaries:
        counts += np.bincount(s.classes.astype(np.int64), minlength=num_classes)[:num_classes]
    total = counts.sum()
    return np.exp(-counts / total) if total else np.ones(num_classes)


def threshold(scores: np.ndarray, max_kept: int, topk: int) -> float:
    """tau: the m-th largest of all (weighted) superpixel scores, ``m = max(1, min(max_kept*topk, floor(0.2 R)))``.

    About ``max_kept * topk`` superpixels of the pool score at least tau (the superpixels the kept
    images need), never more than 20 %. ``+inf`` for an empty pool.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    r = scores.size
    if r == 0:
        return math.inf
    m = max(1, min(max_kept * topk, math.floor(MAX_SHARE * r)))
    return float(np.partition(scores, r - m)[r - m])


def ranking(scores: np.ndarray) -> np.ndarray:
    """An image's superpixel labels by score, best first (ties: lower label first): (K,) int32."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable").astype(np.int32)


def choose(scores: np.ndarray, topk: int, tau: float) -> np.ndarray:
    """Indices of the superpixels an image takes, best first: its ``topk`` best, then every further one >= tau."""
    order = ranking(scores)
    ranked = np.asarray(scores, dtype=np.float64)[order]
    extra = int(np.count_nonzero(ranked[topk:] >= tau))  # sorted, so the ones >= tau form a prefix
    return order[:topk + extra]


@dataclass
class RsalPool:
    """The pool-level result: per-image scores and chosen superpixels, and what they were derived with."""

    scores: np.ndarray  # (N,) float64 image scores
    chosen: list[np.ndarray]  # per image: chosen superpixel labels, best first
    weights: np.ndarray  # (C,) class weights (ones without class balance)
    threshold: float  # tau
    ranked: list[np.ndarray]  # per image: every superpixel label, best first ((K,) int32; ``chosen`` is a prefix)


def score_pool(summaries: Sequence[RsalSummary], num_classes: int, topk: int = 3, max_kept: int = 5000,
               class_balance: bool = True) -> RsalPool:
    """Image scores of the whole pool from the per-image summaries (in any order: the result is per image)."""
    if topk < 1 or max_kept < 1:
        raise ConfigError(f"topk_superpixel_score ({topk}) and max_kept_mining_image ({max_kept}) must be >= 1")
    weights = class_weights(summaries, num_classes) if class_balance else np.ones(num_classes)
    weighted = [s.scores.astype(np.float64) * weights[s.classes.astype(np.int64)] for s in summaries]
    tau = threshold(np.concatenate(weighted) if weighted else np.zeros(0), max_kept, topk)
    chosen = [choose(w, topk, tau) for w in weighted]
    scores = np.array([float(w[c].sum()) for w, c in zip(weighted, chosen)], dtype=np.float64)
    return RsalPool(scores, chosen, weights, tau, [ranking(w) for w in weighted])


__all__ = ["RsalPool", "RsalSummary", "choose", "class_weights", "ranking", "score_pool", "summarize", "threshold"]
