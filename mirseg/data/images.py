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

:func:`read_image_size` gives the size :func:`read_image` would return without decoding the pixels
(the data check reads every image this way before training), and :func:`opencv_threads` is the one
place that sets OpenCV's thread count around a DataLoader fork.
The way back is the one set of encoders every writer uses: :func:`encode_image` (an array to PNG /
JPEG / ... bytes by suffix, JPEG at quality :data:`JPEG_QUALITY`), :func:`encode_indexed_png` (class
indices as a palette PNG) and :func:`write_image` (encoded by the file's suffix and written
atomically, :mod:`mirseg.fileio`).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from mirseg.errors import MirsegError
from mirseg.fileio import write_atomic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""File suffixes treated as images when a folder is scanned (compared lower-case)."""


class ImageError(MirsegError, ValueError):
    """An image file is missing, empty, corrupt or of an unsupported kind; the message names the file."""


def _check_file(path: Path) -> None:
    """Raise :class:`ImageError` for what is wrong before any decoding: missing, a folder, empty."""
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if path.is_dir():
        raise ImageError(f"image path is a directory, not a file: {path}")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageError(f"cannot read image file {path}: {e}") from e
    if size == 0:
        raise ImageError(f"image file is empty (0 bytes): {path}")


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read ``path`` as an (H, W, 3) uint8 RGB array, EXIF orientation applied.

    Raises:
        ImageError: the file is missing, is a directory, is empty, cannot be decoded, or has an
            unsupported sample type.
    """
    path = Path(path)
    _check_file(path)
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


_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees
_JPEG_MAGIC, _JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"  # start of image + first marker; end-of-image marker
_PNG_MAGIC, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND"
# Pillow formats that OpenCV decodes too, in modes read_image accepts; anything else is decoded in
# full, so the answer is OpenCV's (a GIF renamed .jpg, a float TIFF).
_OPENCV_FORMATS = {"JPEG", "PNG", "BMP", "DIB", "TIFF", "WEBP", "PPM", "JPEG2000", "SUN"}
_DECODE_MODES = {"I", "F"}  # 32-bit int / float samples: read_image rejects them (16-bit PNG in mode I passes)


def read_image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(H, W) of the array :func:`read_image` returns for ``path``, read from the file's header.

    Cheap: Pillow parses the header without decoding pixels, and for JPEG and PNG the file's last
    bytes are checked for the end-of-image marker (JPEG ``FF D9``, PNG ``IEND``), which a truncated
    copy lacks. Only where that cheap answer could be wrong is the file decoded in full: a JPEG/PNG
    without its end marker (Pillow decodes it: trailing padding passes, a cut-off file fails); a file
    Pillow cannot parse, or whose format or sample type OpenCV may read differently; an EXIF
    orientation that swaps the sides (whether OpenCV applies it depends on the format and the
    OpenCV version). In those last cases :func:`read_image` itself answers. Not caught at this level:
    damage inside complete-looking pixel data, which :func:`read_image` reports when training reads it.

    Raises:
        ImageError: as :func:`read_image`: missing, a folder, empty, not an image, truncated.
    """
    path = Path(path)
    _check_file(path)
    size = _header_size(path)
    return size if size is not None else read_image(path).shape[:2]


def _header_size(path: Path) -> tuple[int, int] | None:
    """(H, W) from Pillow's reading of the header, or None where only a full decode by OpenCV can tell.

    Raises:
        ImageError: a JPEG or PNG whose data stops before its end marker.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(-min(12, path.stat().st_size), os.SEEK_END)
            tail = f.read()
        with warnings.catch_warnings():
            # A huge picture is the user's own data, not an attack (OpenCV applies its own limit).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format not in _OPENCV_FORMATS or im.mode in _DECODE_MODES:
                    return None
                width, height = im.size
                # A PNG's getexif() decodes the whole image when the header has no eXIf chunk: skip that.
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if im.format != "PNG" or "exif" in im.info else 1
                ended = ((not head.startswith((_JPEG_MAGIC, _PNG_MAGIC)))
                         or (head.startswith(_JPEG_MAGIC) and tail.endswith(_JPEG_END))
                         or (head.startswith(_PNG_MAGIC) and _PNG_END in tail))
                if not ended:
                    try:
                        im.load()  # full decode: "image file is truncated" on a cut-off file
                    except (OSError, SyntaxError, ValueError) as e:
                        raise ImageError(f"image file is truncated or corrupt: {path} ({e}): copy or export it "
                                         "again") from e
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
        return None  # not an image Pillow reads, or a header it cannot parse: let OpenCV decide
    return None if orientation in _SWAPS_SIDES else (height, width)


@contextlib.contextmanager
def opencv_threads(n: int | None) -> Iterator[None]:
    """OpenCV at ``n`` threads inside the block (None: unchanged), restored after.

    Loader workers are forked inside it, so each inherits one OpenCV thread (the workers already run
    in parallel). Setting it in the worker instead (a ``worker_init_fn``) deadlocks when the parent's
    OpenCV thread pool was running at the fork: the child inherits the pool's locks but not its threads.
    """
    if n is None:
        yield
        return
    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


JPEG_QUALITY = 90
"""JPEG quality of every JPEG mirseg writes (overlays) unless the caller passes its own."""


def encode_image(suffix: str, image: np.ndarray, params: Sequence[int] = ()) -> bytes:
    """``image`` encoded in the format of ``suffix`` (``".png"``, ``".jpg"``, ...), as the file's bytes.

    ``image``: (H, W, 3) uint8 RGB, or (H, W) one channel (uint8; uint16 for PNG, e.g. class indices).
    ``params``: OpenCV ``imwrite`` flags, e.g. ``(cv2.IMWRITE_JPEG_QUALITY, 80)``; a JPEG without a quality
    flag gets :data:`JPEG_QUALITY`.
    """
    flags = list(params)
    if suffix.lower() in (".jpg", ".jpeg") and cv2.IMWRITE_JPEG_QUALITY not in flags[::2]:
        flags += [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, buf = cv2.imencode(suffix, bgr, flags)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {suffix} of shape {image.shape}, dtype {image.dtype}")
    return buf.tobytes()


def encode_indexed_png(label: np.ndarray, palette: np.ndarray) -> bytes:
    """(H, W) class indices as an indexed ("P" mode) PNG: pixel values are the indices, shown in the colours of
    ``palette`` (256, 3) uint8 RGB. With more classes than a palette holds: an RGB PNG of ``palette[label % 256]``."""
    if label.max(initial=0) > 255:
        return encode_image(".png", palette[label.astype(np.uint8)])
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(palette.reshape(-1).tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_image(path: str | os.PathLike[str], rgb: np.ndarray, params: Sequence[int] = ()) -> None:
    """Encode (H, W, 3) uint8 RGB (or (H, W) gray) as ``path``'s format (:func:`encode_image`) and write it atomically.

    ``params``: OpenCV ``imwrite`` flags, e.g. ``(cv2.IMWRITE_JPEG_QUALITY, 80)``.
    """
    write_atomic(path, encode_image(Path(path).suffix, rgb, params))
