"""Image folder + label-PNG folder (Cityscapes, CamVid, VOC, mmseg style), matched by file stem.

A label PNG holds the class index of each pixel, ``IGNORE_INDEX`` (255) where unlabelled; its
values are used as they are (no background shift). Image ``<dir>/<stem><image ext or image_suffix>``
pairs with ``<label_dir>/<dir>/<stem><label_suffix>``, where ``<dir>`` is the image's sub-folder
relative to the image folder (Cityscapes keeps one per city), and if that file does not exist,
with ``<label_dir>/<stem><label_suffix>``. Cityscapes, for example, is
``image_suffix="_leftImg8bit.png", label_suffix="_gtFine_labelTrainIds.png"``.

Labels are read with **Pillow**, not OpenCV, on purpose: VOC-style labels are palette PNGs and
OpenCV always expands a palette to colours, while Pillow returns the stored indices.

Bad data -- what happens:

- image without a label file -> skipped, one ``WARNING`` with the count and the first names (VOC
  has far more JPEGs than segmentation masks, so this is normal there); no pair at all -> ``DatasetError``.
- label value >= the number of classes (``len(class_names)``) other than 255 -> ``DatasetError``
  naming the label file and the values, raised whenever the label is read.
- colour-coded label (RGB with differing channels), 16-bit values > 255, unreadable or corrupt
  label file -> ``DatasetError`` naming the file.
- image and label of different sizes -> ``DatasetError`` naming both files.
- path in an explicit image list that does not exist -> ``ImageError``; an unreadable, empty or
  truncated image -> ``ImageError``. Label files without an image are ignored.

The last four are found before training by the data check (:mod:`mirseg.data.check`), which reads
every label and image header once and lists all problems together (or skips them with
``skip_bad_images=true``); the dataset still checks every read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mirseg.constants import IGNORE_INDEX
from mirseg.data.dataset import DatasetError, check_label_values
from mirseg.data.images import IMAGE_EXTENSIONS, ImageError

logger = logging.getLogger("mirseg")


@dataclass(frozen=True)
class LabelFileSample:
    """One image and its label PNG; ``num_classes`` bounds the allowed label values."""

    image_path: str
    label_path: str
    num_classes: int

    @property
    def label_source(self) -> str:
        return self.label_path

    def load_label(self) -> np.ndarray:
        """(H, W) uint8 class indices, checked to be < ``num_classes`` or 255."""
        label = read_label_png(self.label_path)
        check_label_values(label, self.num_classes, self.label_path)
        return label


def read_label_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a single-channel label image as (H, W) uint8 without colour conversion.

    Palette ("P") images give their indices; an RGB(A) image is accepted only if R == G == B.
    """
    try:
        with Image.open(path) as im:
            mode = im.mode
            array = np.asarray(im)  # (H, W) or (H, W, C); decodes the file
    except FileNotFoundError as e:
        raise DatasetError(f"label file not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read label file {path}: {e}") from e
    if array.ndim == 3:
        if mode in ("LA", "PA"):
            array = array[..., 0]  # drop alpha
        elif (array[..., :3] == array[..., :1]).all():
            array = array[..., 0]  # grey values saved as RGB
        else:
            raise DatasetError(
                f"label {path} is a colour ({mode}) image: labels must hold one class index per pixel; "
                "convert the colours to indices first"
            )
    if array.dtype != np.uint8:  # 16/32-bit integer or 1-bit images
        if array.dtype.kind not in "biu" or array.size and (array.max() > 255 or array.min() < 0):
            raise DatasetError(
                f"label {path} holds values outside 0..255 (or non-integer ones, {array.dtype}): "
                f"class indices must be 0..254, with {IGNORE_INDEX} = ignore"
            )
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def load_label_folder(
    images: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    label_dir: str | os.PathLike[str],
    num_classes: int,
    *,
    label_suffix: str = ".png",
    image_suffix: str | None = None,
) -> list[LabelFileSample]:
    """Pair images with label files by stem.

    Args:
        images: a folder (searched recursively for image files) or an explicit list of image paths.
        label_dir: folder of label files.
        num_classes: number of model classes; label values must be below it, or 255.
        label_suffix: what follows the stem in a label's file name.
        image_suffix: what follows the stem in an image's file name; ``None`` = any image extension.

    Returns:
        One sample per image with a label, sorted by image path for a folder, in list order otherwise.
    """
    if not 1 <= num_classes <= IGNORE_INDEX:
        raise ValueError(f"num_classes must be in 1..{IGNORE_INDEX}, got {num_classes}")
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise DatasetError(f"label folder {label_dir} does not exist or is not a folder")

    pairs: list[tuple[Path, Path]] = []  # (image file, sub-folder relative to the image folder)
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        if not folder.is_dir():
            raise DatasetError(f"image folder {folder} does not exist or is not a folder")
        inside = label_dir.resolve().is_relative_to(folder.resolve())  # e.g. VOC2012/ and VOC2012/SegmentationClass
        for p in sorted(folder.rglob("*")):
            wanted = p.name.endswith(image_suffix) if image_suffix else p.suffix.lower() in IMAGE_EXTENSIONS
            if inside and p.resolve().is_relative_to(label_dir.resolve()):
                continue  # a label file, not an image
            if wanted and p.is_file():
                pairs.append((p, p.parent.relative_to(folder)))
    else:
        for p in map(Path, images):
            if not p.is_file():
                raise ImageError(f"image file not found: {p}: fix the path or the image list")
            pairs.append((p, Path()))

    samples: list[LabelFileSample] = []
    unlabelled: list[str] = []
    for image_path, sub in pairs:
        name = image_path.name
        stem = name[: -len(image_suffix)] if image_suffix and name.endswith(image_suffix) else image_path.stem
        for candidate in (label_dir / sub / (stem + label_suffix), label_dir / (stem + label_suffix)):
            if candidate.is_file():
                samples.append(LabelFileSample(str(image_path), str(candidate), num_classes))
                break
        else:
            unlabelled.append(str(image_path))
    if unlabelled:
        shown = ", ".join(unlabelled[:5]) + (", ..." if len(unlabelled) > 5 else "")
        logger.warning(
            "%d of %d images have no label '<stem>%s' in %s and are skipped (%s)",
            len(unlabelled), len(pairs), label_suffix, label_dir, shown,
        )
    if not samples:
        raise DatasetError(
            f"no image has a label file in {label_dir} ({len(pairs)} images found; labels are looked up as "
            f"'<image stem>{label_suffix}'): check label_dir, label_suffix and image_suffix"
        )
    return samples
