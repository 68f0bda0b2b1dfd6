"""Prediction: whole-image and sliding-window logits, one implementation used everywhere."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def _windows(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """Start/end of the windows along one axis, mmseg's way: a grid, the last clipped to the border."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    spans = []
    for i in range(n):
        end = min(i * stride + crop, size)
        spans.append((max(end - crop, 0), end))
    return spans


def sliding_window(
    model: nn.Module,
    images: torch.Tensor,
    crop_size: tuple[int, int],
    stride: tuple[int, int],
    max_batch: int = 8,
) -> torch.Tensor:
    """Logits ``(N, C, H, W)`` averaged over overlapping windows (mmseg ``slide_inference``).

    Windows of ``crop_size`` step by ``stride``; the last window of a row/column is shifted back to
    end at the border; an image smaller than the crop is one window. Window logits are summed and
    divided by the per-pixel window count. All windows have the same size, so they are run
    ``max_batch`` images at a time.
    """
    n, _, h, w = images.shape
    boxes = [(y0, y1, x0, x1) for y0, y1 in _windows(h, crop_size[0], stride[0])
             for x0, x1 in _windows(w, crop_size[1], stride[1])]
    crops = torch.cat([images[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])  # (B*N, 3, hc, wc)
    outs = [model(chunk)["out"] for chunk in crops.split(max(max_batch, 1))]
    logits = torch.cat(outs).float()  # (B*N, C, hc, wc)
    total = logits.new_zeros((n, logits.shape[1], h, w))
    count = logits.new_zeros((1, 1, h, w))
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        total[:, :, y0:y1, x0:x1] += logits[i * n:(i + 1) * n]
        count[:, :, y0:y1, x0:x1] += 1
    return total / count


def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    mode: Literal["whole", "slide"] = "whole",
    crop_size: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logits ``(N, C, H, W)`` of a normalised batch ``(N, 3, H, W)``, in eval mode, no grad.

    ``mode="whole"`` runs the model once; ``"slide"`` uses :func:`sliding_window` with ``crop_size``
    and ``stride`` given as (h, w).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if mode == "whole":
                return model(images)["out"].float()
            if mode == "slide":
                if crop_size is None or stride is None:
                    raise ValueError("slide mode needs crop_size and stride, e.g. (769, 769) and (513, 513)")
                if min(stride) < 1 or min(crop_size) < 1:
                    raise ValueError(f"crop_size {crop_size} and stride {stride} must be positive")
                return sliding_window(model, images, tuple(crop_size), tuple(stride))
            raise ValueError(f"unknown inference mode {mode!r}; use 'whole' or 'slide'")
    finally:
        model.train(was_training)


def predict_proba(logits: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Softmax probabilities (fp32), optionally bilinearly resized to ``size`` first."""
    logits = logits.float()
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits.softmax(dim=1)


def prepare_for_inference(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """Eval mode, BatchNorm folded into convs, and (by default) channels-last memory layout.

    Folding removes one memory pass per conv; channels-last lets oneDNN (CPU) and cuDNN (CUDA)
    pick their fastest kernels. Inputs should then be made channels-last too (``to_model_layout``).
    The model is changed in place and can no longer be trained.
    """
    from mirseg.models._blocks import fuse_conv_bn

    model.eval()
    fuse_conv_bn(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model
