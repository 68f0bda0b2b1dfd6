"""Shared fixtures: where the read-only shared material lives."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MIRSEG_SHARED", REPO.parent / "shared"))
PARITY = SHARED / "parity"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not (PARITY / "architectures.json").is_file():
        pytest.fail(f"parity fixtures not found at {PARITY}; set MIRSEG_SHARED to the shared/ folder")
    return PARITY


@pytest.fixture(scope="session")
def fill(parity_dir: Path):
    """The fixture's ``fill.py`` module (fill_state_dict, parity_input)."""
    spec = importlib.util.spec_from_file_location("parity_fill", parity_dir / "fill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
