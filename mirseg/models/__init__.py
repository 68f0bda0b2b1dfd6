"""The eight networks of the original image, as a plain dict and one builder.

Every model takes a normalised image batch ``(N, 3, H, W)`` of any size and returns a dict:

* ``"out"``: logits ``(N, num_classes, H, W)`` at the input resolution (bilinear);
* ``"aux"``: in train mode only, a list of auxiliary logits, each ``(N, num_classes, H, W)``,
  whose loss weights are ``model.aux_weights`` (same order, values from the mmseg configs).

Both are fp32 even under autocast (``_blocks.upsample_logits``), and so is OCRNet's attention.

Models hold no loss. Their ``state_dict()`` keys, shapes and order are mmsegmentation's, so a
model-zoo checkpoint loads with ``strict=True`` (see ``tests/test_parity.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from mirseg.errors import ConfigError
from mirseg.models.deeplabv3plus import DeepLabV3Plus
from mirseg.models.fastscnn import FastSCNN
from mirseg.models.hrnet import HRNetFCN
from mirseg.models.ocrnet import OCRNet

MODELS: dict[str, Callable[[int], nn.Module]] = {
    "fastscnn": FastSCNN,
    "deeplabv3plus_r18": partial(DeepLabV3Plus, depth=18, stem="v1c"),
    "deeplabv3plus_r18b": partial(DeepLabV3Plus, depth=18, stem="plain"),
    "deeplabv3plus_r50": partial(DeepLabV3Plus, depth=50, stem="v1c"),
    "hrnet_w18s": partial(HRNetFCN, small=True),
    "hrnet_w18": partial(HRNetFCN, small=False),
    "ocrnet_hr18s": partial(OCRNet, small=True),
    "ocrnet_hr18": partial(OCRNet, small=False),
}


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build architecture ``name`` (a key of ``MODELS``) with ``num_classes`` output classes."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))} (config_file picks "
                          "one: mirseg models lists the presets)")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    return MODELS[name](num_classes)
