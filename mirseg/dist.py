"""Process-group and device set-up for one process or ``torchrun`` across GPUs and machines.

Besides the set-up (:func:`setup`) and the tensor collectives training needs, the pieces that let a
job over a list of items (the images of ``mirseg infer``, the candidates of ``mirseg mine``) run
sharded under torchrun and still produce one process's result:

* :class:`Shards`: the list cut into groups of consecutive items, group g for process g mod W;
  :meth:`Shards.merge` hands rank 0 every process's per-item results in list order, a few groups
  at a time (memory stays flat in the list's length), and stops every process after the same round
  when one of them is stopped (a signal);
* :func:`on_main` runs a step on rank 0 only (writing the shared files) and raises its error on
  every process; :func:`broadcast` shares rank 0's (small) values.
"""

from __future__ import annotations

import atexit
import datetime
import itertools
import os
import pickle
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as torch_dist

from mirseg.errors import ConfigError, MirsegError

T = TypeVar("T")

TIMEOUT_ENV = "MIRSEG_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0
"""Seconds a collective waits for the other processes (torch's own default): rank 0 alone writes checkpoints,
the mining ranking and the report meanwhile, which on a large pool takes minutes."""


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device, rank and the world size."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: the process's CUDA device if there is one, else CPU. ``cpu``/``cuda``/``cuda:N`` as given."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use device=cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")


def timeout() -> datetime.timedelta:
    """How long a collective waits for the other processes before it fails: ``$MIRSEG_DIST_TIMEOUT`` seconds,
    default :data:`DEFAULT_TIMEOUT`. A process that hangs (rather than dies: that fails its peers' collectives
    at once) then fails the others within this time, and torchrun stops the group."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds: set it to a number > 0, e.g. 600 "
                          f"(unset: {DEFAULT_TIMEOUT:.0f})")
    return datetime.timedelta(seconds=seconds)


def check_processes(nproc: int) -> None:
    """``--gpus N``: one process per GPU where CUDA is (at most the GPUs this process sees); any N of CPU
    processes (gloo) where it is not."""
    if nproc < 1:
        raise ConfigError(f"--gpus must be 1 or more, got {nproc}")
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if seen and nproc > seen:
        mask = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={mask})" if mask is not None else ""
        raise ConfigError(f"--gpus {nproc} asks for {nproc} GPUs, but this machine shows {seen}{where}: give --gpus "
                          f"{seen} or fewer")


def setup(device: str = "auto") -> Runtime:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1); NCCL on GPU, gloo on CPU; collectives
    time out after :func:`timeout`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not torch_dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout())
        # A group still alive when the interpreter ends can abort the process in its C++ destructor
        # ("terminate called without an active exception", exit -6): jobs that do not tear it down
        # themselves (infer, mine: a caller may run several in one group) leave it to exit time.
        atexit.register(_destroy)
    return Runtime(dev, rank, world, local_rank)


def _destroy() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Sum a tensor over all processes (a no-op in a single process)."""
    if rt.distributed:
        t = t.to(rt.device)
        torch_dist.all_reduce(t)
    return t


def agreed_signal(signum: int | None, rt: Runtime) -> int | None:
    """The signal to stop on, the same in every process: SIGTERM if any process got one, else SIGINT if any did.

    ``signum``: the signal this process got (None: none). Signals reach the processes of a torchrun
    group at different moments; summing one vote per process and signal makes them all stop after
    the same iteration. A collective under torchrun: every process calls it at the same point.
    """
    if not rt.distributed:
        return signum
    votes = torch.tensor([signum == signal.SIGINT, signum == signal.SIGTERM], dtype=torch.int32)
    votes = all_reduce_sum(votes, rt).cpu()
    return signal.SIGTERM if votes[1] else signal.SIGINT if votes[0] else None


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        torch_dist.barrier()


def teardown(rt: Runtime) -> None:
    if rt.distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def broadcast(obj: T, rt: Runtime) -> T:
    """Rank 0's ``obj`` on every process (pickled: keep it small); ``obj`` itself in one process.

    A collective under torchrun: every process calls it at the same point (the others' ``obj`` is ignored).
    """
    if not rt.distributed:
        return obj
    box = [obj if rt.is_main else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T], rt: Runtime) -> T | None:
    """``fn()`` on rank 0 only (None elsewhere), then every process learns whether it failed.

    An error of rank 0 is raised on every process (a :class:`MirsegError` as itself, anything else
    as a MirsegError naming it), so no process waits for a rank 0 that is gone. A collective under
    torchrun, and so also a barrier: no process goes on before rank 0 has done ``fn``.
    """
    if not rt.distributed:
        return fn()
    result, error = None, None
    if rt.is_main:
        try:
            result = fn()
        except Exception as exc:
            error = exc
    shared = broadcast(None if error is None else _portable(error), rt)
    if error is not None:
        raise error
    if shared is not None:
        raise shared
    return result


def _portable(error: Exception) -> MirsegError:
    """``error`` as the other processes can raise it: itself when a MirsegError that pickles, else one naming it."""
    if isinstance(error, MirsegError):
        try:
            return pickle.loads(pickle.dumps(error))
        except Exception:  # an exception class with extra __init__ arguments does not unpickle
            pass
    return MirsegError(f"rank 0 failed: {type(error).__name__}: {error}")


@dataclass
class Shards:
    """``count`` items cut into groups of ``group`` consecutive items; group g goes to process g mod world_size.

    Whole groups, not every W-th item: a job that batches within fixed groups (as
    :func:`mirseg.infer.iter_predictions` does) then forms the same batches in every process count,
    so its results are bit-identical to one process's. No item is repeated to even out the shards:
    the last group may be short, and the last round leaves some processes without a group.
    """

    count: int
    group: int
    rt: Runtime
    done: int = 0  # after merge: how many items (from the first) every process merged; the same on every process
    signum: int | None = None  # after merge: the signal it stopped on (SIGTERM if any process got one), else None

    def __post_init__(self) -> None:
        if self.group < 1:
            raise ValueError(f"a shard group holds at least one item, got {self.group}")

    @property
    def rounds(self) -> int:
        """How many rounds :meth:`merge` takes: one group per process each."""
        groups = -(-self.count // self.group)
        return -(-groups // self.rt.world_size)

    def indices(self) -> list[int]:
        """The positions (in the list) of this process's items, in order."""
        g, n = self.group, self.count
        firsts = range(self.rt.rank * g, n, g * self.rt.world_size)  # the first item of each of its groups
        return [i for first in firsts for i in range(first, min(first + g, n))]

    def merge(self, local: Iterable[T], stop: Callable[[], int | None] = lambda: None) -> Iterator[T]:
        """Every process's results of its :meth:`indices` (``local``, one per item, in order), on rank 0 in list
        order; nothing on the other processes (their loop body never runs), which still have to iterate.

        Each round, each process takes its group's results from ``local`` and votes ``stop()`` (a signal
        number, or None), and the round's groups go to rank 0 (an ``all_gather_object``). A ``local``
        that ends before its items (the job stopped at a group's end) or any vote ends the merge for
        every process after that round; rank 0 gets the groups in list order up to the first one
        missing. Then :attr:`done` is the number of items merged and :attr:`signum` the signal.
        """
        it = iter(local)
        w, g = self.rt.world_size, self.group
        for k in range(self.rounds):
            first = (k * w + self.rt.rank) * g  # this process's group of the round
            want = max(0, min(g, self.count - first))
            items = list(itertools.islice(it, want))
            sent = (items, len(items) == want, stop())
            parts = [sent]
            if self.rt.distributed:
                parts = [None] * w
                torch_dist.all_gather_object(parts, sent)  # in rank order, which is list order within the round
            complete = True
            for items, full, _ in parts:
                complete = complete and full
                if not complete:
                    break
                self.done += len(items)
                if self.rt.is_main:
                    yield from items
            votes = [vote for _, _, vote in parts if vote is not None]
            if votes:
                self.signum = signal.SIGTERM if signal.SIGTERM in votes else votes[0]
                return
            if not complete:  # a job only ends early when it is stopped, and then it votes
                raise RuntimeError(f"a process's results ended before its items (round {k} of {self.rounds})")
