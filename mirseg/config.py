"""Configuration: frozen dataclasses loaded from YAML plus ``key=value`` overrides.

Key names follow the original YMIR image's hyper-parameters wherever one exists
(``config_file``, ``samples_per_gpu``, ``max_iters``, ``interval``, ``ignore_blank_area``, ...).
A key the command does not use is a ``ConfigError`` with a "did you mean" hint and the command's
keys (:func:`check_keys`, also for ``mirseg eval``'s :data:`EVAL_KEYS` and the YMIR task configs);
values are coerced to the field's type (:mod:`mirseg.coerce`: the YMIR web form sends numbers and
booleans as strings) or rejected with the key named; output folders are checked before any work
(:func:`check_output_dir`). The presets ``config_file`` names are :mod:`mirseg.presets`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mirseg.coerce import coerce, field_types, parse_overrides, read_yaml_mapping
from mirseg.errors import ConfigError
from mirseg.fileio import write_atomic
from mirseg.presets import Preset, fit_to_images, resolve_preset

# ---------------------------------------------------------------------------------------------
# The training configuration.


ScaleKey = tuple[int, int] | Literal["auto", "preset"]
"""``img_scale`` in training: (w, h), or how to choose it (:func:`fit_scale`)."""


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
    threads: int = 0  # torch threads; 0: $MIRSEG_THREADS, else cores - min(workers, cores // 4) (README: Threads)
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
    lr_scaling: Literal["none", "sqrt", "linear"] = "none"  # lr x (total batch / preset's design batch)^0, ^.5, ^1
    warmup_iters: int = 0  # linear warm-up of the lr from 0.1x over this many first iterations (0: none)
    class_weight: tuple[float, ...] | str = ()  # per-class loss weights, or "auto"
    # -- augmentation
    crop_size: tuple[int, int] | None = None  # (h, w); default: the preset's, clipped to img_scale
    img_scale: ScaleKey | None = None  # (w, h); auto (default): the training images' median size; preset: mmseg's
    ratio_range: tuple[float, float] = (0.5, 2.0)  # random resize factor range around img_scale
    cat_max_ratio: float = 0.75  # re-draw a crop where one class covers more than this share
    # -- evaluation
    test_mode: Literal["whole", "slide"] | None = None  # evaluation: whole image or sliding window
    slide_crop: tuple[int, int] | None = None  # (h, w); default: crop_size
    slide_stride: tuple[int, int] | None = None  # (h, w)
    # -- runtime
    work_dir: str = "runs/train"  # checkpoints, config.yaml and TensorBoard logs go here
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: bool = True  # mixed precision: fp16 on CUDA; bf16 on a bf16 CPU where faster (README: Speed on CPUs)
    layout: Literal["auto", "channels_last", "contiguous"] = "auto"  # memory layout; auto: the fastest here, probed
    seed: int = 0  # seeds weights, data order and augmentation (reproducible on CPU)
    resume: bool = False  # continue from work_dir/last.pth with the same schedule
    log_interval: int = 50  # loss/lr: a log line, TensorBoard scalars and the NaN check every this many iterations
    tensorboard_dir: str = ""  # default: work_dir/tensorboard

    def __post_init__(self) -> None:
        _check_counts(self, ("samples_per_gpu", "max_iters", "interval", "log_interval"),
                      ("workers_per_gpu", "warmup_iters", "threads"))
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

    def resolved(self, image_sizes: Sequence[tuple[int, int]] = ()) -> TrainConfig:
        """A copy with every preset-dependent ``None`` filled in (what gets saved); ``image_sizes`` are the
        training images' (h, w), which the scale and the crop are fitted to (:func:`fit_scale`)."""
        p = self.preset
        scale, crop, _ = fit_scale(self, image_sizes)
        return dataclasses.replace(
            self,
            lr=p.lr if self.lr is None else self.lr,
            weight_decay=p.weight_decay if self.weight_decay is None else self.weight_decay,
            crop_size=crop,
            img_scale=scale,
            test_mode=self.test_mode or p.test_mode,
            slide_crop=self.slide_crop or crop,
            slide_stride=self.slide_stride or p.slide_stride,
        )


def fit_scale(cfg: TrainConfig, image_sizes: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], tuple[int, int], str]:
    """``(img_scale, crop_size, why)`` of ``cfg`` for training images of ``image_sizes`` (h, w): see
    :func:`mirseg.presets.fit_to_images`."""
    return fit_to_images(cfg.config_file, cfg.img_scale, cfg.crop_size, image_sizes)


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
    samples_per_gpu: int = 2  # images per forward pass, same-size ones together (CPU: at most 2^20 pixels)
    workers_per_gpu: int = 2  # image-decoding worker processes
    threads: int = 0  # torch threads; 0: $MIRSEG_THREADS, else cores - min(workers, cores // 4) (README: Threads)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: bool = False  # autocast: fp16 on CUDA, bf16 on a bf16 CPU where faster; softmax stays fp32
    layout: Literal["auto", "channels_last", "contiguous"] = "auto"  # memory layout; auto: the fastest here, probed
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
        _check_counts(self, ("samples_per_gpu",), ("workers_per_gpu", "threads"))
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
    topk_superpixel_score: int = 3  # rsal (and ripu_image_score=topk): best regions that make an image's score
    class_balance: bool = True  # rsal: weight superpixels by exp(-share of their dominant class)
    ripu_region_radius: int = 1  # ripu: regions are (2r+1)x(2r+1) windows
    ripu_image_score: str = "mean"  # ripu: mean window score; budget: mean of the best region_budget; topk: k best
    reduction: str = "mean"  # baselines: image score = mean, max, sum or topk (mean of the top topk_percent)
    topk_percent: float = 10.0  # baselines with reduction topk: the share of pixels averaged
    sampling: Literal["top", "power"] = "top"  # top: sort by score; power: draw max_kept_mining_image by score^beta
    power_beta: float = 1.0  # sampling power: the exponent (larger: closer to plain top-N)
    samples_per_gpu: int = 2  # images per forward pass (CPU: at most 2^20 pixels)
    workers_per_gpu: int = 2  # image-decoding worker processes
    threads: int = 0  # torch threads; 0: $MIRSEG_THREADS, else cores - min(workers, cores // 4) (README: Threads)
    fp16: bool = True  # autocast fp16 on CUDA (ignored on CPU)
    bf16: bool = False  # autocast bf16 on a bf16 CPU where faster
    layout: Literal["auto", "channels_last", "contiguous"] = "auto"  # memory layout; auto: the fastest here, probed
    img_scale: tuple[int, int] | None = None  # (w, h) working resolution; default: the checkpoint's test scale
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    seed: int = 0  # random baseline and power sampling
    save_masks: bool = False  # masks/ and overlays/ of the chosen regions for the top max_kept_mining_image
    max_saved_masks: int = 1000  # save_masks: at most this many images (each costs one more forward pass)
    region_budget: float = 0.022  # save_masks: share of each image its mask covers, in whole regions (RIPU's 2.2 %)
    report: bool = False  # write report.html (top images with their regions, score histogram); implies save_masks
    resume: bool = False  # continue the interrupted run in out_dir, skipping its finished images; false: start over

    def __post_init__(self) -> None:
        # The algorithm knobs are checked by mirseg.mining.MiningParams, which mine() builds before any work.
        _check_counts(self, ("samples_per_gpu",), ("workers_per_gpu", "max_saved_masks", "threads"))
        _check_sizes(self, ("img_scale",))
        if not self.power_beta >= 0:
            raise ConfigError(f"power_beta must be >= 0, got {self.power_beta}")
        if self.sampling not in ("top", "power"):  # the Literal is checked when coerced, not when built in Python
            raise ConfigError(f"sampling must be 'top' or 'power', got {self.sampling!r}")


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
        if value is not None and not isinstance(value, str) and not all(v > 0 for v in value):
            raise ConfigError(f"{key} must be two positive integers, got {list(value)}")


ALIASES: dict[str, str] = {
    "ignore_black_area": "ignore_blank_area",  # the seed README's spelling
}

RENAMED: dict[str, str] = {
    "scale_lr": "lr_scaling (none, sqrt or linear; scale_lr=false was lr_scaling=none, true was linear)",
}
"""Keys of earlier mirseg versions: their error says what replaced them."""

COMMANDS: dict[type, str] = {TrainConfig: "mirseg train", InferConfig: "mirseg infer", MineConfig: "mirseg mine"}
"""The command each config class belongs to, for messages."""

EVAL_KEYS: tuple[str, ...] = (
    "val_ann", "val_images", "val_labels", "coco_class_by", "img_scale", "test_mode", "slide_crop", "slide_stride",
    "device", "trust_checkpoint",
)
"""The TrainConfig keys ``mirseg eval`` uses (read by ``evaluate.evaluate_checkpoint``); any other key is an error.

The architecture, the classes and the background mode (``config_file``, ``class_names``,
``ignore_blank_area``) come from the checkpoint, so a value for them would be ignored or contradict it.
"""

EVAL_NOTE = ("eval runs the checkpoint as it was trained: its architecture, classes and ignore_blank_area come "
              "from the checkpoint, and training keys do not apply")

# Keys that name a folder the command writes into.
OUTPUT_DIR_KEYS = ("work_dir", "tensorboard_dir", "out_dir")

# ---------------------------------------------------------------------------------------------
# Loading.

C = TypeVar("C")
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
        if key in RENAMED and RENAMED[key].split()[0] in allowed:
            parts.append(f"{key!r} (renamed: {RENAMED[key]})")
        else:
            parts.append(repr(key) + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    why = f" ({note})" if note and any(ALIASES.get(k, k) in known for k in bad) else ""
    raise ConfigError(f"{source}: {command} does not use {', '.join(parts)}{why}; fix or remove "
                      f"{'it' if len(bad) == 1 else 'them'}. Keys of {command}: {', '.join(allowed)}")


def build_config(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """``cls(**values)`` with aliases applied, unknown keys rejected and values coerced."""
    types_ = field_types(cls)
    check_keys(values, types_, source, COMMANDS.get(cls, cls.__name__))
    kwargs = {ALIASES.get(key, key): value for key, value in values.items()}
    kwargs = {key: coerce(f"{source}: {key}", value, types_[key]) for key, value in kwargs.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


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
                        note=EVAL_NOTE)
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


__all__ = ["EVAL_KEYS", "InferConfig", "MineConfig", "TrainConfig", "build_config", "check_keys", "check_output_dir",
           "check_output_dirs", "eval_config", "load_config", "save_config", "to_dict"]
