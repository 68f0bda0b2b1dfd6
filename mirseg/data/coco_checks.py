"""Checks of the parts of a COCO segmentation file: image entries, categories, and each annotation's shape.

:func:`mirseg.data.coco.load_coco` runs them once at load, so that a bad file fails with a message
naming the JSON file, the item and the fix before any training; its docstring lists what is dropped
(empty segmentations, degenerate polygon rings) and what is an error (malformed shapes, an RLE whose
runs do not cover the image: :func:`rle_total`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils

from mirseg.data.dataset import DatasetError

ClassBy = Literal["name", "id"]

MAX_PIXELS = 1 << 30  # OpenCV's default CV_IO_MAX_IMAGE_PIXELS: a larger image could not be read anyway
_COORD_MARGIN = 8  # polygon coordinates may lie this many image sides outside the image, no further


def rle_total(counts: str | bytes) -> int:
    """Pixels covered by the runs of a compressed COCO RLE ``counts`` string (pycocotools' encoding, summed).

    Each run length is a little-endian number of 5-bit digits, one character ``48 + digit`` each
    (bit 0x20 = more digits follow, bit 0x10 of the last = negative); from the third run on, a
    value is the difference to the run two before. Vectorised, ~1 ms for a 2-megapixel mask.

    Raises:
        ValueError: the string is not valid RLE (a character outside ``'0'..'o'``, a number cut
            off at the end, an impossibly long or a negative run).
    """
    c = np.frombuffer(counts.encode() if isinstance(counts, str) else bytes(counts), np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return 0
    if c.min() < 0 or c.max() > 63:
        raise ValueError("a character outside the RLE alphabet '0'..'o'")
    end = (c & 0x20) == 0  # (chars,) the last character of each number
    if not end[-1]:
        raise ValueError("the string ends inside a number")
    starts = np.flatnonzero(np.concatenate([[True], end[:-1]]))  # (numbers,) first character of each
    digit = np.arange(c.size) - np.repeat(starts, np.diff(np.append(starts, c.size)))  # (chars,) digit position
    if digit.max() > 11:
        raise ValueError("a run longer than any image")
    runs = np.add.reduceat((c & 0x1F) << (5 * digit), starts)  # (numbers,)
    negative = (c[end] & 0x10) != 0
    runs[negative] -= 1 << (5 * (digit[end][negative] + 1))  # two's complement of the digits read
    runs[1::2] = np.cumsum(runs[1::2])  # deltas to the run two before (pycocotools: from the third run on)
    runs[2::2] = np.cumsum(runs[2::2])
    if runs.min() < 0:
        raise ValueError("a negative run length")
    return int(runs.sum())


def check_images(path: Path, entries: list[Any]) -> dict[Any, tuple[str, int, int]]:
    """image id -> (file_name, height, width), every entry checked."""
    out: dict[Any, tuple[str, int, int]] = {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or not is_id(entry.get("id")) or not isinstance(entry.get("file_name"), str):
            raise DatasetError(f"{path}: images[{n}] needs an integer 'id' and a 'file_name' string; the file is "
                               "not COCO")
        height, width = entry.get("height"), entry.get("width")
        if not (is_int(height) and is_int(width) and height > 0 and width > 0):
            raise DatasetError(
                f"{path}: image {entry['file_name']!r} needs positive integer 'height' and 'width' "
                f"(got {height!r}, {width!r}): re-export with image sizes"
            )
        if height * width > MAX_PIXELS:
            raise DatasetError(f"{path}: image {entry['file_name']!r} is {width}x{height}, more than {MAX_PIXELS} "
                               "pixels (the most OpenCV reads): tile it, or fix 'height' and 'width'")
        if entry["id"] in out:
            raise DatasetError(f"{path}: image id {entry['id']!r} appears twice in 'images'; ids must be unique")
        out[entry["id"]] = (entry["file_name"], height, width)
    return out


def check_categories(path: Path, categories: Any, class_by: ClassBy) -> dict[Any, str]:
    """category id -> name; ``categories`` is optional only for ``class_by="id"``."""
    if categories is None:
        if class_by == "name":
            raise DatasetError(
                f"{path} has no 'categories' list, so annotations cannot be matched to class_names by name; "
                "add it, or set coco_class_by=id (load_coco's class_by='id') if category_id indexes class_names"
            )
        return {}
    if not isinstance(categories, list):
        raise DatasetError(f"{path}: 'categories' is a {type(categories).__name__}, not a list")
    out: dict[Any, str] = {}
    for n, cat in enumerate(categories):
        if not isinstance(cat, dict) or not is_id(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DatasetError(f"{path}: categories[{n}] needs an integer 'id' and a 'name' string")
        if cat["id"] in out:
            raise DatasetError(f"{path}: category id {cat['id']!r} appears twice in 'categories'")
        out[cat["id"]] = cat["name"]
    return out


def prepare_segmentation(
    path: Path, ann_id: Any, file_name: str, seg: Any, height: int, width: int, dropped: dict[str, list[Any]]
) -> tuple[str, Any] | None:
    """Check one ``segmentation``; ``("poly", rings)``, ``("rle", compressed rle)`` or None (dropped, noted)."""
    where = f"{path}: annotation {ann_id} (image {file_name!r})"
    if seg is None or (isinstance(seg, (list, dict)) and not seg):  # a box-only object, nothing to paint
        dropped["empty segmentations"].append(ann_id)
        return None
    if isinstance(seg, list):
        rings = []
        for ring in seg:
            if not isinstance(ring, list) or not all(_is_number(v) and math.isfinite(v) for v in ring):
                raise DatasetError(f"{where}: a polygon must be a flat list of numbers [x1, y1, x2, y2, ...]")
            # pycocotools walks every edge pixel by pixel: a coordinate of 1e12 would take forever.
            side = _COORD_MARGIN * max(height, width)
            if any(not -side <= v <= side + max(height, width) for v in ring):
                raise DatasetError(f"{where}: polygon coordinates lie far outside the {width}x{height} image "
                                   "(the shape belongs to another image size): re-export it")
            # < 3 points would also be misread by pycocotools: a 4-number list is taken as a box.
            if len(ring) < 6 or len(ring) % 2 or _polygon_area(ring) == 0:
                dropped["degenerate polygon rings (< 3 points, odd length or zero area)"].append(ann_id)
                continue
            rings.append([float(v) for v in ring])
        return ("poly", rings) if rings else None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size, counts = seg["size"], seg["counts"]
        if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
            raise DatasetError(f"{where}: RLE size {size} differs from the image's [height, width] "
                               f"[{height}, {width}]: the mask belongs to another image size; re-export it")
        if isinstance(counts, list):  # uncompressed RLE: column-major run lengths, starting with 0s
            if not all(is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
                raise DatasetError(f"{where}: uncompressed RLE counts must be non-negative integers summing to "
                                   f"height*width = {height * width}")
            return "rle", mask_utils.frPyObjects(seg, height, width)  # -> compressed, far smaller
        if isinstance(counts, str):
            # pycocotools decodes runs that cover fewer pixels than the image into a partly unwritten buffer.
            try:
                covered = rle_total(counts)
            except ValueError as exc:
                raise DatasetError(f"{where}: compressed RLE counts {_short(counts)} are corrupt ({exc}): "
                                   "re-export the annotation") from None
            if covered != height * width:
                raise DatasetError(f"{where}: compressed RLE counts {_short(counts)} are corrupt (their runs cover "
                                   f"{covered} pixels, not height*width = {height * width}): re-export the annotation")
            return "rle", {"size": [height, width], "counts": counts}
    raise DatasetError(f"{where}: segmentation must be a polygon list or an RLE dict with 'counts' and 'size', "
                       f"got {type(seg).__name__}")


def _short(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _polygon_area(ring: list[float]) -> float:
    """Shoelace area of a flat ``[x1, y1, x2, y2, ...]`` ring."""
    xy = np.asarray(ring, dtype=np.float64).reshape(-1, 2)  # (points, 2)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_id(v: Any) -> bool:
    """COCO ids are integers; strings are accepted too (some tools write them)."""
    return is_int(v) or isinstance(v, str)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
