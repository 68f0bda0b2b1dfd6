"""Deterministic weights and inputs for the architecture-parity tests (recipe: tests/data/parity/README.md).

Each tensor's values depend on its state-dict key (plus an optional salt) and nothing else, so our
networks and mmsegmentation's, which share key names, get the same weights without any weight file.
The stored reference logits in tests/data/parity/ were made with exactly these values, so every rule
below (seed, distribution, scale, and the order of the arithmetic) is part of the fixture format.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import torch


def _rng(key: str, salt: str) -> torch.Generator:
    """A CPU generator seeded with the CRC-32 of ``salt + key``."""
    return torch.Generator().manual_seed(zlib.crc32(f"{salt}{key}".encode()))


def fill_tensor(key: str, shape: Sequence[int], salt: str = "") -> torch.Tensor:
    """The fixture value of one state-dict entry, chosen by the key's suffix and the tensor's rank."""
    size = tuple(int(d) for d in shape)
    if key.endswith("num_batches_tracked"):
        return torch.zeros(size, dtype=torch.long)
    rng = _rng(key, salt)
    if key.endswith("running_var"):
        # BN variance: uniform in [0.5, 1.5), so positive and near 1.
        return torch.rand(size, generator=rng) + 0.5
    if key.endswith("running_mean"):
        return torch.randn(size, generator=rng) * 0.1
    if len(size) > 1:
        # Conv / linear weight (out, in, *k): std 0.6 / sqrt(fan_in) keeps activations O(1) through deep nets.
        # Scale first, then divide: the reference logits were made in this order.
        fan_in = math.prod(size[1:])
        return torch.randn(size, generator=rng) * 0.6 / fan_in**0.5
    if key.endswith("weight"):
        # Norm scale near 1.
        return torch.randn(size, generator=rng) * 0.1 + 1.0
    # Every remaining 1-D tensor is a bias (conv, norm or linear).
    return torch.randn(size, generator=rng) * 0.02


def fill_state_dict(state_dict: Mapping[str, torch.Tensor], salt: str = "") -> dict[str, torch.Tensor]:
    """New tensors for every key of ``state_dict`` (only the keys and shapes are read)."""
    return {key: fill_tensor(key, value.shape, salt) for key, value in state_dict.items()}


def parity_input(shape: Sequence[int], salt: str = "") -> torch.Tensor:
    """A normalised-image-like input, standard normal, e.g. shape (2, 3, 64, 128)."""
    return torch.randn(tuple(int(d) for d in shape), generator=_rng("input", salt))
