"""The training objective: cross-entropy on the decode head plus the weighted auxiliary heads, and class weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mirseg.constants import IGNORE_INDEX


def auto_class_weight(counts: np.ndarray) -> list[float]:
    """Inverse square-root pixel frequency, normalised to a mean of 1 over present classes, clipped to [0.1, 10]."""
    present = counts > 0
    weights = np.ones(len(counts))
    if present.any():
        freq = counts[present] / counts[present].sum()
        w = 1.0 / np.sqrt(freq)
        weights[present] = w / w.mean()
    return [float(v) for v in np.clip(weights, 0.1, 10.0)]


def segmentation_loss(out: dict[str, Any], labels: torch.Tensor, aux_weights: tuple[float, ...],
                      class_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy on ``out["out"]`` plus weighted auxiliary heads; averages over non-ignored pixels.

    Logits ``(N, K, H, W)`` are fp32 for the loss even under autocast; labels ``(N, H, W)`` int64.
    Returns the total and each part (``decode``, ``aux0``.., ``total``) as a detached 0-d tensor on the
    logits' device: reading one as a number waits for the GPU, so the training loop reads them in batches.
    """
    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, weight=class_weight, ignore_index=IGNORE_INDEX)

    decode = ce(out["out"])
    parts = {"decode": decode.detach()}
    total = decode
    for i, (w, aux) in enumerate(zip(aux_weights, out.get("aux", []))):
        a = ce(aux)
        parts[f"aux{i}"] = a.detach()
        total = total + w * a
    parts["total"] = total.detach()
    return total, parts
