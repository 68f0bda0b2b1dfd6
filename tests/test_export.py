"""ONNX and TorchScript export: parity with PyTorch at the trace size and at other sizes, metadata, CLI."""

from __future__ import annotations

import json

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from archs import FASTEST, one_per_family
from torch import nn

from mirseg.checkpoint import atomic_save, make_checkpoint
from mirseg.cli import main
from mirseg.config import InferConfig, build_config
from mirseg.export import TraceableAdaptiveAvgPool2d, compare, export, traceable_resize
from mirseg.exported import load_torchscript, onnx_predictor, read_metadata
from mirseg.infer import load_predictor, run_inference
from mirseg.models import build_model
from mirseg.models import fastscnn as fastscnn_module

CLASSES = ["background", "road", "car"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _calibrated(arch: str) -> nn.Module:
    """An untrained model whose BatchNorm statistics come from random inputs.

    With the fresh statistics (mean 0, var 1) an untrained HRNet's logits reach 1e7 and any float
    rounding looks like a large error; calibrated, every network's logits are O(1) like a trained one's.
    """
    torch.manual_seed(0)
    model = build_model(arch, len(CLASSES))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 64, 64))
    return model.eval()


def _save_checkpoint(path, arch: str) -> None:
    model = _calibrated(arch)
    config = {"config_file": arch, "img_scale": [128, 96], "test_mode": "whole"}
    atomic_save(make_checkpoint(model, arch, CLASSES, config=config), path)


def _reference(ckpt, x: torch.Tensor) -> np.ndarray:
    """PyTorch logits of the checkpoint as `mirseg infer` runs it (BN folded), in the exports' NCHW layout.

    (channels-last picks other conv kernels: an untrained OCRNet amplifies that rounding to 1e-3 of its logits.)
    """
    with torch.inference_mode():
        return load_predictor(ckpt, device="cpu", channels_last=False).model(x)["out"].numpy()


@pytest.mark.parametrize("arch", one_per_family(["fastscnn", "hrnet_w18s"], FASTEST))
def test_onnx_matches_pytorch_at_any_size(arch, tmp_path):
    ckpt = tmp_path / f"{arch}.pth"
    _save_checkpoint(ckpt, arch)
    out = export(ckpt, "onnx", tmp_path / "m.onnx", height=64, width=64)
    assert out == tmp_path / "m.onnx"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == [
        "logits"]
    g = torch.Generator().manual_seed(1)
    for shape in [(1, 3, 64, 64), (2, 3, 96, 128), (1, 3, 65, 97)]:  # the trace size, batch 2, odd sizes
        x = torch.randn(*shape, generator=g)
        ref = _reference(ckpt, x)
        ours = session.run(["logits"], {"image": x.numpy()})[0]
        assert ours.shape == ref.shape == (shape[0], 3, *shape[2:])
        assert np.abs(ours - ref).max() <= 1e-4, (shape, np.abs(ours - ref).max())
        assert np.abs(ref).max() > 0.05  # the logits are not trivially small
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["class_names"] == CLASSES and meta["background_index"] == 0 and meta["arch"] == arch
    assert meta["img_scale"] == [128, 96] and meta["input"]["mean"] == [123.675, 116.28, 103.53]
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["mirseg"]) == meta == read_metadata(out)


@pytest.mark.parametrize("arch", one_per_family(default=FASTEST))
def test_torchscript_traces_every_architecture_for_any_size(arch, tmp_path):
    ckpt = tmp_path / "m.pth"
    _save_checkpoint(ckpt, arch)
    # export's own check (two sizes) is covered by the ONNX tests and FastSCNN here; the rest compare below
    out = export(ckpt, "torchscript", height=64, width=64, check=arch == "fastscnn")
    assert out == tmp_path / "m.torchscript.pt" and (tmp_path / "m.torchscript.pt.json").is_file()
    traced = load_torchscript(out)
    g = torch.Generator().manual_seed(2)
    for shape in [(1, 3, 64, 64), (2, 3, 72, 100)]:  # the trace size, then batch 2 at another size
        x = torch.randn(*shape, generator=g)
        ref = _reference(ckpt, x)
        with torch.inference_mode():
            ours = traced(x).numpy()
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), (shape, np.abs(ours - ref).max())
    assert read_metadata(out)["arch"] == arch


def test_cli_export_and_inference_with_the_onnx_model(tmp_path):
    ckpt = tmp_path / "m.pth"
    _save_checkpoint(ckpt, "fastscnn")
    assert main(["export", str(ckpt), "--format", "onnx", "--height", "64", "--width", "96"]) == 0
    onnx_path = tmp_path / "m.onnx"
    assert onnx_path.is_file()
    # ONNX Runtime behind mirseg's pipeline: same labels as PyTorch
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(96, 128), (60, 90)]):
        img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 3)
        cv2.imwrite(str(images / f"{i}.png"), img)
    cfg = {"images": str(images), "workers_per_gpu": 0, "save_coco": False}
    run_inference(build_config(InferConfig, {**cfg, "checkpoint": str(ckpt), "out_dir": str(tmp_path / "pt")}))
    run_inference(build_config(InferConfig, {**cfg, "checkpoint": str(onnx_path), "out_dir": str(tmp_path / "rt")}))
    for i in range(2):
        a = cv2.imread(str(tmp_path / "pt" / "labels" / f"{i}.png"), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "rt" / "labels" / f"{i}.png"), cv2.IMREAD_UNCHANGED)
        assert a.shape == b.shape and (a == b).mean() > 0.999
    p = onnx_predictor(onnx_path)
    assert (p.class_names, p.img_scale, p.background_index) == (CLASSES, (128, 96), 0)


def test_bad_requests_give_clear_errors(tmp_path):
    ckpt = tmp_path / "m.pth"
    _save_checkpoint(ckpt, "fastscnn")
    with pytest.raises(ValueError, match="unknown export format"):
        export(ckpt, "tflite")
    with pytest.raises(FileNotFoundError):
        export(tmp_path / "missing.pth")
    assert main(["export", str(tmp_path / "missing.pth")]) == 2
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        compare("onnxruntime", np.ones((1, 2, 3, 3)), np.ones((1, 2, 3, 3)) + 1e-3)
    assert compare("x", np.full((1, 1, 2, 2), 100.0), np.full((1, 1, 2, 2), 100.005)) < 1e-2  # relative above |1|


def test_traceable_pool_and_resize_are_the_same_math():
    x = torch.randn(2, 4, 13, 22)
    for bins in (1, 2, 3, 6, (2, 5)):
        torch.testing.assert_close(TraceableAdaptiveAvgPool2d(bins)(x), nn.AdaptiveAvgPool2d(bins)(x))
    original = fastscnn_module.resize
    with traceable_resize():
        assert fastscnn_module.resize is not original
        torch.testing.assert_close(fastscnn_module.resize(x, (13, 22)), x)  # identity at equal sizes
    assert fastscnn_module.resize is original
