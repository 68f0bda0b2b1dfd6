"""Draw ``docs/images/mining_rsal.jpg``: the superpixels RSAL chooses on a generated image.

    python docs/make_mining_image.py [--out docs/images/mining_rsal.jpg]

Trains a FastSCNN on generated shapes for 300 iterations (about 15 s on 2 CPU cores, seeded), mines
a pool of 8 new generated images with ``mirseg mine``'s RSAL (``save_masks``), and puts the top
image next to its overlay: the chosen superpixels tinted and outlined, the rest dimmed, and every
superpixel boundary drawn faintly so the choice can be seen among the candidates.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mirseg.config import MineConfig, TrainConfig, build_config  # noqa: E402
from mirseg.data.images import read_image, write_image  # noqa: E402
from mirseg.data.synthetic import make_dataset  # noqa: E402
from mirseg.mine import mine  # noqa: E402
from mirseg.mining.superpixels import superpixels  # noqa: E402
from mirseg.train import train  # noqa: E402

SIZE = (192, 256)  # (h, w) of the pictured scene
MAX_SUPERPIXELS = 192


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "images" / "mining_rsal.jpg"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    with tempfile.TemporaryDirectory(prefix="mirseg-doc-") as tmp_name:
        tmp = Path(tmp_name)
        tr = make_dataset(tmp / "train", 24, num_classes=3, seed=1, labels=True)
        va = make_dataset(tmp / "val", 8, num_classes=3, seed=2, labels=True)
        pool = make_dataset(tmp / "pool", 8, size=SIZE, num_classes=3, seed=7)
        result = train(build_config(TrainConfig, dict(
            train_ann=str(tr.ann), train_images=str(tr.images), val_ann=str(va.ann), val_images=str(va.images),
            crop_size=[64, 64], img_scale=[128, 96], samples_per_gpu=8, workers_per_gpu=0, lr=0.12,
            lr_scaling="none", max_iters=300, interval=300, seed=0, work_dir=str(tmp / "run"))))
        mined = mine(build_config(MineConfig, dict(
            checkpoint=str(result.best), images=str(pool.images), out_dir=str(tmp / "mine"), mining_algorithm="rsal",
            img_scale=[SIZE[1], SIZE[0]], max_superpixel_per_image=MAX_SUPERPIXELS, superpixel_cell=0,
            max_kept_mining_image=1, save_masks=True, workers_per_gpu=0)))
        top = mined.ranking[0][0]
        image = read_image(top)  # (h, w, 3) RGB
        overlay = cv2.cvtColor(cv2.imread(str(tmp / "mine" / "overlays" / f"{Path(top).stem}.jpg")), cv2.COLOR_BGR2RGB)
        mask = cv2.imread(str(tmp / "mine" / "masks" / f"{Path(top).stem}.png"), cv2.IMREAD_GRAYSCALE) > 0
    labels = superpixels(image, "slico", MAX_SUPERPIXELS)  # the same map RSAL used (working size = image size)
    edges = np.zeros(labels.shape, bool)
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edges[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edges &= ~(cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0)  # keep the chosen outlines clean
    faint = overlay.copy()
    faint[edges] = (faint[edges] * 0.6 + 255 * 0.4).astype(np.uint8)  # every other superpixel, faintly
    gap = np.full((SIZE[0], 8, 3), 255, np.uint8)
    picture = np.concatenate([image, gap, faint], axis=1)
    picture = cv2.resize(picture, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    out = Path(args.out)
    write_image(out, picture, (cv2.IMWRITE_JPEG_QUALITY, 70))
    print(f"{out}: {out.stat().st_size / 1024:.0f} KB, top image {Path(top).name} score {mined.ranking[0][1]:.3f}")


if __name__ == "__main__":
    main()
