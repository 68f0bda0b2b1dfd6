"""Shared fixtures: the parity test data shipped in tests/data/parity, the slow and cuda markers, a trained toy
model.

The suite runs in pytest-xdist workers (``-n auto`` in pyproject.toml): each worker keeps to one torch/OpenMP
thread, since two workers with two threads each on two cores slow every step 10-100x, and the toy model is
trained once for all workers (the first to ask trains it under a file lock; the others load what it saved).
"""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

import parity_fill  # tests/parity_fill.py: pytest puts this folder (no __init__.py) on sys.path
import pytest
import torch
import toy  # tests/toy.py, likewise

PARITY = Path(__file__).resolve().parent / "data" / "parity"
RUN_SLOW = os.environ.get("RUN_SLOW", "") not in ("", "0")
IN_WORKER = "PYTEST_XDIST_WORKER" in os.environ
_WEIGHTS = pytest.StashKey[str]()
_CACHE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Point pretrained=auto at an empty weights folder: weights a developer or the image has downloaded must not
    change what the tests train (subprocesses inherit it; YMIR tasks read it before /weights). Likewise the layout
    cache (mirseg.layout): the tests neither read nor write the developer's."""
    os.environ["MIRSEG_WEIGHTS"] = config.stash[_WEIGHTS] = tempfile.mkdtemp(prefix="mirseg-test-weights-")
    os.environ["MIRSEG_CACHE"] = config.stash[_CACHE] = tempfile.mkdtemp(prefix="mirseg-test-cache-")
    if IN_WORKER:  # subprocesses the tests start inherit the one-thread rule
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    for key in (_WEIGHTS, _CACHE):
        if key in config.stash:
            shutil.rmtree(config.stash[key], ignore_errors=True)


def _uses_toy(item: pytest.Item) -> bool:
    return bool({"toy_run", "trained_fastscnn"} & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.slow`` tests (long end-to-end runs) run only with RUN_SLOW=1, as CI sets it;
    ``@pytest.mark.cuda`` tests only where torch sees a CUDA GPU (``pytest -m cuda`` runs just them).

    The first test file that needs the toy model runs first and the other such files last, each file kept
    whole (its module fixtures are set up once): one worker trains the toy while the others run the tests
    that do not need it, instead of waiting on its lock."""
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(str(item.path), []).append(item)
    toy_files = [f for f, group in files.items() if any(_uses_toy(i) for i in group)]
    order = toy_files[:1] + [f for f in files if f not in toy_files] + toy_files[1:]
    items[:] = [item for f in order for item in files[f]]
    slow = pytest.mark.skip(reason="slow: set RUN_SLOW=1 (CI does)")
    cuda = pytest.mark.skip(reason="cuda: torch.cuda.is_available() is False on this machine")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not RUN_SLOW:
            item.add_marker(slow)
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(cuda)


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
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> toy.ToyRun:
    """The toy FastSCNN (tests/toy.py), trained once per run of the suite: every test that needs a trained model
    shares it, across xdist workers too (their base temp folders sit side by side in one parent)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if IN_WORKER else base) / "trained_fastscnn"
    root.mkdir(exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        saved = root / "run.pickle"
        if saved.exists():
            return pickle.loads(saved.read_bytes())
        run = toy.train_toy_fastscnn(root)
        assert run.result.best_metrics["mIoU"] > 0.8, run.result.best_metrics
        saved.write_bytes(pickle.dumps(run))
        return run


@pytest.fixture(scope="session")
def trained_fastscnn(toy_run):
    """The toy model as (best checkpoint path, train set, val set).

    Classes: background, disc, box (ignore_blank_area false); images 96x128. mIoU on val > 0.8.
    """
    return toy_run.result.best, toy_run.train_set, toy_run.val_set
