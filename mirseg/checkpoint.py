"""Saving and loading weights: mirseg checkpoints, mmsegmentation checkpoints, bare state dicts.

A mirseg checkpoint is a plain dict::

    {"format": "mirseg", "version": 1, "arch": str, "class_names": [...],
     "ignore_blank_area": bool, "config": {...resolved config...}, "iteration": int,
     "metrics": {...}, "model": state_dict, "optimizer": ..., "scheduler": ...}

mmsegmentation's are ``{"meta": {...}, "state_dict": {...}, "optimizer": ...}``; our module names
are mmseg's, so their ``state_dict`` loads as is.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("mirseg")

CHECKPOINT_FORMAT = "mirseg"


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Old mmcv checkpoints may pickle numpy objects in "meta"; those need full unpickling.
        log.warning("%s holds non-tensor Python objects; loading it with full unpickling "
                    "(only do this with files you trust)", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file into a dict; a clear error if the file is missing or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a .pth file")
    try:
        obj = _torch_load(path)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise ValueError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or a state dict")
    return obj


def extract_state_dict(ckpt: dict[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights of a mirseg or mmseg checkpoint, or the dict itself if it is a state dict."""
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        state = ckpt["model"]
    elif isinstance(ckpt.get("state_dict"), dict):
        state = ckpt["state_dict"]
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        raise ValueError(f"{source}: no weights found; expected a mirseg checkpoint, an mmsegmentation "
                         f"checkpoint with 'state_dict', or a bare state dict (top-level keys: {sorted(ckpt)[:8]})")
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


@dataclass
class LoadReport:
    """What ``load_weights`` did: keys loaded, and classifier keys left at their fresh init."""

    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)


def _is_classifier_mismatch(key: str, ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    # Only the final 1x1 classifiers (conv_seg) depend on the class count, and only along dim 0.
    return (key.endswith(("conv_seg.weight", "conv_seg.bias"))
            and ours.shape[1:] == theirs.shape[1:] and ours.shape[0] != theirs.shape[0])


def load_weights(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load weights from ``path`` into ``model``.

    Accepts an mmsegmentation checkpoint, a mirseg checkpoint or a bare state dict. When the class
    count differs (a 19-class Cityscapes model fine-tuned to 5 classes) the classifier layers that
    differ keep their fresh initialisation, logged in one line; any other mismatch is an error that
    names the keys.
    """
    state = extract_state_dict(read_checkpoint(path), str(path))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    skip, bad_shape = [], []
    for k in own:
        if k in state and own[k].shape != state[k].shape:
            (skip if _is_classifier_mismatch(k, own[k], state[k]) else bad_shape).append(k)
    if missing or unexpected or bad_shape:
        lines = [f"{path} does not fit {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:10])}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}")
        for k in bad_shape[:10]:
            lines.append(f"  {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        lines.append("  is it a checkpoint of the same architecture (model name / config_file)?")
        raise ValueError("\n".join(lines))
    to_load = {k: v for k, v in state.items() if k not in skip}
    model.load_state_dict({**own, **to_load}, strict=True)
    if skip:
        log.info("%s: class count differs; kept fresh classifier weights for %s", path, ", ".join(skip))
    return LoadReport(loaded=list(to_load), reinitialised=skip)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
