"""The YMIR training task: config.yaml and env.yaml to a TrainConfig, ``mirseg.train.train`` (in this process,
or one process per GPU: :func:`mirseg.ymir.worker.run_job`), then result.yaml from the checkpoints.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
from pathlib import Path
from typing import Any

from mirseg.checkpoint import read_checkpoint
from mirseg.coerce import parse_overrides
from mirseg.config import TrainConfig, build_config
from mirseg.pretrained import YMIR_WEIGHTS_DIR, check_spec, weights_dir
from mirseg.ymir.protocol import (
    CODE_CONFIG,
    CODE_DATASET,
    CODE_MODEL,
    POSTPROCESS,
    PREPROCESS,
    Monitor,
    YmirEnv,
    YmirError,
    index_rows,
    read_index,
    write_training_result,
)
from mirseg.ymir.taskconfig import (
    PLATFORM_KEYS,
    check_task_keys,
    read_task_config,
    task_device,
    visible_devices,
    weight_files,
)
from mirseg.ymir.worker import run_job

log = logging.getLogger("mirseg")

# TrainConfig keys the executor sets from env.yaml; a user value for them would be ignored, so it is refused.
EXECUTOR_TRAIN_KEYS = {"train_ann", "train_images", "train_labels", "val_ann", "val_images", "val_labels",
                       "coco_class_by", "work_dir", "device", "tensorboard_dir", "weights", "resume", "class_names"}
# mmseg --cfg-options names users of the original image may still type, and their mirseg key.
MMSEG_KEYS = {
    "optimizer.lr": "lr", "optimizer.weight_decay": "weight_decay", "optimizer.momentum": "momentum",
    "runner.max_iters": "max_iters", "evaluation.interval": "interval", "checkpoint_config.interval": "interval",
    "data.samples_per_gpu": "samples_per_gpu", "data.workers_per_gpu": "workers_per_gpu",
    "lr_config.min_lr": "min_lr", "lr_config.power": "power", "crop_size": "crop_size",
    "checkpoint_config.max_keep_ckpts": "max_keep_ckpts",
}


def _class_names(params: dict[str, Any], source: Path) -> tuple[str, ...]:
    names = params.get("class_names")
    if isinstance(names, str):
        names = [n for n in names.replace(",", " ").split() if n]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise YmirError(f"{source}: class_names must be a non-empty list of class names, got {names!r}")
    if len(set(names)) != len(names):
        raise YmirError(f"{source}: class_names has duplicates: {names}")
    return tuple(names)


def _parse_cfg_options(text: Any, source: Path) -> dict[str, Any]:
    """``cfg_options``: ``key=value`` pairs separated by spaces; mmseg names are mapped where they exist."""
    if not text:
        return {}
    out = {}
    for key, value in parse_overrides(shlex.split(str(text))).items():
        if "." in key:
            if key not in MMSEG_KEYS:
                raise YmirError(f"{source}: cfg_options key {key!r} is an mmseg config key mirseg does not have; "
                                f"use mirseg keys (mirseg train --help), or one of {', '.join(MMSEG_KEYS)}")
            key = MMSEG_KEYS[key]
        out[key] = value
    return out


def _parse_args_options(text: Any, source: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="args_options", add_help=False, exit_on_error=False)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-amp", action="store_true")
    try:
        args, unknown = parser.parse_known_args(shlex.split(str(text or "")))
    except (argparse.ArgumentError, ValueError) as exc:
        raise YmirError(f"{source}: args_options {text!r}: {exc}") from None
    if unknown:
        raise YmirError(f"{source}: args_options {' '.join(unknown)!r} not understood; supported: "
                        "--seed N, --resume, --no-amp")
    return args


def training_config(env: YmirEnv, params: dict[str, Any]) -> tuple[TrainConfig, Path | None, int]:
    """The TrainConfig of a YMIR training task, the pretrained last.pth to resume from (if --resume), the GPU count."""
    source = env.config_file
    train_keys = {f for f in TrainConfig.__dataclass_fields__} - EXECUTOR_TRAIN_KEYS
    check_task_keys(params, train_keys | {"ignore_black_area"}, source)
    values = {k: v for k, v in params.items() if k not in PLATFORM_KEYS}
    values.update(_parse_cfg_options(params.get("cfg_options"), source))
    reserved = sorted(set(values) & EXECUTOR_TRAIN_KEYS)
    if reserved:
        raise YmirError(f"{source}: {', '.join(reserved)} are set by the executor from env.yaml; remove them")
    args = _parse_args_options(params.get("args_options"), source)
    if args.seed is not None:
        values["seed"] = args.seed
    if args.no_amp:
        values["amp"] = False

    train_index = env.training_index_file
    train_images = read_index(train_index, "training")
    if not train_images:
        raise YmirError(f"training index {train_index} lists no images", CODE_DATASET)
    ann = _annotation_file(train_index, env)
    val_lines = read_index(env.val_index_file, "validation") if env.val_index_file else []
    device, gpus = task_device(params, source)
    weights = weight_files(params, "pretrained_model_params", env)
    resume_from = None
    if args.resume:
        lasts = [w for w in weights if w.name.startswith("last")]
        if not lasts:
            raise YmirError(f"{source}: --resume needs a pretrained model with a last.pth stage file "
                            f"(pretrained_model_params: {params.get('pretrained_model_params')!r})", CODE_MODEL)
        resume_from = lasts[0]
    values.update(
        class_names=_class_names(params, source), coco_class_by="id", train_ann=str(ann),
        train_images=str(train_index), val_ann=str(ann) if val_lines else "",
        val_images=str(env.val_index_file) if val_lines else "", work_dir=str(env.out_models_dir),
        tensorboard_dir=str(env.tensorboard_dir), device=device,
        weights=str(weights[0]) if weights and not args.resume else "", resume=bool(args.resume),
    )
    # Without a pretrained model of the platform, pretrained=auto starts from the model-zoo files baked into
    # /weights (the original image's rule); $MIRSEG_WEIGHTS or a weights_dir key of the task point elsewhere.
    values.setdefault("weights_dir", str(weights_dir("", default=YMIR_WEIGHTS_DIR)))
    try:
        cfg = build_config(TrainConfig, values, str(source))
        check_spec(cfg.pretrained)  # a missing pretrained file is a config error, found before any work
    except (ValueError, FileNotFoundError) as exc:
        raise YmirError(str(exc), CODE_CONFIG) from None
    if weights and not args.resume:
        log.info("initial weights: %s", weights[0])
    return cfg, resume_from, gpus


def _annotation_file(index: Path, env: YmirEnv) -> Path:
    """The seg-coco JSON: the second column of the index (the same file on every line).

    A relative entry is relative to the index file's folder, like the image column (the list-file rule).
    """
    for row in index_rows(index, "training"):
        if len(row) > 1 and row[1]:
            return index.parent / row[1]  # an absolute entry stays as it is
    fallback = Path(str(env.config_file)).parent / "annotations" / "coco-annotations.json"
    if fallback.is_file():
        return fallback
    raise YmirError(f"{index} names no annotation file (expected image<TAB>annotation lines; "
                    "is the training template's export_format seg-coco:raw?)", CODE_DATASET)


def run_training(env: YmirEnv, monitor: Monitor) -> None:
    params = read_task_config(env, "training")
    cfg, resume_from, gpus = training_config(env, params)
    models = env.out_models_dir
    models.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        shutil.copy2(resume_from, models / "last.pth")
    monitor.update(PREPROCESS, 1.0, force=True)

    run_job("train", cfg, gpus, monitor, visible_devices(params, gpus) if cfg.device.startswith("cuda") else "")
    monitor.update(POSTPROCESS, 0.0, force=True)
    write_stages(models, env.training_result_file, cfg.trust_checkpoint)


def write_stages(models: Path, result_file: Path, trust_checkpoint: bool = False) -> None:
    """result.yaml from the checkpoints training left: stages ``best`` (if any) and ``last``."""
    stages: dict[str, dict[str, Any]] = {}
    for name in ("best", "last"):
        path = models / f"{name}.pth"
        if not path.is_file():
            continue
        metrics = read_checkpoint(path, trust_checkpoint).get("metrics") or {}
        stages[name] = {"files": [path.name, "config.yaml"], "timestamp": int(path.stat().st_mtime),
                        **{k: metrics.get(k, 0.0) for k in ("mIoU", "mAcc", "aAcc")}}
    if "last" not in stages:
        raise YmirError(f"training wrote no checkpoint to {models}", CODE_MODEL)
    write_training_result(result_file, stages, "best" if "best" in stages else "last")
    log.info("wrote %s (stages: %s)", result_file, ", ".join(stages))
