"""Colour masks and overlays for people to look at.

The palette is PASCAL VOC's, fixed and documented: colour of index i takes the bits of i
interleaved into the high bits of R, G and B. Index 0 is black (the ``background`` class when
there is one), 1 dark red, 2 dark green, 3 olive, 4 dark blue, ...; 255 (ignore) is light beige
(224, 224, 192).
"""

from __future__ import annotations

import numpy as np


def _voc_palette() -> np.ndarray:
    palette = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[i] = (r, g, b)
    return palette


PALETTE = _voc_palette()
"""(256, 3) uint8 RGB colours indexed by class id."""


def colorize(label: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 RGB colours."""
    return PALETTE[label.astype(np.uint8)]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5, skip: tuple[int, ...] = ()) -> np.ndarray:
    """Blend an (H, W, 3) uint8 RGB image with the colour mask of ``label``; classes in ``skip`` stay unblended."""
    color = colorize(label).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + color * alpha
    if skip:
        keep = np.isin(label, skip)
        out[keep] = image[keep]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
