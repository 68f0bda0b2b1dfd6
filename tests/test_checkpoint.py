"""load_weights accepts mmseg, mirseg and bare checkpoints, and adapts the class count."""

from __future__ import annotations

import logging

import pytest
import torch

from mirseg.checkpoint import CHECKPOINT_FORMAT, atomic_save, load_weights
from mirseg.models import build_model


def _model(num_classes, seed):
    torch.manual_seed(seed)
    return build_model("fastscnn", num_classes)


@pytest.mark.parametrize("wrap", ["mmseg", "mirseg", "bare", "ddp"])
def test_loads_every_checkpoint_kind(tmp_path, wrap):
    src = _model(4, 0)
    sd = src.state_dict()
    obj = {
        "mmseg": {"meta": {"CLASSES": ("a", "b", "c", "d"), "iter": 10}, "state_dict": sd},
        "mirseg": {"format": CHECKPOINT_FORMAT, "model": sd, "arch": "fastscnn"},
        "bare": sd,
        "ddp": {"state_dict": {"module." + k: v for k, v in sd.items()}},
    }[wrap]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    dst = _model(4, 1)
    report = load_weights(dst, path)
    assert report.reinitialised == []
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_other_class_count_keeps_fresh_classifiers(tmp_path, caplog):
    src = _model(19, 0)
    path = tmp_path / "cityscapes.pth"
    torch.save({"meta": {}, "state_dict": src.state_dict()}, path)
    dst = _model(5, 1)
    fresh = {k: v.clone() for k, v in dst.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="mirseg"):
        report = load_weights(dst, path)
    assert sorted(report.reinitialised) == sorted(k for k in fresh if "conv_seg" in k)
    assert len(report.reinitialised) == 6  # decode head + two aux heads, weight and bias each
    log_lines = [r.getMessage() for r in caplog.records if "class count differs" in r.getMessage()]
    assert len(log_lines) == 1 and "decode_head.conv_seg.weight" in log_lines[0]
    out = dst.state_dict()
    for k in out:
        expected = fresh[k] if k in report.reinitialised else src.state_dict()[k]
        assert torch.equal(out[k], expected), k


def test_wrong_architecture_names_the_keys(tmp_path):
    path = tmp_path / "hr.pth"
    torch.save(build_model("hrnet_w18s", 3).state_dict(), path)
    with pytest.raises(ValueError, match=r"missing keys .*backbone\.learning_to_downsample"):
        load_weights(_model(3, 0), path)


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights(_model(3, 0), tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth is not a PyTorch checkpoint"):
        load_weights(_model(3, 0), junk)
    other = tmp_path / "other.pth"
    torch.save({"epoch": 3, "note": "hello"}, other)
    with pytest.raises(ValueError, match="no weights found"):
        load_weights(_model(3, 0), other)


def test_atomic_save_leaves_no_partial_file(tmp_path):
    target = tmp_path / "ckpt.pth"
    atomic_save({"x": torch.ones(2)}, target)
    assert torch.load(target)["x"].sum() == 2

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"x": Unpicklable()}, target)
    assert torch.load(target)["x"].sum() == 2  # the old file survives
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]
