"""What the benches share: the CPU model every bench prints on its first line (the figures depend on it; read by
mirseg.machine), the median timer, a network's inference in both layouts (:func:`infer_times`), the bare forward
pass and the bare training step each job-level figure is a share of, a random-weight checkpoint to time jobs
with, the layout and precision a training run chose, and the labels of a predictor with and without autocast."""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mirseg import layout
from mirseg.checkpoint import atomic_save, make_checkpoint, read_checkpoint
from mirseg.constants import IGNORE_INDEX
from mirseg.infer import iter_predictions
from mirseg.loss import segmentation_loss
from mirseg.machine import cpu_signature, native_bf16
from mirseg.models import build_model
from mirseg.precision import autocast
from mirseg.predict import Predictor, label_map, prepare_for_inference
from mirseg.presets import MMSEG_CONFIGS

LAYOUTS = {"NCHW": torch.contiguous_format, "CL": torch.channels_last}
"""The two memory layouts the benches time, by the names their tables print."""


def load_average() -> str:
    """The 1, 5 and 15 minute load averages as the benches print them at their start and end ("0.52 1.10 1.43")."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def median_seconds(fn: Callable[[], object], repeat: int, sync: Callable[[], None] | None = None,
                   warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after ``warmup`` (oneDNN / ONNX Runtime pick and cache
    their kernels on the first); ``sync`` (e.g. ``torch.cuda.synchronize``) after each call."""
    times = []
    for i in range(warmup + repeat):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bare_forward_ms(model: torch.nn.Module, size: tuple[int, int], repeat: int) -> float:
    """Median ms of ``model`` (as ``mirseg infer`` prepares it: eval, BatchNorm folded, channels-last) on one
    1x3x``size`` (H, W) input, fp32, with this process's torch threads: what an ``infer`` or ``mine`` job's
    images/s is compared with."""
    device = next(model.parameters()).device
    x = torch.randn(1, 3, *size, device=device).contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode():
            model(x)["out"].float()

    return 1000 * median_seconds(forward, repeat, torch.cuda.synchronize if device.type == "cuda" else None)


def infer_times(model: torch.nn.Module, x: torch.Tensor, dtypes: list, repeat: int,
                sync: Callable[[], None]) -> tuple[dict, float]:
    """{(layout, dtype): median seconds per image} of ``model`` prepared as ``mirseg infer`` runs it (eval, BatchNorm
    folded; a copy) on ``x``, in each of :data:`LAYOUTS` and autocast ``dtypes`` (None: fp32), and the bf16/fp32 label
    agreement (channels-last; None without bf16 among ``dtypes``)."""
    fast = prepare_for_inference(copy.deepcopy(model), channels_last=False)
    times, labels = {}, {}
    for name, fmt in LAYOUTS.items():
        fast.to(memory_format=fmt)
        xf = x.contiguous(memory_format=fmt)
        for dtype in dtypes:
            def run(dtype=dtype, xf=xf):
                with torch.inference_mode(), autocast(x.device.type, dtype):
                    return fast(xf)["out"]
            times[name, dtype] = median_seconds(run, repeat, sync)
            if name == "CL":
                labels[dtype] = run().float().argmax(1)
    agree = (labels[torch.bfloat16] == labels[None]).float().mean().item() if torch.bfloat16 in labels else None
    return times, agree


def train_step(arch: str, batch: int, size: tuple[int, int], *, num_classes: int = 19,
               device: torch.device | str = "cpu", memory_format: torch.memory_format = torch.contiguous_format,
               dtype: torch.dtype | None = None) -> Callable[[], None]:
    """One training step per call, as ``mirseg train`` takes it: forward under autocast ``dtype`` (None: fp32), the
    loop's loss (:func:`mirseg.loss.segmentation_loss`, auxiliary heads included, fp32), backward and SGD with
    momentum and weight decay, of a fresh ``arch`` in ``memory_format`` on one fixed random batch ``(batch, 3,
    *size)``, the top eighth of its labels ignored (as void is in real labels). No GradScaler: CPU steps."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = build_model(arch, num_classes).to(device).train().to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    h, w = size
    x = torch.randn(batch, 3, h, w, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, num_classes, (batch, h, w), device=device)
    labels[:, : h // 8] = IGNORE_INDEX

    def step() -> None:
        with autocast(device.type, dtype):
            out = model(x)
        loss, _ = segmentation_loss(out, labels, model.aux_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def mmseg_config(preset: str) -> str:
    """The shortest mmseg config path that maps to ``preset`` (for a network: its Cityscapes 512x1024 config;
    FastSCNN has one, at 1024x2048), under mmseg's packaged ``configs/``."""
    paths = [p for p, (name, _) in MMSEG_CONFIGS.items() if name == preset]
    if not paths:
        raise SystemExit(f"{preset}: no mmseg config maps to it; choose from "
                         f"{', '.join(sorted({name for name, _ in MMSEG_CONFIGS.values()}))}")
    return min(paths, key=len)


def random_checkpoint(arch: str, path: Path, size: tuple[int, int], num_classes: int = 19) -> None:
    """A checkpoint of ``arch`` with random weights and BatchNorm statistics of random inputs (fresh ones make HRNet's
    logits explode), test scale ``size`` (H, W), whole-image inference: the cost of a job does not depend on what
    the weights learned."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 128, 256))
    h, w = size
    names = ["background"] + [f"class{i}" for i in range(1, num_classes)]
    config = {"config_file": arch, "img_scale": [w, h], "test_mode": "whole"}
    atomic_save(make_checkpoint(model.eval(), arch, names, config=config), path)


def trained_in(checkpoint: Path) -> layout.Choice:
    """The layout and autocast dtype a ``mirseg train`` run chose, from its checkpoint (NCHW fp32 when it records
    none)."""
    record = read_checkpoint(checkpoint, trust=True).get("layout")
    return layout.Choice.from_record(record) or layout.Choice("contiguous")


def amp_labels(predictor: Predictor, paths: list[str], workers: int = 0,
               layout_key: str = "auto") -> dict[bool, list[torch.Tensor]]:
    """Each image's label map ``(H, W)`` int64 at its original size, as ``mirseg infer`` writes it, without (False)
    and with (True) autocast; ``layout_key``: ``iter_predictions``' ``layout``. An unreadable image stops the bench."""
    out = {}
    for amp in (False, True):
        out[amp] = []
        for p in iter_predictions(predictor, paths, workers_per_gpu=workers, amp=amp, layout=layout_key):
            if p.error is not None:
                raise SystemExit(f"cannot read {p.path}: {p.error}")
            out[amp].append(label_map(p.proba, p.size)[0])
    return out


def pixel_agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The share of pixels whose label is the same in ``a`` and ``b``, two lists of label maps of the same shapes."""
    return sum(int((x == y).sum()) for x, y in zip(a, b, strict=True)) / sum(x.numel() for x in a)


__all__ = ["LAYOUTS", "bare_forward_ms", "cpu_signature", "infer_times", "load_average", "median_seconds",
           "mmseg_config", "native_bf16", "amp_labels", "pixel_agreement", "random_checkpoint", "train_step",
           "trained_in"]
