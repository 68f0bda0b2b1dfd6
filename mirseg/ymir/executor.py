"""``mirseg ymir``: run the task env.yaml asks for (training, or mining and/or inference) and report it.

Flow: read env.yaml and config.yaml (merged over the task template's defaults) -> check and
coerce every key -> run the task with mirseg's own functions -> write the platform's result
files. Progress goes to monitor.txt throughout; any failure writes the monitor's error state
with an error code, logs the reason and exits non-zero, so a task never stays "running".
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mirseg import interrupt
from mirseg.config import InferConfig, MineConfig, TrainConfig, build_config, check_keys, parse_overrides, save_config
from mirseg.errors import EXIT_SIGINT, ConfigError, Interrupted, MirsegError
from mirseg.fileio import atomic_path, write_atomic
from mirseg.ymir import templates
from mirseg.ymir.protocol import (
    CODE_CONFIG,
    CODE_DATASET,
    CODE_IMAGE,
    CODE_MODEL,
    CODE_NAN,
    CODE_NO_GPU,
    CODE_OOM,
    POSTPROCESS,
    PREPROCESS,
    TASK,
    Monitor,
    YmirEnv,
    YmirError,
    index_rows,
    read_env,
    read_index,
    read_yaml,
    write_mining_result,
    write_training_result,
)

log = logging.getLogger("mirseg")

DEFAULT_ENV = "/in/env.yaml"

# Keys the platform puts in config.yaml (ymir-protocol.md section 3) or that the executor itself
# owns: accepted and never passed on as mirseg keys.
PLATFORM_KEYS = {
    "task_id", "class_names", "gpu_id", "gpu_count", "object_type", "pretrained_model_params", "model_params_path",
    "run_training", "run_mining", "run_infer", "export_format", "shm_size", "openpai_enable", "git_url",
    "code_config", "ymir_saved_file_patterns", "ymir_debug", "palette", "aug_test", "protocol_version",
    "cfg_options", "args_options",
}
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


# ---------------------------------------------------------------------------------------------
# config.yaml


def read_task_config(env: YmirEnv, task: str) -> dict[str, Any]:
    """config.yaml merged over the template defaults of ``task`` (the web form drops empty values)."""
    return {**templates.defaults(task), **read_yaml(env.config_file)}


def _class_names(params: dict[str, Any], source: Path) -> tuple[str, ...]:
    names = params.get("class_names")
    if isinstance(names, str):
        names = [n for n in names.replace(",", " ").split() if n]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise YmirError(f"{source}: class_names must be a non-empty list of class names, got {names!r}")
    if len(set(names)) != len(names):
        raise YmirError(f"{source}: class_names has duplicates: {names}")
    return tuple(names)


def _device(params: dict[str, Any], source: Path) -> tuple[str, int]:
    """("cpu", 0) when gpu_count is 0 or gpu_id is empty, else ("cuda", number of GPUs)."""
    import torch

    gpu_id = str(params.get("gpu_id", "") or "").strip()
    ids = [i for i in gpu_id.replace(" ", "").split(",") if i]
    try:
        count = int(float(params.get("gpu_count", len(ids)) or 0))
    except (TypeError, ValueError, OverflowError):
        raise YmirError(f"{source}: gpu_count must be a number, got {params.get('gpu_count')!r}") from None
    if count <= 0 or not ids:  # the original counted an empty gpu_id as one GPU and failed
        return "cpu", 0
    if not torch.cuda.is_available():
        raise YmirError(f"{source}: gpu_count {count} / gpu_id {gpu_id!r} ask for a GPU but CUDA is not available "
                        "in the container: start it with GPU access, or set gpu_count to 0 to run on the CPU",
                        CODE_NO_GPU)
    return "cuda", min(count, len(ids), torch.cuda.device_count())


def _check_keys(params: dict[str, Any], allowed: set[str], source: Path) -> None:
    """Unknown keys: an error with a "did you mean" hint (a typo would otherwise be silently ignored)."""
    try:
        check_keys([k for k in params if k not in PLATFORM_KEYS], sorted(allowed), str(source), "this YMIR task")
    except ConfigError as exc:
        raise YmirError(str(exc)) from None


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


def _weight_files(params: dict[str, Any], key: str, env: YmirEnv) -> list[Path]:
    """The existing .pth/.pt files a model list names; best* first, then last*, then the rest."""
    entries = params.get(key) or []
    if isinstance(entries, str):
        entries = [entries]
    found = []
    for entry in entries:
        p = Path(str(entry))
        p = p if p.is_absolute() else env.models_dir / p
        if not p.is_file():  # old packages are extracted flat although the list says <stage>/<file>
            p = env.models_dir / p.name
        if p.is_file() and p.suffix in (".pth", ".pt"):
            found.append(p)
    return sorted(found, key=lambda p: (not p.name.startswith("best"), not p.name.startswith("last"), p.name))


# ---------------------------------------------------------------------------------------------
# Training


def training_config(env: YmirEnv, params: dict[str, Any]) -> tuple[TrainConfig, Path | None, int]:
    """The TrainConfig of a YMIR training task, the pretrained last.pth to resume from (if --resume), the GPU count."""
    source = env.config_file
    train_keys = {f for f in TrainConfig.__dataclass_fields__} - EXECUTOR_TRAIN_KEYS
    _check_keys(params, train_keys | {"ignore_black_area"}, source)
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
    device, gpus = _device(params, source)
    weights = _weight_files(params, "pretrained_model_params", env)
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
    from mirseg.pretrained import YMIR_WEIGHTS_DIR, check_spec, weights_dir

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

    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        _train_distributed(cfg, gpus, env, monitor)
    else:
        from mirseg.train import train

        train(cfg, progress=lambda p: monitor.update(TASK, p))
    monitor.update(POSTPROCESS, 0.0, force=True)
    write_stages(models, env.training_result_file, cfg.trust_checkpoint)


def _train_distributed(cfg: TrainConfig, gpus: int, env: YmirEnv, monitor: Monitor) -> None:
    """One process per GPU with torchrun; rank 0 of the workers writes the monitor."""
    with tempfile.TemporaryDirectory(prefix="mirseg-ymir-") as tmp:
        cfg_path = Path(tmp) / "train.yaml"
        save_config(cfg, cfg_path)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "mirseg.ymir.worker", str(cfg_path)]
        child_env = {**os.environ, "MIRSEG_YMIR_MONITOR": str(monitor.path), "MIRSEG_YMIR_TASK_ID": monitor.task_id}
        log.info("training on %d GPUs: %s", gpus, " ".join(cmd))
        rc = subprocess.call(cmd, env=child_env)
        if rc != 0:
            raise YmirError(f"distributed training failed (exit code {rc}); see the log above", CODE_MODEL)


def write_stages(models: Path, result_file: Path, trust_checkpoint: bool = False) -> None:
    """result.yaml from the checkpoints training left: stages ``best`` (if any) and ``last``."""
    from mirseg.checkpoint import read_checkpoint

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


# ---------------------------------------------------------------------------------------------
# Mining and inference


def _model_checkpoint(env: YmirEnv, params: dict[str, Any]) -> Path:
    from mirseg.checkpoint import CHECKPOINT_FORMAT, read_checkpoint, user_classes

    weights = _weight_files(params, "model_params_path", env)
    if not weights:
        raise YmirError(f"{env.config_file}: model_params_path names no .pth file that exists "
                        f"({params.get('model_params_path')!r}, models dir {env.models_dir})", CODE_MODEL)
    ckpt = read_checkpoint(weights[0], _trust_checkpoint(params, env.config_file))
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise YmirError(f"{weights[0]} is not a mirseg checkpoint (no class names or architecture): models trained "
                        "by the mmsegmentation image must be retrained with mirseg first", CODE_MODEL)
    names = params.get("class_names")
    user = list(user_classes(ckpt, str(weights[0])))
    if names and list(names) != user:
        log.warning("config class_names %s differ from the model's classes %s; results use the model's", names, user)
    return weights[0]


def _trust_checkpoint(params: dict[str, Any], source: Path) -> bool:
    """The task's ``trust_checkpoint`` (default false: models come from other users' tasks), coerced like any key."""
    try:
        value = params.get("trust_checkpoint", False)
        return build_config(InferConfig, {"trust_checkpoint": value}, str(source)).trust_checkpoint
    except ValueError as exc:
        raise YmirError(str(exc), CODE_CONFIG) from None


def _job_values(cls: type, params: dict[str, Any], allowed_extra: set[str]) -> dict[str, Any]:
    fields = set(cls.__dataclass_fields__)
    return {k: v for k, v in params.items() if k in fields and k not in PLATFORM_KEYS | allowed_extra}


def run_mining_and_infer(env: YmirEnv, monitor: Monitor) -> None:
    params = read_task_config(env, "mining" if env.run_mining else "infer")
    source = env.config_file
    owned = {"checkpoint", "images", "out_dir", "device", "resume"}  # every YMIR task starts afresh
    _check_keys(params, (set(MineConfig.__dataclass_fields__) | set(InferConfig.__dataclass_fields__)) - owned,
                source)
    device, _ = _device(params, source)
    checkpoint = _model_checkpoint(env, params)
    candidates = read_index(env.candidate_index_file, "candidate")
    if not candidates:
        raise YmirError(f"candidate index {env.candidate_index_file} lists no images", CODE_DATASET)
    monitor.update(PREPROCESS, 1.0, force=True)
    with tempfile.TemporaryDirectory(prefix="mirseg-ymir-") as tmp:
        list_file = Path(tmp) / "candidates.txt"
        write_atomic(list_file, "".join(c + "\n" for c in candidates))
        both = env.run_mining and env.run_infer
        if env.run_mining:
            monitor.set_span(0.0, 0.5 if both else 1.0)
            _mine(env, params, checkpoint, candidates, list_file, device, monitor)
        if env.run_infer:
            monitor.set_span(0.5 if both else 0.0, 1.0)
            _infer(env, params, checkpoint, candidates, list_file, device, monitor, Path(tmp))


def _mine(env: YmirEnv, params: dict[str, Any], checkpoint: Path, candidates: list[str], list_file: Path,
          device: str, monitor: Monitor) -> None:
    from mirseg.mine import mine

    values = _job_values(MineConfig, params, {"checkpoint", "images", "out_dir", "device"})
    values.update(checkpoint=str(checkpoint), images=str(list_file), out_dir=str(env.out_dir / "mining"),
                  device=device)
    try:
        cfg = build_config(MineConfig, values, str(env.config_file))
    except ValueError as exc:
        raise YmirError(str(exc), CODE_CONFIG) from None
    result = mine(cfg, progress=lambda p: monitor.update(TASK, p))
    # The platform takes each line's file stem as the asset id: write the index's paths verbatim.
    as_listed = {_list_path(c, list_file): c for c in candidates}
    ranking = [(as_listed.get(p, p), s) for p, s in result.ranking]
    missing = set(candidates) - {p for p, _ in ranking}
    if missing:
        raise YmirError(f"mining returned no score for {len(missing)} candidates, e.g. {sorted(missing)[0]}",
                        CODE_MODEL)
    write_mining_result(env.mining_result_file, ranking)
    monitor.update(POSTPROCESS, 1.0, force=True)
    log.info("wrote %s (%d candidates)", env.mining_result_file, len(result.ranking))


def _list_path(entry: str, list_file: Path) -> str:
    """How ``image_source`` spells a list-file entry (relative entries are relative to the list)."""
    p = Path(entry)
    return str(p if p.is_absolute() else list_file.parent / p)


def _infer(env: YmirEnv, params: dict[str, Any], checkpoint: Path, candidates: list[str], list_file: Path,
           device: str, monitor: Monitor, tmp: Path) -> None:
    from mirseg.infer import run_inference

    values = _job_values(InferConfig, params, {"checkpoint", "images", "out_dir", "device"})
    if "fp16" in params and "amp" not in params:
        values["amp"] = params["fp16"]
    values.update(checkpoint=str(checkpoint), images=str(list_file), out_dir=str(tmp / "infer"), device=device,
                  save_labels=False, save_color=False, save_overlay=False, save_proba=False, save_coco=True)
    try:
        cfg = build_config(InferConfig, values, str(env.config_file))
    except ValueError as exc:
        raise YmirError(str(exc), CODE_CONFIG) from None
    result = run_inference(cfg, progress=lambda p: monitor.update(TASK, p))
    with atomic_path(env.infer_result_file) as tmp:  # the platform never sees half a file
        shutil.copyfile(result.coco_json, tmp)
    if result.failed:
        log.warning("%d candidates could not be read and have no prediction: %s", len(result.failed),
                    "; ".join(f"{p}: {m}" for p, m in result.failed[:5]))
    monitor.update(POSTPROCESS, 1.0, force=True)
    log.info("wrote %s (%d images)", env.infer_result_file, result.num_images)


# ---------------------------------------------------------------------------------------------
# Entry point


def error_code(exc: BaseException, default: int) -> int:
    """The monitor error code for an exception."""
    import torch

    from mirseg.data import DatasetError, ImageError
    from mirseg.train import TrainingDiverged

    if isinstance(exc, YmirError):
        return exc.code
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return CODE_OOM
    if isinstance(exc, TrainingDiverged):
        return CODE_NAN
    if isinstance(exc, ImageError):
        return CODE_IMAGE
    if isinstance(exc, (DatasetError, FileNotFoundError)):
        return CODE_DATASET
    return default


def _quiet_caches(tmp: str) -> None:
    """Point library caches at a temp dir: /in is read-only and $HOME may not be writable."""
    for var, sub in (("TORCH_HOME", "torch"), ("XDG_CACHE_HOME", "cache"), ("MPLCONFIGDIR", "mpl")):
        os.environ.setdefault(var, str(Path(tmp) / sub))
    os.environ.setdefault("TQDM_MININTERVAL", "30")  # the platform's log is a file: a bar line every 30 s


def run(env_path: str | os.PathLike) -> int:
    """Run the task of ``env_path``; 0 on success, else non-zero after writing the monitor's error state.

    SIGINT / SIGTERM (``docker stop``): training saves last.pth at the current iteration, mining and
    inference finish the images in flight, anything else stops at once; then the monitor's error
    state is written with the reason, and the exit code is 130 / 143 (1 for a failure).
    """
    monitor = None
    try:
        env = read_env(env_path)
        monitor = Monitor(env.monitor_file, env.task_id)
        monitor.update(PREPROCESS, 0.0, force=True)
        log.info("mirseg ymir: task %s (training=%s mining=%s infer=%s, protocol %s)", env.task_id,
                 env.run_training, env.run_mining, env.run_infer, env.protocol_version or "?")
        started = time.time()
        if env.run_training:
            run_training(env, monitor)
        elif env.run_mining or env.run_infer:
            run_mining_and_infer(env, monitor)
        else:
            raise YmirError(f"{env_path}: none of run_training, run_mining, run_infer is true: nothing to do")
        monitor.set_span(0.0, 1.0)
        monitor.update(POSTPROCESS, 1.0, force=True)
        log.info("done in %.0f s", time.time() - started)
        return 0
    except (Interrupted, KeyboardInterrupt) as exc:  # stopped from outside, not a failure: one line, no traceback
        signum = exc.signum if isinstance(exc, Interrupted) else EXIT_SIGINT - 128
        message = str(exc) if isinstance(exc, Interrupted) else "interrupted by SIGINT"
        code = CODE_CONFIG if monitor is None else CODE_MODEL
        log.error("task stopped (error code %d): %s", code, message)
        monitor = monitor or _fallback_monitor()
        if monitor is not None:
            monitor.error(code, message)
        return 128 + signum
    except Exception as exc:  # any failure: error state + message + non-zero exit, never a stuck "running"
        code = error_code(exc, CODE_CONFIG if monitor is None else CODE_MODEL)
        # The user's to fix: the message says what and how. Anything else is a bug: keep the traceback.
        (log.error if isinstance(exc, MirsegError) else log.exception)("task failed (error code %d): %s", code, exc)
        monitor = monitor or _fallback_monitor()
        if monitor is not None:
            monitor.error(code, f"{type(exc).__name__}: {exc}")
        return 1


def _fallback_monitor() -> Monitor | None:
    """env.yaml unusable: the platform's fixed /out/monitor.txt if it can be written, else None."""
    fallback = Path("/out/monitor.txt")
    if fallback.parent.is_dir() and os.access(fallback.parent, os.W_OK):
        return Monitor(fallback, "mirseg")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mirseg ymir", description="Run as the YMIR platform's executor.")
    parser.add_argument("--env", help=f"env.yaml (default: $MIRSEG_YMIR_ENV or {DEFAULT_ENV})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    # SIGINT/SIGTERM outside training's and mining's safe points raise at once, so run() reports them.
    with tempfile.TemporaryDirectory(prefix="mirseg-cache-") as tmp, interrupt.raise_on_signals():
        _quiet_caches(tmp)
        return run(args.env or os.environ.get("MIRSEG_YMIR_ENV") or DEFAULT_ENV)
