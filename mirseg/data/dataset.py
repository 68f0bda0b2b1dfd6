"""The torch ``Dataset`` over samples of either layout, and the label histogram for class weights.

A *sample* is any object with an ``image_path``, a ``label_source`` (text for error messages) and
a ``load_label()`` returning an (H, W) uint8 label map: :class:`mirseg.data.coco.CocoSample`
(rasterised from COCO shapes on each call) and :class:`mirseg.data.labelfolder.LabelFileSample`
(read from a PNG on each call). Nothing per-pixel is held in memory between items, and samples,
dataset and transforms are plain picklable objects, so DataLoader worker processes get a copy.

Reproducibility: the random generator of item ``i`` is ``numpy.random.default_rng([seed, epoch, i])``.
It depends neither on which worker loads the item nor on the order items are loaded in, so a fixed
``seed`` gives the same augmented batches with 0, 2 or 16 workers. Call ``set_epoch(e)`` before each
epoch (with ``persistent_workers=False``, the DataLoader default, workers are re-created each epoch
and see the new value). Index ``k * len(dataset) + i`` is item ``i`` at epoch ``epoch + k``, so an
iteration-based sampler that keeps counting past one epoch needs no ``set_epoch`` at all and also
works with persistent workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np
from torch.utils.data import Dataset

from mirseg.constants import IGNORE_INDEX
from mirseg.data.images import read_image
from mirseg.errors import MirsegError


class DatasetError(MirsegError, ValueError):
    """Annotations or labels are malformed or inconsistent; the message names the file, the item and the fix."""


class Sample(Protocol):
    """What :class:`SegDataset` needs from one item of any layout."""

    image_path: str

    @property
    def label_source(self) -> str:
        """Where the label comes from, for error messages (a PNG path, or a COCO file and image name)."""
        ...

    def load_label(self) -> np.ndarray:
        """(H, W) uint8 map of class indices, ``IGNORE_INDEX`` (255) where unlabelled/ignored."""
        ...


Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[Any, Any]]
"""``transform(image (H, W, 3) uint8 RGB, label (H, W) uint8, rng) -> (image, label)``."""


class SegDataset(Dataset):
    """(image, label) pairs from a list of samples, through an optional transform.

    Without a transform an item is ``(image (H, W, 3) uint8 RGB, label (H, W) uint8)``; with
    :class:`mirseg.data.transforms.TrainTransform` or ``EvalTransform`` it is
    ``(image float32 tensor (3, h, w), label int64 tensor)``.

    Args:
        samples: from :func:`mirseg.data.coco.load_coco` or :func:`mirseg.data.labelfolder.load_label_folder`.
        transform: called as ``transform(image, label, rng)``.
        seed: base seed of the per-item generators; ``None`` draws one now (so still consistent
            across workers, but different per run).
    """

    def __init__(self, samples: Sequence[Sample], transform: Transform | None = None, seed: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.seed = int(np.random.SeedSequence().entropy) if seed is None else int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that enters the per-item seed (see the module docstring)."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The generator item ``index`` is augmented with; ``index`` may run past ``len(self)``."""
        n = len(self.samples)
        if index < 0:
            index += n
        if n == 0 or index < 0:
            raise IndexError(f"index {index} out of range for a dataset of {n} items")
        epoch_offset, i = divmod(index, n)
        return np.random.default_rng([self.seed, self.epoch + epoch_offset, i])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Untransformed item: image (H, W, 3) uint8 RGB and label (H, W) uint8, sizes checked."""
        sample = self.samples[index % len(self.samples)]
        image = read_image(sample.image_path)
        label = sample.load_label()
        if image.shape[:2] != label.shape:
            raise DatasetError(size_mismatch(sample, image.shape[:2], label.shape))
        return image, label

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        rng = self.rng(index)  # validates index first
        image, label = self.load(index)
        if self.transform is None:
            return image, label
        return self.transform(image, label, rng)


def label_histogram(dataset_or_samples: SegDataset | Iterable[Sample], num_classes: int) -> np.ndarray:
    """Pixel count per class over the original (un-augmented) labels, (num_classes,) int64.

    ``IGNORE_INDEX`` pixels are not counted. Reads every label once (no images), so it also
    surfaces bad label files before training starts. Typical use: class weights ∝ 1 / frequency.

    Raises:
        DatasetError: a label holds a value >= ``num_classes`` other than ``IGNORE_INDEX``
            (see :func:`check_label_values`).
    """
    samples = dataset_or_samples.samples if isinstance(dataset_or_samples, SegDataset) else dataset_or_samples
    counts = np.zeros(256, dtype=np.int64)
    for sample in samples:
        counts += check_label_values(sample.load_label(), num_classes, sample.label_source)
    return counts[:num_classes].copy()


def check_label_values(label: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    """Pixel count per value of an (H, W) uint8 label, (256,) int64, after checking every value is a class or 255.

    Raises:
        DatasetError: a value >= ``num_classes`` other than ``IGNORE_INDEX``; the message names
            ``source`` and the values, and says what to change.
    """
    per_value = np.bincount(label.ravel(), minlength=256)  # uint8 labels: exactly 256 bins
    bad = [int(v) for v in np.flatnonzero(per_value[num_classes:]) + num_classes if v != IGNORE_INDEX]
    if bad:
        raise DatasetError(
            f"label {source} has values {bad}, but there are {num_classes} classes (values 0..{num_classes - 1}; "
            f"{IGNORE_INDEX} = ignore): remap those values in the label file, or list one name per label value "
            "in class_names (label value i is class_names[i])"
        )
    return per_value


def size_mismatch(sample: Sample, image_hw: tuple[int, int], label_hw: tuple[int, int]) -> str:
    """The message for an image and its label of different (H, W) sizes, naming both files."""
    swapped = tuple(image_hw) == tuple(label_hw)[::-1]
    return (f"image {sample.image_path} is {image_hw[1]}x{image_hw[0]} (WxH) but its label ({sample.label_source}) "
            f"is {label_hw[1]}x{label_hw[0]}: they must be the same size"
            + (" (swapped sides: the image probably has an EXIF rotation that the labels did not get; "
               "images are read with EXIF orientation applied)" if swapped else ""))
