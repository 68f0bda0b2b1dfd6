"""Shared fixtures: the parity test data shipped in tests/data/parity, the slow marker, a trained toy model."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

import parity_fill  # tests/parity_fill.py: pytest puts this folder (no __init__.py) on sys.path
import pytest
import toy  # tests/toy.py, likewise

PARITY = Path(__file__).resolve().parent / "data" / "parity"
RUN_SLOW = os.environ.get("RUN_SLOW", "") not in ("", "0")
_WEIGHTS = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Point pretrained=auto at an empty weights folder: weights a developer or the image has downloaded must not
    change what the tests train (subprocesses inherit it; YMIR tasks read it before /weights)."""
    os.environ["MIRSEG_WEIGHTS"] = config.stash[_WEIGHTS] = tempfile.mkdtemp(prefix="mirseg-test-weights-")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _WEIGHTS in config.stash:
        shutil.rmtree(config.stash[_WEIGHTS], ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.slow`` tests (long end-to-end runs) run only with RUN_SLOW=1, as CI sets it."""
    if RUN_SLOW:
        return
    skip = pytest.mark.skip(reason="slow: set RUN_SLOW=1 (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """tests/data/parity: mmsegmentation's architectures.json and reference logits (``<arch>.npz``)."""
    return PARITY


@pytest.fixture(scope="session")
def fill() -> ModuleType:
    """The deterministic filler (tests/parity_fill.py: fill_state_dict, parity_input) the references were made with."""
    return parity_fill


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny inputs gain nothing from a second thread, and OpenMP's barriers stall badly when the
    other core is busy (parallel test runs): one thread keeps such tests fast and steady."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> toy.ToyRun:
    """The toy FastSCNN (tests/toy.py), trained once per session: every test that needs a trained model shares it."""
    run = toy.train_toy_fastscnn(tmp_path_factory.mktemp("trained_fastscnn"))
    assert run.result.best_metrics["mIoU"] > 0.8, run.result.best_metrics
    return run


@pytest.fixture(scope="session")
def trained_fastscnn(toy_run):
    """The toy model as (best checkpoint path, train set, val set).

    Classes: background, disc, box (ignore_blank_area false); images 96x128. mIoU on val > 0.8.
    """
    return toy_run.result.best, toy_run.train_set, toy_run.val_set
