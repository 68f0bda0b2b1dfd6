"""Where a job's big CPU tensors get their memory: transparent huge pages, so each pass does not fault in
fresh 4 KiB pages one by one.

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on
``free``: each large activation of a forward or backward pass is page-faulted in, 4 KiB at a time, and
zeroed by the kernel, on every pass. PyTorch asks the kernel for 2 MiB pages for its blocks of 2 MiB and more
when ``THP_MEM_ALLOC_ENABLE=1`` (``madvise(MADV_HUGEPAGE)``): 512 times fewer faults. On the 2-core AMD EPYC,
a bilinear upsampling to 19x1024x2048 took 52-62 ms against 119-123; a FastSCNN training step (batch 2,
512x512, channels-last) 0.45-0.63 s against 0.51-0.78 s, faster in each of 4 alternating runs (median ratio
0.84); DeepLabV3+ R18's step, bound by its convolutions, 0.87-1.15 times, no change. The memory is returned
on ``free`` as before, so a job holds no more than it did.

Keeping freed blocks in glibc's heap instead (``mallopt`` of the mmap and trim thresholds, what jemalloc and
tcmalloc do in their own way) measured faster still on that FastSCNN step (0.45-0.50 s), but glibc cannot
reuse a freed 64-byte-aligned block for the next request of the same size: a loop of 256 MiB tensors grew
the heap to 2.2 GiB before it reused one. Not taken.

:func:`request` sets ``THP_MEM_ALLOC_ENABLE=1`` unless the environment says otherwise (``0`` turns it off),
before torch has allocated anything where it can (``mirseg``'s command line, first thing); PyTorch reads the
variable once per process, at its first allocation. Every job (:func:`mirseg.threads.budget`) requests it too
and logs :func:`describe` of what took effect (:func:`mirseg.machine.huge_pages`): the kernel must allow huge
pages (``/sys/kernel/mm/transparent_hugepage/enabled``: ``always`` or ``madvise``, the defaults of most
distributions), and a process that had allocated before the request keeps 4 KiB pages. No torch here, so that
the command line can request it before torch is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "THP_MEM_ALLOC_ENABLE"
"""PyTorch's own switch (c10's CPU allocator): 1 madvises its blocks of 2 MiB and more for huge pages."""

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def request() -> None:
    """``THP_MEM_ALLOC_ENABLE=1`` unless already set; no torch call, so it can come before torch's first."""
    os.environ.setdefault(ENV_VAR, "1")


def kernel_mode(path: Path = THP_SETTING) -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), None where it has none."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip() or None


def describe(huge: bool) -> str:
    """What the job's tensors get, in words, for its start-up log; ``huge``: whether torch's allocator takes the
    huge-page path (:func:`mirseg.machine.huge_pages`)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value in ("0", ""):
        return f"memory: 4 KiB pages ({ENV_VAR}={value or 'unset'})"
    mode = kernel_mode()
    if mode is None:
        return "memory: the system's own pages (it has no transparent huge pages)"
    if mode == "never":
        return f"memory: 4 KiB pages (the kernel's transparent huge pages are off: {THP_SETTING} says never)"
    if not huge:
        return (f"memory: 4 KiB pages (torch had allocated before {ENV_VAR}=1 was set; set it in the environment "
                "to have huge pages)")
    return f"memory: 2 MiB pages for tensors of 2 MiB and more ({ENV_VAR}=1; {ENV_VAR}=0 turns it off)"


__all__ = ["ENV_VAR", "THP_SETTING", "describe", "kernel_mode", "request"]
