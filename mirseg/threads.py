"""The thread budget of a job: how many threads torch and OpenCV may run, so that a job never fights itself for cores;
and :func:`in_background`, the one helper thread a job may start (``mirseg infer`` writes its files on it).

PyTorch starts one intra-op thread per physical core, whatever else runs: its data workers, a second job,
a container limited to fewer CPUs than the machine has. Every OpenMP barrier then waits for a thread that
has no core, and a step gets 10-100x slower (issue 15: a FastSCNN step at batch 2, 128x128, took 11.6 s
with 2 threads and 0.12 s with one on a busy 2-core machine). The budget, decided once per job:

- **usable cores** (:func:`cpu_info`): the CPUs this process may run on (``sched_getaffinity``: taskset,
  ``docker --cpuset-cpus``), limited by the cgroup CPU quota (``docker --cpus``, Kubernetes limits;
  cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, rounded up), divided among
  the processes ``torchrun`` starts on this machine (``LOCAL_WORLD_SIZE``);
- **torch intra-op threads** (:func:`plan`): the ``threads`` key, else ``MIRSEG_THREADS``, else (auto)
  the usable cores minus the cores reserved for the data workers, ``min(workers, cores // 4)``, and at
  most ``OMP_NUM_THREADS`` when that is set (mmsegmentation's advice and the test suite's setting: an
  explicit limit is never raised);
- **data workers** get one torch thread each (PyTorch's DataLoader sets it in every worker) and one
  OpenCV thread each (:func:`mirseg.data.images.opencv_threads`, around the fork), and run at a lower
  priority (:func:`worker_init`, ``nice +10``): what they need beyond their reserved cores they take
  from idle time, never by stalling the step's threads. The main process's own OpenCV work (resizes
  when there are no workers, writing outputs) gets the torch count.

Why workers reserve at most a quarter of the cores: they need little. On CamVid (FastSCNN, batch 4,
360x480 crops, 2 workers, 2-core AMD EPYC) the loop waited for data 1 % of the time with torch on both
cores, and ran at 0.51-0.59 s/iteration (5 runs) against 0.82 with the earlier rule (torch on cores - workers = 1);
``mirseg infer`` of 1024x2048 images ran at 989 ms/image against 1268 (``bench/train_camvid.py``,
``bench/infer.py``). A whole core per worker halves a small machine for work that takes a tenth of one.

Inter-op threads are left alone: eager training and inference start no inter-op work, and
``torch.set_num_interop_threads`` raises once any parallel work has run in the process.
:func:`budget` applies a plan for the length of a job and restores the previous counts after (library
callers such as tests and benchmarks run several jobs in one process); :func:`budgeted` is the one line
each job function carries.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cv2
import torch

from mirseg import allocator, machine
from mirseg.errors import ConfigError

log = logging.getLogger("mirseg")

ENV_VAR = "MIRSEG_THREADS"
"""The environment variable that sets the torch threads when the ``threads`` key is 0 (auto)."""

WORKER_NICE = 10
"""How much lower a data worker's scheduling priority is than its job's (:func:`worker_init`)."""

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")

# ---------------------------------------------------------------------------------------------
# The cores this process may use


@dataclass(frozen=True)
class CpuInfo:
    """The cores this process may use, and where the limit comes from."""

    affinity: int  # CPUs in the process's affinity mask (os.cpu_count() where the OS has no such mask)
    quota: float | None  # the cgroup CPU quota in CPUs (1.5: one and a half); None: no quota
    local_processes: int = 1  # processes of one torchrun job on this machine (LOCAL_WORLD_SIZE), sharing the cores

    @property
    def usable(self) -> int:
        """min(affinity, quota rounded up), shared by the local processes; at least 1."""
        cores = self.affinity if self.quota is None else min(self.affinity, math.ceil(self.quota))
        return max(1, cores // max(1, self.local_processes))


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """``{controller: path}`` of this process from /proc/self/cgroup; v2's single hierarchy is ``""``."""
    paths: dict[str, str] = {}
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)  # "0::/user.slice" (v2), "4:cpu,cpuacct:/docker/abc" (v1)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _ancestors(base: Path, path: str | None) -> list[Path]:
    """``base/path`` and every folder above it up to ``base``, those that exist (a quota anywhere above limits too).

    Inside a container the process's path may not exist under the mount (no cgroup namespace): ``base`` then is
    the container's own cgroup.
    """
    found, here = [], base / (path or "/").lstrip("/")
    while True:
        if here.is_dir():
            found.append(here)
        if here == base or base not in here.parents:
            break
        here = here.parent
    return found


def _quota_v2(folder: Path) -> float | None:
    fields = (_read(folder / "cpu.max") or "").split()  # "max 100000" (none) or "150000 100000"
    try:
        return None if len(fields) != 2 or fields[0] == "max" else int(fields[0]) / int(fields[1])
    except (ValueError, ZeroDivisionError):
        return None


def _quota_v1(folder: Path) -> float | None:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        return None if quota is None or period is None or int(quota) < 0 else int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def cgroup_quota(root: str | os.PathLike = CGROUP_ROOT, proc_cgroup: str | os.PathLike = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs, the tightest of it and its ancestors; None: no quota.

    ``root``: where the cgroup file systems are mounted (v2 at ``root``, v1's cpu controller at ``root/cpu`` or
    ``root/cpu,cpuacct``); ``proc_cgroup``: the process's cgroup list. Both are parameters for the tests.
    """
    root, paths = Path(root), _cgroup_paths(Path(proc_cgroup))
    quotas = [_quota_v2(d) for d in _ancestors(root, paths.get(""))]
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quotas += [_quota_v1(d) for d in _ancestors(root / mount, paths.get("cpu"))]
    limits = [q for q in quotas if q is not None and q > 0]
    return min(limits) if limits else None


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    """A positive integer environment variable (OMP_NUM_THREADS may list nested levels, "4,2": the first); else None."""
    try:
        value = int(env.get(name, "").split(",")[0])
    except ValueError:
        return None
    return value if value > 0 else None


def cpu_info(root: str | os.PathLike = CGROUP_ROOT, proc_cgroup: str | os.PathLike = PROC_CGROUP,
             env: Mapping[str, str] | None = None) -> CpuInfo:
    """The affinity, the cgroup quota and the torchrun processes on this machine (see :class:`CpuInfo`)."""
    env = os.environ if env is None else env
    return CpuInfo(_affinity(), cgroup_quota(root, proc_cgroup), _env_int(env, "LOCAL_WORLD_SIZE") or 1)


def usable_cores(root: str | os.PathLike = CGROUP_ROOT, proc_cgroup: str | os.PathLike = PROC_CGROUP,
                 env: Mapping[str, str] | None = None) -> int:
    """The cores this process may use: affinity, limited by the cgroup quota, shared with its torchrun siblings."""
    return cpu_info(root, proc_cgroup, env).usable


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Plan:
    """The threads of one job: torch's in the main process, and its data workers (one thread each)."""

    torch_threads: int
    workers: int
    cpu: CpuInfo
    source: str  # what chose torch_threads: "threads=3", "MIRSEG_THREADS=3", "auto" or "auto, OMP_NUM_THREADS=1"

    @property
    def description(self) -> str:
        """One line for the start-up log: the split, the cores it is made for, and how to change it."""
        workers = (f" + {self.workers} data worker{'s' if self.workers != 1 else ''} (1 thread each, nice "
                   f"+{WORKER_NICE})"
                   if self.workers else ", no data workers,")
        quota = "none" if self.cpu.quota is None else f"{self.cpu.quota:g} CPUs"
        shared = f", shared by {self.cpu.local_processes} torchrun processes" if self.cpu.local_processes > 1 else ""
        rule = "auto: usable cores - min(data workers, cores // 4)"
        how = (rule if self.source == "auto" else f"{rule}, at most {self.source.split(', ')[1]}"
               if self.source.startswith("auto") else f"from {self.source}")
        return (f"threads: torch {self.torch_threads}{workers} on {self.cpu.usable} usable cores (affinity "
                f"{self.cpu.affinity}, cgroup quota {quota}{shared}); {how}; set threads=N or {ENV_VAR}")


def plan(threads_key: int, workers: int, env: Mapping[str, str] | None = None, cpu: CpuInfo | None = None) -> Plan:
    """The thread split of a job with ``workers`` data workers.

    ``threads_key`` (the config's ``threads``) > 0 wins; 0 (auto) takes ``MIRSEG_THREADS`` when set, else the
    usable cores minus ``min(workers, cores // 4)`` (at least 1), at most ``OMP_NUM_THREADS`` when set. ``env`` (default
    ``os.environ``) and ``cpu`` (default :func:`cpu_info`) are parameters for the tests.
    """
    env = os.environ if env is None else env
    if threads_key < 0:
        raise ConfigError(f"threads must be >= 0 (0: auto, from the usable cores), got "
                          f"{threads_key}: set threads=N with N >= 1, or 0")
    cpu = cpu or cpu_info(env=env)
    if threads_key > 0:
        return Plan(threads_key, workers, cpu, f"threads={threads_key}")
    text = env.get(ENV_VAR, "").strip()
    if text:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise ConfigError(f"{ENV_VAR}={text!r} is not a thread count: set it to a whole number >= 1 (0 or "
                              f"unset: auto, from the usable cores), e.g. {ENV_VAR}=2")
        if value > 0:
            return Plan(value, workers, cpu, f"{ENV_VAR}={value}")
    auto = max(1, cpu.usable - min(workers, cpu.usable // 4))
    omp = _env_int(env, "OMP_NUM_THREADS")
    if omp is not None:
        return Plan(min(auto, omp), workers, cpu, f"auto, OMP_NUM_THREADS={omp}")
    return Plan(auto, workers, cpu, "auto")


def worker_init(worker_id: int) -> None:
    """The ``worker_init_fn`` of every data loader of a job: the worker runs ``nice`` +:data:`WORKER_NICE`, so a
    core it shares with the step's threads goes to the step first (where the OS has no ``nice``: unchanged)."""
    with contextlib.suppress(AttributeError, OSError):
        os.nice(WORKER_NICE)


def apply(p: Plan) -> tuple[int, int]:
    """Set torch's intra-op threads and the main process's OpenCV threads to ``p.torch_threads``; returns the
    previous (torch, OpenCV) counts, for :func:`restore`."""
    before = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(p.torch_threads)
    cv2.setNumThreads(p.torch_threads)
    return before


def restore(before: tuple[int, int]) -> None:
    """Put back the (torch, OpenCV) thread counts :func:`apply` returned."""
    torch.set_num_threads(before[0])
    cv2.setNumThreads(before[1])


@contextlib.contextmanager
def budget(threads_key: int, workers: int) -> Iterator[Plan]:
    """The :func:`plan` applied inside the block and logged at INFO (rank 0 of a torchrun job); the previous
    thread counts are restored after."""
    p = plan(threads_key, workers)
    if _env_int(os.environ, "RANK") is None:  # RANK unset or 0: this process logs for the job
        log.info("%s", p.description)
        log.info("%s", allocator.describe(machine.huge_pages(), allocator.preloaded()))  # mirseg.allocator
    before = apply(p)
    try:
        yield p
    finally:
        restore(before)


F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
R = TypeVar("R")


def budgeted(job: F) -> F:
    """``job(cfg, ...)`` run inside ``budget(cfg.threads, cfg.workers_per_gpu)``: train, infer and mine carry it."""
    @functools.wraps(job)
    def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        with budget(cfg.threads, cfg.workers_per_gpu):
            return job(cfg, *args, **kwargs)
    return run  # type: ignore[return-value]


def in_background(fn: Callable[[T], R], items: Iterable[T], depth: int = 2) -> Iterator[R]:
    """``fn(item)`` for each item, in order, computed on one helper thread while the caller produces the next items;
    ``depth`` 0: on the caller's thread, one at a time.

    At most ``depth`` results wait unread (their items are kept alive until then). An exception in ``fn`` is
    raised where its result is read. When the iteration ends early (the reader stops, or ``items`` raises),
    the calls already started finish before this returns; their results are dropped. The items are taken up
    to ``depth + 1`` ahead of the reader. Where the work of ``fn`` and of the producer share the same busy
    cores it gains nothing (``mirseg infer`` of 1024x2048 images on 2 cores: 901-946 ms/image with it, 911-917
    without): it pays where the producer's work runs elsewhere (a GPU).
    """
    if depth < 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="mirseg-background") as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            while len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


__all__ = ["ENV_VAR", "WORKER_NICE", "CpuInfo", "Plan", "apply", "budget", "budgeted", "cgroup_quota", "cpu_info",
           "in_background", "plan", "restore", "usable_cores", "worker_init"]
