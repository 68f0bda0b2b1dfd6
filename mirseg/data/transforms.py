"""Joint (image, label) transforms: the mmseg Cityscapes pipeline for training, resize + normalise for evaluation.

Training (``algorithms.md`` §4.5), in mmseg's order:

1. keep-ratio resize with ``s ~ U[ratio_range]``: the target is ``(int(scale[0]*s), int(scale[1]*s))``
   and, as mmcv's ``rescale_size`` does, the factor is
   ``min(long target / long side, short target / short side)``, so the preset fits the image whichever
   way round it is and small images are up-scaled; new size ``int(side * factor + 0.5)``. Image bilinear,
   label nearest (OpenCV).
2. random crop ``crop_size = (h, w)`` (the whole side where the image is smaller); with
   ``cat_max_ratio < 1`` the crop is re-drawn up to 10 times until at least two classes are present
   and none covers ``>= cat_max_ratio`` of the crop's non-ignored pixels (255 is left out of the ratio).
3. horizontal flip with probability ``flip_prob`` (image and label together).
4. photometric distortion, mmseg's defaults, each step with p = 0.5: brightness ``+U[-32, 32]``;
   contrast ``xU[0.5, 1.5]``; saturation ``xU[0.5, 1.5]`` and hue ``+[-18, 18]`` (of OpenCV's 0..179) in
   HSV; contrast before or after the HSV steps at random. Every step clips to 0..255 and truncates to
   uint8, as mmseg does. Deliberate differences: hue is drawn from [-18, 18] inclusive (mmseg's
   ``randint(-18, 18)`` never draws +18), and saturation and hue share one HSV round trip (mmseg
   converts twice, rounding twice).
5. normalise with ImageNet mean/std (RGB, 0..255 scale).
6. pad bottom/right to ``crop_size``: image with 0 (after normalising, as mmseg's ``Pad`` follows
   ``Normalize``), label with ``IGNORE_INDEX``.

Each step is a per-pixel lookup table (``cv2.LUT``) or one vectorised numpy expression.

Randomness comes only from the ``numpy.random.Generator`` passed in, so the output is a pure
function of (image, label, generator state); :class:`mirseg.data.dataset.SegDataset` seeds one per
item from (seed, epoch, index).

Evaluation: keep-ratio resize to fit ``scale`` (same rule, no jitter; up- or down-scaled so one side
is tight), normalise; the label is returned **at its original size**, since metrics are computed
at the original resolution (predictions are resized back, as mmseg does).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch

from mirseg.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from mirseg.errors import ConfigError

_CAT_MAX_TRIES = 10  # mmseg RandomCrop: re-draws allowed by cat_max_ratio


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(new_h, new_w) of a keep-ratio resize that fits the image into ``scale`` (mmcv ``rescale_size``).

    ``scale`` is treated as (long side limit, short side limit) whatever order it is given in.
    """
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


def resize_pair(
    image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize image (bilinear) and label (nearest, so no new values appear) to ``size = (h, w)``."""
    h, w = size
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    if label is not None and label.shape != (h, w):
        label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    return image, label


def normalize(image: np.ndarray, pad_to: tuple[int, int] | None = None,
              mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 ``(x - mean) / std`` (:func:`normalize_pixels`), zero-padded
    bottom/right to ``pad_to``."""
    h, w = image.shape[:2]
    out_h, out_w = pad_to if pad_to is not None else (h, w)
    out = (torch.zeros if (out_h, out_w) != (h, w) else torch.empty)((3, out_h, out_w), dtype=torch.float32)
    out[:, :h, :w] = normalize_pixels(torch.from_numpy(np.ascontiguousarray(image)), mean, std).permute(2, 0, 1)
    return out


def normalize_pixels(pixels: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
                     std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """(..., H, W, 3) uint8 RGB -> the same shape in float32, ``(x - mean) / std`` per channel, on its device.

    Each row of ``W * 3`` values is taken against a row of ``W`` repeated means (and stds): broadcasting over a
    last axis of 3 runs 3-value inner loops (64 ms for 1024x2048 on AMD EPYC, against 6 ms so). A batch of them,
    ``.permute(0, 3, 1, 2)``, is a channels-last (N, 3, H, W) network input without a copy.
    """
    if pixels.shape[-1] != 3:
        raise ValueError(f"normalize_pixels takes (..., H, W, 3) RGB, got shape {tuple(pixels.shape)}")
    w = pixels.shape[-2]
    mean_row, std_row = _channel_rows(tuple(mean), tuple(std), w, pixels.device)
    rows = pixels.reshape(*pixels.shape[:-2], w * 3).float()  # (..., H, W*3) fp32 copy
    return rows.sub_(mean_row).div_(std_row).view(pixels.shape)


@functools.lru_cache(maxsize=16)
def _channel_rows(mean: tuple[float, ...], std: tuple[float, ...], width: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(W*3,) fp32 rows of the repeated means and stds on ``device``, made once per width (on a GPU each would be a
    host-to-device copy that waits); read-only."""
    return (torch.tensor(mean, dtype=torch.float32).repeat(width).to(device),
            torch.tensor(std, dtype=torch.float32).repeat(width).to(device))


def _cat_ratio_ok(label_crop: np.ndarray, cat_max_ratio: float) -> bool:
    """mmseg's acceptance test: >= 2 classes and the largest < cat_max_ratio of the non-ignored pixels."""
    counts = np.bincount(label_crop.ravel(), minlength=256)  # (256,) pixels per value
    counts[IGNORE_INDEX] = 0
    present = counts[counts > 0]
    return len(present) > 1 and present.max() / present.sum() < cat_max_ratio


def _lut(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """(256,) uint8 table of clip(v * alpha + beta) truncated to uint8, mmseg's ``convert``."""
    return np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: float = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion`` on an (H, W, 3) uint8 RGB image (see the module docstring)."""
    identity = np.arange(256, dtype=np.uint8)
    # Brightness, then contrast if it goes first: consecutive tables compose as lut2[lut1].
    before = _lut(beta=rng.uniform(-brightness_delta, brightness_delta)) if rng.integers(2) else identity
    contrast_first = bool(rng.integers(2))
    contrast = _lut(alpha=rng.uniform(*contrast_range)) if rng.integers(2) else None
    if contrast_first and contrast is not None:
        before = contrast[before]
    if before is not identity:
        image = cv2.LUT(image, before)

    saturation = _lut(alpha=rng.uniform(*saturation_range)) if rng.integers(2) else None
    hue_shift = int(rng.integers(-hue_delta, hue_delta + 1)) if rng.integers(2) else None
    if saturation is not None or hue_shift is not None:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # uint8: H 0..179, S and V 0..255
        table = np.stack([identity, identity, identity], axis=-1)  # (256, 3): one column per channel
        if hue_shift is not None:
            table[:, 0] = (np.arange(256) + hue_shift) % 180
        if saturation is not None:
            table[:, 1] = saturation
        hsv = cv2.LUT(hsv, table.reshape(256, 1, 3))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    if not contrast_first and contrast is not None:
        image = cv2.LUT(image, contrast)
    return image


class TrainTransform:
    """mmseg's training pipeline: resize jitter, crop, flip, photometric, normalise, pad.

    Args:
        crop_size: (h, w) of the output.
        scale: base resize target, (2048, 1024) in the mmseg Cityscapes configs; see :func:`rescale_size`.
        ratio_range: ``s`` of the resize jitter is uniform in it.
        cat_max_ratio: crop acceptance threshold; 1.0 disables the re-draws.
        flip_prob: probability of a horizontal flip.
        photometric: apply :func:`photometric_distortion`.

    Call ``transform(image (H, W, 3) uint8 RGB, label (H, W) uint8, rng)`` ->
    ``(image float32 tensor (3, h, w), label int64 tensor (h, w))``.
    """

    def __init__(
        self,
        crop_size: tuple[int, int] = (512, 1024),
        scale: tuple[int, int] = (2048, 1024),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ):
        if min(crop_size) < 1 or min(scale) < 1:
            raise ConfigError(f"crop_size {list(crop_size)} and img_scale {list(scale)} must be positive")
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ConfigError(f"ratio_range must be (low, high) with 0 < low <= high, got {list(ratio_range)}")
        if not 0 < cat_max_ratio <= 1:
            raise ConfigError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.photometric = photometric
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # 1. Resize jitter: target scale x s, as mmseg's Resize(ratio_range=...) does with int().
        s = rng.uniform(*self.ratio_range)
        target = (int(self.scale[0] * s), int(self.scale[1] * s))
        image, label = resize_pair(image, label, rescale_size(*label.shape, target))

        # 2. Random crop; the last draw is used unchecked once the re-draws run out (mmseg).
        crop_h, crop_w = self.crop_size
        h, w = label.shape
        y0, x0 = self._crop_origin(h, w, rng)
        if self.cat_max_ratio < 1:
            for _ in range(_CAT_MAX_TRIES):
                if _cat_ratio_ok(label[y0:y0 + crop_h, x0:x0 + crop_w], self.cat_max_ratio):
                    break
                y0, x0 = self._crop_origin(h, w, rng)
        image = image[y0:y0 + crop_h, x0:x0 + crop_w]  # (h', w', 3), h' <= crop_h, w' <= crop_w
        label = label[y0:y0 + crop_h, x0:x0 + crop_w]

        # 3. Flip (views; the copies below make them contiguous).
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]

        # 4. Photometric distortion on uint8.
        image = np.ascontiguousarray(image)
        if self.photometric:
            image = photometric_distortion(image, rng)

        # 5-6. Normalise, pad to the crop size: image with 0, label with 255.
        image_t = normalize(image, pad_to=self.crop_size, mean=self.mean, std=self.std)  # (3, crop_h, crop_w)
        padded = np.full(self.crop_size, IGNORE_INDEX, dtype=np.int64)  # (crop_h, crop_w)
        padded[: label.shape[0], : label.shape[1]] = label
        return image_t, torch.from_numpy(padded)

    def _crop_origin(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
        """Top-left corner of a crop, uniform over the valid offsets (0 where the image is smaller)."""
        y0 = int(rng.integers(0, max(h - self.crop_size[0], 0) + 1))
        x0 = int(rng.integers(0, max(w - self.crop_size[1], 0) + 1))
        return y0, x0


class EvalTransform:
    """Keep-ratio resize to fit ``scale`` and normalise; the label stays at its original size.

    Call ``transform(image (H, W, 3) uint8 RGB, label (H, W) uint8 or None, rng=None)`` ->
    ``(image float32 tensor (3, h, w), label int64 tensor (H, W) or None)``.
    """

    def __init__(
        self,
        scale: tuple[int, int] = (2048, 1024),
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ):
        if min(scale) < 1:
            raise ConfigError(f"img_scale {list(scale)} must be positive")
        self.scale = (int(scale[0]), int(scale[1]))
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(
        self, image: np.ndarray, label: np.ndarray | None = None, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        image, _ = resize_pair(image, None, rescale_size(*image.shape[:2], self.scale))
        image_t = normalize(image, mean=self.mean, std=self.std)  # (3, h, w)
        label_t = None if label is None else torch.from_numpy(label.astype(np.int64))  # (H, W), original size
        return image_t, label_t
