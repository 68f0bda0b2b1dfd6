"""What the benches share: the CPU model every bench prints on its first line (the figures depend on it; read by
mirseg.machine) and the bare forward pass each job-level figure is a share of."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from mirseg.machine import cpu_model, native_bf16


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


__all__ = ["bare_forward_ms", "cpu_model", "median_ms", "native_bf16"]
