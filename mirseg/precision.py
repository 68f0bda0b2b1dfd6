"""Mixed precision: what ``amp`` means on a device, and the autocast context that applies it.

- **CUDA**: fp16 autocast; training adds GradScaler's loss scaling (:mod:`mirseg.train`).
- **CPU**: bf16 autocast where the CPU computes bf16 natively (:func:`mirseg.machine.native_bf16`:
  AVX512-BF16 or AMX on x86, BF16 on Arm) and, with ``layout=auto``, where the probe of
  :mod:`mirseg.layout` finds it faster than fp32; elsewhere fp32, with one log line saying why. bf16
  has fp32's exponent range, so training needs no loss scaling. ``MIRSEG_CPU_BF16=1`` uses bf16 on any
  CPU, probe or not (emulated where it is not native: slow, but the same arithmetic, for measuring
  accuracy on such a machine), ``=0`` never.

Autocast runs convolutions and matrix products in the low precision and keeps some ops in fp32, but
on CPU softmax and bilinear upsampling are not among them: the losses (:mod:`mirseg.loss`), the
models' final upsampling (:func:`mirseg.models._blocks.upsample_logits`), OCRNet's attention and the
prediction maths (:mod:`mirseg.predict`) cast to fp32 themselves. Weights stay fp32.
"""

from __future__ import annotations

import contextlib
import logging
import os
from contextlib import AbstractContextManager

import torch

from mirseg import machine
from mirseg.errors import ConfigError

log = logging.getLogger("mirseg")

ENV_VAR = "MIRSEG_CPU_BF16"
"""``1``: bf16 autocast on any CPU when amp is on; ``0``: never; unset: where the CPU has native bf16."""

DTYPE_NAMES: dict[torch.dtype | None, str] = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
"""How logs, the layout cache and checkpoints name an autocast dtype (None: no autocast)."""


def bf16_forced() -> bool | None:
    """``MIRSEG_CPU_BF16``: True (1), False (0) or None (unset); a ConfigError for another value."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    if value:
        raise ConfigError(f"{ENV_VAR}={value!r} is not a switch: set it to 1 (bf16 on any CPU), 0 (never) or unset it "
                          "(bf16 where the CPU has it natively)")
    return None


def cpu_bf16() -> tuple[bool, str]:
    """Whether ``amp`` means bf16 on this CPU, and why (``MIRSEG_CPU_BF16``, else :func:`machine.native_bf16`)."""
    forced = bf16_forced()
    if forced is not None:
        return forced, f"{ENV_VAR}={os.environ[ENV_VAR].strip()}"
    if machine.native_bf16():
        return True, "native bf16"
    return False, f"{machine.cpu_model()} has no native bfloat16 (AVX512-BF16, AMX or Arm BF16)"


def autocast_dtype(device: torch.device, amp: bool, level: int = logging.WARNING,
                   what: str = "running") -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device``: fp16 on CUDA, bf16 on a CPU with native bf16, else None.

    Where ``amp`` is on and means nothing (a CPU without native bf16), one line at ``level`` says why and
    that the job is ``what`` ("running", "training") in fp32.
    """
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        bf16, why = cpu_bf16()
        if bf16:
            return torch.bfloat16
        log.log(level, "amp: %s; %s in fp32 (%s=1 forces bf16)", why, what, ENV_VAR)
    return None


def autocast(device_type: str, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device_type``; with None, a context that changes nothing (fp32)."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def dtype_named(name: str) -> torch.dtype | None:
    """The autocast dtype of a :data:`DTYPE_NAMES` name ("fp32": None); a ValueError for any other name."""
    for dtype, known in DTYPE_NAMES.items():
        if known == name:
            return dtype
    raise ValueError(f"unknown precision {name!r}; one of {', '.join(DTYPE_NAMES.values())}")
