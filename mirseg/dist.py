"""Process-group and device set-up for one process or ``torchrun`` across GPUs and machines."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from mirseg.errors import ConfigError


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


def setup(device: str = "auto") -> Runtime:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1); NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not torch_dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank, world, local_rank)


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
