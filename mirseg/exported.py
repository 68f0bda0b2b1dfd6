"""Exported models (``mirseg export``) as deployments and ``mirseg infer`` read and run them.

:func:`read_metadata` gives the metadata written beside (or inside) an export; :func:`ort_session`
opens an ONNX model with ONNX Runtime and :class:`OnnxModule` puts it behind the mirseg model
interface (``x (N, 3, H, W)`` -> ``{"out": logits}``), so mirseg's own prediction runs it unchanged;
:func:`load_torchscript` loads a TorchScript export; :func:`onnx_predictor` makes an ONNX export a
:class:`~mirseg.predict.Predictor`, which ``mirseg infer model.onnx`` and mining run. ``onnx`` and
``onnxruntime`` are optional dependencies (``pip install 'mirseg[export]'``), imported only when an
ONNX file is read or run.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mirseg.errors import DependencyError, FileFormatError, MissingFileError
from mirseg.predict import Predictor

METADATA_KEY = "mirseg"  # ONNX metadata_props key, and TorchScript extra file "mirseg.json"


def ort_session(path: str | os.PathLike, threads: int | None = None, providers: list[str] | None = None) -> Any:
    """An ONNX Runtime session on ``path`` (CPU unless ``providers`` say otherwise), idle threads not spinning;
    ``threads``: intra-op threads (None: torch's count)."""
    try:
        import onnxruntime as ort  # optional (mirseg[export]): deferred so mirseg runs without it
    except ImportError:
        raise DependencyError("checking or running an ONNX model needs onnxruntime: pip install 'mirseg[export]' "
                              "(or export with --no-check)") from None
    options = ort.SessionOptions()
    # None: torch's intra-op count, which the job's thread budget (mirseg.threads) has set; ONNX Runtime's own
    # default is one thread per core, whatever the data workers and other jobs need.
    options.intra_op_num_threads = threads or torch.get_num_threads()
    # Idle ONNX Runtime threads spin by default; in mirseg's pipeline they would take the cores the
    # image-decoding workers need between two forward passes.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load a TorchScript export on the CPU (quietly: PyTorch marks ``torch.jit.load`` deprecated, it still works)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an exported model: the ``<path>.json`` beside it, else the copy embedded in the file."""
    path = Path(path)
    side = Path(f"{path}.json")
    if side.is_file():
        try:
            return json.loads(side.read_bytes())
        except ValueError as exc:
            raise FileFormatError(
                f"{side} is not valid JSON ({exc}): export the model again with `mirseg export`") from None
    if not path.is_file():
        raise MissingFileError(f"exported model {path} does not exist")
    if path.suffix == ".onnx":
        import onnx  # optional (mirseg[export]): deferred so mirseg runs without it

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if METADATA_KEY in props:
            return json.loads(props[METADATA_KEY])
    else:
        extra = {f"{METADATA_KEY}.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        if extra[f"{METADATA_KEY}.json"]:
            return json.loads(extra[f"{METADATA_KEY}.json"])
    raise FileFormatError(f"{path} has no mirseg metadata ({side.name} missing and none embedded); export it with "
                          "`mirseg export`")


class OnnxModule(nn.Module):
    """An ONNX Runtime session behind the mirseg model interface: ``x (N, 3, H, W)`` -> ``{"out": logits}``."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, providers: list[str] | None = None):
        super().__init__()
        self.path = str(path)
        self.session = ort_session(path, threads, providers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.session.run(["logits"], {"image": x.detach().float().cpu().contiguous().numpy()})[0]
        return {"out": torch.from_numpy(logits).to(x.device)}


def onnx_predictor(path: str | os.PathLike, img_scale: tuple[int, int] | None = None, test_mode: str | None = None,
                   slide_crop: tuple[int, int] | None = None, slide_stride: tuple[int, int] | None = None,
                   threads: int | None = None) -> Predictor:
    """A :class:`~mirseg.predict.Predictor` that runs an exported ONNX model with ONNX Runtime (CPU).

    Everything else (decoding, resizing, batching, TTA, outputs) is mirseg's, so
    :func:`mirseg.infer.iter_predictions` and :func:`mirseg.infer.run_inference` work unchanged. ``None``
    settings come from the model's metadata.
    """
    meta = read_metadata(path)
    if not str(meta.get("format", "")).endswith("onnx"):
        raise FileFormatError(f"{path} is not an ONNX export of mirseg (metadata format {meta.get('format')!r}): "
                              "give the .onnx file `mirseg export --format onnx` wrote")
    return Predictor(
        model=OnnxModule(path, threads), arch=str(meta["arch"]), class_names=list(meta["class_names"]),
        ignore_blank_area=bool(meta["ignore_blank_area"]), img_scale=tuple(img_scale or meta["img_scale"]),
        test_mode=str(test_mode or meta["test_mode"]), slide_crop=tuple(slide_crop or meta["slide_crop"]),
        slide_stride=tuple(slide_stride or meta["slide_stride"]), device=torch.device("cpu"))
