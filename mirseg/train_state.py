"""What a training run carries from one iteration to the next, and its exact save and restore in ``last.pth``.

:class:`TrainState` is the network, the optimiser, the schedule, the AMP loss scale, how far the run
got and the best evaluation so far. :meth:`TrainState.resume_state` is what ``last.pth`` keeps
besides the weights (with every process's random generators, gathered by :func:`rank_rng_states`),
and :meth:`TrainState.restore` puts it all back, so a resumed run takes the steps an uninterrupted
one takes (bit-exact on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from mirseg import dist


@dataclass
class TrainState:
    """What the loop changes and ``last.pth`` keeps (with the RNG), so that a resumed run continues exactly."""

    model: nn.Module  # the network; DistributedDataParallel around it under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # AMP loss scale (disabled on CPU)
    iteration: int = 0  # iterations done
    saved_at: int = 0  # the iteration last.pth holds (0: none yet)
    best: dict[str, Any] = field(default_factory=lambda: {"mIoU": -1.0, "iteration": 0, "metrics": {}})

    @property
    def net(self) -> nn.Module:
        """The network itself (without the DistributedDataParallel wrapper)."""
        return self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model

    def resume_state(self, rank_rng: list[Any] | None) -> dict[str, Any]:
        """What ``resume=true`` needs besides the weights, for :func:`mirseg.checkpoint.make_checkpoint`.

        ``rank_rng``: :func:`rank_rng_states` (None in a single process).
        """
        rng: dict[str, Any] = {"torch": torch.get_rng_state(),
                               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        if rank_rng is not None:  # under torchrun: each process's own state (dropout differs per process)
            rng["ranks"] = rank_rng
        out = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
               "best": self.best, "rng": rng}
        if self.scaler.is_enabled():  # AMP loss scale: a resumed run must not re-learn it
            out["scaler"] = self.scaler.state_dict()
        return out

    def restore(self, ckpt: dict[str, Any], rt: dist.Runtime) -> None:
        """Load a ``last.pth`` (weights and :meth:`resume_state`); each torchrun process continues its own
        random stream."""
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.iteration = self.saved_at = ckpt["iteration"]
        self.best = ckpt.get("best") or self.best
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and rt.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
        ranks = rng.get("ranks") or []
        if rt.distributed and len(ranks) == rt.world_size:
            torch.set_rng_state(ranks[rt.rank]["torch"])
            if ranks[rt.rank]["cuda"] is not None and rt.device.type == "cuda":
                torch.cuda.set_rng_state(ranks[rt.rank]["cuda"], rt.device)
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])


def rank_rng_states(rt: dist.Runtime) -> list[dict[str, Any]] | None:
    """Every process's RNG state (CPU, and its own CUDA device's), for rank 0's last.pth; None in one process.

    A collective: every process calls it at the same point.
    """
    if not rt.distributed:
        return None
    mine = {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None}
    states: list[Any] = [None] * rt.world_size
    torch_dist.all_gather_object(states, mine)
    return states
