"""The YMIR prediction tasks: mining (``mirseg.mine.mine`` -> the platform's mining result) and inference
(``mirseg.infer.run_inference`` -> its COCO result), one after the other when a task asks for both; each in
this process, or in one process per GPU (:func:`mirseg.ymir.worker.run_job`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirseg.checkpoint import CHECKPOINT_FORMAT, read_checkpoint, user_classes
from mirseg.config import InferConfig, MineConfig, build_config
from mirseg.fileio import atomic_path, write_atomic
from mirseg.ymir.protocol import (
    CODE_CONFIG,
    CODE_DATASET,
    CODE_MODEL,
    POSTPROCESS,
    PREPROCESS,
    Monitor,
    YmirEnv,
    YmirError,
    read_index,
    write_mining_result,
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


@dataclass(frozen=True)
class _Devices:
    """Where a task's jobs run: the device key, how many processes, their CUDA_VISIBLE_DEVICES ('' to leave it)."""

    device: str
    processes: int
    visible: str


def _model_checkpoint(env: YmirEnv, params: dict[str, Any]) -> Path:
    weights = weight_files(params, "model_params_path", env)
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
    check_task_keys(params, (set(MineConfig.__dataclass_fields__) | set(InferConfig.__dataclass_fields__)) - owned,
                source)
    device, processes = task_device(params, source)
    devices = _Devices(device, processes, visible_devices(params, processes) if device == "cuda" else "")
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
            _mine(env, params, checkpoint, candidates, list_file, devices, monitor)
        if env.run_infer:
            monitor.set_span(0.5 if both else 0.0, 1.0)
            _infer(env, params, checkpoint, candidates, list_file, devices, monitor, Path(tmp))


def _mine(env: YmirEnv, params: dict[str, Any], checkpoint: Path, candidates: list[str], list_file: Path,
          devices: _Devices, monitor: Monitor) -> None:
    values = _job_values(MineConfig, params, {"checkpoint", "images", "out_dir", "device"})
    values.update(checkpoint=str(checkpoint), images=str(list_file), out_dir=str(env.out_dir / "mining"),
                  device=devices.device)
    try:
        cfg = build_config(MineConfig, values, str(env.config_file))
    except ValueError as exc:
        raise YmirError(str(exc), CODE_CONFIG) from None
    result = run_job("mine", cfg, devices.processes, monitor, devices.visible)
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
           devices: _Devices, monitor: Monitor, tmp: Path) -> None:
    values = _job_values(InferConfig, params, {"checkpoint", "images", "out_dir", "device"})
    if "fp16" in params and "amp" not in params and devices.device != "cpu":
        values["amp"] = params["fp16"]  # the form's fp16 is a GPU setting ("ignored on CPU"): not bf16 there
    values.update(checkpoint=str(checkpoint), images=str(list_file), out_dir=str(tmp / "infer"), device=devices.device,
                  save_labels=False, save_color=False, save_overlay=False, save_proba=False, save_coco=True)
    try:
        cfg = build_config(InferConfig, values, str(env.config_file))
    except ValueError as exc:
        raise YmirError(str(exc), CODE_CONFIG) from None
    result = run_job("infer", cfg, devices.processes, monitor, devices.visible)
    with atomic_path(env.infer_result_file) as tmp:  # the platform never sees half a file
        shutil.copyfile(result.coco_json, tmp)
    if result.failed:
        log.warning("%d candidates could not be read and have no prediction: %s", len(result.failed),
                    "; ".join(f"{p}: {m}" for p, m in result.failed[:5]))
    monitor.update(POSTPROCESS, 1.0, force=True)
    log.info("wrote %s (%d images)", env.infer_result_file, result.num_images)
