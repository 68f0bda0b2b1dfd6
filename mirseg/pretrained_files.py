"""The known pretrained starts as data: each preset's model-zoo checkpoint and ImageNet backbone file.

The model zoo is the original image's performance table (mmsegmentation v0.5 Cityscapes
checkpoints); the ImageNet backbones are the files mmcv (``open-mmlab://``) and torchvision
(``torchvision://``) publish, which the mmseg configs start from. Each :class:`WeightFile` has its
publisher's URL and the sha256 prefix in its name; :mod:`mirseg.pretrained` finds and loads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mirseg.download import hash_in_name
from mirseg.presets import MMSEG_CONFIGS, PRESETS


@dataclass(frozen=True)
class WeightFile:
    """One published starting point."""

    name: str  # the file name; ends in -<first 8 hex digits of its sha256>.pth
    url: str  # where its publisher serves it
    kind: Literal["zoo", "imagenet"]
    models: tuple[str, ...]  # the architectures (mirseg.models.MODELS keys) it fits
    config: str = ""  # zoo: the mmseg config it was trained with (a key of MMSEG_CONFIGS)
    published_as: str = ""  # imagenet: the name mmseg configs give it
    ignore: tuple[str, ...] = ()  # imagenet: key prefixes of the classification head, not loaded

    @property
    def sha256_prefix(self) -> str:
        return hash_in_name(self.name)

    @property
    def presets(self) -> list[str]:
        return [name for name, p in PRESETS.items() if p.model in self.models]


# -- the model zoo: the original image's performance table (mmseg v0.5 Cityscapes checkpoints).
_ZOO_BASE = "https://download.openmmlab.com/mmsegmentation/v0.5"
_ZOO: list[tuple[str, str, str]] = [  # (mmseg config, folder on the server, the file's date-hash tag)
    ("configs/fastscnn/fast_scnn_lr0.12_8x4_160k_cityscapes.py", "fast_scnn", "20210630_164853-0cec9937"),
    ("configs/hrnet/fcn_hr18s_512x1024_40k_cityscapes.py", "hrnet", "20200601_014216-93db27d0"),
    ("configs/hrnet/fcn_hr18_512x1024_40k_cityscapes.py", "hrnet", "20200601_014216-f196fb4e"),
    ("configs/hrnet/fcn_hr18s_512x1024_80k_cityscapes.py", "hrnet", "20200601_202700-1462b75d"),
    ("configs/hrnet/fcn_hr18_512x1024_80k_cityscapes.py", "hrnet", "20200601_223255-4e7b345e"),
    ("configs/hrnet/fcn_hr18s_512x1024_160k_cityscapes.py", "hrnet", "20200602_190901-4a0797ea"),
    ("configs/hrnet/fcn_hr18_512x1024_160k_cityscapes.py", "hrnet", "20200602_190822-221e4a4f"),
    ("configs/deeplabv3plus/deeplabv3plus_r50-d8_512x1024_40k_cityscapes.py", "deeplabv3plus",
     "20200605_094610-d222ffcd"),
    ("configs/deeplabv3plus/deeplabv3plus_r50-d8_769x769_40k_cityscapes.py", "deeplabv3plus",
     "20200606_114143-1dcb0e3c"),
    ("configs/deeplabv3plus/deeplabv3plus_r18-d8_512x1024_80k_cityscapes.py", "deeplabv3plus",
     "20201226_080942-cff257fe"),
    ("configs/deeplabv3plus/deeplabv3plus_r18-d8_769x769_80k_cityscapes.py", "deeplabv3plus",
     "20201226_083346-f326e06a"),
    ("configs/deeplabv3plus/deeplabv3plus_r18b-d8_512x1024_80k_cityscapes.py", "deeplabv3plus",
     "20201226_090828-e451abd9"),
    ("configs/deeplabv3plus/deeplabv3plus_r18b-d8_769x769_80k_cityscapes.py", "deeplabv3plus",
     "20201226_151312-2c868aff"),
    ("configs/ocrnet/ocrnet_hr18s_512x1024_40k_cityscapes.py", "ocrnet", "20200601_033304-fa2436c2"),
    ("configs/ocrnet/ocrnet_hr18_512x1024_40k_cityscapes.py", "ocrnet", "20200601_033320-401c5bdd"),
    ("configs/ocrnet/ocrnet_hr18s_512x1024_80k_cityscapes.py", "ocrnet", "20200601_222735-55979e63"),
    ("configs/ocrnet/ocrnet_hr18_512x1024_80k_cityscapes.py", "ocrnet", "20200614_230521-c2e1dd4a"),
    ("configs/ocrnet/ocrnet_hr18s_512x1024_160k_cityscapes.py", "ocrnet", "20200602_191005-f4a7af28"),
    ("configs/ocrnet/ocrnet_hr18_512x1024_160k_cityscapes.py", "ocrnet", "20200602_191001-b9172d0c"),
]

# -- ImageNet backbones, as mmcv (open-mmlab://) and torchvision (torchvision://) publish them.
_MMCV = "https://download.openmmlab.com/pretrain/third_party"
_RESNET_HEAD = ("fc.",)
_HRNET_HEAD = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
_IMAGENET: list[tuple[str, str, str, tuple[str, ...], tuple[str, ...]]] = [  # name, url, published as, models, head
    ("resnet18_v1c-b5776b93.pth", _MMCV, "open-mmlab://resnet18_v1c", ("deeplabv3plus_r18",), _RESNET_HEAD),
    ("resnet50_v1c-2cccc1ad.pth", _MMCV, "open-mmlab://resnet50_v1c", ("deeplabv3plus_r50",), _RESNET_HEAD),
    ("resnet18-f37072fd.pth", "https://download.pytorch.org/models", "torchvision://resnet18",
     ("deeplabv3plus_r18b",), _RESNET_HEAD),
    ("hrnetv2_w18_small-b5a04e21.pth", _MMCV, "open-mmlab://msra/hrnetv2_w18_small", ("hrnet_w18s", "ocrnet_hr18s"),
     _HRNET_HEAD),
    ("hrnetv2_w18-00eb2006.pth", _MMCV, "open-mmlab://msra/hrnetv2_w18", ("hrnet_w18", "ocrnet_hr18"), _HRNET_HEAD),
]


def config_stem(config: str) -> str:
    return Path(config).name.removesuffix(".py")


def _known() -> dict[str, WeightFile]:
    files: list[WeightFile] = []
    for config, folder, tag in _ZOO:
        stem = config_stem(config)
        name = f"{stem}_{tag}.pth"
        model = PRESETS[MMSEG_CONFIGS[config][0]].model
        files.append(WeightFile(name, f"{_ZOO_BASE}/{folder}/{stem}/{name}", "zoo", (model,), config=config))
    for name, base, published, models, head in _IMAGENET:
        files.append(WeightFile(name, f"{base}/{name}", "imagenet", models, published_as=published, ignore=head))
    return {f.name: f for f in files}


KNOWN: dict[str, WeightFile] = _known()

# The config each preset mirrors: the one with the preset's name and nominal schedule.
PRESET_CONFIG: dict[str, str] = {}
for _path, (_preset, _iters) in MMSEG_CONFIGS.items():  # a preset's own config is the first listed for it
    PRESET_CONFIG.setdefault(_preset, _path)


def zoo_file(preset: str) -> WeightFile | None:
    """The model-zoo checkpoint of a preset's own mmseg config."""
    config = PRESET_CONFIG.get(preset)
    return next((f for f in KNOWN.values() if f.kind == "zoo" and f.config == config), None)


def imagenet_file(model: str) -> WeightFile | None:
    """The ImageNet backbone file of an architecture (None for FastSCNN, which its config trains from scratch)."""
    return next((f for f in KNOWN.values() if f.kind == "imagenet" and model in f.models), None)


def head_prefixes(model: str) -> tuple[str, ...]:
    """The classification-head keys an ImageNet file of ``model``'s backbone carries."""
    backbone = imagenet_file(model)
    return backbone.ignore if backbone is not None else ()
