"""The data check before training: every image and label is read once, and every problem is listed together.

Without it a corrupt image or a bad label stops training at whatever iteration first draws it,
one file per run. :func:`check_data` goes through every sample of every split once, in DataLoader
worker processes, and for each one:

- reads the image's **header** (:func:`mirseg.data.images.read_image_size`: size as ``read_image``
  returns it, EXIF orientation included; empty, non-image and truncated JPEG/PNG files fail);
- loads the **label** as training does (``sample.load_label()``: a label PNG is decoded, COCO shapes
  are rasterised, so bad polygons and corrupt RLE fail here) and checks every value is a class
  index or 255 (:func:`mirseg.data.dataset.check_label_values`);
- compares the two sizes (for COCO the label's size is the JSON's ``width``/``height``).

What the loaders already reject when they parse the annotations (unknown categories, malformed
JSON, missing label files) is not repeated. All problems of all splits end in one
:class:`DatasetError` that lists the first :data:`MAX_LISTED` and the count of the rest (an
:class:`ImageError` when every problem is an unreadable image, so callers that tell the two apart,
like the YMIR executor's error codes, still can); with ``skip_bad=True`` (``skip_bad_images``) they
are logged as one warning and the samples dropped.

:func:`crop_padding_warning` uses the sizes read here to say when ``crop_size`` is larger than
every training image can ever be after the resize jitter.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mirseg.data.dataset import DatasetError, Sample, check_label_values, size_mismatch
from mirseg.data.images import ImageError, opencv_threads, read_image_size
from mirseg.data.transforms import rescale_size
from mirseg.errors import MirsegError

log = logging.getLogger("mirseg")

MAX_LISTED = 20
"""How many problems an error or warning lists before "... and N more"."""
PROGRESS_FROM = 200
"""Sets larger than this get a progress bar."""
FIX = "fix or remove these files, or set skip_bad_images=true to train without them"


@dataclass
class CheckResult:
    """One split after the check: the usable samples, their (H, W) image sizes, and what was wrong."""

    samples: list[Any] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    bad: int = 0
    """Samples dropped (a sample can have several problems)."""


def check_sample(sample: Sample, num_classes: int) -> tuple[tuple[int, int] | None, list[str], list[str]]:
    """(image (H, W) or None where unreadable, image problems, other problems) of one sample.

    Each problem is one line naming its file; image problems are the ones ``read_image`` would
    raise ``ImageError`` for, the others are about the label or the pair.
    """
    image_problems: list[str] = []
    problems: list[str] = []
    size = label_size = None
    try:
        size = read_image_size(sample.image_path)
    except MirsegError as e:
        image_problems.append(str(e))
    except Exception as e:  # a hostile file can fail in other ways: report it with the rest, don't crash
        image_problems.append(f"cannot read image {sample.image_path}: {type(e).__name__}: {e}")
    try:
        label = sample.load_label()  # (H, W) uint8
        check_label_values(label, num_classes, sample.label_source)
        label_size = label.shape
    except MirsegError as e:
        problems.append(str(e))
    except Exception as e:
        problems.append(f"cannot load label {sample.label_source}: {type(e).__name__}: {e}")
    if size is not None and label_size is not None and tuple(size) != tuple(label_size):
        problems.append(size_mismatch(sample, size, label_size))
    return size, image_problems, problems


class _Items(Dataset):
    """Item i: ``(i, *check_sample(sample i))``, computed in a loader worker."""

    def __init__(self, samples: Sequence[Sample], num_classes: int) -> None:
        self.samples, self.num_classes = list(samples), num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[int, tuple[int, int] | None, list[str], list[str]]:
        return (i, *check_sample(self.samples[i], self.num_classes))


def _identity(item: Any) -> Any:
    return item


def listing(problems: Sequence[str], limit: int = MAX_LISTED) -> str:
    """The first ``limit`` problems, one per line, then "... and N more"."""
    lines = [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def check_data(splits: Mapping[str, Sequence[Sample]], num_classes: int, *, workers: int = 0, skip_bad: bool = False,
               report: bool = True) -> dict[str, CheckResult]:
    """Check every sample of every split (e.g. ``{"train": ..., "val": ...}``); the usable samples per split.

    Args:
        splits: split name -> samples (:class:`mirseg.data.dataset.Sample`).
        num_classes: label values must be below it, or 255.
        workers: loader worker processes (``workers_per_gpu``); 0 checks in this process.
        skip_bad: drop bad samples with one warning instead of raising.
        report: log the skips and show the progress bar (false on the other ranks of a process group).

    Raises:
        DatasetError: any problem without ``skip_bad`` (the first :data:`MAX_LISTED`, each naming its
            file, the count of the rest and the fix); with ``skip_bad``, a split that had samples and
            has none left.
        ImageError: (a ``DatasetError`` sibling, same message) where every problem is an unreadable image.
    """
    names = list(splits)
    flat = [(name, s) for name in names for s in splits[name]]  # one pass, one pool of workers for all splits
    results = {name: CheckResult() for name in names}
    if not flat:
        return results
    loader = DataLoader(_Items([s for _, s in flat], num_classes), batch_size=None, shuffle=False,
                        num_workers=min(workers, len(flat)), collate_fn=_identity)
    bar = tqdm(total=len(flat), desc="checking data", unit="file", dynamic_ncols=True, mininterval=1.0,
               disable=not report or len(flat) <= PROGRESS_FROM)
    # Loader workers run in parallel already: one OpenCV thread each, set around the fork (see opencv_threads).
    with opencv_threads(1 if loader.num_workers > 0 else None):
        items = iter(loader)
    only_images = True  # every problem is an unreadable image: ImageError (YMIR reports those apart)
    for i, size, image_problems, problems in items:  # in sample order
        name, sample = flat[i]
        result = results[name]
        only_images = only_images and not problems
        if image_problems or problems:
            result.problems.extend(image_problems + problems)
            result.bad += 1
        else:
            result.samples.append(sample)
            result.sizes.append(size)
        bar.update(1)
    bar.close()

    found = {n: r for n, r in results.items() if r.problems}
    if not found:
        return results
    every = list(dict.fromkeys(p for r in found.values() for p in r.problems))  # a file in two splits: once
    counts = ", ".join(f"{r.bad} of {len(splits[n])} {n} samples" for n, r in found.items())
    if not skip_bad:
        error = ImageError if only_images else DatasetError
        raise error(f"the data check found {len(every)} problem{'s' * (len(every) > 1)} in {counts}, before training:\n"
                    f"{listing(every)}\n{FIX}")
    if report:
        log.warning("skip_bad_images=true: training without %s that cannot be used:\n%s", counts, listing(every))
    for name, r in found.items():
        if not r.samples:
            raise DatasetError(f"none of the {len(splits[name])} {name} samples can be used "
                               f"(skip_bad_images=true skipped them all):\n{listing(r.problems)}\n"
                               "fix or replace these files")
    return results


def crop_padding_warning(sizes: Sequence[tuple[int, int]], crop_size: tuple[int, int], img_scale: tuple[int, int],
                         ratio_range: tuple[float, float]) -> str | None:
    """The warning to log when ``crop_size`` (h, w) is larger than every training image ever gets, else None.

    Training first resizes each image to fit ``img_scale`` times a jitter ``s <= ratio_range[1]``
    (:class:`mirseg.data.transforms.TrainTransform`), then crops; a side that is shorter than the
    crop even at the largest ``s`` in *every* image is padded in every batch (with label 255, so
    those pixels cost compute and teach nothing). ``sizes`` are the original (H, W) of the images.
    """
    if not sizes:
        return None
    hi = ratio_range[1]
    target = (int(img_scale[0] * hi), int(img_scale[1] * hi))
    distinct = set(map(tuple, sizes))
    resized = [rescale_size(h, w, target) for h, w in distinct]  # largest (h, w) each image is resized to
    max_h, max_w = max(r[0] for r in resized), max(r[1] for r in resized)
    crop_h, crop_w = crop_size
    sides = [side for side, short in (("height", crop_h > max_h), ("width", crop_w > max_w)) if short]
    if not sides:
        return None
    heights, widths = sorted({h for h, _ in distinct}), sorted({w for _, w in distinct})
    original = (f"{widths[0]}x{heights[0]}" if len(distinct) == 1
                else f"{widths[0]}..{widths[-1]} x {heights[0]}..{heights[-1]}")
    return (f"crop_size {list(crop_size)} (h, w) is larger in {' and '.join(sides)} than any training image gets: "
            f"images ({original}, WxH) are resized to fit img_scale {list(img_scale)} times at most "
            f"ratio_range's {hi:g}, so at most {max_w}x{max_h} (WxH); every crop is padded to the crop size with "
            f"ignored pixels (label 255, image 0), which costs compute and teaches nothing. Set crop_size to at most "
            f"[{min(crop_h, max_h)}, {min(crop_w, max_w)}], or a larger img_scale")
