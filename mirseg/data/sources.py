"""From a config's data keys to image paths, samples and the model's class list.

Two layouts per split (``train`` / ``val``):

* COCO: ``<split>_ann`` (a COCO JSON) + ``<split>_images`` (a folder, or a text file listing image
  paths, one per line; the first tab-separated column is used, relative paths are relative to the
  list file). Classes: ``class_names``, or the train JSON's ``categories`` in file order.
  The model's classes get ``background`` first unless ``ignore_blank_area`` is true.
* Label PNGs: ``<split>_images`` + ``<split>_labels`` (a folder of PNGs matched by stem);
  ``class_names`` must be given and label value i is ``class_names[i]``.

:func:`list_images` is the same for the unlabelled images of ``mirseg infer`` and ``mirseg mine``: a
folder, a glob pattern, a list file or one image.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirseg.data.coco import dataset_classes, load_coco
from mirseg.data.dataset import DatasetError
from mirseg.data.images import IMAGE_EXTENSIONS
from mirseg.data.labelfolder import load_label_folder
from mirseg.errors import ConfigError, MissingFileError

log = logging.getLogger("mirseg")

LIST_SUFFIXES = (".txt", ".tsv", ".lst", ".list")


@dataclass
class Split:
    """Samples of one split and the model's class list (background first when there is one)."""

    samples: list[Any] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    user_classes: list[str] = field(default_factory=list)  # what class_names= gives: without an added background


def image_source(path: str) -> str | list[str]:
    """A folder stays a folder; a list file becomes its list of image paths."""
    p = Path(path)
    if p.is_dir():
        return str(p)
    if p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        paths = []
        for n, line in enumerate(_read_lines(p), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            first = line.split("\t")[0].strip()
            if not first or "\0" in first:
                raise DatasetError(f"{p} line {n}: {line[:80]!r} has no image path in its first (tab-separated) "
                                   "column: one image path per line")
            item = Path(first)
            paths.append(str(item if item.is_absolute() else p.parent / item))
        return paths
    if p.is_file():
        raise DatasetError(f"{p} is neither an image folder nor a list file ({', '.join(LIST_SUFFIXES)})")
    raise DatasetError(f"image folder or list {p} does not exist")


def list_images(spec: str | os.PathLike) -> list[str]:
    """Image paths from a folder (recursive, sorted, image suffixes only), a glob pattern (sorted;
    ``**`` recurses), a list file (``.txt``/``.tsv``/``.lst``/``.list``: one path per line, first
    tab-separated column, relative to the list file, ``#`` comments) or a single image file.
    """
    text = str(spec)
    if not text.strip():
        raise ConfigError("images is empty: give an image folder, a glob pattern such as 'photos/*.jpg', "
                         "or a text file listing image paths")
    p = Path(text)
    if p.is_dir():
        paths = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        kind = "folder"
    elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        paths = list(image_source(text))  # every listed path is kept: an unreadable one is reported later
        kind = "list file"
    elif p.is_file():
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ConfigError(f"{p} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a list file "
                             f"({', '.join(LIST_SUFFIXES)})")
        paths, kind = [text], "file"
    elif glob.has_magic(text):
        paths = sorted(f for f in glob.glob(text, recursive=True)
                       if Path(f).suffix.lower() in IMAGE_EXTENSIONS and os.path.isfile(f))
        kind = "glob pattern"
    else:
        raise MissingFileError(f"image folder, list file or image {p} does not exist")
    if not paths:
        raise ConfigError(f"no images found by {kind} {text!r} (image suffixes: {', '.join(IMAGE_EXTENSIONS)})")
    return paths


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a BOM is dropped), or a DatasetError naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text (byte {exc.start}): save the list as UTF-8, one path "
                           "per line") from None
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None


def coco_category_names(path: str) -> list[str]:
    """Category names of a COCO JSON, in file order (the default class order)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise DatasetError(f"COCO file {path} does not exist") from None
    except OSError as exc:
        raise DatasetError(f"cannot read COCO file {path}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:  # bad JSON or encoding, absurd nesting
        raise DatasetError(f"{path} is not valid JSON ({exc}); pass a COCO segmentation JSON") from None
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats:
        raise DatasetError(f"{path} has no 'categories' list; give class_names explicitly")
    for n, cat in enumerate(cats):
        if not isinstance(cat, dict) or not isinstance(cat.get("name"), str):
            raise DatasetError(f"{path}: categories[{n}] has no 'name' string; fix the file or give class_names")
    return [c["name"] for c in cats]


def model_classes(cfg: Any, split: str = "train") -> tuple[list[str], list[str]]:
    """(the user's classes, the model's): the model's get background first unless ignore_blank_area (COCO layout
    only); the user's are what ``class_names`` gives (the COCO categories when it is empty)."""
    # The layout is the training set's: validation label PNGs may be absent (no validation data).
    if cfg.train_labels or getattr(cfg, f"{split}_labels"):
        if not cfg.class_names:
            raise ConfigError(f"{split}_labels (label-PNG layout) needs class_names: names of label values 0, 1, "
                              "... (e.g. class_names=[road,car])")
        return list(cfg.class_names), list(cfg.class_names)
    names = list(cfg.class_names)
    if not names:
        ann = cfg.train_ann or getattr(cfg, f"{split}_ann")
        if not ann:
            raise ConfigError("no training data: give train_ann + train_images (COCO) or train_images + train_labels")
        names = coco_category_names(ann)
    return names, dataset_classes(names, cfg.ignore_blank_area)


def load_split(cfg: Any, split: str) -> Split:
    """Samples of ``split`` ("train" or "val") as the config describes them; an empty val split is allowed."""
    ann, images, labels = (getattr(cfg, f"{split}_{k}") for k in ("ann", "images", "labels"))
    user, classes = model_classes(cfg, split)
    if not (ann or labels):
        if split == "val":
            log.warning("no validation data (val_ann or val_labels): no metrics and no best checkpoint")
            return Split([], classes, user)
        raise ConfigError(f"{split}: give {split}_ann (COCO) or {split}_labels (label PNGs)")
    if not images:
        raise ConfigError(f"{split}_images is empty: give the image folder or a list file of image paths")
    if labels:
        samples = load_label_folder(image_source(images), labels, len(classes))
    else:
        samples = load_coco(ann, image_source(images), user, ignore_blank_area=cfg.ignore_blank_area,
                            class_by=getattr(cfg, "coco_class_by", "name"))
    return Split(samples, classes, user)
