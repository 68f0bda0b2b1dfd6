"""The tests' toy model: a FastSCNN trained in ~15 s on generated shapes (tests/conftest.py trains it once per
session; docs/make_images.py draws the docs' picture with it).

Classes: background, disc, box (ignore_blank_area false); 24 training and 8 validation images, 96x128;
300 iterations of batch 8 on 64x64 crops; mIoU on the validation images > 0.8.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirseg.config import TrainConfig, build_config
from mirseg.data.synthetic import SyntheticSet, make_dataset
from mirseg.train import TrainResult, train

ITERS = 300


def shapes_config(train_set: SyntheticSet, val_set: SyntheticSet, work_dir: str | Path, **keys: Any) -> TrainConfig:
    """The toy training's config on generated shapes; ``keys`` override (max_iters, interval, ...)."""
    values = dict(train_ann=str(train_set.ann), train_images=str(train_set.images), val_ann=str(val_set.ann),
                  val_images=str(val_set.images), crop_size=[64, 64], img_scale=[128, 96], samples_per_gpu=8,
                  workers_per_gpu=0, lr=0.12, lr_scaling="none", work_dir=str(work_dir), pretrained="none")
    return build_config(TrainConfig, {**values, **keys})


@dataclass
class ToyRun:
    """The toy training: its result (checkpoints in ``result.work_dir``) and the data it saw."""

    result: TrainResult
    train_set: SyntheticSet
    val_set: SyntheticSet


def shapes(root: str | Path) -> tuple[SyntheticSet, SyntheticSet]:
    """The toy training and validation sets (COCO and label PNGs), generated under ``root``."""
    root = Path(root)
    return (make_dataset(root / "train", 24, num_classes=2, seed=1, labels=True),
            make_dataset(root / "val", 8, num_classes=2, seed=2, labels=True))


def train_toy_fastscnn(root: str | Path) -> ToyRun:
    """Generate the shapes under ``root`` and train the toy FastSCNN into ``root/run``."""
    tr, va = shapes(root)
    result = train(shapes_config(tr, va, Path(root) / "run", max_iters=ITERS, interval=ITERS))
    return ToyRun(result, tr, va)
