"""Build the ``/in`` + ``/out`` tree the platform would mount, in any folder (tests and ``mirseg demo``).

It follows what ymir 2.x writes (``ymir-protocol.md`` sections 1-4): assets under
``in/assets/<last 2 hex of sha1>/<sha1>.<ext>``, one seg-coco JSON for train and val whose
``file_name`` is the hashed basename and whose ``category_id`` is the index into ``class_names``,
``categories`` listing only the classes the train split uses, index files, config.yaml with the
platform's keys, and env.yaml with every path.

Every path written (env.yaml, index files, ``model_params_path``) is absolute, as the platform
writes its in-container paths (protocol section 4), whatever ``root`` and the working directory
are: a relative ``root`` is resolved first. (A relative index entry would be read relative to the
index file's folder, the rule of every mirseg list file, so cwd-relative paths would break.)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mirseg.fileio import write_atomic


def _asset(src: Path, assets: Path) -> Path:
    digest = hashlib.sha1(src.read_bytes()).hexdigest()
    dst = assets / digest[-2:] / f"{digest}{src.suffix.lower()}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def _env(root: Path, task_id: str, training: bool, mining: bool, infer: bool) -> Path:
    inp, out = root / "in", root / "out"
    env = {
        "protocol_version": "1.1.0", "task_id": task_id, "run_training": training, "run_mining": mining,
        "run_infer": infer, "manifest_file": "/img-man/manifest.yaml",
        "input": {"root_dir": str(inp), "assets_dir": str(inp / "assets"), "annotations_dir": str(inp / "annotations"),
                  "models_dir": str(inp / "models"), "config_file": str(inp / "config.yaml"),
                  "training_index_file": str(inp / "train-index.tsv") if training else "",
                  "val_index_file": str(inp / "val-index.tsv") if training else "",
                  "candidate_index_file": "" if training else str(inp / "candidate-index.tsv")},
        "output": {"root_dir": str(out), "models_dir": str(out / "models"), "tensorboard_dir": str(out / "tensorboard"),
                   "training_result_file": str(out / "models" / "result.yaml"),
                   "mining_result_file": str(out / "result.tsv"), "infer_result_file": str(out / "infer-result.json"),
                   "monitor_file": str(out / "monitor.txt"), "executor_log_file": str(out / "ymir-executor-out.log")},
    }
    for sub in ("models", "tensorboard"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    path = inp / "env.yaml"
    write_atomic(path, yaml.safe_dump(env, sort_keys=False))
    return path


def ymir_coco(splits: Sequence[tuple[str | Path, str | Path]], class_names: Sequence[str],
              image_dir: str | Path) -> dict[str, Any]:
    """One COCO dict from several (COCO JSON, image folder) splits, as YMIR exports them together.

    Images are copied into ``image_dir``; image and annotation ids are renumbered so they stay
    unique; ``category_id`` becomes the index of the category's name in ``class_names`` (YMIR's
    rule). The result is what :func:`training_workspace` takes.
    """
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    coco: dict[str, Any] = {"images": [], "annotations": []}
    for ann_file, images in splits:
        data = json.loads(Path(ann_file).read_text())
        index = {c["id"]: list(class_names).index(c["name"]) for c in data["categories"]}
        offset = len(coco["images"])
        for e in data["images"]:
            shutil.copyfile(Path(images) / e["file_name"], image_dir / e["file_name"])
            coco["images"].append({**e, "id": e["id"] + offset})
        for a in data["annotations"]:
            coco["annotations"].append({**a, "id": len(coco["annotations"]) + 1, "image_id": a["image_id"] + offset,
                                        "category_id": index[a["category_id"]]})
    return coco


def training_workspace(root: str | Path, coco: dict[str, Any], image_dir: str | Path, val_names: Sequence[str],
                       class_names: Sequence[str], config: dict[str, Any] | None = None,
                       task_id: str = "t0000001000001mirsegtrain00000") -> Path:
    """A training task's tree under ``root``; returns the env.yaml path.

    ``coco`` is a COCO dict whose ``file_name`` values are files of ``image_dir`` and whose
    ``category_id`` is already the 0-based index into ``class_names``; images named in
    ``val_names`` form the validation split, the rest the training split.
    """
    root = Path(root).resolve()  # absolute paths everywhere, like the platform's (module docstring)
    inp = root / "in"
    assets = inp / "assets"
    renamed: dict[str, Path] = {}
    for entry in coco["images"]:
        renamed[entry["file_name"]] = _asset(Path(image_dir) / entry["file_name"], assets)
    val = set(val_names)
    train_ids = {e["id"] for e in coco["images"] if e["file_name"] not in val}
    used = sorted({a["category_id"] for a in coco["annotations"] if a["image_id"] in train_ids})
    out = dict(coco)
    out["images"] = [{**e, "file_name": renamed[e["file_name"]].name, "license": 1, "coco_url": "", "flickr_url": ""}
                     for e in coco["images"]]
    out["categories"] = [{"id": k, "name": class_names[k], "supercategory": "object"} for k in used]
    ann = inp / "annotations" / "coco-annotations.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(ann, json.dumps(out))
    for name, keep in (("train-index.tsv", lambda n: n not in val), ("val-index.tsv", lambda n: n in val)):
        lines = [f"{renamed[e['file_name']]}\t{ann}\n" for e in coco["images"] if keep(e["file_name"])]
        write_atomic(inp / name, "".join(lines))
    params = {"class_names": list(class_names), "gpu_count": 0, "gpu_id": "", "task_id": task_id,
              "object_type": 3, "export_format": "seg-coco:raw", "shm_size": "16G", **(config or {})}
    write_atomic(inp / "config.yaml", yaml.safe_dump(params, sort_keys=False))
    return _env(root, task_id, True, False, False)


def inference_workspace(root: str | Path, model_files: Sequence[str | Path], images: Sequence[str | Path],
                        class_names: Sequence[str], mining: bool = True, infer: bool = True,
                        config: dict[str, Any] | None = None, stage: str = "best",
                        task_id: str = "t0000002000001mirsegmine000000") -> Path:
    """A mining and/or inference task's tree under ``root``; returns the env.yaml path."""
    root = Path(root).resolve()  # absolute paths everywhere, like the platform's (module docstring)
    inp = root / "in"
    stage_dir = inp / "models" / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    params_paths = []
    for f in model_files:
        shutil.copyfile(f, stage_dir / Path(f).name)
        params_paths.append(str(stage_dir / Path(f).name))
    lines = [f"{_asset(Path(p), inp / 'assets')}\n" for p in images]
    write_atomic(inp / "candidate-index.tsv", "".join(lines))
    params = {"class_names": list(class_names), "gpu_count": 0, "gpu_id": "", "task_id": task_id,
              "object_type": 3, "model_params_path": params_paths, "run_mining": mining, "run_infer": infer,
              **(config or {})}
    write_atomic(inp / "config.yaml", yaml.safe_dump(params, sort_keys=False))
    return _env(root, task_id, False, mining, infer)
