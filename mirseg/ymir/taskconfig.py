"""A YMIR task's config.yaml, as both kinds of task read it: the template defaults under it, the key check,
the GPUs asked for, the model files named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mirseg.config import check_keys
from mirseg.errors import ConfigError
from mirseg.ymir import templates
from mirseg.ymir.protocol import CODE_NO_GPU, YmirEnv, YmirError, read_yaml

CPU_FALLBACK_ENV = "MIRSEG_YMIR_CPU_FALLBACK"
"""Set (to anything but 0): in a container without CUDA, a task asking for N GPUs runs as N CPU processes
(gloo) instead of failing with 300102. For tests and CPU-only trials; the platform's GPU tasks want the error."""

# Keys the platform puts in config.yaml (ymir-protocol.md section 3) or that the executor itself
# owns: accepted and never passed on as mirseg keys.
PLATFORM_KEYS = {
    "task_id", "class_names", "gpu_id", "gpu_count", "object_type", "pretrained_model_params", "model_params_path",
    "run_training", "run_mining", "run_infer", "export_format", "shm_size", "openpai_enable", "git_url",
    "code_config", "ymir_saved_file_patterns", "ymir_debug", "palette", "aug_test", "protocol_version",
    "cfg_options", "args_options",
}


def read_task_config(env: YmirEnv, task: str) -> dict[str, Any]:
    """config.yaml merged over the template defaults of ``task`` (the web form drops empty values)."""
    return {**templates.defaults(task), **read_yaml(env.config_file)}


def _gpu_ids(params: dict[str, Any]) -> list[str]:
    return [i for i in str(params.get("gpu_id", "") or "").replace(" ", "").split(",") if i]


def task_device(params: dict[str, Any], source: Path) -> tuple[str, int]:
    """("cpu", 0) when gpu_count is 0 or gpu_id is empty, else ("cuda", number of GPUs): the smallest of
    gpu_count, the ids in gpu_id and the GPUs CUDA sees. More than one: the task's job runs in one process per
    GPU. Without CUDA: an error (300102), or ("cpu", N) for N CPU processes with :data:`CPU_FALLBACK_ENV`."""
    gpu_id = str(params.get("gpu_id", "") or "").strip()
    ids = _gpu_ids(params)
    try:
        count = int(float(params.get("gpu_count", len(ids)) or 0))
    except (TypeError, ValueError, OverflowError):
        raise YmirError(f"{source}: gpu_count must be a number, got {params.get('gpu_count')!r}") from None
    if count <= 0 or not ids:  # the original counted an empty gpu_id as one GPU and failed
        return "cpu", 0
    if not torch.cuda.is_available():
        if os.environ.get(CPU_FALLBACK_ENV, "0").strip() not in ("", "0"):
            return "cpu", min(count, len(ids))
        raise YmirError(f"{source}: gpu_count {count} / gpu_id {gpu_id!r} ask for a GPU but CUDA is not available "
                        "in the container: start it with GPU access, or set gpu_count to 0 to run on the CPU",
                        CODE_NO_GPU)
    return "cuda", min(count, len(ids), torch.cuda.device_count())


def visible_devices(params: dict[str, Any], count: int) -> str:
    """CUDA_VISIBLE_DEVICES for a task's processes: the first ``count`` ids of gpu_id, read as indices into the
    container's CUDA_VISIBLE_DEVICES when it has one (gpu_id holds container-local indices, protocol section 3)."""
    ids = _gpu_ids(params)[:count]
    outer = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if outer and all(i.isdigit() and int(i) < len(outer) for i in ids):
        ids = [outer[int(i)].strip() for i in ids]
    return ",".join(ids)


def check_task_keys(params: dict[str, Any], allowed: set[str], source: Path) -> None:
    """Unknown keys: an error with a "did you mean" hint (a typo would otherwise be silently ignored)."""
    try:
        check_keys([k for k in params if k not in PLATFORM_KEYS], sorted(allowed), str(source), "this YMIR task")
    except ConfigError as exc:
        raise YmirError(str(exc)) from None


def weight_files(params: dict[str, Any], key: str, env: YmirEnv) -> list[Path]:
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
