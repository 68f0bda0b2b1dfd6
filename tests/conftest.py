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


@pytest.fixture(scope="session")
def trained_fastscnn(tmp_path_factory):
    """A FastSCNN trained once per session on generated shapes: (best checkpoint path, train set, val set).

    Classes: background, disc, box (ignore_blank_area false); images 96x128. mIoU on val > 0.8.
    """
    from mirseg.config import TrainConfig, build_config
    from mirseg.data.synthetic import make_dataset
    from mirseg.train import train

    root = tmp_path_factory.mktemp("trained_fastscnn")
    tr = make_dataset(root / "train", 24, num_classes=2, seed=1, labels=True)
    va = make_dataset(root / "val", 8, num_classes=2, seed=2, labels=True)
    cfg = build_config(TrainConfig, dict(
        train_ann=str(tr.ann), train_images=str(tr.images), val_ann=str(va.ann), val_images=str(va.images),
        crop_size=[64, 64], img_scale=[128, 96], samples_per_gpu=8, workers_per_gpu=0, lr=0.12, scale_lr=False,
        max_iters=300, interval=300, work_dir=str(root / "run")))
    result = train(cfg)
    assert result.best_metrics["mIoU"] > 0.8, result.best_metrics
    return Path(result.best), tr, va
