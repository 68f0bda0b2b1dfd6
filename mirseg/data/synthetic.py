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
from pycocotools import mask as mask_utils

from mirseg.data.images import write_image
from mirseg.fileio import write_atomic

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


def _folders(out_dir: str | Path, labels: bool) -> tuple[Path, Path, Path | None]:
    """``out_dir``, its ``images/`` and (with ``labels``) ``labels/`` folders, created."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if labels:
        (out / "labels").mkdir(exist_ok=True)
    return out, out / "images", out / "labels" if labels else None


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
    out, img_dir, lbl_dir = _folders(out_dir, labels)
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
        write_image(img_dir / name, image)
        if lbl_dir:
            write_image(lbl_dir / name, label)
        coco["images"].append({"id": i + 1, "file_name": name, "height": h, "width": w})
    ann = out / "annotations.json"
    write_atomic(ann, json.dumps(coco))
    return SyntheticSet(img_dir, ann, lbl_dir, names)


def _class_prior(k: int) -> np.ndarray:
    p = np.array([0.55, 0.3, 0.15][:k])
    return p / p.sum()


# ---------------------------------------------------------------------------------------------
# Street-like scenes for the demo: several classes, perspective, textures, class imbalance and a
# domain shift (day / fog / night) that a model trained on day scenes finds hard.

STREET_CLASSES = ["sky", "building", "road", "car", "person"]
DOMAINS = ("day", "fog", "night")


def _street_scene(rng: np.random.Generator, h: int, w: int, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (h, w, 3) uint8 RGB and (h, w) uint8 label (0 = unannotated clutter, k + 1 = class k)."""
    sky, building, road, car, person = (i + 1 for i in range(len(STREET_CLASSES)))
    label = np.zeros((h, w), np.uint8)
    image = np.zeros((h, w, 3), np.float32)
    horizon = int(h * rng.uniform(0.38, 0.55))
    gy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    top, bottom = np.array([70, 120, 200], np.float32), np.array([170, 200, 235], np.float32)
    image[:] = top * (1 - gy) + bottom * gy  # sky gradient everywhere, painted over below
    label[:horizon] = sky
    # Buildings: a row of boxes along the horizon, each with its colour and a window grid.
    x = int(rng.integers(-w // 8, w // 16))
    while x < w:
        bw = int(rng.uniform(0.12, 0.3) * w)
        btop = int(rng.uniform(0.05, 0.8) * horizon)
        colour = rng.uniform(80, 190) * np.array([1.0, 0.92, 0.85]) * rng.uniform(0.8, 1.1, 3)
        x0, x1, y1 = max(x, 0), min(x + bw, w), horizon + int(0.04 * h)
        image[btop:y1, x0:x1] = colour
        win = max(3, bw // 8)
        for wy in range(btop + win // 2, y1 - win, win * 2):
            for wx in range(x0 + win // 2, x1 - win, win * 2):
                image[wy:wy + win, wx:wx + win] = colour * 0.45
        label[btop:y1, x0:x1] = building
        x += bw + int(rng.integers(0, max(w // 20, 2)))
    # Trees: unannotated green blobs in front of the buildings (the "background" class).
    for _ in range(int(rng.integers(0, 3))):
        cx, cy, r = int(rng.uniform(0, w)), int(horizon - rng.uniform(0, 0.15) * h), int(rng.uniform(0.05, 0.1) * h)
        mask = np.zeros((h, w), np.uint8)
        cv2.circle(mask, (cx, cy), r, 1, -1)
        image[mask > 0] = np.array([50, 110, 45], np.float32) * rng.uniform(0.7, 1.2)
        label[mask > 0] = 0
    # Ground below the horizon (unannotated), and the road: a trapezoid towards a vanishing point.
    image[horizon:] = np.array([110, 105, 95], np.float32)
    label[horizon:] = 0
    vx = w * rng.uniform(0.4, 0.6)
    road_poly = np.array([[vx - 0.03 * w, horizon], [vx + 0.03 * w, horizon], [w * 1.1, h], [-0.1 * w, h]], np.int32)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [road_poly], 1)
    image[mask > 0] = np.array([75, 75, 80], np.float32)
    label[mask > 0] = road
    for t in np.linspace(0.1, 0.9, 5):  # dashed lane marks are road too
        y = int(horizon + t * (h - horizon))
        half = max(1, int(t * 0.01 * w))
        image[y:y + max(1, int(t * 0.03 * h)), int(vx) - half:int(vx) + half + 1] = 230
    # Cars on the road, larger when nearer; people at the road side (rare).
    for _ in range(int(rng.integers(0, 4))):
        t = rng.uniform(0.2, 0.9)
        y = horizon + t * (h - horizon)
        cw, ch = t * 0.35 * w, t * 0.18 * h
        cx = vx + rng.uniform(-0.8, 0.8) * t * w * 0.5
        x0, y0 = int(cx - cw / 2), int(y - ch)
        colour = rng.choice([[180, 30, 30], [30, 60, 170], [220, 220, 220], [30, 30, 30], [200, 170, 40]])
        cv2.rectangle(image, (x0, y0), (int(x0 + cw), int(y)), [float(c) for c in colour], -1)
        cv2.rectangle(label, (x0, y0), (int(x0 + cw), int(y)), car, -1)
        cv2.rectangle(image, (int(x0 + cw * 0.15), y0 + 1), (int(x0 + cw * 0.85), int(y0 + ch * 0.4)),
                      (40, 50, 60), -1)
    if rng.random() < 0.5:
        t = rng.uniform(0.3, 0.8)
        y = int(horizon + t * (h - horizon))
        ph = t * 0.45 * h
        side = rng.choice([-1, 1])
        px = int(vx + side * (0.2 + t * 0.5) * w * 0.6)
        colour = [float(c) for c in rng.uniform(40, 220, 3)]
        for img, value in ((image, colour), (label, person)):
            cv2.ellipse(img, (px, int(y - ph * 0.4)), (max(1, int(ph * 0.12)), max(1, int(ph * 0.4))), 0, 0, 360,
                        value, -1)
            cv2.circle(img, (px, int(y - ph * 0.88)), max(1, int(ph * 0.1)), value, -1)
    # Texture and noise, then the domain.
    image += cv2.GaussianBlur(rng.normal(0, 10, size=(h, w, 3)).astype(np.float32), (0, 0), 1.2)
    if domain == "fog":
        image = image * 0.45 + np.float32(175) * 0.55
    elif domain == "night":
        image = image * 0.3 + rng.normal(0, 8, size=image.shape).astype(np.float32)
    elif domain != "day":
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    return np.clip(image + rng.normal(0, 4, size=image.shape), 0, 255).astype(np.uint8), label


def make_street_dataset(
    out_dir: str | Path,
    num_images: int,
    size: tuple[int, int] = (128, 256),
    seed: int = 0,
    domains: dict[str, float] | None = None,
    labels: bool = False,
    prefix: str = "street",
) -> SyntheticSet:
    """Write ``num_images`` street-like scenes; classes :data:`STREET_CLASSES`, COCO with one RLE per class.

    ``domains`` maps "day" / "fog" / "night" to their share (default all day); an image's domain is
    the first part of its file name (``<domain>_<prefix>_0003.png``), so a result list tells where
    each image came from. Unannotated clutter (trees, verge) is class 0 in the label PNGs.
    """
    out, img_dir, lbl_dir = _folders(out_dir, labels)
    shares = domains or {"day": 1.0}
    names, probs = list(shares), np.array(list(shares.values()), np.float64)
    rng = np.random.default_rng(seed)
    h, w = size
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": n, "supercategory": "street"} for i, n in enumerate(STREET_CLASSES)]}
    # Domains in fixed proportions (not drawn), so small pools still hold every domain.
    counts = np.floor(probs / probs.sum() * num_images).astype(int)
    counts[: num_images - counts.sum()] += 1
    order = [d for d, c in zip(names, counts) for _ in range(c)]
    for i, domain in enumerate(order):
        image, label = _street_scene(rng, h, w, domain)
        name = f"{domain}_{prefix}_{i:04d}.png"
        write_image(img_dir / name, image)
        if lbl_dir:
            write_image(lbl_dir / name, label)
        coco["images"].append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for k in range(len(STREET_CLASSES)):
            mask = np.asfortranarray((label == k + 1).astype(np.uint8))
            if not mask.any():
                continue
            rle = mask_utils.encode(mask)
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": k + 1, "iscrowd": 1,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                "area": int(mask.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            })
    ann = out / "annotations.json"
    write_atomic(ann, json.dumps(coco))
    return SyntheticSet(img_dir, ann, lbl_dir, list(STREET_CLASSES))
