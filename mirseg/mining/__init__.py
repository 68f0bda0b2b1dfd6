"""Mining (active learning) scores as pure functions on tensors: no file I/O, no model code.

Every algorithm is a :class:`Miner` with up to three steps, so the run (:mod:`mirseg.mine`) has one
loop for all of them and keeps only small per-image summaries in memory:

1. ``summarize(proba (C, h, w), image (h, w, 3) | None, params) -> summary`` per image;
2. ``score_pool(summaries, keys, num_classes, params) -> (scores (N,), chosen)`` over the pool
   (RSAL needs pool-wide class shares and a threshold; for the others it just collects);
3. ``regions(proba, image, chosen_i, params) -> (h, w) int32`` for the masks: 0 outside the
   chosen regions, i + 1 inside the i-th one (recomputed, for the top images only). Every
   algorithm's regions cover ``region_budget`` of the image, ranked best first: whole superpixels
   (RSAL by its weighted scores, the pixel baselines by their mean uncertainty, ``random`` in a
   seeded random order) or merged windows (RIPU). ``random`` has no model: its ``proba`` is None
   and ``image`` the original, so its map is at the original size.

``ALGORITHMS`` maps the names of the ``mining_algorithm`` key to them; :func:`get_algorithm` looks
a name up in any case (``RSAL``, ``rsal``) and suggests the nearest one on a typo.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from mirseg.config import MineConfig
from mirseg.errors import ConfigError
from mirseg.mining import baselines, ripu, rsal
from mirseg.mining._names import lookup
from mirseg.mining.regions import check_budget, region_means, take_budget
from mirseg.mining.superpixels import check_algorithm, enlarge, superpixel_grid
from mirseg.mining.uncertainty import get_uncertainty

_DEFAULTS = MineConfig()  # the knobs' defaults and documentation live in MineConfig, the user's keys


@dataclass(frozen=True)
class MiningParams:
    """The algorithm knobs of :class:`mirseg.config.MineConfig`: the same names, its defaults (see there)."""

    superpixel_algorithm: str = _DEFAULTS.superpixel_algorithm
    max_superpixel_per_image: int = _DEFAULTS.max_superpixel_per_image
    superpixel_cell: int = _DEFAULTS.superpixel_cell
    uncertainty_method: str = _DEFAULTS.uncertainty_method
    topk_superpixel_score: int = _DEFAULTS.topk_superpixel_score
    max_kept_mining_image: int = _DEFAULTS.max_kept_mining_image
    class_balance: bool = _DEFAULTS.class_balance
    ripu_region_radius: int = _DEFAULTS.ripu_region_radius
    ripu_image_score: str = _DEFAULTS.ripu_image_score
    reduction: str = _DEFAULTS.reduction
    topk_percent: float = _DEFAULTS.topk_percent
    seed: int = _DEFAULTS.seed
    region_budget: float = _DEFAULTS.region_budget

    @classmethod
    def from_config(cls, cfg: MineConfig) -> MiningParams:
        """The knobs of ``cfg``, taken by name; a ConfigError on a bad name or range."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    def __post_init__(self) -> None:
        # Fail on a typo before any image is predicted.
        check_algorithm(self.superpixel_algorithm)
        get_uncertainty(self.uncertainty_method)
        baselines.check_reduction(self.reduction)
        ripu.check_image_score(self.ripu_image_score)
        for key in ("max_superpixel_per_image", "topk_superpixel_score", "max_kept_mining_image"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.superpixel_cell < 0 or self.ripu_region_radius < 0:
            raise ConfigError(f"superpixel_cell ({self.superpixel_cell}) and ripu_region_radius "
                              f"({self.ripu_region_radius}) must be >= 0")
        if not 0 < self.topk_percent <= 100:
            raise ConfigError(f"topk_percent must be in (0, 100], got {self.topk_percent}")
        check_budget(self.region_budget)


PoolScores = tuple[np.ndarray, Sequence[Any]]
"""``(scores (N,) float64, chosen)``: per image, its score and what :attr:`Miner.regions` needs to redraw it."""


@dataclass(frozen=True)
class Miner:
    """One mining algorithm, as three pure steps (see the module docstring)."""

    name: str
    uses_model: bool  # False: no forward pass needed (random)
    uses_image: bool  # True: summarize needs the RGB image (superpixels)
    summarize: Callable[[torch.Tensor, np.ndarray | None, MiningParams], Any] | None
    score_pool: Callable[[Sequence[Any], Sequence[str], int, MiningParams], PoolScores]
    regions: Callable[[torch.Tensor | None, np.ndarray | None, Any, MiningParams], np.ndarray] | None
    description: str = ""


# -- RSAL


def _rsal_superpixels(image: np.ndarray | None, p: MiningParams) -> np.ndarray:
    """Superpixels on their own (possibly coarser) grid; deterministic, so the mask pass gets the same map."""
    if image is None:
        raise ValueError("RSAL needs the image to compute superpixels")
    return superpixel_grid(image, p.superpixel_algorithm, p.max_superpixel_per_image, p.superpixel_cell)


def _superpixel_map(image: np.ndarray | None, p: MiningParams, size: tuple[int, int]) -> np.ndarray:
    """The superpixels of ``image`` enlarged to ``size`` (h, w): region pixel counts are taken at that size."""
    return enlarge(_rsal_superpixels(image, p), size)


def _rsal_summarize(proba: torch.Tensor, image: np.ndarray | None, p: MiningParams) -> rsal.RsalSummary:
    return rsal.summarize(proba, _rsal_superpixels(image, p), p.uncertainty_method)


def _rsal_pool(summaries: Sequence[rsal.RsalSummary], keys: Sequence[str], num_classes: int,
               p: MiningParams) -> PoolScores:
    pool = rsal.score_pool(summaries, num_classes, p.topk_superpixel_score, p.max_kept_mining_image,
                           p.class_balance)
    return pool.scores, pool.ranked  # the masks take superpixels in score order up to the budget


def _rsal_regions(proba: torch.Tensor | None, image: np.ndarray | None, ranked: np.ndarray,
                  p: MiningParams) -> np.ndarray:
    assert proba is not None
    labels = _superpixel_map(image, p, tuple(proba.shape[-2:]))  # (h, w) the scoring pass's superpixels
    return take_budget(labels, ranked, p.region_budget)


# -- RIPU


def _ripu_summarize(proba: torch.Tensor, image: np.ndarray | None, p: MiningParams) -> ripu.RipuSummary:
    return ripu.summarize(proba, p.ripu_region_radius, p.topk_superpixel_score, p.ripu_image_score, p.region_budget)


def _ripu_pool(summaries: Sequence[ripu.RipuSummary], keys: Sequence[str], num_classes: int,
               p: MiningParams) -> PoolScores:
    return np.array([s.score for s in summaries], dtype=np.float64), [s.centres for s in summaries]


def _ripu_regions(proba: torch.Tensor | None, image: np.ndarray | None, chosen: np.ndarray,
                  p: MiningParams) -> np.ndarray:
    assert proba is not None
    return ripu.budget_windows(ripu.region_scores(proba, p.ripu_region_radius), p.ripu_region_radius, p.region_budget)


# -- pixel-map baselines and random


def _pixel_miner(method: str) -> Miner:
    fn = get_uncertainty(method)

    def summarize(proba: torch.Tensor, image: np.ndarray | None, p: MiningParams) -> float:
        return baselines.reduce(fn(proba), p.reduction, p.topk_percent)

    def pool(summaries: Sequence[float], keys: Sequence[str], num_classes: int, p: MiningParams) -> PoolScores:
        return np.array(summaries, dtype=np.float64), [None] * len(summaries)

    def regions(proba: torch.Tensor | None, image: np.ndarray | None, chosen: Any, p: MiningParams) -> np.ndarray:
        # Whole superpixels (the image's, as RSAL cuts it) ranked by their mean pixel uncertainty.
        assert proba is not None
        labels = _superpixel_map(image, p, tuple(proba.shape[-2:]))  # (h, w)
        means, _ = region_means(fn(proba), labels)  # (K,)
        return take_budget(labels, np.argsort(-means, kind="stable"), p.region_budget)

    return Miner(method, True, False, summarize, pool, regions,
                 f"image {method} ({'normalised, ' if method == 'entropy' else ''}reduced by `reduction`)")


def _random_pool(summaries: Sequence[Any], keys: Sequence[str], num_classes: int, p: MiningParams) -> PoolScores:
    # Per image a seed for its random superpixel order: hashed like the score, so order-independent too.
    seeds = baselines.hashed_uniform([f"regions:{k}" for k in keys], p.seed)
    return baselines.random_scores(keys, p.seed), [int(u * 2**53) for u in seeds]


def _random_regions(proba: torch.Tensor | None, image: np.ndarray | None, seed: int, p: MiningParams) -> np.ndarray:
    if image is None:
        raise ValueError("random regions need the image to compute superpixels")
    labels = _superpixel_map(image, p, image.shape[:2])  # (H, W) of the original: random has no working size
    order = np.random.default_rng(seed).permutation(int(labels.max()) + 1)
    return take_budget(labels, order, p.region_budget)


ALGORITHMS: dict[str, Miner] = {
    "rsal": Miner("rsal", True, True, _rsal_summarize, _rsal_pool, _rsal_regions,
                  "superpixel mean uncertainty x class balance; top-k + above-threshold superpixels"),
    "ripu": Miner("ripu", True, False, _ripu_summarize, _ripu_pool, _ripu_regions,
                  "window entropy x label impurity, averaged over the image (ripu_image_score); merged windows"),
    "random": Miner("random", False, False, None, _random_pool, _random_regions,
                    "seeded uniform scores (baseline); random superpixels as regions"),
    "entropy": _pixel_miner("entropy"),
    "margin": _pixel_miner("margin"),
    "least_confidence": _pixel_miner("least_confidence"),
}
"""Mining algorithms by name (lower case); look names up with :func:`get_algorithm`."""


def get_algorithm(name: str) -> Miner:
    """The miner called ``name`` (any case), or a ValueError with a "did you mean" hint."""
    return ALGORITHMS[lookup("mining_algorithm", name, ALGORITHMS)]


__all__ = ["ALGORITHMS", "Miner", "MiningParams", "PoolScores", "get_algorithm"]
