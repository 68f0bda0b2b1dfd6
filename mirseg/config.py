"""Configuration: frozen dataclasses loaded from YAML plus ``key=value`` overrides.

Key names follow the original YMIR image's hyper-parameters wherever one exists
(``config_file``, ``samples_per_gpu``, ``max_iters``, ``interval``, ``ignore_blank_area``, ...).
A key the command does not use is a ``ConfigError`` with a "did you mean" hint and the command's
keys (:func:`check_keys`, also for ``mirseg eval``'s :data:`EVAL_KEYS` and the YMIR task configs);
values are coerced to the field's type (the YMIR web form sends numbers and booleans as strings) or
rejected with the key named; output folders are checked before any work (:func:`check_output_dir`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mirseg.errors import ConfigError, MissingFileError
from mirseg.fileio import write_atomic

# ---------------------------------------------------------------------------------------------
# Presets: one per architecture and crop, with the numbers of the mmseg config they mirror.


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


# ---------------------------------------------------------------------------------------------
# The training configuration.


@dataclass(frozen=True)
class TrainConfig:
    """Every option of ``mirseg train``; ``None`` means "from the preset of ``config_file``"."""

    # -- model
    config_file: str = "fastscnn"  # preset name (see PRESETS) or the original image's mmseg config path
    class_names: tuple[str, ...] = ()  # class order; empty: the COCO categories in file order
    ignore_blank_area: bool = False  # true: unannotated pixels are ignored; false: class "background"
    weights: str = ""  # initial weights: mirseg or mmseg checkpoint, or a state dict (wins over pretrained)
    pretrained: str = "auto"  # auto (model-zoo file, else ImageNet backbone, in weights_dir; else random), none, a file
    weights_dir: str = ""  # where auto looks; default $MIRSEG_WEIGHTS, else ~/.cache/mirseg/weights
    trust_checkpoint: bool = False  # true: fully unpickle weights / resume files (runs their code: trusted files only)
    # -- data: COCO (ann + images) or label-PNG folders (images + labels)
    train_ann: str = ""  # COCO JSON of the training set
    train_images: str = ""  # image folder, or a text file listing image paths
    train_labels: str = ""  # folder of label PNGs matched by file stem (instead of train_ann)
    val_ann: str = ""  # COCO JSON of the validation set (none: no metrics, no best checkpoint)
    val_images: str = ""  # validation image folder or list file
    val_labels: str = ""  # validation label-PNG folder (instead of val_ann)
    coco_class_by: Literal["name", "id"] = "name"  # match COCO categories by name, or category_id = class index
    skip_bad_images: bool = False  # train without the unreadable images and bad labels the data check finds
    # -- schedule (the original image's names and defaults)
    samples_per_gpu: int = 2  # batch per process
    workers_per_gpu: int = 2  # data-loading worker processes per process
    max_iters: int = 20000  # training iterations; the poly schedule decays over them
    interval: int = 2000  # evaluate and checkpoint every this many iterations
    save_least_file: bool = True  # keep only the best and last checkpoints
    max_keep_ckpts: int = -1  # with save_least_file false: iteration checkpoints kept (-1: all)
    # -- optimiser
    lr: float | None = None  # base lr of the preset's design batch
    weight_decay: float | None = None  # SGD weight decay (preset: 4e-5 FastSCNN, 5e-4 others)
    momentum: float = 0.9  # SGD momentum
    min_lr: float = 1e-4  # poly decay floor
    power: float = 0.9  # poly decay exponent
    scale_lr: bool = True  # scale lr linearly with total batch / the preset's design batch
    class_weight: tuple[float, ...] | str = ()  # per-class loss weights, or "auto"
    # -- augmentation
    crop_size: tuple[int, int] | None = None  # (h, w)
    img_scale: tuple[int, int] | None = None  # (w, h)
    ratio_range: tuple[float, float] = (0.5, 2.0)  # random resize factor range around img_scale
    cat_max_ratio: float = 0.75  # re-draw a crop where one class covers more than this share
    # -- evaluation
    test_mode: Literal["whole", "slide"] | None = None  # evaluation: whole image or sliding window
    slide_crop: tuple[int, int] | None = None  # (h, w); default: crop_size
    slide_stride: tuple[int, int] | None = None  # (h, w)
    # -- runtime
    work_dir: str = "runs/train"  # checkpoints, config.yaml and TensorBoard logs go here
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    seed: int = 0  # seeds weights, data order and augmentation (reproducible on CPU)
    resume: bool = False  # continue from work_dir/last.pth with the same schedule
    log_interval: int = 50  # loss/lr: a log line and TensorBoard scalars every this many iterations
    tensorboard_dir: str = ""  # default: work_dir/tensorboard

    def __post_init__(self) -> None:
        _check_counts(self, ("samples_per_gpu", "max_iters", "interval", "log_interval"), ("workers_per_gpu",))
        _check_sizes(self, ("crop_size", "img_scale", "slide_crop", "slide_stride"))
        if self.max_keep_ckpts < -1 or self.max_keep_ckpts == 0:
            raise ConfigError(f"max_keep_ckpts must be -1 (all) or >= 1, got {self.max_keep_ckpts}")
        if isinstance(self.class_weight, str) and self.class_weight not in ("", "auto"):
            raise ConfigError(f"class_weight must be a list of numbers or 'auto', got {self.class_weight!r}")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ConfigError(f"ratio_range must be (low, high) with 0 < low <= high, got {list(self.ratio_range)}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ConfigError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        resolve_preset(self.config_file)  # fail early on an unknown preset

    @property
    def preset(self) -> Preset:
        return resolve_preset(self.config_file)

    @property
    def model(self) -> str:
        return self.preset.model

    def resolved(self) -> TrainConfig:
        """A copy with every preset-dependent ``None`` filled in (what gets saved)."""
        p = self.preset
        crop = self.crop_size or p.crop_size
        return dataclasses.replace(
            self,
            lr=p.lr if self.lr is None else self.lr,
            weight_decay=p.weight_decay if self.weight_decay is None else self.weight_decay,
            crop_size=crop,
            img_scale=self.img_scale or p.img_scale,
            test_mode=self.test_mode or p.test_mode,
            slide_crop=self.slide_crop or crop,
            slide_stride=self.slide_stride or p.slide_stride,
        )


# ---------------------------------------------------------------------------------------------
# Inference and mining. ``None`` means "from the checkpoint's saved config" (its preset's test scale
# and mode), so a model infers the way it was evaluated.


@dataclass(frozen=True)
class InferConfig:
    """Every option of ``mirseg infer``."""

    checkpoint: str = ""  # a mirseg checkpoint (best.pth / last.pth)
    trust_checkpoint: bool = False  # true: fully unpickle the checkpoint (runs its code: trusted files only)
    images: str = ""  # image folder, glob pattern ("data/*.jpg"), or a text file listing image paths
    out_dir: str = "runs/infer"  # where the outputs go
    samples_per_gpu: int = 2  # images per forward pass (same-size images are batched together)
    workers_per_gpu: int = 2  # image-decoding worker processes
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: bool = False  # autocast: fp16 on CUDA, bf16 on CPU; softmax stays fp32
    img_scale: tuple[int, int] | None = None  # (w, h) keep-ratio test scale; default: the checkpoint's
    test_mode: Literal["whole", "slide"] | None = None  # whole image or sliding window; default: the checkpoint's
    slide_crop: tuple[int, int] | None = None  # (h, w) sliding-window size; default: the checkpoint's
    slide_stride: tuple[int, int] | None = None  # (h, w) sliding-window stride; default: the checkpoint's
    flip: bool = False  # test-time augmentation: average with the horizontally flipped image
    scales: tuple[float, ...] = ()  # test-time augmentation: img_scale ratios, e.g. [0.75, 1.0, 1.25]
    save_labels: bool = True  # labels/<stem>.png: class index per pixel
    save_color: bool = False  # color/<stem>.png: the class colours of mirseg.visualize.PALETTE
    save_overlay: bool = False  # overlay/<stem>.jpg: the image blended with the colour mask
    save_coco: bool = True  # predictions.json: COCO, one compressed-RLE annotation per (image, class)
    save_proba: bool = False  # proba/<stem>.npy: float16 softmax (C, H, W) at the original size
    resume: bool = False  # continue the interrupted run in out_dir, skipping its finished images; false: start over

    def __post_init__(self) -> None:
        _check_counts(self, ("samples_per_gpu",), ("workers_per_gpu",))
        _check_sizes(self, ("img_scale", "slide_crop", "slide_stride"))
        if not all(s > 0 for s in self.scales):
            raise ConfigError(f"scales must be positive ratios of img_scale, e.g. [0.75, 1.0, 1.25], "
                              f"got {list(self.scales)}")


@dataclass(frozen=True)
class MineConfig:
    """Every option of ``mirseg mine`` (the original image's mining keys and defaults)."""

    checkpoint: str = ""  # a mirseg checkpoint (best.pth / last.pth)
    trust_checkpoint: bool = False  # true: fully unpickle the checkpoint (runs its code: trusted files only)
    images: str = ""  # candidate pool: image folder, glob pattern, or a text file listing image paths
    out_dir: str = "runs/mine"  # result.tsv (and masks/ overlays/) go here
    mining_algorithm: str = "rsal"  # rsal, ripu, random, entropy, margin, least_confidence (any case)
    superpixel_algorithm: str = "slico"  # rsal: slico, slic, mslic, seeds
    uncertainty_method: str = "bvsb"  # rsal: bvsb (the original's only one), entropy, margin, least_confidence
    max_superpixel_per_image: int = 1024  # rsal: superpixels per image, at most
    superpixel_cell: int = 8  # rsal: superpixels run on a copy shrunk until one is ~cell x cell px (0: full size)
    max_kept_mining_image: int = 5000  # images the pool-wide threshold aims at; masks are saved for these
    topk_superpixel_score: int = 3  # rsal: best superpixels that make an image's score
    class_balance: bool = True  # rsal: weight superpixels by exp(-share of their dominant class)
    ripu_region_radius: int = 1  # ripu: regions are (2r+1)x(2r+1) windows
    reduction: str = "mean"  # baselines: image score = mean, max, sum or topk (mean of the top topk_percent)
    topk_percent: float = 10.0  # baselines with reduction topk: the share of pixels averaged
    sampling: Literal["top", "power"] = "top"  # top: sort by score; power: draw max_kept_mining_image by score^beta
    power_beta: float = 1.0  # sampling power: the exponent (larger: closer to plain top-N)
    samples_per_gpu: int = 2  # images per forward pass
    workers_per_gpu: int = 2  # image-decoding worker processes
    fp16: bool = True  # autocast fp16 on CUDA (ignored on CPU)
    bf16: bool = False  # autocast bf16 on CPU
    img_scale: tuple[int, int] | None = None  # (w, h) working resolution; default: the checkpoint's test scale
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    seed: int = 0  # random baseline and power sampling
    save_masks: bool = False  # masks/ and overlays/ of the chosen regions for the top max_kept_mining_image
    max_saved_masks: int = 1000  # save_masks: at most this many images (each costs one more forward pass)
    resume: bool = False  # continue the interrupted run in out_dir, skipping its finished images; false: start over

    def __post_init__(self) -> None:
        # The algorithm knobs are checked by mirseg.mining.MiningParams, which mine() builds before any work.
        _check_counts(self, ("samples_per_gpu",), ("workers_per_gpu", "max_saved_masks"))
        _check_sizes(self, ("img_scale",))
        if not self.power_beta >= 0:
            raise ConfigError(f"power_beta must be >= 0, got {self.power_beta}")


def _check_counts(cfg: Any, positive: Iterable[str], non_negative: Iterable[str] = ()) -> None:
    """Integer keys that must be >= 1 (``positive``) or >= 0; a ConfigError names the key."""
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    for key in non_negative:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")


def _check_sizes(cfg: Any, keys: Iterable[str]) -> None:
    """(a, b) size keys: ``None`` (the default) or two positive integers."""
    for key in keys:
        value = getattr(cfg, key)
        if value is not None and not all(v > 0 for v in value):
            raise ConfigError(f"{key} must be two positive integers, got {list(value)}")


ALIASES: dict[str, str] = {
    "ignore_black_area": "ignore_blank_area",  # the seed README's spelling
}

COMMANDS: dict[type, str] = {TrainConfig: "mirseg train", InferConfig: "mirseg infer", MineConfig: "mirseg mine"}
"""The command each config class belongs to, for messages."""

EVAL_KEYS: tuple[str, ...] = (
    "val_ann", "val_images", "val_labels", "coco_class_by", "img_scale", "test_mode", "slide_crop", "slide_stride",
    "device", "trust_checkpoint",
)
"""The TrainConfig keys ``mirseg eval`` uses (read by ``train.evaluate_checkpoint``); any other key is an error.

The architecture, the classes and the background mode (``config_file``, ``class_names``,
``ignore_blank_area``) come from the checkpoint, so a value for them would be ignored or contradict it.
"""

_EVAL_NOTE = ("eval runs the checkpoint as it was trained: its architecture, classes and ignore_blank_area come "
              "from the checkpoint, and training keys do not apply")

# Keys that name a folder the command writes into.
OUTPUT_DIR_KEYS = ("work_dir", "tensorboard_dir", "out_dir")

# ---------------------------------------------------------------------------------------------
# Loading and coercion.

C = TypeVar("C")

TRUE_WORDS = ("true", "t", "yes", "on", "1")
FALSE_WORDS = ("false", "f", "no", "off", "0", "none", "")


def parse_bool(value: Any, key: str) -> bool:
    """``value`` as a boolean, for every true/false key of mirseg and of YMIR's env.yaml.

    Accepts a bool, the numbers 0 and 1, None (false) and, in any case and with surrounding
    spaces, :data:`TRUE_WORDS` / :data:`FALSE_WORDS` (the empty string is false); anything else
    is a ConfigError naming ``key`` and the spellings.
    """
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = value.strip().lower() if isinstance(value, str) else None
    if text in TRUE_WORDS or text in FALSE_WORDS:
        return text in TRUE_WORDS
    raise ConfigError(f"{key}: expected true or false, got {value!r} (true: {', '.join(TRUE_WORDS)}; false: "
                      f"{', '.join(w or repr(w) for w in FALSE_WORDS)})")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` converted to annotation ``tp``, or a ConfigError that names ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"{key}: cannot use {value!r}")
    if origin is Literal:
        text = str(value).strip().lower() if isinstance(value, str) else value
        if text in args:
            return text
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip()
            try:
                parsed = yaml.safe_load(text) if text else []
            except (yaml.YAMLError, RecursionError):
                parsed = None
            value = parsed if isinstance(parsed, list) else [p for p in text.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if tp is bool:
        return parse_bool(value, key)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value  # exact, however large (float() would overflow)
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list, tuple, set)):
            raise ConfigError(f"{key}: expected text, got {value!r}")
        return "" if value is None else str(value)
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def field_help(cls: type) -> dict[str, str]:
    """The comment after each field in the class source: one place documents a key, for --help and docs."""
    import inspect
    import re

    helps: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]*#\s*(.+)$", line)
        if m:
            helps[m.group(1)] = m.group(2).strip()
    return helps


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_keys(keys: Iterable[Any], allowed: Iterable[str], source: str, command: str,
               known: Iterable[str] = (), note: str = "") -> None:
    """Every key must be one of ``allowed`` (or an alias of one), else a ConfigError naming each bad key.

    The one check of keys, for the config classes, ``mirseg eval`` and the YMIR task configs: a typo gets a
    "did you mean", the message ends with ``command``'s keys. ``note`` says why a key of ``known`` (keys
    of a wider config, e.g. TrainConfig's for eval) is refused all the same.
    """
    allowed, known = list(allowed), set(known)
    names = allowed + [alias for alias, key in ALIASES.items() if key in allowed]
    bad = []
    for key in keys:
        if not isinstance(key, str):
            raise ConfigError(f"{source}: {key!r} is not a key name; keys are words such as {allowed[0]!r}")
        if ALIASES.get(key, key) not in allowed:
            bad.append(key)
    if not bad:
        return
    parts = []
    for key in bad:
        hint = difflib.get_close_matches(key, names, n=1)
        parts.append(repr(key) + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    why = f" ({note})" if note and any(ALIASES.get(k, k) in known for k in bad) else ""
    raise ConfigError(f"{source}: {command} does not use {', '.join(parts)}{why}; fix or remove "
                      f"{'it' if len(bad) == 1 else 'them'}. Keys of {command}: {', '.join(allowed)}")


def build_config(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """``cls(**values)`` with aliases applied, unknown keys rejected and values coerced."""
    types_ = field_types(cls)
    check_keys(values, types_, source, COMMANDS.get(cls, cls.__name__))
    kwargs = {ALIASES.get(key, key): value for key, value in values.items()}
    kwargs = {key: _coerce(f"{source}: {key}", value, types_[key]) for key, value in kwargs.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=0.01", "crop_size=[256,256]"]`` -> dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"argument {item!r} is not key=value (e.g. max_iters=1000)")
        text = text.strip()
        try:
            value = yaml.safe_load(text) if text else ""
        except (yaml.YAMLError, RecursionError):
            value = text
        out[key.strip()] = value
    return out


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The ``key: value`` mapping of a YAML file, with clear errors for a missing or malformed file.

    Raises:
        MissingFileError: there is no such file.
        ConfigError: a folder, unreadable, not YAML, or not a mapping with text keys.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder, not a YAML file")
    if not p.is_file():
        raise MissingFileError(f"config file {p} does not exist")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    try:
        loaded = yaml.safe_load(data)  # bytes: PyYAML detects UTF-8/UTF-16 and rejects bad encodings itself
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{p} is nested too deeply to be a config file") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p} must hold a mapping of key: value, not a {type(loaded).__name__}")
    bad = [k for k in loaded if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{p}: {bad[0]!r} is not a key name; write key: value lines such as 'max_iters: 1000'")
    return loaded


def _user_values(path: str | os.PathLike | None, overrides: list[str] | dict | None, allowed: Iterable[str],
                 command: str, known: Iterable[str] = (), note: str = "") -> dict[str, Any]:
    """The YAML file's keys, then the ``key=value`` overrides on top; each checked, the message names its source."""
    allowed = list(allowed)
    values: dict[str, Any] = {}
    if path:
        from_file = read_yaml_mapping(path)
        check_keys(from_file, allowed, str(path), command, known, note)
        values.update(from_file)
    if overrides:
        given = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        check_keys(given, allowed, "command line", command, known, note)
        values.update(given)
    return values


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None,
                base: dict[str, Any] | None = None) -> C:
    """Config of type ``cls``: ``base`` values, then the YAML file, then ``key=value`` overrides on top."""
    user = _user_values(path, overrides, field_types(cls), COMMANDS.get(cls, cls.__name__))
    return build_config(cls, {**(base or {}), **user}, str(path) if path else "config")


def eval_config(saved: dict[str, Any], path: str | os.PathLike | None = None,
                overrides: list[str] | dict | None = None) -> TrainConfig:
    """The TrainConfig of ``mirseg eval``: the checkpoint's ``saved`` config with the user's keys on top.

    Only the user's keys (YAML file and overrides) are checked against :data:`EVAL_KEYS`.
    """
    user = _user_values(path, overrides, EVAL_KEYS, "mirseg eval", known=TrainConfig.__dataclass_fields__,
                        note=_EVAL_NOTE)
    # A key an older mirseg saved and this one no longer has must not stop the evaluation.
    known = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
    return build_config(TrainConfig, {**known, **user}, str(path) if path else "config")


def check_output_dir(key: str, path: str | os.PathLike) -> None:
    """Fail before any work when ``path`` cannot be a folder to write in; the ConfigError names ``key``.

    ``path`` may not exist yet; it fails when it is a file, when one of its parents is a file, or when
    the nearest existing parent is not writable.
    """
    if not str(path):
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}: {p} is a file, not a folder: choose another {key}, or move the file away")
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{key}: {p} cannot be created because {parent} is a file: choose another {key}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: no permission to write in {parent} (for {p}): choose another {key}")


def check_output_dirs(cfg: Any) -> None:
    """:func:`check_output_dir` for each folder key of ``cfg`` (work_dir, tensorboard_dir, out_dir)."""
    for key in OUTPUT_DIR_KEYS:
        value = getattr(cfg, key, "")
        if value:
            check_output_dir(key, value)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain YAML-able dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the config as YAML (atomically, see mirseg.fileio)."""
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = ["EVAL_KEYS", "PRESETS", "MMSEG_CONFIGS", "InferConfig", "MineConfig", "Preset", "TrainConfig",
           "build_config", "check_keys", "check_output_dir", "check_output_dirs", "eval_config", "load_config",
           "parse_overrides", "read_yaml_mapping", "resolve_preset", "save_config", "to_dict"]


def reference_markdown() -> str:
    """``docs/configuration.md``: every key of every command with its type, default and help.

    Generated from the dataclasses (``python -m mirseg.config > docs/configuration.md``); a test
    checks that the file is current.
    """
    from mirseg.ymir import templates

    out = ["# Configuration reference", "",
           "Generated by `python -m mirseg.config > docs/configuration.md` from the dataclasses in "
           "`mirseg/config.py`; do not edit by hand. Keys go in a YAML file or on the command line as `key=value` "
           "(lists as `[a,b]`). A key the command does not use is an error with a \"did you mean\" hint and the "
           "command's keys.", ""]
    sections = [("mirseg train / mirseg eval", TrainConfig), ("mirseg infer", InferConfig), ("mirseg mine", MineConfig)]
    for title, cls in sections:
        helps, hints = field_help(cls), typing.get_type_hints(cls)
        out += [f"## {title}", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            tp = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            tp = tp.replace("NoneType", "None").replace("|", "or")
            default = f.default if f.default is not dataclasses.MISSING else ""
            out.append(f"| `{f.name}` | {tp} | `{default!r}` | {helps.get(f.name, '').replace('|', '/')} |")
        out.append("")
        if cls is TrainConfig:
            out += ["`mirseg eval` starts from the checkpoint's saved config and takes only "
                    + ", ".join(f"`{k}`" for k in EVAL_KEYS) + f"; any other key is an error ({_EVAL_NOTE}).", ""]
    out += ["Aliases: " + ", ".join(f"`{a}` = `{k}`" for a, k in ALIASES.items()) + ".", "",
            "## Presets (`config_file`)", "", "| preset | network | crop (h, w) | scale (w, h) | lr | weight decay | "
            "design batch | test mode |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, p in PRESETS.items():
        out.append(f"| `{name}` | {p.model} | {p.crop_size} | {p.img_scale} | {p.lr} | {p.weight_decay} | "
                   f"{p.batch_size} | {p.test_mode} |")
    out += ["", "The original image's mmseg config paths are accepted too and map to these presets:", ""]
    out += [f"- `{path}` -> `{preset}` ({iters} iterations nominal)" for path, (preset, iters) in MMSEG_CONFIGS.items()]
    out += ["", "## YMIR task templates", "",
            "What the platform's forms show (`img-man/*-template.yaml`); every other key of the tables above may be "
            "added to a training task's config too.", ""]
    for task, rows in templates.TEMPLATES.items():
        out += [f"### {task}", "", "| key | default | meaning |", "| --- | --- | --- |"]
        out += [f"| `{k}` | `{v!r}` | {c} |" for k, v, c in rows]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
