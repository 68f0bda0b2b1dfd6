"""Superpixels with OpenCV-contrib ``ximgproc``: SLIC, SLICO, MSLIC and SEEDS, capped at a maximum count.

The original image's settings are kept (``iterate(10)``; SEEDS with 5 levels, prior 3, 5 histogram
bins, double step), and these of its behaviours are deliberately changed (algorithms.md §1.3, §8):

- **Size.** The original used a SLIC cell of ``2 * round(sqrt(H*W/M))``, about M/4 superpixels.
  Here the cell starts at ``ceil(sqrt(H*W/M))`` and is adapted to the count OpenCV actually
  returns (larger when over, smaller when under 70 % of M, at most 5 tries; SEEDS's requested count
  likewise), so an image gets close to ``max_count`` superpixels and **never more**. MSLIC, which always went over
  the cap and aborted the whole job, is handled the same way.
- **Colour space.** CIELab (what the OpenCV documentation recommends for both SLIC and SEEDS)
  instead of raw BGR.
- **Connectivity.** SLIC labels go through ``enforceLabelConnectivity`` so each superpixel is one
  connected piece, which is what a person labelling it expects.
- **Resolution.** With ``cell > 0`` the algorithm runs on a copy shrunk (area interpolation) until
  an average superpixel is about ``cell x cell`` pixels; :func:`superpixel_grid` returns labels on
  that grid, :func:`superpixels` scales them back with nearest-neighbour. That bounds the cost
  (SLICO takes ~40 ns per pixel and iteration: at full resolution several times a FastSCNN forward
  pass) at the price of boundaries snapped to the coarser grid; the official RSAL code likewise
  scored on a half-resolution map.
- **Labels** are always consecutive ``0..K-1`` (int32), so every label is scored, and nothing
  touches the disk.
- **Tiny images.** OpenCV's implementations crash (segfault, which no ``try`` can catch) on
  images that are small relative to the cell (measured on OpenCV 5.0: SLIC-family when the short
  side is under ~2.5 cells, SEEDS under 16 pixels or with cells wider than a third of the short
  side). Those cases get a regular grid of square cells instead, which is also what a superpixel
  algorithm would converge to on a few pixels.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from mirseg.errors import ConfigError
from mirseg.mining._names import lookup

SUPERPIXEL_ALGORITHMS = ("slico", "slic", "mslic", "seeds")
ITERATIONS = 10  # the original image's iterate(10)
MIN_CELL = 4  # no SLIC cell below 4x4 pixels: smaller superpixels carry no region information
_MAX_TRIES = 5
_CLOSE = 0.7  # a result with at least this share of max_count is close enough (each retry is a full run)


def check_algorithm(algorithm: str) -> str:
    """The lower-case algorithm name, or a ValueError with a "did you mean" hint."""
    return lookup("superpixel_algorithm", algorithm, SUPERPIXEL_ALGORITHMS)


def consecutive(labels: np.ndarray) -> np.ndarray:
    """Relabel an int map so its labels are exactly ``0..K-1`` in increasing order of the old labels."""
    labels = labels.astype(np.int64, copy=False)
    if labels.size == 0:
        return labels.astype(np.int32)
    present = np.bincount(labels.ravel() - labels.min()) > 0  # (max - min + 1,)
    lut = (np.cumsum(present) - 1).astype(np.int32)
    return lut[labels - labels.min()]


def grid(height: int, width: int, max_count: int) -> np.ndarray:
    """Square cells of the smallest side ``s`` with ``ceil(H/s) * ceil(W/s) <= max_count``, row-major labels."""
    s = max(1, math.ceil(math.sqrt(height * width / max_count)))
    while math.ceil(height / s) * math.ceil(width / s) > max_count:
        s += 1
    cols = math.ceil(width / s)
    ys = np.arange(height, dtype=np.int32)[:, None] // s
    xs = np.arange(width, dtype=np.int32)[None, :] // s
    return (ys * cols + xs).astype(np.int32)


def _slic_start(height: int, width: int, max_count: int) -> int:
    """The cell of ``max_count`` square cells (>= MIN_CELL). OpenCV seeds a grid of ``ceil`` cells, a few more
    than ``max_count``, but connectivity enforcement merges some, so this usually lands just under the cap."""
    return max(MIN_CELL, math.ceil(math.sqrt(height * width / max_count)))


def _run_slic(lab: np.ndarray, algorithm: str, size: int) -> np.ndarray:
    flag = {"slic": cv2.ximgproc.SLIC, "slico": cv2.ximgproc.SLICO, "mslic": cv2.ximgproc.MSLIC}[algorithm]
    sp = cv2.ximgproc.createSuperpixelSLIC(lab, algorithm=flag, region_size=int(size))
    sp.iterate(ITERATIONS)
    sp.enforceLabelConnectivity()  # merges fragments below 25% of a cell into a neighbour
    return sp.getLabels()


def _slic(lab: np.ndarray, algorithm: str, max_count: int) -> np.ndarray | None:
    """Adapt the cell to the returned count: grow when over the cap, shrink when far under (MSLIC)."""
    h, w = lab.shape[:2]
    size = _slic_start(h, w, max_count)
    best: tuple[int, np.ndarray] | None = None  # (count, labels) of the fullest result within the cap
    over = 0  # the largest cell known to give more than max_count
    tried: set[int] = set()
    for _ in range(_MAX_TRIES):
        if size in tried or size <= over or min(h, w) < 3 * size:  # 3 cells across: below that OpenCV may crash
            break
        tried.add(size)
        labels = consecutive(_run_slic(lab, algorithm, size))
        n = int(labels.max()) + 1
        if n > max_count:
            over = max(over, size)
            size = max(size + 1, math.ceil(size * math.sqrt(n / max_count)))
            continue
        if best is None or n > best[0]:
            best = (n, labels)
        if n >= _CLOSE * max_count or size <= MIN_CELL:
            break
        # Far under the cap (MSLIC's adaptive seeds): a smaller cell, but never one known to overshoot.
        size = max(MIN_CELL, over + 1, math.floor(size * math.sqrt(n / max_count)))
    return None if best is None else best[1]


def _seeds(lab: np.ndarray, max_count: int) -> np.ndarray | None:
    """SEEDS returns a count quantised by its block pyramid (e.g. 242 when 1024 are asked on 181x362), so
    the requested count is adapted like the SLIC cell: raised when far under the cap, lowered when over."""
    h, w = lab.shape[:2]
    limit = h * w // 16  # at least 16 pixels per superpixel
    request = min(max_count, limit)
    best: tuple[int, np.ndarray] | None = None
    over = limit + 1  # the smallest request known to give more than max_count
    tried: set[int] = set()
    for _ in range(_MAX_TRIES):
        if request in tried or request >= over or request < 1 or min(h, w) < 16 \
                or math.sqrt(h * w / request) > min(h, w) / 3:  # shapes where OpenCV's SEEDS crashes
            break
        tried.add(request)
        seeds = cv2.ximgproc.createSuperpixelSEEDS(w, h, 3, request, num_levels=5, prior=3, histogram_bins=5,
                                                   double_step=True)
        seeds.iterate(lab, ITERATIONS)
        labels = consecutive(seeds.getLabels())
        n = int(labels.max()) + 1
        if n > max_count:
            over = min(over, request)
            request = min(request - 1, math.floor(request * max_count / n))
            continue
        if best is None or n > best[0]:
            best = (n, labels)
        if n >= _CLOSE * max_count:
            break
        request = min(over - 1, limit, math.ceil(request * max_count / n))
    return None if best is None else best[1]


def superpixel_grid(image: np.ndarray, algorithm: str = "slico", max_count: int = 1024, cell: int = 0) -> np.ndarray:
    """Superpixel labels at the resolution they are computed at: ``(h, w)`` int32, consecutive ``0..K-1``.

    ``(h, w)`` is the image's size, or with ``cell > 0`` the shrunk size (about ``max_count * cell^2``
    pixels, same aspect ratio). Scores can be aggregated on this grid directly (RSAL does), which
    avoids enlarging the label map; :func:`superpixels` returns it at the image's size.
    """
    algorithm = check_algorithm(algorithm)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"superpixels need an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    if max_count < 1:
        raise ConfigError(f"max_superpixel_per_image must be >= 1, got {max_count}")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"superpixels of an empty image ({h}x{w})")
    small = image
    if cell > 0:
        factor = math.sqrt(h * w / max_count) / cell  # > 1: the average superpixel is wider than `cell`
        if factor > 1:
            size = (max(1, round(w / factor)), max(1, round(h / factor)))  # cv2 wants (w, h)
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2Lab)
    labels = _seeds(lab, max_count) if algorithm == "seeds" else _slic(lab, algorithm, max_count)
    if labels is None:
        labels = grid(*small.shape[:2], max_count)
    return labels.astype(np.int32, copy=False)


def enlarge(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map scaled up to ``size`` (H, W) by nearest neighbour.

    No label disappears: OpenCV maps output pixel x to input ``floor(x * w / W)``, which steps by at
    most 1 when ``w <= W`` and ends at ``w - 1``, so every input pixel is used.
    """
    h, w = size
    if labels.shape == (h, w):
        return labels
    if labels.shape[0] > h or labels.shape[1] > w:
        raise ValueError(f"enlarge: {labels.shape} is larger than {size}")
    return cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)


def superpixels(image: np.ndarray, algorithm: str = "slico", max_count: int = 1024, cell: int = 0) -> np.ndarray:
    """Superpixel labels ``(H, W)`` int32 of an ``(H, W, 3)`` uint8 RGB image, consecutive ``0..K-1``,
    ``1 <= K <= max_count``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        algorithm: ``slico``, ``slic``, ``mslic`` or ``seeds`` (any case).
        max_count: the cap (``max_superpixel_per_image``); the count aimed at.
        cell: run on a copy shrunk until an average superpixel is about ``cell x cell`` pixels
            (0: at full size), then enlarge the labels. Images already that coarse are not enlarged.
    """
    return enlarge(superpixel_grid(image, algorithm, max_count, cell), image.shape[:2])


__all__ = ["SUPERPIXEL_ALGORITHMS", "check_algorithm", "consecutive", "enlarge", "grid", "superpixel_grid",
           "superpixels"]
