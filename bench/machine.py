"""What every bench prints on its first line: the CPU model (the figures depend on it); mirseg.machine reads it."""

from __future__ import annotations

from mirseg.machine import cpu_model, native_bf16

__all__ = ["cpu_model", "native_bf16"]
