"""The networks of the per-architecture tests: one of each family in the default suite, the larger variants of
the same code (deeplabv3plus_r18b/_r50, hrnet_w18, ocrnet_hr18) marked slow, so they run with RUN_SLOW=1 (CI)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from mirseg.models import MODELS

FAMILIES = ("fastscnn", "deeplabv3plus_r18", "hrnet_w18s", "ocrnet_hr18s")


def one_per_family(names: Iterable[str] = MODELS, default: Iterable[str] = FAMILIES) -> list:
    """``names`` as pytest parameters, those outside ``default`` (one per family) marked slow."""
    keep = set(default)
    return [n if n in keep else pytest.param(n, marks=pytest.mark.slow) for n in names]


FASTEST = ("fastscnn",)
"""For tests whose cost is tracing or exporting a whole network: FastSCNN by default, the rest in CI."""
