"""Make the pictures of the docs from mirseg's own outputs (reproducible, CPU, about a minute).

    python docs/make_images.py

``docs/images/infer_overlay.jpg``: a FastSCNN trained for 300 iterations on generated shapes
(background, disc, box; 96x128 training images, the toy model of the tests), then ``run_inference``
with ``save_overlay=true`` on three new 192x256 scenes (top row: the images; bottom row: the overlays
exactly as written to ``overlay/``, at the images' original size).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))  # tests/toy.py: the toy model

from toy import train_toy_fastscnn  # noqa: E402

from mirseg.config import InferConfig, build_config  # noqa: E402
from mirseg.data.images import write_image  # noqa: E402
from mirseg.data.synthetic import make_dataset  # noqa: E402
from mirseg.infer import run_inference  # noqa: E402

OUT = Path(__file__).resolve().parent / "images"


def toy_model(root: Path) -> Path:
    """The tests' toy FastSCNN (tests/toy.py); returns its best checkpoint."""
    return train_toy_fastscnn(root).result.best


def infer_overlay(root: Path, ckpt: Path) -> np.ndarray:
    """Images (top) over their overlays (bottom), 4 px white gaps, BGR."""
    scenes = make_dataset(root / "demo", 3, size=(192, 256), num_classes=2, seed=22)  # discs and boxes
    run_inference(build_config(InferConfig, dict(checkpoint=str(ckpt), images=str(scenes.images),
                                                 out_dir=str(root / "infer"), save_overlay=True, workers_per_gpu=0)))
    names = sorted(p.stem for p in scenes.images.glob("*.png"))
    top = [cv2.imread(str(scenes.images / f"{n}.png")) for n in names]
    bottom = [cv2.imread(str(root / "infer" / "overlay" / f"{n}.jpg")) for n in names]

    def row(tiles: list[np.ndarray]) -> np.ndarray:
        gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
        return np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)

    a, b = row(top), row(bottom)
    return np.concatenate([a, np.full((4, a.shape[1], 3), 255, np.uint8), b], axis=0)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mirseg-docs-") as tmp:
        root = Path(tmp)
        picture = infer_overlay(root, toy_model(root))
    path = OUT / "infer_overlay.jpg"
    write_image(path, picture[..., ::-1], (cv2.IMWRITE_JPEG_QUALITY, 80))  # picture is BGR
    print(f"wrote {path} ({picture.shape[1]}x{picture.shape[0]}, {path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
