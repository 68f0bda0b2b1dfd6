"""The result files of ``mirseg infer`` for one image, and their names.

Under ``out_dir``, for an image whose output name is ``<name>`` (:func:`output_names`), all at the
image's original size and each written atomically (:mod:`mirseg.fileio`):

* ``labels/<name>.png``: the class index per pixel (uint8; uint16 above 256 classes);
* ``color/<name>.png``: an indexed PNG, the class indices shown in :data:`mirseg.visualize.PALETTE`;
* ``overlay/<name>.jpg``: the image blended with the colour mask, the background left as it is;
* ``proba/<name>.npy``: the probabilities, float16 ``(C, H, W)``.

The label map is :func:`mirseg.predict.label_map` of the working-resolution probabilities, the
same function ``mirseg eval`` scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mirseg.data.images import encode_indexed_png, write_image
from mirseg.fileio import atomic_path, write_atomic
from mirseg.predict import label_map
from mirseg.visualize import PALETTE, overlay


def output_names(paths: Sequence[str]) -> list[str]:
    """Output file stems, unique (case-insensitively) even when inputs share a stem.

    The first image with a stem keeps it; a later one (``b/x.jpg`` after ``a/x.jpg``, or ``x.png``
    after ``x.jpg``) becomes ``<stem>__2``, ``__3``, ..., skipping any number that is another
    image's stem. Input order decides, and folders and globs are listed sorted, so it is stable.
    """
    stems = [Path(p).stem for p in paths]
    reserved = {s.lower() for s in stems}
    used: set[str] = set()
    names = []
    for stem in stems:
        name = stem
        if name.lower() in used:
            k = 2
            while f"{stem}__{k}".lower() in used or f"{stem}__{k}".lower() in reserved:
                k += 1
            name = f"{stem}__{k}"
        used.add(name.lower())
        names.append(name)
    return names


def write_proba(path: Path, proba: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``proba`` to ``size`` into a float16 ``.npy`` (memory-mapped, written atomically); label, conf."""
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(proba.shape[0], *size))
        label, conf = label_map(proba, size, proba_out=out)
        out.flush()
        del out
    return label, conf


@dataclass(frozen=True)
class ImageOutputs:
    """Which of the per-image files to write into ``out_dir``."""

    out_dir: Path
    labels: bool  # labels/<name>.png
    color: bool  # color/<name>.png
    overlay: bool  # overlay/<name>.jpg (needs the decoded image)
    proba: bool  # proba/<name>.npy
    num_classes: int
    skip: tuple[int, ...] = ()  # classes the overlay leaves unblended (the background)

    def make_dirs(self) -> None:
        """The sub-folders of the files asked for."""
        for sub, on in (("labels", self.labels), ("color", self.color), ("overlay", self.overlay),
                        ("proba", self.proba)):
            if on:
                (self.out_dir / sub).mkdir(parents=True, exist_ok=True)

    def label_map(self, name: str, proba: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The label ``(H, W)`` (uint8, or uint16 above 256 classes) and confidence ``(H, W)`` fp32 at ``size``
        (H, W) from ``proba`` ``(C, h, w)`` at the working resolution, both as numpy arrays; writes
        ``proba/<name>.npy`` when asked. The torch half of an image's outputs: it stays on the thread that runs
        the network (see :meth:`write_images`)."""
        if self.proba:
            label_t, conf = write_proba(self.out_dir / "proba" / f"{name}.npy", proba, size)
        else:
            label_t, conf = label_map(proba, size)
        label = label_t.cpu().numpy().astype(np.uint8 if self.num_classes <= 256 else np.uint16)  # class indices
        return label, conf.cpu().numpy()

    def write_images(self, name: str, label: np.ndarray, original: np.ndarray | None = None) -> None:
        """Write the label, colour and overlay images of ``label`` (:meth:`label_map`); ``original``: the decoded
        ``(H, W, 3)`` uint8 RGB image, needed for the overlay.

        numpy and OpenCV's encoders only, no torch: this half may run on a helper thread, where torch operations
        would start a second pool of intra-op threads beside the network's, on the same cores.
        """
        if self.labels:
            write_image(self.out_dir / "labels" / f"{name}.png", label)
        if self.color:
            write_atomic(self.out_dir / "color" / f"{name}.png", encode_indexed_png(label, PALETTE))
        if self.overlay:
            if original is None:
                raise ValueError(f"{name}: an overlay needs the decoded image (keep_original=True)")
            write_image(self.out_dir / "overlay" / f"{name}.jpg", overlay(original, label, skip=self.skip))

    def record(self, name: str, path: str, error: str | None, label: np.ndarray | None, conf: np.ndarray | None,
               original: np.ndarray | None, encode: Callable[..., tuple[dict, list]] | None) -> dict[str, Any]:
        """Write one image's images (:meth:`write_images`; nothing when ``error``) and return its record for
        ``mirseg infer``'s journal: name, path, error, and with ``encode`` (:func:`mirseg.coco_result.encode_result`)
        the COCO image entry and annotations (None and [] otherwise). No torch: a helper thread may run it."""
        entry, anns = None, []
        if error is None:
            self.write_images(name, label, original)
            if encode is not None:
                entry, anns = encode(path, label, conf)
        return {"name": name, "path": path, "error": error, "image": entry, "anns": anns}
