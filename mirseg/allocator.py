"""Where a job's big CPU tensors get their memory (pages, malloc), and the start-up line that says so.

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on
``free``: each large activation of a pass is page-faulted in, 4 KiB at a time, and zeroed by the kernel. With
``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's own switch, read once per process at its first allocation) torch asks the
kernel for 2 MiB pages for its blocks of 2 MiB and more (``madvise(MADV_HUGEPAGE)``): 512 times fewer faults,
but each one may wait for the kernel to compact memory into a free 2 MiB page.

It is left to the user, because it pays for some networks and costs others. Measured on the 2-core AMD EPYC
(``bench/vs_mmseg.py``, the same run's reference as the yardstick, without and then with huge pages):
inference at 1x3x512x1024 went from 0.73 to 0.51 times mmseg's time for FastSCNN and from 0.79 to 0.52 for
HRNet-W18s, but from 0.73 to 0.90 for OCRNet-HR18s (DeepLabV3+ R18 0.89 and 0.92); a training step at batch 2,
512x512, from 0.83 to 1.17 for OCRNet and 0.93 to 1.15 for DeepLabV3+ (FastSCNN 0.48 and 0.50).

Keeping freed blocks in glibc's heap instead (``mallopt`` of the mmap and trim thresholds, what jemalloc and
tcmalloc do in their own way) made a FastSCNN step faster still (0.45-0.50 s against 0.51-0.78), but glibc
cannot reuse a freed 64-byte-aligned block for the next request of the same size: a loop of 256 MiB tensors
grew the heap to 2.2 GiB before it reused one. Not taken either.

A malloc that keeps freed blocks for the next request of the same size (jemalloc, tcmalloc, mimalloc), swapped in
with ``LD_PRELOAD``, removes the faults without glibc's fragmentation; :func:`preloaded` says whether one is in.
It is the user's choice too, for the same reason: mimalloc 3.4 on the AMD EPYC (``bench/allocators.py``, the
system's and the preloaded run alternated, median of 3 ratios) took 0.78 of glibc's time for FastSCNN inference
at 1x3x512x1024 and 0.68 for its training step, 0.76 and 1.06 for OCRNet-HR18s, but 1.12 and 1.17 for DeepLabV3+.

:func:`describe` is the line every job logs (:func:`mirseg.threads.budget`), from the environment, the kernel's
setting (``/sys/kernel/mm/transparent_hugepage/enabled``: ``always`` or ``madvise`` give huge pages, most
distributions' defaults) and :func:`mirseg.machine.huge_pages` (what torch's allocator actually does). No torch
here: a module of facts about the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "THP_MEM_ALLOC_ENABLE"
"""PyTorch's own switch (c10's CPU allocator): 1 madvises its blocks of 2 MiB and more for huge pages."""

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PROCESS_MAPS = Path("/proc/self/maps")
MALLOCS = ("jemalloc", "tcmalloc", "mimalloc")
"""The malloc replacements :func:`preloaded` recognises, by their libraries' names (``lib<name>...``)."""


def kernel_mode(path: Path = THP_SETTING) -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), None where it has none."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip() or None


def preloaded(maps: Path = PROCESS_MAPS, environ: dict[str, str] | None = None) -> str | None:
    """The malloc replacement this process runs with: the first ``LD_PRELOAD`` entry named after jemalloc, tcmalloc
    or mimalloc that is mapped into it (``maps``: the process's own ``/proc/self/maps``; where the loader could not
    open a library it warns and goes on without it), as its file name; None: the C library's own malloc."""
    entries = (environ if environ is not None else os.environ).get("LD_PRELOAD", "").replace(":", " ").split()
    names = [Path(e).name for e in entries if any(Path(e).name.startswith(f"lib{a}") for a in MALLOCS)]
    if not names:
        return None
    try:
        mapped = {Path(line.split()[-1]).name for line in maps.read_text().splitlines() if "/" in line}
    except OSError:  # no /proc: trust the variable
        return names[0]
    return next((n for n in names if n in mapped), None)


def describe(huge: bool, malloc: str | None = None) -> str:
    """What the job's tensors get, in words, for its start-up log; ``huge``: whether torch's allocator takes the
    huge-page path (:func:`mirseg.machine.huge_pages`); ``malloc``: :func:`preloaded`."""
    heap = (f"malloc: {malloc} (LD_PRELOAD)" if malloc else
            "malloc: the C library's (LD_PRELOAD of jemalloc, tcmalloc or mimalloc reuses freed blocks without "
            "page faults: README, Speed on CPUs)")
    return f"{_pages(huge)}; {heap}"


def _pages(huge: bool) -> str:
    value = os.environ.get(ENV_VAR, "").strip()
    if value != "1":
        return (f"memory: 4 KiB pages ({ENV_VAR}={value or 'unset'}; 1 gives tensors of 2 MiB and more huge pages, "
                "faster for some networks: README, Speed on CPUs)")
    mode = kernel_mode()
    if mode is None:
        return "memory: the system's own pages (it has no transparent huge pages)"
    if mode == "never":
        return f"memory: 4 KiB pages (the kernel's transparent huge pages are off: {THP_SETTING} says never)"
    if not huge:
        return (f"memory: 4 KiB pages (torch had allocated before {ENV_VAR}=1 was set; set it in the environment "
                "the job starts in)")
    return f"memory: 2 MiB pages for tensors of 2 MiB and more ({ENV_VAR}=1)"


__all__ = ["ENV_VAR", "MALLOCS", "PROCESS_MAPS", "THP_SETTING", "describe", "kernel_mode", "preloaded"]
