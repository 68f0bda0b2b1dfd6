"""What the machine is, as far as speed depends on it: the CPU's model name and :func:`cpu_signature`, whether it
has native bfloat16, and whether torch's CPU tensors get huge pages (:func:`huge_pages`, for
:mod:`mirseg.allocator`'s log line).

Each is read once per process (torch's allocator settles huge pages at its first allocation). The benches print
:func:`cpu_signature` on their first line, and :mod:`mirseg.layout` keys its cache of layout choices on it;
:mod:`mirseg.precision` asks :func:`native_bf16` whether bf16 autocast pays on this CPU.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    """The text of /proc/cpuinfo, "" where there is none (macOS, Windows), read once for :func:`cpu_model` and
    :func:`cpu_signature`."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what torch's cpuinfo or the platform module knows."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    name = str(torch.cpu.get_capabilities().get("cpu_name") or "")
    return name or platform.processor() or platform.machine()


CPU_NUMBERS = ("cpu family", "model", "CPU implementer", "CPU part")
"""The /proc/cpuinfo fields that tell CPU generations apart where the model name does not: x86's family and
model numbers, Arm's implementer and part."""


def cpu_numbers(cpuinfo: str) -> str:
    """``"cpu family 25, model 17"`` (x86) or ``"CPU implementer 0x41, CPU part 0xd0c"`` (Arm): the
    :data:`CPU_NUMBERS` fields of the first processor in the text of /proc/cpuinfo, "" when it has none."""
    found: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip() and found:
            break  # the end of the first processor's block
        key, sep, value = line.partition(":")
        if sep and key.strip() in CPU_NUMBERS:
            found.setdefault(key.strip(), value.strip())
    return ", ".join(f"{k} {found[k]}" for k in CPU_NUMBERS if k in found)


@functools.lru_cache(maxsize=1)
def cpu_signature() -> str:
    """The CPU as the layout cache keys it and the benches name it, e.g. ``AMD EPYC (cpu family 25, model 17;
    AVX512; native bf16)``: the model name, then what decides which kernels run and is not in a name a VM
    masks (every AMD EPYC generation can read "AMD EPYC"): the family and model numbers, the widest vector
    instructions torch dispatches to (``torch.backends.cpu.get_cpu_capability()``) and native bf16."""
    parts = [p for p in (cpu_numbers(_cpuinfo()), torch.backends.cpu.get_cpu_capability(),
                         "native bf16" if native_bf16() else "no native bf16") if p]
    return f"{cpu_model()} ({'; '.join(parts)})"


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """True when this CPU computes bfloat16 in hardware: AVX512-BF16 or AMX-BF16 on x86, the BF16 extension on Arm.

    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not that test on x86: it is true on any AVX-512
    CPU, where oneDNN emulates bf16 with fp32 instructions instead of computing it natively. The
    instruction sets come from ``torch.cpu.get_capabilities()`` (cpuinfo).
    """
    caps = torch.cpu.get_capabilities()
    has = caps.get("avx512_bf16") or caps.get("amx_bf16") or caps.get("bf16")  # x86, x86 AMX, Arm64
    return bool(has and torch.backends.mkldnn.is_available())


@functools.lru_cache(maxsize=1)
def huge_pages() -> bool:
    """Whether torch's CPU allocator takes its huge-page path in this process (``THP_MEM_ALLOC_ENABLE=1`` when it
    first allocated): its blocks of 2 MiB and more then start on a page boundary, otherwise 64 bytes into
    glibc's mapping. The probe is 64 MiB, above glibc's largest mmap threshold (32 MiB), so that without huge
    pages it is always a fresh mapping, never a heap block that may start on a page boundary by chance;
    ``empty`` touches none of its pages."""
    return torch.empty(1 << 24).data_ptr() % 4096 == 0  # 64 MiB of fp32
