"""Saving and loading weights: mirseg checkpoints, mmsegmentation checkpoints, bare state dicts.

A mirseg checkpoint is a plain dict, made by :func:`make_checkpoint` (training, the benches, the
tests: every writer)::

    {"format": "mirseg", "version": 1, "arch": str, "class_names": [...],
     "ignore_blank_area": bool, "background_index": int | None, "config": {...resolved config...},
     "iteration": int, "metrics": {...}, "model": state_dict,
     # training's last.pth also: "optimizer", "scheduler", "best", "rng" (and "scaler" under AMP)}

``background_index`` is the model's class of unannotated pixels (0, or None when there is none);
every reader asks :func:`background_index`, which falls back to the old rule for files without it.

mmsegmentation's are ``{"meta": {...}, "state_dict": {...}, "optimizer": ...}``; our module names
are mmseg's, so their ``state_dict`` loads as is.

Loading is safe by default: ``torch.load(weights_only=True)`` builds only tensors, containers,
numbers and the numpy arrays / scalars old mmcv checkpoints keep in ``meta`` (:data:`SAFE_GLOBALS`);
a file that needs anything else (any other class or function, i.e. code) is refused with an error
naming the file and ``trust_checkpoint=true``, the option that loads it with full unpickling.
Models reach a YMIR executor from other users' tasks: a crafted file must never run unasked.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mirseg.constants import BACKGROUND
from mirseg.errors import MirsegError, MissingFileError
from mirseg.fileio import atomic_path

log = logging.getLogger("mirseg")

CHECKPOINT_FORMAT = "mirseg"
CHECKPOINT_VERSION = 1  # additions (background_index) keep it: a reader of version 1 ignores keys it does not know


class CheckpointError(MirsegError, ValueError):
    """A weights file that cannot be used: not a checkpoint, refused by safe loading, or not fitting the model."""


def background_index(meta: Mapping[str, Any], source: str = "checkpoint") -> int | None:
    """The model's class index of background (the unannotated pixels), or None when the model has no such class.

    ``meta``: a checkpoint, or anything with its ``class_names`` / ``ignore_blank_area`` (export
    metadata, a predictor's fields). The stored ``background_index`` wins; files written before it
    was stored get the rule that made it: class 0 named "background" and ``ignore_blank_area`` false.
    """
    names = list(meta.get("class_names") or [])
    if "background_index" in meta:
        value = meta["background_index"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < len(names)):
            raise CheckpointError(f"{source}: background_index {value!r} is not a class index (0..{len(names) - 1}) "
                                  "or null; save the checkpoint again with mirseg")
        return value
    return 0 if not meta.get("ignore_blank_area", False) and names[:1] == [BACKGROUND] else None


def user_classes(ckpt: Mapping[str, Any], source: str = "checkpoint") -> tuple[str, ...]:
    """The classes a config names for ``ckpt``'s model: its classes without the background class (the COCO
    layout adds that one itself when ``ignore_blank_area`` is false)."""
    skip = background_index(ckpt, source)
    return tuple(str(n) for i, n in enumerate(ckpt.get("class_names") or []) if i != skip)


def make_checkpoint(model: nn.Module, arch: str, class_names: Sequence[str], *, ignore_blank_area: bool = False,
                    config: Mapping[str, Any] | None = None, iteration: int = 0,
                    metrics: Mapping[str, Any] | None = None,
                    resume_state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A mirseg checkpoint of ``model`` (the module doc lists the keys); the one place that lays one out.

    ``config``: the resolved config as a plain dict (what ``load_predictor`` and ``mirseg eval``
    start from). ``resume_state``: what ``resume=true`` needs besides the weights (optimizer,
    scheduler, best, rng, scaler), for training's last.pth.
    """
    names = [str(n) for n in class_names]
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": arch, "class_names": names,
        "ignore_blank_area": bool(ignore_blank_area),
        "background_index": background_index({"class_names": names, "ignore_blank_area": ignore_blank_area}),
        "config": dict(config or {}), "iteration": int(iteration), "metrics": dict(metrics or {}),
        "model": model.state_dict(),
    }
    ckpt.update(resume_state or {})
    return ckpt


def _numpy_safe_globals() -> list[Any]:
    """What old mmcv checkpoints pickle in ``meta`` (numpy arrays and scalars, e.g. a palette or a best score).

    Arrays are ``_reconstruct(ndarray, ...)`` then ``ndarray.__setstate__``, scalars ``scalar(dtype, bytes)``,
    dtypes ``dtype(code)`` then a BUILD on the dtype's class: only plain numeric, bool and fixed-width
    text dtypes are listed, so object arrays (which would hold arbitrary Python objects) stay refused.
    numpy 1.x pickles name ``numpy.core.multiarray``, numpy 2.x ``numpy._core.multiarray``: both map
    to the same functions.
    """
    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # numpy 2.x / 1.x
    names = [(fn, f"{module}.{fn.__name__}") for fn in (multiarray._reconstruct, multiarray.scalar)
             for module in ("numpy.core.multiarray", "numpy._core.multiarray")]
    dtype_classes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGSU"}
    return [*names, np.ndarray, np.dtype, *sorted(dtype_classes, key=lambda t: t.__name__)]


SAFE_GLOBALS = _numpy_safe_globals()
"""Globals ``read_checkpoint`` allows beyond torch's own ``weights_only`` set (tensors, containers, numbers)."""

# Markers of torch's weights-only unpickler refusing a global or an object (not of a corrupt file).
_REFUSED = ("GLOBAL", "allowlisted", "unrecognized function")


def _refusal(path: Path, exc: Exception) -> str | None:
    """What safe loading refused in ``path`` (the globals it would have to import), or None if the file is corrupt."""
    text = str(exc)
    if not any(marker in text for marker in _REFUSED):
        return None
    if zipfile.is_zipfile(path):
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            try:
                found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # only for the message; the refusal itself is certain
                found = []
        if found:
            return "it needs " + ", ".join(found[:5]) + (" ..." if len(found) > 5 else "")
    line = next((ln.strip() for ln in text.splitlines() if any(m in ln for m in _REFUSED)), "")
    return line.split(". Please use")[0].split(" was not an allowed global")[0] or "it needs more than tensors"


def _reason(exc: Exception) -> str:
    """The informative line of a torch.load error (torch wraps it in paragraphs of general advice)."""
    boiler = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return next((ln for ln in lines if not ln.startswith(boiler)), lines[0] if lines else "unreadable")


def _torch_load(path: Path, trust: bool) -> Any:
    if trust:
        # The user vouched for the file: full unpickling runs whatever code the file contains.
        log.warning("%s: loading with full unpickling (trust_checkpoint=true)", path)
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refusal(path, exc)
        if refused is None:
            raise
        # Never fall back to full unpickling on our own: a crafted file would run its code here.
        raise CheckpointError(
            f"{path} holds Python objects that safe loading refuses ({refused}); it was not loaded. If the file "
            "comes from a source you trust, set trust_checkpoint=true to load it with full unpickling "
            "(this runs any code the file contains)") from None


def read_checkpoint(path: str | os.PathLike, trust: bool = False) -> dict[str, Any]:
    """Load a checkpoint file into a dict; a clear error if the file is missing, refused or not a checkpoint.

    Loading is safe (``weights_only``: tensors, containers, numbers and the numpy types of
    ``SAFE_GLOBALS``) unless ``trust`` (the ``trust_checkpoint`` key) allows full unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist; pass the path of a .pth file")
    try:
        obj = _torch_load(path, trust)
    except CheckpointError:
        raise
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {_reason(exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or a state dict")
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
        raise CheckpointError(f"{source}: no weights found; expected a mirseg checkpoint, an mmsegmentation checkpoint "
                              f"with 'state_dict', or a bare state dict (top-level keys: {sorted(ckpt)[:8]})")
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


def load_weights(model: nn.Module, path: str | os.PathLike, trust: bool = False) -> LoadReport:
    """Load weights from ``path`` into ``model``.

    Accepts an mmsegmentation checkpoint, a mirseg checkpoint or a bare state dict. When the class
    count differs (a 19-class Cityscapes model fine-tuned to 5 classes) the classifier layers that
    differ keep their fresh initialisation, logged in one line; any other mismatch is an error that
    names the keys. ``trust``: see :func:`read_checkpoint`.
    """
    state = extract_state_dict(read_checkpoint(path, trust), str(path))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    skip, bad_shape = [], []
    for k in own:
        if k in state and own[k].shape != state[k].shape:
            (skip if _is_classifier_mismatch(k, own[k], state[k]) else bad_shape).append(k)
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}")
        parts += [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in bad_shape[:10]]
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {'; '.join(parts)}; is it a checkpoint "
                              "of the same architecture (model name / config_file)?")
    to_load = {k: v for k, v in state.items() if k not in skip}
    model.load_state_dict({**own, **to_load}, strict=True)
    if skip:
        log.info("%s: class count differs; kept fresh classifier weights for %s", path, ", ".join(skip))
    return LoadReport(loaded=list(to_load), reinitialised=skip)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`mirseg.fileio.atomic_path`: a crash never leaves half a file; umask mode."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
