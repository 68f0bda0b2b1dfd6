"""COCO segmentation JSON (YMIR seg-coco export, CVAT, Label Studio) + images -> per-image label maps.

:func:`load_coco` parses and checks the whole JSON once and returns one :class:`CocoSample` per
usable image; each sample keeps only its own shapes and rasterises them on every
``load_label()`` call, so no label map is held in memory.

Label values (YMIR / mmseg convention, ``ymir-protocol.md`` §4, ``algorithms.md`` §4.2-4.3):

- ``ignore_blank_area=False``: unannotated pixels are class 0, ``constants.BACKGROUND``, and user
  class ``k`` is painted as ``k + 1``; the model's class list is ``["background", *class_names]``.
- ``ignore_blank_area=True``: unannotated pixels are ``IGNORE_INDEX`` (255), class ``k`` is ``k``.

:func:`dataset_classes` gives the model's class list for either mode.

Classes: ``class_by="name"`` (default) maps each annotation's category **name** to its position
in ``class_names``, so category ids may be any numbers in any order. ``class_by="id"`` is YMIR's
rule: ``category_id`` *is* the index into ``class_names``. YMIR lists in ``categories`` only the
classes present in the training split, yet val annotations can carry other ids, so in this mode an
id missing from ``categories`` is fine; where ``categories`` does name an id, the name must match.

Shapes: polygons (``[[x1, y1, x2, y2, ...], ...]``, several rings merge), compressed RLE
(``counts`` a string) and uncompressed RLE (``counts`` a list) all decode with pycocotools.
``iscrowd`` does not matter for a semantic label map: crowd regions are painted with their class,
as mmseg's converter does. **Annotations are painted in file order and later ones paint over
earlier ones** where they overlap (YMIR's converter does the same; torchvision's "overlap -> 255"
was not adopted because semantic exports often overlap on purpose, e.g. "car" over "road").

Bad data -- what happens (``DatasetError`` and ``ImageError`` are ``ValueError`` subclasses whose
message names the JSON file, the offending item and the fix):

- unreadable, not JSON, not a dict, ``images``/``annotations`` missing or not lists, an image entry
  without ``id``/``file_name``/positive ``width``/``height`` (at most 2**30 pixels, OpenCV's limit),
  an id that is not an integer or a string, duplicate image or category ids, an annotation without
  ``image_id``/``category_id`` or pointing at an unknown image id
  -> ``DatasetError`` (the file is not the COCO file you meant; guessing would train on garbage).
- ``class_by="name"`` without a ``categories`` list -> ``DatasetError``.
- annotation of a class not in ``class_names`` -> by ``on_unknown_class``: ``"error"`` (default,
  ``DatasetError`` listing each unknown category with its count and a first annotation id, plus
  a close-match hint), ``"skip"`` (one warning; its pixels stay unannotated, which is what the
  YMIR exporter does with classes outside ``class_names``) or ``"ignore"`` (one warning; its
  pixels are painted 255 so they are neither background nor any class). Only annotations of
  images that are actually used are considered.
- ``class_by="id"`` and ``categories`` names id ``k`` differently from ``class_names[k]``
  -> ``DatasetError`` (the class list does not belong to this export).
- empty segmentation (``[]``, ``{}``, ``null``, missing: a box-only object) and degenerate polygon rings
  (< 3 points, odd coordinate count, zero area) -> dropped, with **one** warning per file giving
  counts and a few annotation ids; a shape with no usable ring left is skipped.
- malformed segmentation (not a list/dict, non-numeric or non-finite coordinates, coordinates far
  outside the image, RLE ``size`` different from the image's ``height``/``width``, uncompressed
  ``counts`` not summing to ``height * width``, a compressed ``counts`` string that is malformed or
  whose runs do not cover exactly ``height * width`` pixels) -> ``DatasetError``. Anything
  pycocotools still cannot decode is found when that image's label is rasterised; the
  ``DatasetError`` then names the annotation.
- image listed in the JSON but absent from the folder/list -> skipped, one log line with the count
  (``WARNING`` for a folder; ``INFO`` for an explicit list, since YMIR's one JSON lists the train
  and val images together and each index file selects its split).
- image in the explicit list without a JSON entry -> skipped, one ``WARNING`` with the count
  (YMIR's converter drops such images silently).
- path in the explicit list that does not exist -> ``ImageError`` (the list is your selection, so a
  missing file means a broken path or mount). An unreadable/corrupt image file, and an image whose
  size differs from the JSON's ``width``/``height``, are found by the data check before training
  (:mod:`mirseg.data.check`, all of them listed together), and again by the dataset when read.
- nothing left to use -> ``DatasetError``.
- images without annotations are valid: all background (or all ignore).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils

from mirseg.constants import BACKGROUND, IGNORE_INDEX
from mirseg.data.coco_checks import ClassBy, check_categories, check_images, is_id, is_int, prepare_segmentation
from mirseg.data.dataset import DatasetError
from mirseg.data.images import ImageError
from mirseg.errors import ConfigError

logger = logging.getLogger("mirseg")

OnUnknownClass = Literal["error", "skip", "ignore"]

_MAX_LISTED = 5  # how many offending items an error or warning names before "..."


def dataset_classes(class_names: Sequence[str], ignore_blank_area: bool) -> list[str]:
    """The model's class list: ``class_names``, preceded by ``"background"`` unless blank area is ignored.

    Raises:
        DatasetError: ``class_names`` is empty, has duplicates, already holds ``"background"``
            while a background class is added, or has too many classes for a uint8 label with 255 reserved.
    """
    names = list(class_names)
    if not names:
        raise DatasetError("class_names is empty: give at least one class")
    duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
    if duplicates:
        raise DatasetError(f"class_names has duplicates {duplicates}: each class must appear once")
    if not ignore_blank_area:
        if BACKGROUND in names:
            raise DatasetError(
                f"class_names already contains {BACKGROUND!r}, and ignore_blank_area=False adds it again for "
                f"unannotated pixels: remove it from class_names, or set ignore_blank_area=True"
            )
        names = [BACKGROUND, *names]
    if len(names) > IGNORE_INDEX:
        raise DatasetError(f"{len(names)} classes do not fit a uint8 label map with {IGNORE_INDEX} reserved for ignore")
    return names


@dataclass(frozen=True)
class CocoSample:
    """One image of a COCO file and its shapes, rasterised on demand.

    Attributes:
        image_path: the image file.
        height, width: the image size the JSON states (the dataset checks the real image against it).
        fill: value of unannotated pixels, 0 (background) or ``IGNORE_INDEX``.
        shapes: ``(annotation id, label value, kind, data)`` in paint order; ``kind`` is ``"poly"``
            (``data`` = list of flat ``[x1, y1, ...]`` rings) or ``"rle"`` (``data`` = compressed RLE dict).
        source: ``"<json file> image '<file_name>'"``, for messages.
    """

    image_path: str
    height: int
    width: int
    fill: int
    shapes: tuple[tuple[Any, int, str, Any], ...]
    source: str

    @property
    def label_source(self) -> str:
        return self.source

    def load_label(self) -> np.ndarray:
        """Rasterise the shapes into an (H, W) uint8 label map; later shapes overwrite earlier ones."""
        label = np.full((self.height, self.width), self.fill, dtype=np.uint8)
        for ann_id, value, kind, data in self.shapes:
            try:
                if kind == "poly":  # rings -> one RLE per ring -> their union
                    rle = mask_utils.merge(mask_utils.frPyObjects(data, self.height, self.width))
                else:
                    rle = data  # its runs were checked against height*width at load (rle_total)
                mask = mask_utils.decode(rle)  # (H, W) uint8 0/1, Fortran order
            except (ValueError, TypeError, OverflowError) as e:
                raise DatasetError(
                    f"{self.source}: annotation {ann_id} cannot be decoded ({e}); fix or remove it"
                ) from e
            np.copyto(label, value, where=mask.view(bool))
        return label


def load_coco(
    annotation_file: str | os.PathLike[str],
    images: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    class_names: Sequence[str],
    *,
    ignore_blank_area: bool = False,
    class_by: ClassBy = "name",
    on_unknown_class: OnUnknownClass = "error",
) -> list[CocoSample]:
    """Samples for the images of ``annotation_file`` that are found in ``images``.

    Args:
        annotation_file: the COCO JSON.
        images: a folder, where each ``file_name`` is looked up as a relative path and then by its
            basename; or an explicit list of image paths, matched to ``file_name`` by basename
            (YMIR's rule, since its index files list hashed basenames).
        class_names: user classes, without background; their order defines the indices.
        ignore_blank_area: see the module docstring (background class vs. 255 for unannotated pixels).
        class_by: ``"name"`` or ``"id"`` (``category_id`` is the index into ``class_names``).
        on_unknown_class: ``"error"``, ``"skip"`` or ``"ignore"`` for classes not in ``class_names``.

    Returns:
        Samples in the order of the JSON's ``images``.
    """
    path = Path(annotation_file)
    dataset_classes(class_names, ignore_blank_area)  # validates the class list
    num_user = len(class_names)
    shift = 0 if ignore_blank_area else 1  # blank area is class 0, so user class k is k + 1
    fill = IGNORE_INDEX if ignore_blank_area else 0
    if class_by not in ("name", "id"):
        raise ConfigError(f"coco_class_by (class_by) must be 'name' or 'id', got {class_by!r}")
    if on_unknown_class not in ("error", "skip", "ignore"):
        raise ConfigError(f"on_unknown_class must be 'error', 'skip' or 'ignore', got {on_unknown_class!r}")

    coco = _read_coco_json(path)
    image_entries = check_images(path, coco["images"])  # id -> (file_name, height, width)
    categories = check_categories(path, coco.get("categories"), class_by)  # id -> name

    # Which user class (0-based) each category id stands for; absent = not in class_names.
    class_of: dict[Any, int] = {}
    if class_by == "name":
        index_of = {name: i for i, name in enumerate(class_names)}
        class_of = {cid: index_of[name] for cid, name in categories.items() if name in index_of}
    else:
        for cid, name in categories.items():
            if is_int(cid) and 0 <= cid < num_user and name != class_names[cid]:
                raise DatasetError(
                    f"{path}: category id {cid} is named {name!r} but class_names[{cid}] is {class_names[cid]!r}: "
                    "with coco_class_by=id (class_by='id') the ids index class_names, so pass the class list this "
                    "file was exported with, or set coco_class_by=name to match categories by name"
                )

    paths = _resolve_images(path, image_entries, images)  # image id -> image path, for images we use

    shapes: dict[Any, list[tuple[Any, int, str, Any]]] = defaultdict(list)
    unknown: dict[tuple[Any, str | None], list[Any]] = defaultdict(list)  # (category id, name) -> annotation ids
    dropped: dict[str, list[Any]] = defaultdict(list)  # reason -> annotation ids
    for n, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict):
            raise DatasetError(f"{path}: annotations[{n}] is not an object; the file is not COCO")
        ann_id = ann.get("id", f"#{n}")
        for key in ("image_id", "category_id"):
            if key not in ann:
                raise DatasetError(f"{path}: annotation {ann_id} has no {key!r}; the file is not COCO segmentation")
            if not is_id(ann[key]):
                raise DatasetError(f"{path}: annotation {ann_id} has {key} {ann[key]!r}; ids must be integers "
                                   "(or strings): the file is not COCO segmentation")
        image_id, cid = ann["image_id"], ann["category_id"]
        if image_id not in image_entries:
            raise DatasetError(
                f"{path}: annotation {ann_id} refers to image_id {image_id!r}, which no entry of 'images' has; "
                "the file is truncated or inconsistent: re-export it"
            )
        if image_id not in paths:
            continue  # image not used (other split, or missing): its annotations don't matter
        file_name, height, width = image_entries[image_id]

        if class_by == "name":
            if cid not in categories:
                raise DatasetError(
                    f"{path}: annotation {ann_id} (image {file_name!r}) has category_id {cid!r}, which 'categories' "
                    "does not list, so its class name is unknown: fix the file, or set coco_class_by=id "
                    "(load_coco's class_by='id') if the ids index class_names (YMIR exports)"
                )
            user_class = class_of.get(cid)
        else:
            user_class = cid if is_int(cid) and 0 <= cid < num_user else None
        if user_class is None:
            unknown[(cid, categories.get(cid))].append(ann_id)
            if on_unknown_class != "ignore":
                continue
            value = IGNORE_INDEX
        else:
            value = user_class + shift

        prepared = prepare_segmentation(path, ann_id, file_name, ann.get("segmentation"), height, width, dropped)
        if prepared is not None:
            shapes[image_id].append((ann_id, value, *prepared))

    if unknown:
        _report_unknown(path, unknown, class_names, on_unknown_class)
    if dropped:
        details = "; ".join(f"{len(ids)} {reason} (annotation ids {_head(ids)})" for reason, ids in dropped.items())
        logger.warning("%s: dropped shapes that cannot be painted: %s", path, details)

    return [
        CocoSample(
            image_path=str(image_path),
            height=image_entries[image_id][1],
            width=image_entries[image_id][2],
            fill=fill,
            shapes=tuple(shapes.get(image_id, ())),
            source=f"{path} image {image_entries[image_id][0]!r}",
        )
        for image_id, image_path in paths.items()
    ]


def _read_coco_json(path: Path) -> dict[str, Any]:
    """Load the JSON and check its top level."""
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
    except FileNotFoundError as e:
        raise DatasetError(f"annotation file not found: {path}") from e
    except OSError as e:  # a folder, no permission
        raise DatasetError(f"cannot read annotation file {path}: {e.strerror or e}") from e
    # ValueError: bad JSON or UTF-8, or an integer too long for int(); RecursionError: absurd nesting.
    except (ValueError, RecursionError) as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); is it the COCO annotation file?") from e
    if not isinstance(coco, dict):
        raise DatasetError(
            f"{path} holds a JSON {type(coco).__name__}, not a COCO object with 'images' and 'annotations'"
        )
    for key in ("images", "annotations"):
        if key not in coco:
            raise DatasetError(f"{path} has no {key!r} list: it is not a COCO annotation file (keys: {sorted(coco)})")
        if not isinstance(coco[key], list):
            raise DatasetError(f"{path}: {key!r} is a {type(coco[key]).__name__}, not a list; the file is not COCO")
    return coco


def _resolve_images(
    path: Path,
    entries: dict[Any, tuple[str, int, int]],
    images: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
) -> dict[Any, Path]:
    """image id -> file, for the JSON images found in the folder or list (JSON order)."""
    found: dict[Any, Path] = {}
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        if not folder.is_dir():
            raise DatasetError(f"image folder {folder} does not exist or is not a folder (annotations: {path})")
        for image_id, (file_name, _, _) in entries.items():
            # CVAT/Label Studio file_names may carry sub-folders; fall back to the bare name.
            for candidate in (folder / file_name, folder / Path(file_name).name):
                if candidate.is_file():
                    found[image_id] = candidate
                    break
        absent = [entries[i][0] for i in entries if i not in found]
        if absent:
            logger.warning(
                "%s: %d of %d images are not in %s and are skipped (%s)",
                path, len(absent), len(entries), folder, _head(absent),
            )
    else:
        by_name: dict[str, Path] = {}
        for p in map(Path, images):
            if not p.is_file():
                raise ImageError(f"image file not found: {p} (listed for {path}): fix the path or the index file")
            if p.name in by_name and by_name[p.name] != p:
                raise DatasetError(f"two listed images share the file name {p.name!r} ({by_name[p.name]}, {p}), "
                                   f"so they cannot be matched to {path} by name: rename one")
            by_name[p.name] = p
        json_names = Counter(Path(file_name).name for file_name, _, _ in entries.values())
        for image_id, (file_name, _, _) in entries.items():
            name = Path(file_name).name
            if name in by_name:
                if json_names[name] > 1:
                    raise DatasetError(f"{path}: several images are named {name!r}, so the listed {by_name[name]} "
                                       "is ambiguous: make the file names unique")
                found[image_id] = by_name[name]
        unlisted = len(entries) - len(found)
        if unlisted:
            logger.info("%s: %d of %d images are not in the image list (another split?) and are skipped",
                        path, unlisted, len(entries))
        orphans = sorted(set(by_name) - set(json_names))
        if orphans:
            logger.warning("%d listed images have no entry in %s and are skipped (%s)", len(orphans), path,
                           _head(orphans))
    if not found:
        raise DatasetError(f"none of the {len(entries)} images of {path} was found in the given images: "
                           "check the image folder/list and the 'file_name' values")
    return found


def _report_unknown(
    path: Path,
    unknown: dict[tuple[Any, str | None], list[Any]],
    class_names: Sequence[str],
    on_unknown_class: OnUnknownClass,
) -> None:
    """Raise or warn once about annotations whose class is not in ``class_names``."""
    lines = []
    for (cid, name), ids in unknown.items():
        category = f"{name!r} (id {cid!r})" if name is not None else f"id {cid!r}"
        # Compare case- and space-insensitively, so 'Car ' suggests 'car'.
        folded = {c.strip().lower(): c for c in class_names}
        close = difflib.get_close_matches(name.strip().lower(), list(folded), n=1) if name is not None else []
        hint = [folded[c] for c in close]
        lines.append(f"{category}: {len(ids)} annotations (first id {ids[0]})"
                     + (f", did you mean {hint[0]!r}?" if hint else ""))
    summary = "; ".join(lines)
    if on_unknown_class == "error":
        raise DatasetError(
            f"{path}: annotations of classes not in class_names {list(class_names)}: {summary}. Add the classes to "
            "class_names, or pass on_unknown_class='skip' (leave those pixels unannotated) or 'ignore' (mark them 255)"
        )
    action = "left unannotated" if on_unknown_class == "skip" else f"painted {IGNORE_INDEX} (ignored)"
    logger.warning("%s: classes not in class_names, their pixels are %s: %s", path, action, summary)


def _head(items: Sequence[Any]) -> str:
    """The first few items as text, for messages."""
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    return shown + (", ..." if len(items) > _MAX_LISTED else "")
