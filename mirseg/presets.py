"""Presets: one per architecture and crop, with the numbers of the mmseg config they mirror.

``config_file`` names a preset (:data:`PRESETS`) or one of the original image's mmseg config paths
(:data:`MMSEG_CONFIGS`, each mapped to its preset and, for the docs, the config's schedule); :func:`resolve_preset`
accepts both, with a "did you mean" for a typo.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mirseg.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """What an mmseg config fixes: architecture, crop, scales, optimiser and test mode."""

    model: str
    crop_size: tuple[int, int] = (512, 1024)  # (h, w)
    img_scale: tuple[int, int] = (2048, 1024)  # (w, h): train resize base and test scale
    lr: float = 0.01
    weight_decay: float = 5e-4
    batch_size: int = 8  # total batch the schedule was designed for (GPUs x samples_per_gpu)
    test_mode: Literal["whole", "slide"] = "whole"
    slide_stride: tuple[int, int] = (513, 513)


_P769 = dict(crop_size=(769, 769), img_scale=(2049, 1025), test_mode="slide")

PRESETS: dict[str, Preset] = {
    "fastscnn": Preset("fastscnn", lr=0.12, weight_decay=4e-5, batch_size=32),
    "deeplabv3plus_r18": Preset("deeplabv3plus_r18"),
    "deeplabv3plus_r18_769": Preset("deeplabv3plus_r18", **_P769),
    "deeplabv3plus_r18b": Preset("deeplabv3plus_r18b"),
    "deeplabv3plus_r18b_769": Preset("deeplabv3plus_r18b", **_P769),
    "deeplabv3plus_r50": Preset("deeplabv3plus_r50"),
    "deeplabv3plus_r50_769": Preset("deeplabv3plus_r50", **_P769),
    "hrnet_w18s": Preset("hrnet_w18s"),
    "hrnet_w18": Preset("hrnet_w18"),
    "ocrnet_hr18s": Preset("ocrnet_hr18s"),
    "ocrnet_hr18": Preset("ocrnet_hr18"),
}


def _mmseg_config_paths() -> dict[str, tuple[str, int]]:
    """The original image's mmseg config paths -> (preset, the config's schedule in iterations, for the docs).

    A preset's own config (the one it mirrors, whose model-zoo weights are its pretrained start)
    is the first path listed for it. ``max_iters`` is the user's key: a config path never sets it.
    """
    table: dict[str, tuple[str, int]] = {
        "configs/fastscnn/fast_scnn_lr0.12_8x4_160k_cityscapes.py": ("fastscnn", 160000),
        "configs/deeplabv3plus/deeplabv3plus_r50-d8_512x1024_40k_cityscapes.py": ("deeplabv3plus_r50", 40000),
        "configs/deeplabv3plus/deeplabv3plus_r50-d8_769x769_40k_cityscapes.py": ("deeplabv3plus_r50_769", 40000),
        "configs/deeplabv3plus/deeplabv3plus_r18-d8_512x1024_80k_cityscapes.py": ("deeplabv3plus_r18", 80000),
        "configs/deeplabv3plus/deeplabv3plus_r18-d8_769x769_80k_cityscapes.py": ("deeplabv3plus_r18_769", 80000),
        "configs/deeplabv3plus/deeplabv3plus_r18b-d8_512x1024_80k_cityscapes.py": ("deeplabv3plus_r18b", 80000),
        "configs/deeplabv3plus/deeplabv3plus_r18b-d8_769x769_80k_cityscapes.py": ("deeplabv3plus_r18b_769", 80000),
    }
    for iters in (40, 80, 160):
        for arch, stem in (("hrnet_w18s", "fcn_hr18s"), ("hrnet_w18", "fcn_hr18")):
            table[f"configs/hrnet/{stem}_512x1024_{iters}k_cityscapes.py"] = (arch, iters * 1000)
        for arch in ("ocrnet_hr18s", "ocrnet_hr18"):
            short = arch.replace("ocrnet_", "")
            table[f"configs/ocrnet/ocrnet_{short}_512x1024_{iters}k_cityscapes.py"] = (arch, iters * 1000)
    return table


MMSEG_CONFIGS = _mmseg_config_paths()


def resolve_preset(config_file: str) -> Preset:
    """A preset from its name or from one of the original image's mmseg config paths."""
    key = config_file.strip()
    if key in PRESETS:
        return PRESETS[key]
    # Accept the path with or without a leading "./" or a repository prefix before "configs/".
    norm = key.replace("\\", "/")
    if "configs/" in norm:
        norm = "configs/" + norm.split("configs/", 1)[1]
    if norm in MMSEG_CONFIGS:
        return PRESETS[MMSEG_CONFIGS[norm][0]]
    choices = list(PRESETS) + list(MMSEG_CONFIGS)
    hint = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    raise ConfigError(
        f"config_file: unknown preset or mmseg config {config_file!r}"
        + (f"; did you mean {hint[0]!r}?" if hint else "")
        + f" Presets: {', '.join(PRESETS)}; or one of the original image's config paths, e.g. "
        "configs/fastscnn/fast_scnn_lr0.12_8x4_160k_cityscapes.py"
    )


def fit_to_images(config_file: str, img_scale: Sequence[int] | str | None, crop_size: Sequence[int] | None,
                  image_sizes: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], tuple[int, int], str]:
    """``(img_scale (w, h), crop_size (h, w), why)`` of preset ``config_file`` for training images of
    ``image_sizes`` (h, w), given the user's ``img_scale`` and ``crop_size`` (``None``: not given).

    The mmseg configs' scales are Cityscapes' (2048x1024): kept for 480x360 images, training would
    blow them up 2.8x around it and evaluate there, at 8x the pixels, for nothing the data holds. So
    an ``img_scale`` not given (or ``auto``) is the images' median width and height, and ``preset``
    (or no images to look at) takes the preset's. A ``crop_size`` not given is the preset's, clipped
    to the scale: a crop larger than the images is padding the network learns nothing from.
    """
    p, name = resolve_preset(config_file), config_file
    if isinstance(img_scale, (tuple, list)):
        scale, scale_why = tuple(img_scale), "as given"
    elif img_scale == "preset" or not image_sizes:
        scale, scale_why = p.img_scale, f"the preset's ({name})"
    else:
        heights, widths = zip(*image_sizes)
        scale = (int(np.median(widths)), int(np.median(heights)))
        scale_why = (f"the median size of the {len(image_sizes)} training images (img_scale=preset gives the "
                     f"preset's {list(p.img_scale)})")
    if crop_size:
        crop, crop_why = tuple(crop_size), "as given"
    else:
        # (h, w) of the median image at img_scale is (scale[1], scale[0]) in either orientation.
        crop = (min(p.crop_size[0], scale[1]), min(p.crop_size[1], scale[0]))
        crop_why = (f"the preset's {list(p.crop_size)}" + (" clipped to img_scale" if crop != p.crop_size else ""))
    return scale, crop, f"img_scale {list(scale)} (w, h): {scale_why}; crop_size {list(crop)} (h, w): {crop_why}"
