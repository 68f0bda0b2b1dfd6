"""Prediction maths: from a normalised image batch to probabilities and to the original-size label map.

What training's evaluation, ``mirseg eval``, ``mirseg infer``, mining and export share:

* :func:`predict_logits` / :func:`sliding_window`: logits of a normalised batch, whole image or
  mmseg's sliding window; :func:`predict_proba`: the softmax (always fp32) at a chosen size.
* :func:`predict_batch`: probabilities at the working resolution of one batch seen at one or more
  scales (and mirrored, for test-time augmentation), averaged; under autocast
  (:func:`mirseg.precision.autocast_dtype`) in the network's memory layout.
* :func:`label_map`: the original-size label and confidence from those probabilities.
* :func:`prepare_for_inference`: eval mode, BatchNorm folded, channels-last; :class:`Predictor`: such a
  network with the test scale and mode it predicts with (made by :func:`load_predictor` from a
  checkpoint, :func:`mirseg.exported.onnx_predictor` from an ONNX export). Which layout is fastest
  on this machine, :func:`mirseg.infer.iter_predictions` asks :mod:`mirseg.layout` at the first batch.

**Original-size results resize probabilities, not logits.** The working-resolution softmax is the
one tensor that evaluation, inference, mining and the YMIR executor share, and test-time
augmentation averages probabilities (as mmseg's ``aug_test`` does), so the original-size label map is
``argmax(bilinear(proba))`` in every path: ``mirseg eval`` scores exactly the labels ``mirseg infer``
writes. mmseg's single-scale path resizes logits before the softmax; the two differ only in where a
class boundary falls inside a pixel.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mirseg.checkpoint import CHECKPOINT_FORMAT, CheckpointError, extract_state_dict, read_checkpoint
from mirseg.checkpoint import background_index as background_rule
from mirseg.dist import pick_device
from mirseg.errors import ConfigError
from mirseg.models import build_model
from mirseg.models._blocks import fuse_conv_bn
from mirseg.precision import autocast
from mirseg.presets import resolve_preset


@dataclass
class Predictor:
    """A checkpoint's network ready to predict, with the test scale and mode it was evaluated with."""

    model: nn.Module  # eval, BN folded, in ``memory_format``, on ``device``; returns {"out": logits (N, C, H, W)}
    arch: str  # key of mirseg.models.MODELS
    class_names: list[str]  # the model's classes (background first when the model has one)
    ignore_blank_area: bool  # true: the model has no background class
    img_scale: tuple[int, int]  # (w, h) keep-ratio working scale
    test_mode: str  # "whole" | "slide"
    slide_crop: tuple[int, int]  # (h, w)
    slide_stride: tuple[int, int]  # (h, w)
    device: torch.device
    memory_format: torch.memory_format = torch.channels_last  # the network's and its inputs' (mirseg.layout)

    @property
    def background_index(self) -> int | None:
        """The model's class of unannotated pixels, or None (the one rule, in :mod:`mirseg.checkpoint`)."""
        return background_rule({"class_names": self.class_names, "ignore_blank_area": self.ignore_blank_area})

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


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
    """Logits ``(N, C, H, W)`` of a normalised batch ``(N, 3, H, W)``, in eval mode, no grad (``no_grad``, not
    ``inference_mode``: the caller may overwrite them in place, as :func:`predict_batch`'s softmax does).

    ``mode="whole"`` runs the model once; ``"slide"`` uses :func:`sliding_window` with ``crop_size``
    and ``stride`` given as (h, w).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if mode == "whole":
                return model(images)["out"].float()
            if mode == "slide":
                if crop_size is None or stride is None:
                    raise ConfigError("slide mode needs crop_size and stride, e.g. (769, 769) and (513, 513)")
                if min(stride) < 1 or min(crop_size) < 1:
                    raise ConfigError(f"crop_size {crop_size} and stride {stride} must be positive")
                return sliding_window(model, images, tuple(crop_size), tuple(stride))
            raise ConfigError(f"unknown inference mode {mode!r}; use 'whole' or 'slide'")
    finally:
        model.train(was_training)


def predict_proba(logits: torch.Tensor, size: tuple[int, int] | None = None, *, inplace: bool = False) -> torch.Tensor:
    """Softmax probabilities (fp32), optionally bilinearly resized to ``size`` first. ``inplace``: the caller has
    no further use for fp32 ``logits``, so they may be overwritten with the probabilities (a resize makes a
    new tensor anyway)."""
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        resized = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
        return channel_softmax(resized, inplace=True)
    if logits.dtype != torch.float32:
        return channel_softmax(logits.float(), inplace=True)
    return channel_softmax(logits, inplace=inplace)


def channel_softmax(x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``x.softmax(dim=1)`` of ``(N, C, H, W)``, in the layout ``x`` has; ``inplace``: written over ``x``.

    For a channels-last ``x`` the classes are its innermost dimension, but PyTorch's CPU softmax over dim 1
    takes a strided path there, 2-3x slower than on NCHW (0.8 s against 0.29 s for 2x19x1024x2048 on 2 cores):
    softmax over the last dimension of the NHWC view is the fast kernel, on the same memory. In place, a
    softmax of 19x1024x2048 values took 64 ms against 167 into a new tensor on the same machine: no fresh
    160 MB to fault in, and each value read and written where it is.
    """
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    view = x.permute(0, 2, 3, 1) if channels_last else x  # (N, H, W, C) on the same memory, or (N, C, H, W)
    dim = -1 if channels_last else 1
    if inplace:
        torch.softmax(view, dim, out=view)
        return x
    out = view.softmax(dim=dim)
    return out.permute(0, 3, 1, 2) if channels_last else out  # back to (N, C, H, W), channels-last


CPU_BATCH_PIXELS = 2 ** 20
"""On a CPU a batch holds at most this many pixels per view (one 1024x1024 image, two of 512x1024, ...)."""


def batch_limit(device: torch.device, pixels: int, samples_per_gpu: int) -> int:
    """How many images go through the network together whose largest view has ``pixels`` pixels (h * w).

    ``samples_per_gpu`` on a GPU. On a CPU at most :data:`CPU_BATCH_PIXELS` pixels: batching buys a CPU little
    (each kernel already spreads one image over the cores) and big batches fall out of the caches. FastSCNN on
    2 cores (AMD EPYC): at 1024x2048, 294 ms per image alone against 452 at batch 2, and ``mirseg infer`` 1.53
    images/s against 1.03; at 512x1024 batch 2 is the faster (78 against 81 ms), at 360x480 HRNet-W18s takes
    31 % less time per image with it (115 against 166 ms). A function of the images' size alone, so a group's
    batches never depend on how a run is split.
    """
    if device.type != "cpu":
        return samples_per_gpu
    return max(1, min(samples_per_gpu, CPU_BATCH_PIXELS // pixels))


def prepare_for_inference(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """Eval mode, BatchNorm folded into convs, and (by default) channels-last memory layout.

    Folding removes one memory pass per conv; channels-last lets oneDNN (CPU) and cuDNN (CUDA)
    pick their fastest kernels. Inputs are made channels-last by :func:`predict_batch`.
    The model is changed in place and can no longer be trained.
    """
    model.eval()
    fuse_conv_bn(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def predict_batch(
    model: nn.Module,
    views: Sequence[torch.Tensor],
    size: tuple[int, int],
    mode: Literal["whole", "slide"] = "whole",
    crop_size: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    *,
    flip: bool = False,
    dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.channels_last,
) -> torch.Tensor:
    """Probabilities ``(N, C, *size)`` fp32 of one batch, averaged over its views (scales) and, with ``flip``,
    their mirror images.

    ``views``: the normalised batch ``(N, 3, h_s, w_s)`` at each test scale, on the model's device (one view
    without multi-scale augmentation). Each goes through :func:`predict_logits` (in ``memory_format``, the
    network's; autocast ``dtype`` when given), then is resized to ``size`` (h, w), the working resolution, and
    softmaxed in fp32.
    """
    total: torch.Tensor | None = None
    count = 0
    with torch.no_grad():
        for x in views:
            x = x.contiguous(memory_format=memory_format)  # (N, 3, h_s, w_s)
            for flipped in (False, True) if flip else (False,):
                with autocast(x.device.type, dtype):
                    logits = predict_logits(model, x.flip(-1) if flipped else x, mode, crop_size,
                                            stride)  # (N, C, h_s, w_s) fp32
                if flipped:
                    logits = logits.flip(-1)
                proba = predict_proba(logits, size, inplace=True)  # (N, C, h, w): resize, softmax in fp32
                total = proba if total is None else total.add_(proba)
                count += 1
    if total is None:
        raise ValueError("predict_batch needs at least one view")
    return total / count if count > 1 else total


def label_map(proba: torch.Tensor, size: tuple[int, int], proba_out: np.ndarray | None = None,
              chunk: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Label ``(H, W)`` int64 and confidence ``(H, W)`` fp32 at ``size``: the argmax and max over classes of
    the probabilities ``proba`` ``(C, h, w)`` bilinearly resized to ``size`` (H, W).

    Computed ``chunk`` classes at a time, so memory is O(H*W), not O(C*H*W); ties go to the lower class,
    as ``argmax`` does. ``proba_out`` (C, H, W), when given, receives the resized probabilities.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(proba.shape[-2:]) == size:  # nothing to resize: one pass over the tensor we already hold
        if proba_out is not None:
            proba_out[:] = proba.cpu().numpy()
        conf, label = proba.float().max(dim=0)
        return label, conf
    label = conf = None
    for c0 in range(0, proba.shape[0], chunk):
        part = proba[c0:c0 + chunk].float()  # (k, h, w)
        if tuple(part.shape[-2:]) != size:
            part = F.interpolate(part[None], size=size, mode="bilinear", align_corners=False)[0]  # (k, H, W)
        if proba_out is not None:
            proba_out[c0:c0 + part.shape[0]] = part.cpu().numpy()
        val, idx = part.max(dim=0)  # (H, W): the first maximum within the chunk
        if label is None:
            label, conf = idx, val
        else:
            better = val > conf  # strict: an equal later class does not win
            label = torch.where(better, idx + c0, label)
            conf = torch.where(better, val, conf)
    assert label is not None and conf is not None
    return label, conf


def _pair(key: str, value: Any) -> tuple[int, int]:
    """A (a, b) pair of positive ints from a tuple/list, or a ValueError naming ``key``."""
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be two positive integers, got {value!r}") from None
    if a < 1 or b < 1:
        raise ConfigError(f"{key} must be two positive integers, got {value!r}")
    return a, b


def load_predictor(
    checkpoint: str | os.PathLike,
    device: str | torch.device = "auto",
    img_scale: tuple[int, int] | None = None,
    test_mode: str | None = None,
    slide_crop: tuple[int, int] | None = None,
    slide_stride: tuple[int, int] | None = None,
    *,
    channels_last: bool = True,
    trust_checkpoint: bool = False,
) -> Predictor:
    """The network of a mirseg checkpoint, ready to predict.

    ``None`` for ``img_scale`` (w, h), ``test_mode``, ``slide_crop`` (h, w), ``slide_stride`` (h, w)
    means the checkpoint's saved config (the preset's test scale and mode, e.g. keep-ratio into
    2048x1024, whole image; slide with 769x769 windows for the ``_769`` presets).
    ``trust_checkpoint``: load with full unpickling (see :func:`mirseg.checkpoint.read_checkpoint`).
    """
    ckpt = read_checkpoint(checkpoint, trust_checkpoint)
    if ckpt.get("format") != CHECKPOINT_FORMAT or "arch" not in ckpt or not ckpt.get("class_names"):
        raise CheckpointError(f"{checkpoint} is not a mirseg checkpoint (it has no architecture and class names); "
                         "use a best.pth / last.pth written by `mirseg train`")
    arch = str(ckpt["arch"])
    class_names = [str(n) for n in ckpt["class_names"]]
    saved = ckpt.get("config") or {}
    preset = resolve_preset(saved.get("config_file") or arch)
    img_scale = _pair("img_scale", img_scale or saved.get("img_scale") or preset.img_scale)
    test_mode = str(test_mode or saved.get("test_mode") or preset.test_mode)
    if test_mode not in ("whole", "slide"):
        raise ConfigError(f"test_mode must be 'whole' or 'slide', got {test_mode!r}")
    slide_crop = _pair("slide_crop", slide_crop or saved.get("slide_crop") or saved.get("crop_size")
                       or preset.crop_size)
    slide_stride = _pair("slide_stride", slide_stride or saved.get("slide_stride") or preset.slide_stride)
    dev = device if isinstance(device, torch.device) else pick_device(device)

    model = build_model(arch, len(class_names))
    try:
        model.load_state_dict(extract_state_dict(ckpt, str(checkpoint)))
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint}: the weights do not fit {arch} with {len(class_names)} classes: "
                              f"{' '.join(str(exc).split())}") from None
    model = prepare_for_inference(model.to(dev), channels_last=channels_last)
    return Predictor(model=model, arch=arch, class_names=class_names,
                     ignore_blank_area=bool(ckpt.get("ignore_blank_area", False)), img_scale=img_scale,
                     test_mode=test_mode, slide_crop=slide_crop, slide_stride=slide_stride, device=dev,
                     memory_format=torch.channels_last if channels_last else torch.contiguous_format)
