"""Decode an image file into the one array layout the rest of mirseg uses: (H, W, 3) uint8 RGB.

Training, evaluation, inference and mining all call :func:`read_image`, so a picture looks the
same to the model in every task. The decisions, in one place:

- **Decoder.** OpenCV ``imdecode`` on the file's bytes (read with numpy, so non-ASCII paths work
  on every OS), with ``IMREAD_COLOR | IMREAD_ANYDEPTH``. ``IMREAD_COLOR`` makes the result
  3-channel whatever the source (grayscale is replicated, a palette is expanded, **alpha is
  dropped**, not composited); ``IMREAD_ANYDEPTH`` keeps 16-bit samples, so the 16 → 8 bit rule
  below is ours rather than the codec's.
- **EXIF orientation is applied.** OpenCV rotates/flips by the EXIF ``Orientation`` tag for every
  flag set except ``IMREAD_UNCHANGED`` and ``IMREAD_IGNORE_ORIENTATION``; we use neither, and
  ``tests/test_data.py`` checks it on a JPEG carrying the tag. The result is the image as a viewer
  shows it, which is also how annotation tools (CVAT, Label Studio) display it.
- **16-bit** samples become 8-bit by ``>> 8`` (keep the high byte). That is a fixed,
  content-independent mapping, the same one libpng's ``strip_16`` and OpenCV's own 8-bit path
  use, and it turns an 8-bit image stored as 16-bit (``v * 257``) back into exactly ``v``.
  Data that only uses the low bits (e.g. 12-bit sensors) comes out dark: rescale it beforehand.
  Per-image min/max stretching was rejected because it makes brightness depend on content.
- Other sample types (float or 32-bit TIFF, ...) raise :class:`ImageError`: there is no
  scaling rule that is right for all of them.

:func:`write_image` is the way back: an (H, W, 3) RGB array encoded by the file's suffix and
written atomically (:mod:`mirseg.fileio`).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from mirseg.errors import MirsegError
from mirseg.fileio import write_atomic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""File suffixes treated as images when a folder is scanned (compared lower-case)."""


class ImageError(MirsegError, ValueError):
    """An image file is missing, empty, corrupt or of an unsupported kind; the message names the file."""


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read ``path`` as an (H, W, 3) uint8 RGB array, EXIF orientation applied.

    Raises:
        ImageError: the file is missing, is a directory, is empty, cannot be decoded, or has an
            unsupported sample type.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if path.is_dir():
        raise ImageError(f"image path is a directory, not a file: {path}")
    try:
        data = np.fromfile(path, dtype=np.uint8)  # (num_bytes,)
    except OSError as e:
        raise ImageError(f"cannot read image file {path}: {e}") from e
    if data.size == 0:
        raise ImageError(f"image file is empty (0 bytes): {path}")

    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)  # (H, W, 3) BGR, uint8 or uint16
    if image is None or image.size == 0:
        raise ImageError(f"cannot decode image file {path}: corrupt, truncated or not an image format OpenCV reads")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(
            f"unsupported sample type {image.dtype} in image file {path}: convert it to 8- or 16-bit integer samples"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def write_image(path: str | os.PathLike[str], rgb: np.ndarray, params: tuple[int, ...] = ()) -> None:
    """Encode (H, W, 3) uint8 RGB (or (H, W) gray) as ``path``'s format and write it atomically.

    ``params``: OpenCV ``imwrite`` flags, e.g. ``(cv2.IMWRITE_JPEG_QUALITY, 80)``.
    """
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    ok, buf = cv2.imencode(Path(path).suffix, bgr, list(params))
    if not ok:
        raise ValueError(f"OpenCV could not encode {path} (shape {rgb.shape}, dtype {rgb.dtype})")
    write_atomic(path, buf.tobytes())
