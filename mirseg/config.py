"""Configuration: frozen dataclasses loaded from YAML plus ``key=value`` overrides.

Key names follow the original YMIR image's hyper-parameters wherever one exists
(``config_file``, ``samples_per_gpu``, ``max_iters``, ``interval``, ``ignore_blank_area``, ...).
An unknown key is an error with a "did you mean" hint; values are coerced to the field's type
(the YMIR web form sends numbers and booleans as strings) or rejected with the key named.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

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
    max_iters: int = 80000  # the config's nominal schedule
    test_mode: Literal["whole", "slide"] = "whole"
    slide_stride: tuple[int, int] = (513, 513)


_P769 = dict(crop_size=(769, 769), img_scale=(2049, 1025), test_mode="slide")

PRESETS: dict[str, Preset] = {
    "fastscnn": Preset("fastscnn", lr=0.12, weight_decay=4e-5, batch_size=32, max_iters=160000),
    "deeplabv3plus_r18": Preset("deeplabv3plus_r18"),
    "deeplabv3plus_r18_769": Preset("deeplabv3plus_r18", **_P769),
    "deeplabv3plus_r18b": Preset("deeplabv3plus_r18b"),
    "deeplabv3plus_r18b_769": Preset("deeplabv3plus_r18b", **_P769),
    "deeplabv3plus_r50": Preset("deeplabv3plus_r50", max_iters=40000),
    "deeplabv3plus_r50_769": Preset("deeplabv3plus_r50", max_iters=40000, **_P769),
    "hrnet_w18s": Preset("hrnet_w18s", max_iters=40000),
    "hrnet_w18": Preset("hrnet_w18", max_iters=40000),
    "ocrnet_hr18s": Preset("ocrnet_hr18s", max_iters=40000),
    "ocrnet_hr18": Preset("ocrnet_hr18", max_iters=40000),
}


def _mmseg_config_paths() -> dict[str, tuple[str, int]]:
    """The original image's mmseg config paths -> (preset, nominal max_iters)."""
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
        name, iters = MMSEG_CONFIGS[norm]
        return dataclasses.replace(PRESETS[name], max_iters=iters)
    choices = list(PRESETS) + list(MMSEG_CONFIGS)
    hint = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    raise ValueError(
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
    weights: str = ""  # initial weights: mirseg or mmseg checkpoint, or a state dict
    # -- data: COCO (ann + images) or label-PNG folders (images + labels)
    train_ann: str = ""  # COCO JSON of the training set
    train_images: str = ""  # image folder, or a text file listing image paths
    train_labels: str = ""  # folder of label PNGs matched by file stem (instead of train_ann)
    val_ann: str = ""  # COCO JSON of the validation set (none: no metrics, no best checkpoint)
    val_images: str = ""  # validation image folder or list file
    val_labels: str = ""  # validation label-PNG folder (instead of val_ann)
    coco_class_by: Literal["name", "id"] = "name"  # match COCO categories by name, or category_id = class index
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
        for key in ("samples_per_gpu", "max_iters", "interval", "log_interval"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.workers_per_gpu < 0:
            raise ValueError(f"workers_per_gpu must be >= 0, got {self.workers_per_gpu}")
        if self.max_keep_ckpts < -1 or self.max_keep_ckpts == 0:
            raise ValueError(f"max_keep_ckpts must be -1 (all) or >= 1, got {self.max_keep_ckpts}")
        if isinstance(self.class_weight, str) and self.class_weight not in ("", "auto"):
            raise ValueError(f"class_weight must be a list of numbers or 'auto', got {self.class_weight!r}")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {self.ratio_range}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
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


@dataclass(frozen=True)
class MineConfig:
    """Every option of ``mirseg mine`` (the original image's mining keys and defaults)."""

    checkpoint: str = ""  # a mirseg checkpoint (best.pth / last.pth)
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


ALIASES: dict[str, str] = {
    "ignore_black_area": "ignore_blank_area",  # the seed README's spelling
}

# ---------------------------------------------------------------------------------------------
# Loading and coercion.

C = TypeVar("C")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0", ""}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` converted to annotation ``tp``, or a ValueError that names ``key``."""
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
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[-1] if errors else f"{key}: cannot use {value!r}")
    if origin is Literal:
        text = str(value).strip().lower() if isinstance(value, str) else value
        if text in args:
            return text
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip()
            parsed = yaml.safe_load(text) if text else []
            value = parsed if isinstance(parsed, list) else [p for p in text.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{key}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key}: expected text, got {value!r}")
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


def build_config(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """``cls(**values)`` with aliases applied, unknown keys rejected and values coerced."""
    types_ = field_types(cls)
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = ALIASES.get(raw_key, raw_key)
        if key not in types_:
            hint = difflib.get_close_matches(raw_key, list(types_) + list(ALIASES), n=1)
            raise ValueError(f"{source}: unknown key {raw_key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                             + f" (valid keys: {', '.join(types_)})")
        kwargs[key] = _coerce(f"{source}: {key}", value, types_[key])
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=0.01", "crop_size=[256,256]"]`` -> dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. max_iters=1000)")
        key, text = item.split("=", 1)
        text = text.strip()
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        out[key.strip()] = value
    return out


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The ``key: value`` mapping of a YAML file, with clear errors for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{p} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{p} must hold a mapping of key: value, not {type(loaded).__name__}")
    return loaded


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | dict | None = None,
                base: dict[str, Any] | None = None) -> C:
    """Config of type ``cls``: ``base`` values, then the YAML file, then ``key=value`` overrides on top."""
    values: dict[str, Any] = dict(base or {})
    if path:
        values.update(read_yaml_mapping(path))
    if overrides:
        values.update(parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return build_config(cls, values, str(path) if path else "config")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain YAML-able dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the config as YAML (temp file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


__all__ = ["PRESETS", "MMSEG_CONFIGS", "InferConfig", "MineConfig", "Preset", "TrainConfig", "build_config",
           "load_config", "parse_overrides", "resolve_preset", "save_config", "to_dict"]


def reference_markdown() -> str:
    """``docs/configuration.md``: every key of every command with its type, default and help.

    Generated from the dataclasses (``python -m mirseg.config > docs/configuration.md``); a test
    checks that the file is current.
    """
    from mirseg.ymir import templates

    out = ["# Configuration reference", "",
           "Generated by `python -m mirseg.config > docs/configuration.md` from the dataclasses in "
           "`mirseg/config.py`; do not edit by hand. Keys go in a YAML file or on the command line as `key=value` "
           "(lists as `[a,b]`). An unknown key is an error with a \"did you mean\" hint.", ""]
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
