"""What the benches share: the CPU model every bench prints on its first line (the figures depend on it; read by
mirseg.machine), the bare forward pass each job-level figure is a share of, and a random-weight checkpoint to
time jobs with."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mirseg.checkpoint import atomic_save, make_checkpoint
from mirseg.machine import cpu_model, native_bf16
from mirseg.models import build_model


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeat`` calls after one warm-up (oneDNN / ONNX Runtime pick and
    cache their kernels on the first)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def bare_forward_ms(model: torch.nn.Module, size: tuple[int, int], repeat: int) -> float:
    """Median ms of ``model`` (as ``mirseg infer`` prepares it: eval, BatchNorm folded, channels-last) on one
    1x3x``size`` (H, W) input, fp32, with this process's torch threads: what an ``infer`` or ``mine`` job's
    images/s is compared with."""
    device = next(model.parameters()).device
    x = torch.randn(1, 3, *size, device=device).contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode():
            model(x)["out"].float()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return median_ms(forward, repeat)



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


__all__ = ["bare_forward_ms", "cpu_model", "median_ms", "native_bf16", "random_checkpoint"]
