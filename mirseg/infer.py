"""Prediction: from a checkpoint and image files to probabilities, label maps and result files.

Layers, each used by the next and by mining and the YMIR executor:

* :func:`predict_logits` / :func:`sliding_window` / :func:`predict_proba`: the math on a normalised
  batch (whole image or mmseg's sliding window; softmax always in fp32).
* :func:`load_predictor` -> :class:`Predictor`: a checkpoint's network, ready to run (eval, BatchNorm
  folded, channels-last, on its device), with the test scale and mode it was evaluated with.
* :func:`iter_predictions`: image paths -> one :class:`ImagePrediction` per path, in input order,
  with the softmax at the working resolution (keep-ratio ``img_scale``). Images are decoded and
  resized in DataLoader worker processes; a batch only stacks images of the same working size,
  so there is never padding and batching cannot change a result; test-time flip and multi-scale
  average the probabilities; an unreadable image yields an entry with ``error`` set.
* :func:`run_inference`: ``mirseg infer``: label / colour PNGs, overlays, ``.npy`` probabilities and
  a COCO RLE JSON, streamed to disk one image at a time.

**Original-size results resize probabilities, not logits.** The working-resolution softmax is the
one tensor that inference, mining and the YMIR executor share, and test-time augmentation
averages probabilities (as mmseg's ``aug_test`` does), so the original-size label map is
``argmax(bilinear(proba))`` in every path. mmseg's single-scale path resizes logits before the
softmax; the two differ only in where a class boundary falls inside a pixel.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mirseg import interrupt
from mirseg.config import InferConfig, check_output_dirs
from mirseg.data.images import opencv_threads
from mirseg.errors import ConfigError, Interrupted, MissingFileError
from mirseg.fileio import AtomicFile, atomic_path, write_atomic

log = logging.getLogger("mirseg")


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
                    raise ConfigError("slide mode needs crop_size and stride, e.g. (769, 769) and (513, 513)")
                if min(stride) < 1 or min(crop_size) < 1:
                    raise ConfigError(f"crop_size {crop_size} and stride {stride} must be positive")
                return sliding_window(model, images, tuple(crop_size), tuple(stride))
            raise ConfigError(f"unknown inference mode {mode!r}; use 'whole' or 'slide'")
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


# ---------------------------------------------------------------------------------------------
# The shared prediction API: Predictor, load_predictor, list_images, iter_predictions.


@dataclass
class Predictor:
    """A checkpoint's network ready to predict, with the test scale and mode it was evaluated with."""

    model: nn.Module  # eval, BN folded, channels-last, on ``device``; returns {"out": logits (N, C, H, W)}
    arch: str  # key of mirseg.models.MODELS
    class_names: list[str]  # the model's classes (background first when the model has one)
    ignore_blank_area: bool  # true: the model has no background class
    img_scale: tuple[int, int]  # (w, h) keep-ratio working scale
    test_mode: str  # "whole" | "slide"
    slide_crop: tuple[int, int]  # (h, w)
    slide_stride: tuple[int, int]  # (h, w)
    device: torch.device

    @property
    def background_index(self) -> int | None:
        """The model's class of unannotated pixels, or None (the rule: :func:`mirseg.checkpoint.background_index`)."""
        from mirseg.checkpoint import background_index

        return background_index({"class_names": self.class_names, "ignore_blank_area": self.ignore_blank_area})

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


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
    from mirseg.checkpoint import CHECKPOINT_FORMAT, CheckpointError, extract_state_dict, read_checkpoint
    from mirseg.config import resolve_preset
    from mirseg.dist import pick_device
    from mirseg.models import build_model

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
                              f"{_one_line(str(exc))}") from None
    model = prepare_for_inference(model.to(dev), channels_last=channels_last)
    return Predictor(model=model, arch=arch, class_names=class_names,
                     ignore_blank_area=bool(ckpt.get("ignore_blank_area", False)), img_scale=img_scale,
                     test_mode=test_mode, slide_crop=slide_crop, slide_stride=slide_stride, device=dev)


def list_images(spec: str | os.PathLike) -> list[str]:
    """Image paths from a folder (recursive, sorted, image suffixes only), a glob pattern (sorted;
    ``**`` recurses), a list file (``.txt``/``.tsv``/``.lst``/``.list``: one path per line, first
    tab-separated column, relative to the list file, ``#`` comments) or a single image file.
    """
    from mirseg.data.images import IMAGE_EXTENSIONS
    from mirseg.data.sources import LIST_SUFFIXES, image_source

    text = str(spec)
    if not text.strip():
        raise ConfigError("images is empty: give an image folder, a glob pattern such as 'photos/*.jpg', "
                         "or a text file listing image paths")
    p = Path(text)
    if p.is_dir():
        paths = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        kind = "folder"
    elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        paths = list(image_source(text))  # every listed path is kept: an unreadable one is reported later
        kind = "list file"
    elif p.is_file():
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ConfigError(f"{p} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a list file "
                             f"({', '.join(LIST_SUFFIXES)})")
        paths, kind = [text], "file"
    elif glob.has_magic(text):
        paths = sorted(f for f in glob.glob(text, recursive=True)
                       if Path(f).suffix.lower() in IMAGE_EXTENSIONS and os.path.isfile(f))
        kind = "glob pattern"
    else:
        raise MissingFileError(f"image folder, list file or image {p} does not exist")
    if not paths:
        raise ConfigError(f"no images found by {kind} {text!r} (image suffixes: {', '.join(IMAGE_EXTENSIONS)})")
    return paths


@dataclass
class ImagePrediction:
    """The prediction for one input path; ``error`` is set (and ``proba`` None) when it could not be read."""

    index: int  # position in the input path list
    path: str
    size: tuple[int, int]  # (H, W) of the original image, (0, 0) when unreadable
    proba: torch.Tensor | None  # (C, h, w) fp32 softmax at the working resolution, on the predictor's device
    # (a view into its batch, possibly channels-last: use .reshape / .contiguous(), not .view)
    image: np.ndarray | None  # (h, w, 3) uint8 RGB at the working resolution, only with keep_image=True
    error: str | None  # why the image could not be read
    original: np.ndarray | None = None  # (H, W, 3) uint8 RGB as decoded, only with keep_original=True


@dataclass
class _Loaded:
    """What a loader worker hands to the main process for one path."""

    index: int
    path: str
    size: tuple[int, int] = (0, 0)  # (H, W) original
    work_size: tuple[int, int] = (0, 0)  # (h, w) at img_scale
    views: list[torch.Tensor] = field(default_factory=list)  # normalised (3, h_s, w_s), one per TTA scale
    image: np.ndarray | None = None
    original: np.ndarray | None = None
    error: str | None = None

    @property
    def key(self) -> tuple[tuple[int, int], ...]:
        """Items with equal keys stack into one batch: every view has the same size."""
        return (self.work_size, *(tuple(v.shape[-2:]) for v in self.views))


class _ImageDataset(torch.utils.data.Dataset):
    """Decode, resize (one view per TTA scale) and normalise one image; errors become ``_Loaded.error``."""

    def __init__(self, paths: Sequence[str], img_scale: tuple[int, int], ratios: tuple[float, ...],
                 keep_image: bool, keep_original: bool) -> None:
        self.paths, self.img_scale, self.ratios = list(paths), img_scale, ratios
        self.keep_image, self.keep_original = keep_image, keep_original

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> _Loaded:
        from mirseg.data.images import ImageError, read_image
        from mirseg.data.transforms import normalize, rescale_size, resize_pair

        path = str(self.paths[index])
        try:
            image = read_image(path)  # (H, W, 3) uint8 RGB
            h, w = image.shape[:2]
            work = rescale_size(h, w, self.img_scale)
            out = _Loaded(index, path, (h, w), work, original=image if self.keep_original else None)
            for r in self.ratios:
                # mmseg's MultiScaleFlipAug: the scale times the ratio (int()), then the keep-ratio fit
                scale = self.img_scale if r == 1.0 else (int(self.img_scale[0] * r), int(self.img_scale[1] * r))
                resized, _ = resize_pair(image, None, rescale_size(h, w, scale))
                out.views.append(normalize(resized))
                if self.keep_image and out.image is None and resized.shape[:2] == work:
                    out.image = resized
            if self.keep_image and out.image is None:
                out.image = resize_pair(image, None, work)[0]
            return out
        except ImageError as exc:
            return _Loaded(index, path, error=str(exc))
        except Exception as exc:  # a hostile file can make OpenCV or numpy fail in other ways: report, go on
            return _Loaded(index, path, error=f"cannot load image {path}: {type(exc).__name__}: {exc}")


def _identity(item: _Loaded) -> _Loaded:
    return item


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device``: fp16 on CUDA, bf16 on a CPU with native bf16, else None."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        # Without AVX512-BF16 / AMX, bf16 is emulated and slower than fp32: keep fp32 there.
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.bfloat16
        log.warning("amp: this CPU has no native bfloat16 support; running in fp32")
    return None


def _predict_batch(predictor: Predictor, items: list[_Loaded], flip: bool, dtype: torch.dtype | None) -> torch.Tensor:
    """Probabilities ``(B, C, h, w)`` at the items' working size, averaged over TTA views (scales x flips)."""
    dev = predictor.device
    work = items[0].work_size
    total: torch.Tensor | None = None
    count = 0
    with torch.no_grad():
        for v in range(len(items[0].views)):
            x = torch.stack([it.views[v] for it in items]).to(dev, non_blocking=True)  # (B, 3, h_s, w_s)
            x = x.contiguous(memory_format=torch.channels_last)
            for flipped in (False, True) if flip else (False,):
                with torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
                    logits = predict_logits(predictor.model, x.flip(-1) if flipped else x, predictor.test_mode,
                                            predictor.slide_crop, predictor.slide_stride)  # (B, C, h_s, w_s) fp32
                if flipped:
                    logits = logits.flip(-1)
                proba = predict_proba(logits, work)  # (B, C, h, w): resize the logits, softmax in fp32
                total = proba if total is None else total.add_(proba)
                count += 1
    assert total is not None
    return total / count if count > 1 else total


def iter_predictions(
    predictor: Predictor,
    paths: Sequence[str],
    *,
    samples_per_gpu: int = 2,
    workers_per_gpu: int = 2,
    amp: bool = False,
    flip: bool = False,
    scales: Sequence[float] = (),
    keep_image: bool = False,
    keep_original: bool = False,
    stop: Callable[[], bool] | None = None,
) -> Iterator[ImagePrediction]:
    """One :class:`ImagePrediction` per path, in input order; unreadable images yield ``error``, never raise.

    ``samples_per_gpu`` images of the same working size go through the network together (others wait
    in a small look-ahead of ``2 * samples_per_gpu`` images, so memory stays bounded); decoding runs in
    ``workers_per_gpu`` processes (0: in this one). ``amp``: autocast (see :func:`autocast_dtype`).
    ``flip`` / ``scales`` (ratios of ``img_scale``, e.g. ``(0.75, 1.0, 1.25)``): test-time augmentation,
    probabilities averaged over every view at the working resolution. ``keep_image`` / ``keep_original``
    attach the working-size / decoded image.

    ``stop`` (e.g. a :class:`mirseg.interrupt.StopRequest`) is asked after each image yielded while no
    image is held back (none decoded and waiting in a partial batch); when it is true the iteration ends
    there. The images yielded are then exactly the first ones of an uninterrupted run, predicted in the
    same batches, and the rest of the run is ``iter_predictions(paths[len(yielded):])``: batches only
    depend on the images from such a point on, so a resumed run predicts bit-identically.
    """
    if samples_per_gpu < 1:
        raise ConfigError(f"samples_per_gpu must be >= 1, got {samples_per_gpu}")
    if workers_per_gpu < 0:
        raise ConfigError(f"workers_per_gpu must be >= 0, got {workers_per_gpu}")
    ratios = tuple(float(s) for s in scales) or (1.0,)
    if min(ratios) <= 0:
        raise ConfigError(f"scales must be positive ratios of img_scale, e.g. [0.75, 1.0, 1.25], got {list(scales)}")
    if not paths:
        return
    dtype = autocast_dtype(predictor.device, amp)
    dataset = _ImageDataset(paths, predictor.img_scale, ratios, keep_image, keep_original)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers_per_gpu,
                                         collate_fn=_identity)
    with opencv_threads(1 if workers_per_gpu > 0 else None):
        loaded = iter(loader)  # forks the workers
    window = max(2 * samples_per_gpu, 2)
    buckets: dict[tuple, list[_Loaded]] = {}  # working sizes -> loaded items waiting for a batch, in input order
    done: dict[int, ImagePrediction] = {}  # finished, waiting for the earlier ones
    next_out = 0

    def run(key: tuple) -> None:
        items = buckets.pop(key)
        proba = _predict_batch(predictor, items, flip, dtype)
        for it, p in zip(items, proba):
            done[it.index] = ImagePrediction(it.index, it.path, it.size, p, it.image, None, it.original)

    for item in loaded:
        if item.error is not None:
            log.warning("skipping %s: %s", item.path, item.error)
            done[item.index] = ImagePrediction(item.index, item.path, (0, 0), None, None, item.error)
        else:
            bucket = buckets.setdefault(item.key, [])
            bucket.append(item)
            if len(bucket) >= samples_per_gpu:
                run(item.key)
        while True:
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
            if sum(map(len, buckets.values())) + len(done) <= window:
                break
            # Too much held back: run the (partial) batch that holds the oldest image not yet yielded.
            run(next(k for k, b in buckets.items() if b[0].index == next_out))
        if stop is not None and not buckets and not done and stop():
            return  # a clean point: every image taken so far is yielded, none waits in a batch
    while buckets:
        run(min(buckets, key=lambda k: buckets[k][0].index))
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1


# ---------------------------------------------------------------------------------------------
# Original-size results and ``mirseg infer``.


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


def output_names(paths: Sequence[str]) -> list[str]:
    """Output file stems, unique (case-insensitively) even when inputs share a stem.

    The first image with a stem keeps it; a later one (``b/x.jpg`` after ``a/x.jpg``, or ``x.png``
    after ``x.jpg``) becomes ``<stem>__2``, ``__3``, ..., skipping any number that is another
    image's stem. Input order decides, and folders and globs are listed sorted, so it is stable.
    """
    stems = [Path(p).stem for p in paths]
    reserved = {s.lower() for s in stems}
    used: set[str] = set()
    names = []
    for stem in stems:
        name = stem
        if name.lower() in used:
            k = 2
            while f"{stem}__{k}".lower() in used or f"{stem}__{k}".lower() in reserved:
                k += 1
            name = f"{stem}__{k}"
        used.add(name.lower())
        names.append(name)
    return names


def _png(array: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a PNG of shape {array.shape} {array.dtype}")
    return buf.tobytes()


def _palette_png(label: np.ndarray) -> bytes:
    """An indexed ("P" mode) PNG: pixel values are class indices, shown in mirseg.visualize.PALETTE colours."""
    from PIL import Image

    from mirseg.visualize import PALETTE, colorize

    if label.max(initial=0) > 255:  # more classes than a palette holds: plain RGB colours
        return _png(colorize(label)[..., ::-1].copy())
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(PALETTE.reshape(-1).tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a JPEG of shape {rgb.shape}")
    return buf.tobytes()


def _write_proba(path: Path, proba: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``proba`` to ``size`` into a float16 ``.npy`` (memory-mapped, written atomically); label, conf."""
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(proba.shape[0], *size))
        label, conf = label_map(proba, size, proba_out=out)
        out.flush()
        del out
    return label, conf


JOURNAL = "resume.jsonl"
"""In ``out_dir`` while a run is unfinished: one line per image done (see :class:`mirseg.interrupt.Journal`)."""


@dataclass
class InferResult:
    """What ``run_inference`` wrote."""

    out_dir: Path
    num_images: int  # images listed, including the failed ones
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of images that could not be read
    coco_json: Path | None = None  # predictions.json, when save_coco
    class_names: list[str] = field(default_factory=list)  # the model's classes: label value i is class_names[i]
    index_tsv: Path | None = None  # images.tsv: coco image id, output name, input path, status


def run_inference(cfg: InferConfig, progress: Callable[[float], None] | None = None, *,
                  predictor: Predictor | None = None) -> InferResult:
    """``mirseg infer``: predict every image of ``cfg.images`` and write the outputs ``cfg`` asks for.

    Under ``cfg.out_dir``: ``labels/<name>.png`` (class index per pixel, uint8), ``color/<name>.png``
    (indexed PNG in the PALETTE colours), ``overlay/<name>.jpg``, ``proba/<name>.npy`` (float16
    (C, H, W)), ``predictions.json`` (COCO RLE), ``images.tsv`` (one row per input: COCO image id,
    output name, path, ``ok`` or the error) and ``classes.txt`` (line i: the name of label value i).
    ``<name>`` is the image's file stem, made unique by :func:`output_names`. Every file is written
    atomically; all outputs are at each image's original size. Unreadable images are logged, listed
    in ``failed`` and ``images.tsv``, and skipped. ``progress`` gets the fraction done after each image.

    ``cfg.checkpoint`` may also be an ONNX export (``.onnx``, run with ONNX Runtime, see
    :func:`mirseg.export.onnx_predictor`); ``predictor`` replaces loading ``cfg.checkpoint`` altogether.

    SIGINT / SIGTERM finish the image(s) in flight, keep ``out_dir/resume.jsonl`` (one line per image
    done, see :class:`mirseg.interrupt.Journal`) and raise :class:`~mirseg.errors.Interrupted`; with
    ``cfg.resume`` a rerun skips the images done and writes the same files an uninterrupted run writes.
    """
    from mirseg.coco_result import CocoResultWriter
    from mirseg.visualize import overlay

    check_output_dirs(cfg)  # an out_dir that is a file fails before the model is loaded
    if not cfg.checkpoint and predictor is None:
        raise ConfigError("checkpoint is empty: give a mirseg checkpoint, e.g. `mirseg infer runs/train/best.pth "
                         "photos/`")
    if predictor is None and str(cfg.checkpoint).lower().endswith(".onnx"):
        from mirseg.export import onnx_predictor

        predictor = onnx_predictor(cfg.checkpoint, cfg.img_scale, cfg.test_mode, cfg.slide_crop, cfg.slide_stride)
    elif predictor is None:
        predictor = load_predictor(cfg.checkpoint, cfg.device, cfg.img_scale, cfg.test_mode, cfg.slide_crop,
                                   cfg.slide_stride, trust_checkpoint=cfg.trust_checkpoint)
    paths = list_images(cfg.images)
    names = output_names(paths)
    out_dir = Path(cfg.out_dir)
    wanted = {"labels": cfg.save_labels, "color": cfg.save_color, "overlay": cfg.save_overlay,
              "proba": cfg.save_proba}
    for sub, on in wanted.items():
        if on:
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "classes.txt", "".join(f"{n}\n" for n in predictor.class_names).encode())
    skip = () if predictor.background_index is None else (predictor.background_index,)
    log.info("inferring %d images with %s (%s, img_scale %s, %s) on %s -> %s", len(paths), cfg.checkpoint,
             predictor.arch, predictor.img_scale, predictor.test_mode, predictor.device, out_dir)

    coco = (CocoResultWriter(out_dir / "predictions.json", predictor.class_names, predictor.background_index,
                             list_failed=False) if cfg.save_coco else None)
    rows = AtomicFile(out_dir / "images.tsv")  # committed into place below
    failed: list[tuple[str, str]] = []
    journal = None
    try:
        journal = interrupt.Journal.open(out_dir / JOURNAL, "infer", interrupt.job_settings(cfg, paths, cfg.checkpoint),
                                         cfg.resume, f"out_dir {out_dir}")
        rows.write("image_id\tname\tpath\tstatus\n")
        # Each image's outputs are written, then its journal line: a line on disk means the image is done.
        for rec in journal.records:  # replay what an interrupted run finished (resume=true)
            image_id = coco.add_encoded(rec["image"], rec["anns"]) if coco and rec["image"] is not None else None
            if rec["error"] is not None:
                failed.append((rec["path"], rec["error"]))
            rows.write(f"{image_id or ''}\t{rec['name']}\t{rec['path']}\t{_one_line(rec['error'] or 'ok')}\n")
        start = len(journal.records)
        if start:
            log.info("resuming: %d of %d images were done by the interrupted run", start, len(paths))
        with interrupt.graceful_stop("the images in flight") as stop:
            preds = iter_predictions(predictor, paths[start:], samples_per_gpu=cfg.samples_per_gpu,
                                     workers_per_gpu=cfg.workers_per_gpu, amp=cfg.amp, flip=cfg.flip,
                                     scales=cfg.scales, keep_original=cfg.save_overlay, stop=lambda: bool(stop))
            for done, pred in enumerate(preds, start=start + 1):
                name = names[start + pred.index]
                entry, anns = None, []
                if pred.error is not None:
                    failed.append((pred.path, pred.error))
                    entry = coco.failed_entry(pred.path) if coco else None
                else:
                    if cfg.save_proba:
                        label_t, conf_t = _write_proba(out_dir / "proba" / f"{name}.npy", pred.proba, pred.size)
                    else:
                        label_t, conf_t = label_map(pred.proba, pred.size)
                    dtype = np.uint8 if predictor.num_classes <= 256 else np.uint16
                    label = label_t.cpu().numpy().astype(dtype)  # (H, W) model class indices
                    if cfg.save_labels:
                        write_atomic(out_dir / "labels" / f"{name}.png", _png(label))
                    if cfg.save_color:
                        write_atomic(out_dir / "color" / f"{name}.png", _palette_png(label))
                    if cfg.save_overlay:
                        write_atomic(out_dir / "overlay" / f"{name}.jpg", _jpeg(overlay(pred.original, label,
                                                                                         skip=skip)))
                    if coco:
                        entry, anns = coco.encode(pred.path, label, conf_t.cpu().numpy())
                image_id = coco.add_encoded(entry, anns) if entry is not None else None
                rows.write(f"{image_id or ''}\t{name}\t{pred.path}\t{_one_line(pred.error or 'ok')}\n")
                journal.append({"name": name, "path": pred.path, "error": pred.error, "image": entry, "anns": anns})
                if progress is not None:
                    progress(done / len(paths))
        if stop and len(journal.records) < len(paths):
            left = len(paths) - len(journal.records)
            raise Interrupted(f"interrupted by {stop.name} after {len(journal.records)} of {len(paths)} images; "
                              f"run the same command with resume=true to do the other {left} (out_dir={out_dir})",
                              stop.signum)
        rows.commit()
        coco_json = coco.close() if coco else None
        journal.finish()
    except BaseException:
        rows.abort()
        if coco:
            coco.abort()
        if journal is not None:
            journal.close()  # kept: resume=true continues from it
        raise
    if failed:
        log.warning("%d of %d images could not be read (listed in %s): %s", len(failed), len(paths),
                    out_dir / "images.tsv", "; ".join(p for p, _ in failed[:5]) + (" ..." if len(failed) > 5 else ""))
    return InferResult(out_dir=out_dir, num_images=len(paths), failed=failed, coco_json=coco_json,
                       class_names=list(predictor.class_names), index_tsv=out_dir / "images.tsv")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
