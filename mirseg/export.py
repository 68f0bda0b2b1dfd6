"""``mirseg export``: a checkpoint to ONNX or TorchScript, checked against PyTorch, with its metadata.

Both formats hold the network as ``mirseg infer`` runs it (eval mode, BatchNorm folded into the
convolutions) with one input and one output:

* ``image``: float32 ``(N, 3, H, W)``, RGB, normalised as in training: ``(pixel - mean) / std`` with
  pixels in 0..255 and the ImageNet ``mean``/``std`` of the metadata. N, H and W are dynamic; resize
  the image keep-ratio to fit ``img_scale`` first, as mirseg does, for the accuracy it was trained for.
* ``logits``: float32 ``(N, C, H, W)`` at the input size; softmax over dim 1 gives probabilities,
  argmax the label (index into ``class_names``; the class ``background``, when present, is index 0).

The metadata (class names, background index, preprocessing, test scale and mode) is written beside
the model as ``<output>.json`` and also embedded: ONNX ``metadata_props["mirseg"]``, TorchScript
extra file ``mirseg.json``. Reading and running an export (its metadata, ONNX Runtime, TorchScript) is
:mod:`mirseg.exported`.

Both exports trace the network (the ONNX exporter is the TorchScript-based one, which needs no
extra packages): Python control flow is frozen at the example input's shapes. Two places of our
models would freeze wrongly, and are made shape-generic for the trace only (same math):

* ``resize`` skips the interpolation when the sizes already match (e.g. HRNet's fusion at sizes
  that are multiples of 32); traced at such a size, the graph would fail on other sizes. During the
  trace it always interpolates, an exact identity when the sizes match.
* ``nn.AdaptiveAvgPool2d`` with bins > 1 (FastSCNN's pyramid pooling) has no dynamic-shape ONNX
  form; it is replaced by an equivalent average over the same bins written as two matrix products.

``check=True`` runs the export on two random inputs (the example size, then batch 2 at another
size, so the dynamic axes are exercised) and compares with the PyTorch model: the largest absolute
difference of the logits must be <= ``atol`` (1e-4) times ``max(1, max |logit|)``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import mirseg
import mirseg.models  # noqa: F401 -- every model module, whose ``resize`` traceable_resize patches
from mirseg.config import check_output_dir
from mirseg.constants import IMAGENET_MEAN, IMAGENET_STD
from mirseg.errors import ConfigError, DependencyError
from mirseg.exported import METADATA_KEY, load_torchscript, ort_session
from mirseg.fileio import atomic_path, write_atomic
from mirseg.infer import load_predictor
from mirseg.models._blocks import resize as _resize
from mirseg.predict import Predictor

log = logging.getLogger("mirseg")

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


class LogitsOnly(nn.Module):
    """The model with a plain tensor output: ``image (N, 3, H, W)`` -> ``logits (N, C, H, W)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)["out"]


def _bin_matrix(size: torch.Tensor | int, bins: int, like: torch.Tensor) -> torch.Tensor:
    """(bins, size) averaging matrix of adaptive pooling: row i averages [floor(i*size/bins), ceil((i+1)*size/bins))."""
    i = torch.arange(bins, device=like.device)
    start = torch.div(i * size, bins, rounding_mode="floor")  # (bins,)
    end = torch.div((i + 1) * size + bins - 1, bins, rounding_mode="floor")
    pos = torch.arange(size, device=like.device)  # (size,), traced from the input's shape
    inside = ((pos[None] >= start[:, None]) & (pos[None] < end[:, None])).to(like.dtype)  # (bins, size)
    return inside / inside.sum(dim=1, keepdim=True)


class TraceableAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as ``Ph @ x @ Pw^T``: the same bins, and an ONNX graph valid for any input size."""

    def __init__(self, output_size: int | tuple[int | None, int | None]) -> None:
        super().__init__()
        out = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        if None in out:
            raise ValueError(f"adaptive pooling with a free dimension ({output_size}) is not supported for export")
        self.output_size = (int(out[0]), int(out[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph = _bin_matrix(h, self.output_size[0], x)  # (oh, H)
        pw = _bin_matrix(w, self.output_size[1], x)  # (ow, W)
        return ph @ x @ pw.transpose(0, 1)  # (N, C, oh, ow)


def _swap_adaptive_pools(module: nn.Module) -> None:
    """Replace every AdaptiveAvgPool2d with bins other than 1x1 (those export as GlobalAveragePool) in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size not in (1, (1, 1)):
            setattr(module, name, TraceableAdaptiveAvgPool2d(child.output_size))
        else:
            _swap_adaptive_pools(child)


def _always_resize(x: torch.Tensor, size: Any) -> torch.Tensor:
    return torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


@contextlib.contextmanager
def traceable_resize() -> Iterator[None]:
    """While tracing: every model module's ``resize`` interpolates even when sizes match (see the module docstring)."""
    patched = []
    for name in list(sys.modules):
        if name.startswith("mirseg.models.") and getattr(sys.modules[name], "resize", None) is _resize:
            module = importlib.import_module(name)
            patched.append(module)
            module.resize = _always_resize
    try:
        yield
    finally:
        for module in patched:
            module.resize = _resize


def metadata(predictor: Predictor, fmt: str, example: tuple[int, int], opset: int | None = None) -> dict[str, Any]:
    """What a deployment needs beside the network: classes, preprocessing, test scale and mode."""
    meta: dict[str, Any] = {
        "format": f"mirseg-{fmt}", "mirseg_version": mirseg.__version__, "arch": predictor.arch,
        "class_names": list(predictor.class_names), "background_index": predictor.background_index,
        "ignore_blank_area": predictor.ignore_blank_area,
        "input": {"name": "image", "shape": ["N", 3, "H", "W"], "dtype": "float32", "color": "RGB",
                  "normalize": "(pixel - mean) / std, pixel in 0..255", "mean": list(IMAGENET_MEAN),
                  "std": list(IMAGENET_STD)},
        "output": {"name": "logits", "shape": ["N", "C", "H", "W"], "dtype": "float32",
                   "postprocess": "softmax over dim 1 (probabilities); argmax over dim 1 (class index)"},
        "img_scale": list(predictor.img_scale), "resize": "keep ratio to fit img_scale (w, h), bilinear",
        "test_mode": predictor.test_mode, "slide_crop": list(predictor.slide_crop),
        "slide_stride": list(predictor.slide_stride), "example_input": [1, 3, *example],
    }
    if opset is not None:
        meta["opset"] = opset
    return meta


def check_shapes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The example shape, then batch 2 at about 3/4 of it plus one pixel (an odd size)."""
    return [(1, 3, height, width), (2, 3, max(height * 3 // 4, 32) + 1, max(width * 3 // 4, 32) + 1)]


def compare(name: str, ours: np.ndarray, ref: np.ndarray, atol: float = 1e-4) -> float:
    """Largest absolute difference; a RuntimeError when it exceeds ``atol * max(1, max |ref|)``."""
    if ours.shape != ref.shape:
        raise RuntimeError(f"{name}: output shape {ours.shape} differs from PyTorch's {ref.shape}")
    diff = float(np.abs(ours.astype(np.float64) - ref).max())
    limit = atol * max(1.0, float(np.abs(ref).max()))
    log.info("%s: max |export - pytorch| = %.3g on input %s (limit %.3g)", name, diff, ref.shape, limit)
    if not diff <= limit:
        raise RuntimeError(f"{name}: the export differs from PyTorch by up to {diff:.3g} on a random input of shape "
                           f"{ref.shape} (limit {limit:.3g}); try another --opset, or report the model and the sizes")
    return diff


def _reference(model: nn.Module, shapes: list[tuple[int, int, int, int]]) -> list[tuple[torch.Tensor, np.ndarray]]:
    """Seeded random inputs and the PyTorch logits for them."""
    g = torch.Generator().manual_seed(0)
    out = []
    for shape in shapes:
        x = torch.randn(*shape, generator=g)
        with torch.inference_mode():
            out.append((x, model(x)["out"].float().numpy()))
    return out


def export(checkpoint: str | os.PathLike, fmt: str = "onnx", output: str | os.PathLike | None = None,
           height: int = 512, width: int = 1024, opset: int = 17, check: bool = True, atol: float = 1e-4,
           trust_checkpoint: bool = False) -> Path:
    """Export a mirseg checkpoint as ``fmt`` ("onnx" or "torchscript"); returns the model file's path.

    ``output`` defaults to the checkpoint's path with ``.onnx`` / ``.torchscript.pt``; the metadata
    goes to ``<output>.json``. ``height`` x ``width`` is the example input of the trace (any size
    works afterwards). ``check``: compare with PyTorch on random inputs (see the module docstring).
    ``trust_checkpoint``: load the checkpoint with full unpickling (see :func:`mirseg.checkpoint.read_checkpoint`).
    """
    fmt = str(fmt).lower()
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if height < 32 or width < 32:
        raise ConfigError(f"--height and --width of the example input must be >= 32, got {height}x{width}")
    out = Path(output) if output else Path(checkpoint).with_suffix(SUFFIXES[fmt])
    if out.is_dir():
        raise ConfigError(f"--output {out} is a folder: give the file to write, e.g. {out / Path(checkpoint).stem}"
                          f"{SUFFIXES[fmt]}")
    check_output_dir("--output", out.parent)  # before the model is loaded and traced
    predictor = load_predictor(checkpoint, device="cpu", channels_last=False, trust_checkpoint=trust_checkpoint)
    reference = predictor.model  # folded BN: what `mirseg infer` computes
    net = LogitsOnly(_copy_for_trace(reference)).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    meta = metadata(predictor, fmt, (height, width), opset if fmt == "onnx" else None)
    meta_text = json.dumps(meta, indent=1)

    # The model file appears only once it is written and checked: a failed check leaves nothing behind.
    with atomic_path(out) as tmp:
        with traceable_resize(), warnings.catch_warnings():
            # TracerWarnings name every Python int taken from a shape: expected, the check below is what counts.
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                _export_onnx(net, example, tmp, opset, meta_text)
            else:
                traced = torch.jit.trace(net, example, check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files={f"{METADATA_KEY}.json": meta_text})
        if check:
            cases = _reference(reference, check_shapes(height, width))
            if fmt == "onnx":
                session = ort_session(tmp)
                for x, ref in cases:
                    compare("onnxruntime", session.run(["logits"], {"image": x.numpy()})[0], ref, atol)
            else:
                loaded = load_torchscript(tmp)
                for x, ref in cases:
                    with torch.inference_mode():
                        compare("torchscript", loaded(x).numpy(), ref, atol)
    write_atomic(f"{out}.json", meta_text + "\n")
    log.info("exported %s (%s, %d classes) to %s, metadata %s.json", checkpoint, predictor.arch,
             len(predictor.class_names), out, out)
    return out


def _copy_for_trace(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()
    _swap_adaptive_pools(model)
    return model


def _export_onnx(net: nn.Module, example: torch.Tensor, path: Path, opset: int, meta_text: str) -> None:
    try:
        import onnx  # optional (mirseg[export]): deferred so mirseg runs without it
    except ImportError:
        raise DependencyError("ONNX export needs the onnx package: pip install 'mirseg[export]' "
                              "(or use --format torchscript)") from None
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(net, (example,), str(path), dynamo=False, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": axes, "logits": axes}, opset_version=opset, do_constant_folding=True)
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta_text
    onnx.save(model, str(path))
