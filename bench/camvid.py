"""CamVid as the benches read it: where it is, its classes, and ``mirseg train`` at a CPU's budget on it.

CamVid (480x360 street scenes, 11 classes, void = 255) lives in ``../shared/data/camvid`` beside the
checkout, read in place (its licence is research-only: never copied into the project): ``images/{train,val}``,
``labels/{train,val}`` (label PNGs of the same stems) and ``{train,val}.json`` (COCO; void unannotated).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mirseg.config import TrainConfig, build_config

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
"""The default CamVid folder: ``shared/data/camvid`` beside the checkout."""

CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian",
           "bicyclist"]
"""Label value i is ``CLASSES[i]``."""


def require(root: Path, layout: str = "labels", flag: str = "--camvid") -> Path:
    """``root``, or exit naming what is missing and the bench's ``flag`` that points elsewhere."""
    need = ([root / "train.json", root / "val.json"] if layout == "coco"
            else [root / "labels" / "train", root / "labels" / "val"])
    missing = [p for p in [root / "images" / "train", root / "images" / "val", *need] if not p.exists()]
    if missing:
        sys.exit(f"CamVid not found at {root} (no {missing[0]}); pass {flag} DIR")
    return root


def train_config(preset: str, root: Path, work_dir: str | Path, *, iters: int, batch: int = 4, workers: int = 2,
                 layout: str = "labels", **overrides: Any) -> TrainConfig:
    """``mirseg train`` of ``preset`` on CamVid scaled to a CPU: test scale 480x360, 360x480 crops, one evaluation
    at the end (``interval = iters``), 20 log lines; ``layout`` "coco" reads the JSON (void ignored as blank
    area), "labels" the label PNGs. ``overrides``: any other TrainConfig keys (they win)."""
    data: dict[str, Any] = {"class_names": CLASSES, "train_images": str(root / "images" / "train"),
                            "val_images": str(root / "images" / "val")}
    if layout == "coco":
        data.update(train_ann=str(root / "train.json"), val_ann=str(root / "val.json"), ignore_blank_area=True)
    else:
        data.update(train_labels=str(root / "labels" / "train"), val_labels=str(root / "labels" / "val"))
    return build_config(TrainConfig, {
        **data, "config_file": preset, "max_iters": iters, "interval": iters, "samples_per_gpu": batch,
        "workers_per_gpu": workers, "crop_size": [360, 480], "img_scale": [480, 360], "test_mode": "whole",
        "work_dir": str(work_dir), "log_interval": max(iters // 20, 1), **overrides})
