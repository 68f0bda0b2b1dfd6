"""What a training run carries from one iteration to the next, and its exact save and restore in ``last.pth``.

:class:`TrainState` is the network, the optimiser, the schedule, the AMP loss scale, how far the run
got, the best evaluation so far and the steps' layout and precision. :meth:`TrainState.resume_state` is
what ``last.pth`` keeps besides the weights (with every process's random generators, gathered by
:func:`rank_rng_states`), and :meth:`TrainState.restore` puts it all back, so a resumed run takes the
steps an uninterrupted one takes (bit-exact on CPU). :class:`LossWindow` holds the loss values of the
iterations since the loop last read them, on the device; :class:`LoopClock` where the loop's time goes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from mirseg import dist
from mirseg.layout import Choice

log = logging.getLogger("mirseg")


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
    steps: Choice | None = None  # the steps' memory layout and autocast dtype (mirseg.layout.for_training)

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
               "best": self.best, "rng": rng, "layout": self.steps.record() if self.steps else {}}
        if self.scaler.is_enabled():  # AMP loss scale: a resumed run must not re-learn it
            out["scaler"] = self.scaler.state_dict()
        return out

    def restore(self, ckpt: dict[str, Any], rt: dist.Runtime) -> None:
        """Load a ``last.pth`` (weights and :meth:`resume_state`); each torchrun process continues its own
        random stream."""
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:  # the kernel is this run's device's choice (fused on CUDA)
            group.update({k: self.optimizer.defaults[k] for k in ("fused", "foreach") if k in self.optimizer.defaults})
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.iteration = self.saved_at = ckpt["iteration"]
        self.best = ckpt.get("best") or self.best
        self.steps = Choice.from_record(ckpt.get("layout"))  # kept by the resumed run: the same steps
        rng = ckpt["rng"]
        ranks = rng.get("ranks") or []
        own = ranks[rt.rank] if rt.distributed and len(ranks) == rt.world_size else None
        if rt.distributed and own is None:
            log.warning("last.pth was saved by %d processes, not %d: every process resumes rank 0's random "
                        "generators, so the run is not the one an uninterrupted run would have been",
                        len(ranks) or 1, rt.world_size)
        torch.set_rng_state(own["torch"] if own else rng["torch"])
        if rt.device.type == "cuda":  # only this process's device: the machine may have fewer GPUs than the saver's
            index = rt.device.index if rt.device.index is not None else torch.cuda.current_device()
            cuda = own["cuda"] if own else (rng["cuda"][index] if index < len(rng["cuda"]) else None)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, rt.device)
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


def poly_lr(base_lr: float, min_lr: float, power: float, max_iters: int,
            warmup_iters: int = 0) -> Callable[[int], float]:
    """Factor on ``base_lr`` at iteration ``it``: mmcv's ``(base - min) * (1 - it/max)^power + min``, times a
    linear warm-up from 0.1 to 1 over the first ``warmup_iters`` (mmcv's ``warmup='linear'``, ratio 0.1)."""
    def factor(it: int) -> float:
        poly = ((base_lr - min_lr) * (1 - min(it, max_iters) / max_iters) ** power + min_lr) / base_lr
        return poly * (1 - 0.9 * (1 - it / warmup_iters)) if it < warmup_iters else poly
    return factor


class LossWindow:
    """The loss parts of the iterations since the last :meth:`take`, as tensors on the training device.

    Reading a CUDA tensor as a number makes the CPU wait until the GPU has done all queued work, so a loop
    that printed every iteration's loss would run in lock-step with the GPU. The loop adds each iteration's
    parts here (one small stack kernel, no wait) and takes them all at once every ``log_interval`` iterations
    and before each checkpoint: one copy to the host per window.
    """

    def __init__(self) -> None:
        self.first = 1  # the iteration of the first row
        self.names: tuple[str, ...] = ()
        self.rows: list[torch.Tensor] = []  # one (P,) tensor per iteration, P = len(names)

    def add(self, iteration: int, parts: dict[str, torch.Tensor]) -> None:
        """Keep ``parts`` (0-d tensors, :func:`mirseg.loss.segmentation_loss`) of iteration ``iteration``."""
        if not self.rows:
            self.first, self.names = iteration, tuple(parts)
        self.rows.append(torch.stack([parts[k].float() for k in self.names]))

    def take(self) -> tuple[dict[str, float], str | None]:
        """Read and forget the rows kept (one copy to the host): the last iteration's parts as numbers, and
        ``"<value> at iteration <k> (found reading iterations <a>-<b>)"`` for the first non-finite total, else None."""
        if not self.rows:
            return {}, None
        values = torch.stack(self.rows).cpu()  # (n, P): row i is iteration first + i
        self.rows = []
        total = values[:, self.names.index("total")]
        bad = (~torch.isfinite(total)).nonzero()
        where = None
        if len(bad):
            k = int(bad[0])
            where = (f"{float(total[k])} at iteration {self.first + k} (found reading iterations {self.first}-"
                     f"{self.first + len(values) - 1})")
        return dict(zip(self.names, values[-1].tolist())), where


class LoopClock:
    """Where the training loop's wall time goes: waiting for the loader, evaluating (with the checkpoints it
    writes), and the rest, the steps themselves.

    The job-level throughput figure of issue 15: on a machine whose data workers compete with the step for
    the same cores, ``data_share`` is the part of the loop spent waiting for batches. On CUDA the steps are
    queued, so a step's GPU time shows where the host waits for it (reading the losses, the next batch's copy).
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.iterations = 0
        self.data_s = 0.0  # waiting for the next batch
        self.eval_s = 0.0  # inside evaluating()

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The loader's batches, timing each wait for one."""
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.data_s += time.perf_counter() - t0
            self.iterations += 1
            yield batch

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Time the block as evaluation, not training."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.eval_s += time.perf_counter() - t0

    def summary(self) -> dict[str, float]:
        """``seconds`` since the start, ``iterations``, ``s_per_iter`` of training alone (no evaluation), the
        ``data_share`` of that spent waiting for batches, ``data_s``, ``eval_s`` and ``step_s`` (the rest)."""
        total = time.perf_counter() - self.start
        training = max(total - self.eval_s, 1e-9)
        n = max(self.iterations, 1)
        return {"seconds": total, "iterations": float(self.iterations), "s_per_iter": training / n,
                "data_share": self.data_s / training, "data_s": self.data_s, "eval_s": self.eval_s,
                "step_s": training - self.data_s}

    def line(self, s: dict[str, float] | None = None) -> str:
        """``0.512 s/iteration (12% waiting for data)`` for the log, of ``s`` (default: :meth:`summary` now)."""
        s = s or self.summary()
        return f"{s['s_per_iter']:.3f} s/iteration ({100 * s['data_share']:.0f}% waiting for data)"
