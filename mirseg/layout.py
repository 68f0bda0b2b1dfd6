"""The memory layout (and, with amp on a bf16 CPU, the precision) a network runs fastest in on this machine.

oneDNN's fastest kernels differ from CPU to CPU: channels-last everywhere won on the AMD EPYC the
benchmarks were first run on, and was not the best for every network on an Intel Xeon with AMX
(issue 15). So ``infer``, ``mine`` and ``train`` choose per machine, network and size, with the
``layout`` key:

- ``channels_last`` or ``contiguous`` (NCHW): used as given, in the precision ``amp`` gives;
- ``auto`` (the default): on a GPU no probe (channels-last for inference, as cuDNN likes it, NCHW
  for training, as before); on a CPU the layout a resumed training run used, else the cached answer
  for this machine, else a short probe (:func:`choose`), whose answer is cached. Inputs under
  :data:`PROBE_MIN_PIXELS` are not probed (the default layout: the choice cannot matter much there);
  neither are the processes of a ``torchrun`` job (they would time each other): they take the cache,
  else the default.

**The probe** times every candidate (both layouts; with ``amp`` on a bf16 CPU, each in fp32 and bf16,
so that bf16 is kept only where it is faster, unless ``MIRSEG_CPU_BF16=1`` forces it) with random
input at the working size, scaled down to at most :data:`PROBE_MAX_PIXELS` with its aspect kept:
inference one forward pass, training one forward and backward pass of a copy of the network (its
weights and statistics stay untouched). Each candidate runs once to warm up (oneDNN makes its kernels
on the first call), then in rounds of one timed pass each, interleaved so that a change in the
machine's load hits all alike, until :data:`PROBE_BUDGET_S` is spent (at least one round, at most
:data:`MAX_ROUNDS`); a candidate's best pass counts. It runs inside ``torch.random.fork_rng``: a probe
never moves the job's random stream.

**The cache** is one JSON file, :func:`cache_file` (``$MIRSEG_CACHE/layout.json``, else
``~/.cache/mirseg/layout.json``), written through :mod:`mirseg.fileio`; its keys are the CPU (model name,
family and model numbers, vector instructions, native bf16: :func:`mirseg.machine.cpu_signature`), the torch
version, the network, the task, the size bucket (the working size's pixels to the nearest power of two), the
torch threads and the precisions tried (:func:`cache_key`). Delete the file, or an entry, to probe again.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from mirseg import machine
from mirseg.errors import ConfigError
from mirseg.fileio import write_atomic
from mirseg.loss import segmentation_loss
from mirseg.precision import DTYPE_NAMES, autocast, autocast_dtype, bf16_forced, dtype_named

log = logging.getLogger("mirseg")

LAYOUTS = ("auto", "channels_last", "contiguous")
"""Values of the ``layout`` key."""

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}

DEFAULT = {"infer": "channels_last", "train": "contiguous"}
"""The layout of each task where nothing is probed (a GPU, a tiny input, torchrun without a cached answer)."""

PROBE_MIN_PIXELS = 256 * 256
"""Working sizes below this many pixels are not probed."""

PROBE_MAX_PIXELS = {"infer": 512 * 512, "train": 256 * 256}
"""Larger working sizes are probed scaled down to this many pixels (a training probe runs 2 images, each pass
costing ~3 forward passes)."""

PROBE_BUDGET_S = {"infer": 2.0, "train": 4.0}
"""What a probe may spend, in seconds of timed passes (warm-up included)."""

MAX_ROUNDS = 5
CACHE_ENV = "MIRSEG_CACHE"


@dataclass(frozen=True)
class Choice:
    """A layout and an autocast dtype (None: fp32), and, once chosen, how (``how``: for the log)."""

    layout: str  # "channels_last" | "contiguous"
    dtype: torch.dtype | None = None
    how: str = ""

    @property
    def memory_format(self) -> torch.memory_format:
        return MEMORY_FORMATS[self.layout]

    @property
    def name(self) -> str:
        """E.g. ``"channels_last bf16"``."""
        return f"{self.layout} {DTYPE_NAMES[self.dtype]}"

    def autocast(self, device_type: str) -> AbstractContextManager:
        """The autocast context of this choice's dtype (nothing for fp32)."""
        return autocast(device_type, self.dtype)

    def record(self) -> dict[str, str]:
        """What a training checkpoint keeps, so that a resumed run runs as its first part did."""
        return {"layout": self.layout, "dtype": DTYPE_NAMES[self.dtype]}

    @classmethod
    def from_record(cls, record: Any, how: str = "") -> Choice | None:
        """The choice of :meth:`record` (a checkpoint's, a cache entry), or None when ``record`` is not one."""
        try:
            choice = cls(str(record["layout"]), dtype_named(str(record["dtype"])), how)
        except (KeyError, TypeError, ValueError):
            return None
        return choice if choice.layout in MEMORY_FORMATS else None


TimePass = Callable[[Choice, tuple[int, int]], float]
"""Seconds per image of one pass of the network in a candidate's layout and dtype, at size (h, w)."""


def cache_file() -> Path:
    """``$MIRSEG_CACHE/layout.json``, else ``$XDG_CACHE_HOME/mirseg/layout.json`` (``~/.cache`` by default)."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mirseg"
    return Path(root) / "layout.json"


def size_bucket(size: tuple[int, int]) -> str:
    """The working size's pixels to the nearest power of two, e.g. ``"2^19 px"`` for 512x1024."""
    return f"2^{round(math.log2(max(size[0] * size[1], 1)))} px"


def cache_key(network: str, task: str, size: tuple[int, int], dtypes: tuple[torch.dtype | None, ...]) -> str:
    """The cache entry of a choice: CPU (:func:`mirseg.machine.cpu_signature`), torch version, network, task, size
    bucket, threads, precisions tried."""
    return " | ".join((machine.cpu_signature(), f"torch {torch.__version__}", network, task, size_bucket(size),
                       f"{torch.get_num_threads()} threads", "+".join(DTYPE_NAMES[d] for d in dtypes)))


def probe_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """``size`` (h, w) scaled down to at most ``max_pixels`` (aspect kept, multiples of 32, at least 32)."""
    h, w = size
    scale = min(1.0, math.sqrt(max_pixels / max(h * w, 1)))
    return max(32, int(h * scale) // 32 * 32), max(32, int(w * scale) // 32 * 32)


def _distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def choose(network: str, task: str, device: torch.device, size: tuple[int, int], layout: str,
           dtype: torch.dtype | None, time_pass: TimePass, *, resumed: Choice | None = None,
           min_pixels: int | None = None, budget_s: float | None = None) -> Choice:
    """The layout (and dtype) ``network`` runs ``task`` ("infer" | "train") fastest in at working size ``size``
    (h, w) on ``device``, following the ``layout`` key; logs the choice and why.

    ``dtype``: the autocast dtype ``amp`` gives (:func:`mirseg.precision.autocast_dtype`); with bf16 the probe
    also tries fp32. ``time_pass`` times one pass of a candidate (:func:`forward_timer`,
    :func:`train_step_timer`; tests give a fake). ``resumed``: the choice of the training run being resumed,
    kept under ``auto`` when its dtype is still allowed. ``min_pixels`` / ``budget_s``: :data:`PROBE_MIN_PIXELS`
    and :data:`PROBE_BUDGET_S` when None.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    # bf16 on a CPU competes with fp32, unless MIRSEG_CPU_BF16=1 asks for it whatever its speed
    dtypes = (None, dtype) if dtype == torch.bfloat16 and device.type == "cpu" and not bf16_forced() else (dtype,)
    h, w = size
    if layout != "auto":
        return _said(Choice(layout, dtype, "the layout key"), network)
    if device.type != "cpu":
        return Choice(DEFAULT[task], dtype, f"not probed on {device.type}")
    if resumed is not None and resumed.dtype in dtypes:
        return _said(Choice(resumed.layout, resumed.dtype, "as the run being resumed"), network)
    if h * w < (PROBE_MIN_PIXELS if min_pixels is None else min_pixels):
        return _said(Choice(DEFAULT[task], dtype, f"{h}x{w} input: too small to probe"), network, logging.DEBUG)
    key, path = cache_key(network, task, size, dtypes), cache_file()
    cached = Choice.from_record(_read(path).get(key), f"cached in {path}")
    if cached is not None:
        return _said(cached, network)
    if _distributed():
        return _said(Choice(DEFAULT[task], dtype, "not probed under torchrun, nothing cached"), network)
    candidates = [Choice(lay, d) for d in dtypes for lay in ("channels_last", "contiguous")]
    at = probe_size(size, PROBE_MAX_PIXELS[task])
    times = probe(candidates, lambda c: time_pass(c, at), PROBE_BUDGET_S[task] if budget_s is None else budget_s)
    best = min(candidates, key=lambda c: times[c])
    others = ", ".join(f"{c.name} {times[c]:.3g} s" for c in candidates if c != best)
    how = f"probe at {at[0]}x{at[1]}: {times[best]:.3g} s per image, against {others}"
    _write(path, key, {**best.record(), "probe": {c.name: round(times[c], 5) for c in candidates},
                       "probe_size": list(at), "probed": time.strftime("%Y-%m-%d %H:%M:%S")})
    return _said(Choice(best.layout, best.dtype, f"{how}; cached in {path}"), network)


def probe(candidates: list[Choice], time_pass: Callable[[Choice], float], budget_s: float) -> dict[Choice, float]:
    """Each candidate's best time: one warm-up pass each, then interleaved rounds until ``budget_s`` is spent."""
    with torch.random.fork_rng(devices=[]):
        spent = sum(time_pass(c) for c in candidates)  # warm-up: not counted as a candidate's time
        best = {c: math.inf for c in candidates}
        for _ in range(MAX_ROUNDS):
            for c in candidates:
                t = time_pass(c)
                best[c] = min(best[c], t)
                spent += t
            if spent >= budget_s:
                break
    return best


def _said(choice: Choice, network: str, level: int = logging.INFO) -> Choice:
    """Log ``choice`` (on rank 0 of a torchrun job) and return it."""
    if _distributed() and torch_dist.get_rank() != 0:
        level = logging.DEBUG
    log.log(level, "layout: %s for %s on %s (%s)", choice.name, network, machine.cpu_signature(), choice.how)
    return choice


def _read(path: Path) -> dict[str, Any]:
    """The cache's entries; nothing when the file is missing or unreadable (it is then written anew)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.debug("layout: ignoring the cache %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` under ``key`` (another process's entry written meanwhile may be lost: it is probed again)."""
    data = _read(path)
    data[key] = entry
    try:
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        log.warning("layout: cannot write the probe's answer to %s (%s); set %s to a writable folder, or the next "
                    "run probes again", path, exc, CACHE_ENV)


# ---------------------------------------------------------------------------------------------
# Timing one pass, and the choices of the jobs


def _random_input(batch: int, size: tuple[int, int], device: torch.device, fmt: torch.memory_format) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)  # its own generator: the job's random stream is not touched
    return torch.randn(batch, 3, *size, generator=gen).to(device).contiguous(memory_format=fmt)  # (B, 3, h, w)


def forward_timer(model: nn.Module) -> TimePass:
    """Times one inference pass of ``model`` (eval mode, prepared) at batch 1; it is left in the last candidate's
    layout."""
    device = next(model.parameters()).device

    def run(c: Choice, size: tuple[int, int]) -> float:
        model.to(memory_format=c.memory_format)
        x = _random_input(1, size, device, c.memory_format)
        t0 = time.perf_counter()
        with torch.inference_mode(), c.autocast(device.type):
            model(x)["out"].sum().item()  # the read waits for the device
        return time.perf_counter() - t0

    return run


def train_step_timer(model: nn.Module) -> TimePass:
    """Times one forward and backward pass (the training loss, no optimiser step) of a copy of ``model`` at batch 2
    (BatchNorm after a global pooling needs two samples), per image."""
    device = next(model.parameters()).device
    aux = getattr(model, "aux_weights", ())
    nets: list[nn.Module] = []  # the copy, made at the first pass: no copy when nothing is probed

    def run(c: Choice, size: tuple[int, int]) -> float:
        if not nets:
            nets.append(copy.deepcopy(model).train())
        net = nets[0].to(memory_format=c.memory_format)
        x = _random_input(2, size, device, c.memory_format)
        labels = torch.zeros(2, *size, dtype=torch.long, device=device)  # (2, h, w)
        t0 = time.perf_counter()
        with c.autocast(device.type):
            out = net(x)
        segmentation_loss(out, labels, aux)[0].backward()
        net.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / 2

    return run


def for_training(model: nn.Module, network: str, device: torch.device, crop: tuple[int, int], layout: str,
                 amp: bool, resumed: Choice | None = None) -> Choice:
    """The layout and autocast dtype of a training run's steps; ``model`` is put in that layout.

    ``amp``: fp16 on CUDA (with GradScaler, :mod:`mirseg.train`), bf16 on a bf16 CPU where the probe finds it
    faster; ``resumed``: the choice of the run being resumed (kept in its ``last.pth``).
    """
    dtype = autocast_dtype(device, amp, logging.INFO, "training")
    choice = choose(network, "train", device, crop, layout, dtype, train_step_timer(model), resumed=resumed)
    model.to(memory_format=choice.memory_format)
    return choice
