"""Small generated segmentation datasets, for the tests and the demo (no files shipped, no download).

Scenes are textured, noisy backgrounds with objects of a few classes, each class with its own
shape and colour family; sizes and counts vary and the classes are imbalanced. Written as images
plus a COCO JSON (polygons), and optionally label PNGs for the second layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# Class name -> (shape, base RGB colour). The order is the class order of the written JSON.
CLASSES: dict[str, tuple[str, tuple[int, int, int]]] = {
    "disc": ("circle", (200, 60, 50)),
    "box": ("rect", (50, 90, 200)),
    "tri": ("triangle", (60, 170, 70)),
}


@dataclass
class SyntheticSet:
    """Where a generated split was written."""

    images: Path
    ann: Path
    labels: Path | None
    class_names: list[str]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A grey-brown gradient with blurred noise texture, (h, w, 3) float32."""
    base = rng.uniform(90, 160, size=3)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    grad = (gx / max(w - 1, 1) * rng.uniform(-30, 30) + gy / max(h - 1, 1) * rng.uniform(-30, 30))[..., None]
    noise = cv2.GaussianBlur(rng.normal(0, 18, size=(h, w, 3)).astype(np.float32), (0, 0), 1.5)
    return base[None, None].astype(np.float32) + grad + noise


def _shape_polygon(kind: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An (K, 2) int polygon of the given kind at a random place and size."""
    size = rng.uniform(0.12, 0.3) * min(h, w)
    cx, cy = rng.uniform(size, w - size), rng.uniform(size, h - size)
    if kind == "circle":
        return cv2.ellipse2Poly((int(cx), int(cy)), (int(size), int(size * rng.uniform(0.7, 1.0))),
                                int(rng.uniform(0, 180)), 0, 360, 15)
    if kind == "rect":
        half = np.array([size, size * rng.uniform(0.5, 1.0)])
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
    else:
        angles = np.deg2rad([90, 210, 330]) + rng.uniform(0, 2 * np.pi)
        corners = np.stack([np.cos(angles), np.sin(angles)], 1) * size * 1.2
    t = rng.uniform(0, np.pi)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return np.round(corners @ rot.T + [cx, cy]).astype(np.int32)


def make_dataset(
    out_dir: str | Path,
    num_images: int,
    size: tuple[int, int] = (96, 128),
    num_classes: int = 3,
    seed: int = 0,
    labels: bool = False,
    prefix: str = "img",
) -> SyntheticSet:
    """Write ``num_images`` scenes of ``size`` (h, w) with the first ``num_classes`` classes of ``CLASSES``.

    Returns the image folder, the COCO JSON (``annotations.json``, polygons, category ids starting
    at 1) and, with ``labels=True``, a folder of label PNGs (0 = background, class k = k + 1).
    """
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be 1..{len(CLASSES)}")
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir = out / "labels" if labels else None
    if lbl_dir:
        lbl_dir.mkdir(exist_ok=True)
    names = list(CLASSES)[:num_classes]
    rng = np.random.default_rng(seed)
    h, w = size
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(names)]}
    ann_id = 1
    for i in range(num_images):
        image = _background(rng, h, w)
        label = np.zeros((h, w), np.uint8)
        # Imbalance: the first class is common, later ones rarer.
        count = rng.integers(1, 4)
        for _ in range(count):
            k = int(min(rng.choice(num_classes, p=_class_prior(num_classes)), num_classes - 1))
            kind, colour = CLASSES[names[k]]
            poly = _shape_polygon(kind, rng, h, w)
            mask = np.zeros((h, w), np.uint8)
            cv2.fillPoly(mask, [poly], 1)
            tint = np.array(colour, np.float32) + rng.normal(0, 15, size=3)
            shade = cv2.GaussianBlur(rng.normal(0, 12, size=(h, w)).astype(np.float32), (0, 0), 2)[..., None]
            image = np.where(mask[..., None] > 0, tint[None, None] + shade, image)
            label[mask > 0] = k + 1
            coco["annotations"].append({
                "id": ann_id, "image_id": i + 1, "category_id": k + 1, "iscrowd": 0,
                "segmentation": [poly.reshape(-1).astype(float).tolist()],
                "area": float(mask.sum()), "bbox": [float(v) for v in cv2.boundingRect(poly)],
            })
            ann_id += 1
        image = np.clip(image + rng.normal(0, 6, size=image.shape), 0, 255).astype(np.uint8)
        name = f"{prefix}_{i:04d}.png"
        cv2.imwrite(str(img_dir / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if lbl_dir:
            cv2.imwrite(str(lbl_dir / name), label)
        coco["images"].append({"id": i + 1, "file_name": name, "height": h, "width": w})
    ann = out / "annotations.json"
    ann.write_text(json.dumps(coco))
    return SyntheticSet(img_dir, ann, lbl_dir, names)


def _class_prior(k: int) -> np.ndarray:
    p = np.array([0.55, 0.3, 0.15][:k])
    return p / p.sum()
