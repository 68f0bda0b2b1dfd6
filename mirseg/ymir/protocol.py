"""YMIR's files: env.yaml in, monitor.txt / result.yaml / result.tsv out (``shared/docs/ymir-protocol.md``).

Everything is written atomically (temp file in the same folder, then rename), so the platform
never reads half a file, and a failure never destroys a result already written.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mirseg.coerce import parse_bool, read_yaml_mapping
from mirseg.errors import ConfigError, MirsegError
from mirseg.fileio import write_atomic

# Executor error codes of the SDK (ymir_exc/code.py), written to monitor.txt before a non-zero exit.
CODE_CONFIG = 300001
CODE_DATASET = 300002
CODE_IMAGE = 300003
CODE_MODEL = 300004
CODE_NO_GPU = 300102
CODE_OOM = 300103
CODE_NAN = 300201

STATE_RUNNING = 2
STATE_ERROR = 4

# The SDK's stage weights (ymir_exc/util.py YmirStageWeight): preprocess, task, postprocess.
STAGE_WEIGHTS = (1e-5, 0.99998, 1e-5)
PREPROCESS, TASK, POSTPROCESS = 0, 1, 2

OBJECT_TYPE_SEMANTIC = 3


class YmirError(MirsegError):
    """A failure with the monitor error code that describes it."""

    def __init__(self, message: str, code: int = CODE_CONFIG):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# env.yaml


@dataclass(frozen=True)
class YmirEnv:
    """The parts of env.yaml the executor uses; every path comes from here, none is hard-coded."""

    task_id: str
    run_training: bool
    run_mining: bool
    run_infer: bool
    protocol_version: str
    config_file: Path
    assets_dir: Path
    models_dir: Path
    training_index_file: Path | None
    val_index_file: Path | None
    candidate_index_file: Path | None
    out_dir: Path
    out_models_dir: Path
    tensorboard_dir: Path
    training_result_file: Path
    mining_result_file: Path
    infer_result_file: Path
    monitor_file: Path


def _flag(value: Any, key: str, source: Path) -> bool:
    try:
        return parse_bool(value, f"{source}: {key}")
    except ConfigError as exc:
        raise YmirError(str(exc)) from None


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping, its errors as YmirError (config code)."""
    try:
        return read_yaml_mapping(path)
    except MirsegError as exc:  # missing, unreadable, not YAML, not a mapping
        raise YmirError(str(exc)) from None


def read_env(path: str | os.PathLike) -> YmirEnv:
    """Parse env.yaml; a missing file or section is an error naming the key."""
    path = Path(path)
    if not path.is_file():
        raise YmirError(f"env file {path} does not exist; the platform mounts it at /in/env.yaml "
                        "(set MIRSEG_YMIR_ENV or --env to use another)")
    env = read_yaml(path)
    inp, out = env.get("input") or {}, env.get("output") or {}
    if not isinstance(inp, dict) or not isinstance(out, dict):
        raise YmirError(f"{path}: 'input' and 'output' must be mappings of paths")

    def opt(section: dict, name: str, key: str) -> Path | None:
        value = section.get(key)
        if value in (None, ""):
            return None
        if not isinstance(value, str) or "\0" in value:
            raise YmirError(f"{path}: {name}.{key} must be a path, got {value!r}")
        return Path(value)

    def req(section: dict, name: str, key: str) -> Path:
        value = opt(section, name, key)
        if value is None:
            raise YmirError(f"{path}: {name}.{key} is missing")
        return value

    out_root = req(out, "output", "root_dir")
    return YmirEnv(
        task_id=str(env.get("task_id") or "mirseg"),
        run_training=_flag(env.get("run_training", False), "run_training", path),
        run_mining=_flag(env.get("run_mining", False), "run_mining", path),
        run_infer=_flag(env.get("run_infer", False), "run_infer", path),
        protocol_version=str(env.get("protocol_version", "")),
        config_file=req(inp, "input", "config_file"),
        assets_dir=opt(inp, "input", "assets_dir") or Path(),
        models_dir=opt(inp, "input", "models_dir") or Path(),
        training_index_file=opt(inp, "input", "training_index_file"),
        val_index_file=opt(inp, "input", "val_index_file"),
        candidate_index_file=opt(inp, "input", "candidate_index_file"),
        out_dir=out_root,
        out_models_dir=opt(out, "output", "models_dir") or out_root / "models",
        tensorboard_dir=opt(out, "output", "tensorboard_dir") or out_root / "tensorboard",
        training_result_file=opt(out, "output", "training_result_file") or out_root / "models" / "result.yaml",
        mining_result_file=opt(out, "output", "mining_result_file") or out_root / "result.tsv",
        infer_result_file=opt(out, "output", "infer_result_file") or out_root / "infer-result.json",
        monitor_file=opt(out, "output", "monitor_file") or out_root / "monitor.txt",
    )


def index_rows(path: Path | None, what: str) -> list[list[str]]:
    """The TAB-separated columns of each non-blank line of an index file (UTF-8), each stripped.

    Raises:
        YmirError (dataset code): no such file, not UTF-8 text, or a line whose first column is empty.
    """
    if path is None:
        raise YmirError(f"env.yaml names no {what} index file", CODE_DATASET)
    if not path.is_file():
        raise YmirError(f"{what} index file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""),
                        CODE_DATASET)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of the first path
    except UnicodeDecodeError as exc:
        raise YmirError(f"{what} index file {path} is not UTF-8 text (byte {exc.start}); the platform writes "
                        "UTF-8: is it the right file?", CODE_DATASET) from None
    except OSError as exc:
        raise YmirError(f"cannot read {what} index file {path}: {exc.strerror or exc}", CODE_DATASET) from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        columns = [c.strip() for c in line.split("\t")]
        if not columns[0] or "\0" in columns[0]:
            raise YmirError(f"{what} index file {path} line {n}: {line[:80]!r} has no image path in its first "
                            "column (expected image<TAB>annotation lines)", CODE_DATASET)
        rows.append(columns)
    return rows


def read_index(path: Path | None, what: str) -> list[str]:
    """Image paths (first TAB column) of an index file, as written; blank lines skipped."""
    return [row[0] for row in index_rows(path, what)]


# ---------------------------------------------------------------------------------------------
# monitor.txt


class Monitor:
    """``monitor.txt``: one line ``task_id<TAB>timestamp<TAB>percent<TAB>state<TAB>code``.

    Percent goes through the SDK's stage weights, then into this task's share of the whole run
    (mining and inference in one container get [0, 0.5] and [0.5, 1]). Writes are rate-limited
    (at most one a second unless forced) and never go backwards. State 3 ("done") is never
    written: the platform writes it after importing the results.
    """

    def __init__(self, path: Path, task_id: str, min_interval: float = 1.0):
        self.path, self.task_id, self.min_interval = Path(path), task_id, min_interval
        self.span = (0.0, 1.0)  # this task's share of the whole run
        self.percent = 0.0
        self._last_write = 0.0

    def set_span(self, start: float, end: float) -> None:
        self.span = (start, end)

    def update(self, stage: int, fraction: float, force: bool = False) -> None:
        """Report ``fraction`` (0..1) of ``stage`` (PREPROCESS, TASK, POSTPROCESS)."""
        fraction = min(max(float(fraction), 0.0), 1.0) if math.isfinite(fraction) else 0.0
        within = sum(STAGE_WEIGHTS[:stage]) + STAGE_WEIGHTS[stage] * fraction
        percent = self.span[0] + (self.span[1] - self.span[0]) * min(within, 1.0)
        percent = max(percent, self.percent)
        now = time.monotonic()
        if not force and now - self._last_write < self.min_interval:
            return
        self.percent = percent
        self._write(percent, STATE_RUNNING, 0)
        self._last_write = now

    def adopt(self) -> None:
        """Take over the percent another process (rank 0 of the task's group) wrote to the file meanwhile."""
        try:
            fields = self.path.read_text(encoding="utf-8").split("\n", 1)[0].split("\t")
            self.percent = max(self.percent, float(fields[2]))
        except (OSError, ValueError, IndexError):  # no file yet, or not a monitor line: keep our own
            pass

    def error(self, code: int, message: str = "") -> None:
        """The error state, written just before the process exits non-zero."""
        self._write(self.percent, STATE_ERROR, code, message)

    def _write(self, percent: float, state: int, code: int, message: str = "") -> None:
        fields = [self.task_id, f"{time.time():.4f}", f"{percent:.4f}", str(state), str(code)]
        text = "\t".join(fields)
        if message:  # line 2 onwards: free text the platform shows as the error's details
            text += "\n" + "\n".join(message.splitlines()[-20:])
        write_atomic(self.path, text + "\n")


# ---------------------------------------------------------------------------------------------
# results


def _fraction(value: Any) -> float:
    """A plain Python float in [0, 1] (never numpy/torch scalars, never NaN: the platform rejects both)."""
    v = float(value)
    return min(max(v, 0.0), 1.0) if math.isfinite(v) else 0.0


def write_training_result(path: Path, stages: dict[str, dict[str, Any]], best_stage: str) -> None:
    """``result.yaml`` with ``model_stages``; each stage: ``files`` (basenames) and metrics in [0, 1].

    Written as the SDK writes it, plus the top-level ``object_type: 3`` that ymir 2.1-2.3 need to
    register a segmentation model.
    """
    if best_stage not in stages:
        raise ValueError(f"best stage {best_stage!r} is not one of {sorted(stages)}")
    models_dir = path.parent
    out: dict[str, Any] = {"best_stage_name": best_stage, "model_stages": {}, "object_type": OBJECT_TYPE_SEMANTIC}
    for name, stage in stages.items():
        if not name.isidentifier():
            raise ValueError(f"stage name {name!r} must be an identifier")
        files = [Path(f).name for f in stage["files"]]
        for f in files:
            if not ((models_dir / name / f).is_file() or (models_dir / f).is_file()):
                raise FileNotFoundError(f"stage {name}: {f} is not in {models_dir} or {models_dir / name}")
        entry = {"stage_name": name, "files": files, "timestamp": int(stage.get("timestamp", time.time()))}
        for key in ("mIoU", "mAcc", "aAcc"):
            entry[key] = _fraction(stage.get(key, 0.0))
        out["model_stages"][name] = entry
    out["mIoU"] = out["model_stages"][best_stage]["mIoU"]
    write_atomic(path, yaml.safe_dump(out, sort_keys=False))


def write_mining_result(path: Path, ranking: list[tuple[str, float]]) -> None:
    """``result.tsv``: ``path<TAB>score`` best first, every candidate path exactly as the index gave it."""
    lines = [f"{p}\t{float(s):.6g}" for p, s in ranking]
    write_atomic(path, "".join(line + "\n" for line in lines))
