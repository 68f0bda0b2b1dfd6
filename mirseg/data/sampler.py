"""The order of training samples: an endless shuffled stream cut into iterations, the same after a resume."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class IterationSampler(Sampler[list[int]]):
    """Batches of indices for iterations ``start, start+1, ...`` of an endless shuffled stream.

    The stream is one permutation per epoch, drawn from ``(seed, epoch)``; iteration ``it`` takes
    stream positions ``[it*B, (it+1)*B)`` with ``B = batch * world_size``, and this process keeps
    its slice. The index of position p in epoch e is ``e * n + perm_e[p]``, which SegDataset turns
    into item ``perm_e[p]`` with the generator of ``(seed, e, item)``. So a resumed run sees exactly
    the batches and augmentations of an uninterrupted one, whatever the number of workers.
    """

    def __init__(self, n: int, batch: int, seed: int, start_iter: int, max_iters: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        self.start_iter, self.max_iters = start_iter, max_iters
        self.rank, self.world = rank, world_size

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __len__(self) -> int:
        return self.max_iters - self.start_iter

    def __iter__(self) -> Iterator[list[int]]:
        total = self.batch * self.world
        cache: dict[int, torch.Tensor] = {}
        for it in range(self.start_iter, self.max_iters):
            first = it * total + self.rank * self.batch
            batch = []
            for pos in range(first, first + self.batch):
                epoch, slot = divmod(pos, self.n)
                if epoch not in cache:
                    cache.clear()
                    cache[epoch] = self._perm(epoch)
                batch.append(epoch * self.n + int(cache[epoch][slot]))
            yield batch
