"""load_weights takes mmseg, mirseg and bare checkpoints and adapts the class count; loading is safe unless trusted."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mirseg.checkpoint import (
    SAFE_GLOBALS,
    CheckpointError,
    atomic_save,
    background_index,
    load_weights,
    make_checkpoint,
    read_checkpoint,
    user_classes,
)
from mirseg.cli import main
from mirseg.errors import EXIT_ERROR, MirsegError, MissingFileError
from mirseg.models import build_model
from mirseg.ymir.executor import main as ymir_main
from mirseg.ymir.protocol import CODE_MODEL
from mirseg.ymir.workspace import inference_workspace


def _model(num_classes, seed):
    torch.manual_seed(seed)
    return build_model("fastscnn", num_classes)


@pytest.mark.parametrize("wrap", ["mmseg", "mirseg", "bare", "ddp"])
def test_loads_every_checkpoint_kind(tmp_path, wrap):
    src = _model(4, 0)
    sd = src.state_dict()
    obj = {
        "mmseg": {"meta": {"CLASSES": ("a", "b", "c", "d"), "iter": 10}, "state_dict": sd},
        "mirseg": make_checkpoint(src, "fastscnn", ["a", "b", "c", "d"]),
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


def test_make_checkpoint_stores_the_background_class_and_readers_fall_back_for_old_files(tmp_path):
    model = _model(3, 0)
    coco = make_checkpoint(model, "fastscnn", ["background", "disc", "box"], config={"img_scale": [128, 96]},
                           iteration=7, metrics={"mIoU": 0.5})
    assert {k: coco[k] for k in ("format", "version", "arch", "ignore_blank_area", "background_index", "iteration")} \
        == {"format": "mirseg", "version": 1, "arch": "fastscnn", "ignore_blank_area": False, "background_index": 0,
            "iteration": 7}
    assert coco["config"] == {"img_scale": [128, 96]} and coco["metrics"] == {"mIoU": 0.5}
    assert all(torch.equal(coco["model"][k], v) for k, v in model.state_dict().items())
    atomic_save(coco, tmp_path / "c.pth")
    assert background_index(read_checkpoint(tmp_path / "c.pth")) == 0
    assert user_classes(coco) == ("disc", "box")
    ignore = make_checkpoint(model, "fastscnn", ["background", "disc", "box"], ignore_blank_area=True)
    assert ignore["background_index"] is None and user_classes(ignore) == ("background", "disc", "box")
    labels = make_checkpoint(model, "fastscnn", ["road", "car", "sky"], resume_state={"best": {"mIoU": 1.0}})
    assert labels["background_index"] is None and labels["best"] == {"mIoU": 1.0}
    # Files from before background_index was stored: class 0 named "background" unless ignore_blank_area.
    for ckpt, want in ((coco, 0), (ignore, None), (labels, None)):
        old = {k: v for k, v in ckpt.items() if k != "background_index"}
        assert background_index(old) == want and user_classes(old) == user_classes(ckpt)
    # The stored value is what counts; a value that is no class index is refused, naming the file.
    assert background_index({**coco, "background_index": None}) is None
    assert user_classes({**coco, "background_index": None}) == ("background", "disc", "box")
    for bad in (3, -1, True, "0", 0.0):
        with pytest.raises(CheckpointError, match=r"c.pth: background_index .* is not a class index \(0\.\.2\) or "
                                                  r"null"):
            background_index({**coco, "background_index": bad}, "c.pth")


def test_a_checkpoint_from_before_background_index_infers_as_before(trained_fastscnn, tmp_path):
    """Inference asks the one rule: an old file (no background_index) reports no background in predictions.json."""
    best, _, val = trained_fastscnn
    ckpt = read_checkpoint(best)
    assert ckpt["background_index"] == 0
    old = tmp_path / "old.pth"
    atomic_save({k: v for k, v in ckpt.items() if k != "background_index"}, old)
    for path in (best, old):
        out = tmp_path / path.stem
        assert main(["infer", str(path), str(val.images), f"out_dir={out}", "save_labels=false",
                     "workers_per_gpu=0"]) == 0
        coco = json.loads((out / "predictions.json").read_text())
        assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "disc"), (2, "box")]
        assert {a["category_id"] for a in coco["annotations"]} == {1, 2}


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


# ---------------------------------------------------------------------------------------------
# Safe loading (issue 10): tensors, plain data and mmcv's numpy meta load; anything else needs trust.


class MkdirOnLoad:
    """Unpickling this runs ``os.mkdir(path)``: a harmless stand-in for the ``os.system`` payload of issue 10."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _mmcv_meta():
    """What mmcv 1.x's ``save_checkpoint`` puts in ``meta``, numpy objects included."""
    return {"mmcv_version": "1.4.0", "time": time.asctime(), "env_info": "sys.platform: linux\nPython: 3.8.10",
            "config": "model = dict(type='EncoderDecoder')", "seed": np.int64(42), "exp_name": "fastscnn.py",
            "CLASSES": ("road", "car", "person", "tree"),
            "PALETTE": np.random.default_rng(0).integers(0, 255, size=(4, 3)),  # mmseg's random palette
            "hook_msgs": {"best_score": np.float64(0.6125), "best_ckpt": "best_mIoU_iter_160000.pth",
                          "last_ckpt": "iter_160000.pth"},
            "flags": np.array([True, False]), "half": np.zeros((2, 2), np.float16), "names": np.array(["a", "bb"]),
            "epoch": 1, "iter": 160000}


def test_mmcv_checkpoint_with_numpy_meta_loads_without_trust(tmp_path):
    src = _model(4, 0)
    path = tmp_path / "mmcv.pth"
    meta = _mmcv_meta()
    torch.save({"meta": meta, "state_dict": src.state_dict(), "optimizer": {"state": {}, "param_groups": []}}, path)
    with pytest.raises(pickle.UnpicklingError):  # torch's own allow-list refuses numpy: ours is what makes it load
        torch.load(path, weights_only=True)
    ckpt = read_checkpoint(path)
    assert np.array_equal(ckpt["meta"]["PALETTE"], meta["PALETTE"]) and ckpt["meta"]["PALETTE"].dtype == np.int64
    assert ckpt["meta"]["hook_msgs"]["best_score"] == np.float64(0.6125)
    assert ckpt["meta"]["seed"] == 42 and ckpt["meta"]["names"].tolist() == ["a", "bb"]
    dst = _model(4, 1)
    load_weights(dst, path)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())
    assert torch.serialization.get_safe_globals() == [g for g in torch.serialization.get_safe_globals()
                                                      if g not in SAFE_GLOBALS]  # nothing left registered


def test_numpy_1_legacy_format_checkpoint_loads_without_trust(tmp_path):
    """Checkpoints from torch < 1.6 / numpy 1.x: the legacy (non-zip) format, numpy.core.multiarray names."""
    path = tmp_path / "old.pth"
    torch.save({"meta": _mmcv_meta(), "state_dict": _model(4, 0).state_dict()}, path,
               _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert data.count(b"numpy._core.multiarray") >= 2
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ckpt = read_checkpoint(path)
    assert ckpt["meta"]["hook_msgs"]["best_score"] == np.float64(0.6125)
    assert ckpt["meta"]["PALETTE"].shape == (4, 3)


def test_other_python_objects_need_trust(tmp_path):
    path = tmp_path / "args.pth"
    # Old research checkpoints often keep their argparse arguments; object arrays may hold anything.
    torch.save({"state_dict": _model(3, 0).state_dict(), "args": argparse.Namespace(lr=0.01)}, path)
    with pytest.raises(CheckpointError, match=r"args\.pth .*argparse\.Namespace.*trust_checkpoint=true") as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value) and isinstance(info.value, MirsegError) and isinstance(info.value, ValueError)
    assert read_checkpoint(path, trust=True)["args"].lr == 0.01
    load_weights(_model(3, 1), path, trust=True)
    objects = tmp_path / "objects.pth"
    torch.save({"state_dict": {}, "meta": {"x": np.array([{"a": 1}], dtype=object)}}, objects)
    with pytest.raises(CheckpointError, match="objects.pth .*trust_checkpoint=true"):
        read_checkpoint(objects)


def test_crafted_checkpoint_never_runs_its_payload(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _model(3, 0).state_dict(), "meta": MkdirOnLoad(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pth .*posix\.mkdir.*it was not loaded.*trust_checkpoint=true"):
        read_checkpoint(evil)
    with pytest.raises(CheckpointError, match="trust_checkpoint=true"):
        load_weights(_model(3, 1), evil)
    assert not marker.exists()
    read_checkpoint(evil, trust=True)  # full unpickling, as asked: the payload is live, so the checks above count
    assert marker.is_dir()


def test_missing_and_foreign_files_are_mirseg_errors(tmp_path):
    with pytest.raises(MissingFileError, match="nope.pth does not exist"):
        read_checkpoint(tmp_path / "nope.pth")
    for trust in (False, True):
        junk = tmp_path / "junk.pth"
        junk.write_bytes(b"\x80\x02not a checkpoint")
        with pytest.raises(CheckpointError, match="junk.pth is not a PyTorch checkpoint") as info:
            read_checkpoint(junk, trust=trust)
        assert "\n" not in str(info.value)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        read_checkpoint(tmp_path / "list.pth")


# The commands, with a real trained model (tests/conftest.py::trained_fastscnn).


@pytest.fixture
def planted(trained_fastscnn, tmp_path):
    """(crafted model.pth, trusted-but-pickled model.pth, marker path, image folder) from the trained toy model."""
    ckpt = torch.load(trained_fastscnn[0], weights_only=True)
    marker = tmp_path / "PAYLOAD_RAN"
    evil, trusted = tmp_path / "model.pth", tmp_path / "trusted.pth"
    torch.save({**ckpt, "meta": MkdirOnLoad(marker)}, evil)
    torch.save({**ckpt, "args": argparse.Namespace(note="saved by an old script")}, trusted)
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(trained_fastscnn[2].images.iterdir())[:2]:
        shutil.copyfile(p, images / p.name)
    return evil, trusted, marker, images


def _one_line_with(text: str, *words: str) -> str:
    lines = [ln for ln in text.splitlines() if all(w in ln for w in words)]
    assert lines, f"no line with {words} in:\n{text}"
    return lines[0]


def test_cli_infer_refuses_a_crafted_model(planted, tmp_path):
    """Issue 10: `mirseg infer model.pth images/` ran the pickle's payload, then reported an error."""
    evil, _, marker, images = planted
    proc = subprocess.run([sys.executable, "-m", "mirseg", "infer", str(evil), str(images),
                           f"out_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_ERROR, proc.stdout + proc.stderr
    assert not marker.exists(), "the payload ran"
    _one_line_with(proc.stdout + proc.stderr, str(evil), "trust_checkpoint=true")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "labels").exists()


def test_every_command_refuses_it_and_trust_loads_a_pickled_model(planted, trained_fastscnn, tmp_path, capsys,
                                                                    caplog, one_torch_thread):
    evil, trusted, marker, images = planted
    _, tr, va = trained_fastscnn
    data = [f"train_ann={tr.ann}", f"train_images={tr.images}", f"val_ann={va.ann}", f"val_images={va.images}",
            "workers_per_gpu=0", "max_iters=1", "interval=1", "crop_size=[64,64]", "img_scale=[128,96]"]
    val = [f"val_ann={va.ann}", f"val_images={va.images}", "img_scale=[128,96]"]  # eval takes only its own keys
    runs = {
        "train": ["train", f"weights={evil}", f"work_dir={tmp_path / 'train'}", *data],
        "eval": ["eval", str(evil), *val],
        "mine": ["mine", str(evil), str(images), f"out_dir={tmp_path / 'mine'}", "workers_per_gpu=0"],
        "export": ["export", str(evil), "--format", "torchscript", "--no-check", "--height", "32", "--width", "32"],
    }
    for name, argv in runs.items():
        caplog.clear()
        assert main(argv) == EXIT_ERROR, name
        assert not marker.exists(), f"the payload ran in mirseg {name}"
        _one_line_with(caplog.text + capsys.readouterr().err, evil.name, "trust_checkpoint=true")
    assert not (tmp_path / "train" / "last.pth").exists()
    # A legitimately pickled checkpoint: refused by default, loaded when the user trusts it.
    out = tmp_path / "infer"
    assert main(["infer", str(trusted), str(images), f"out_dir={out}", "workers_per_gpu=0"]) == EXIT_ERROR
    assert main(["infer", str(trusted), str(images), f"out_dir={out}", "workers_per_gpu=0",
                 "trust_checkpoint=true"]) == 0
    assert len(list((out / "labels").iterdir())) == 2
    assert main(["export", str(trusted), "--format", "torchscript", "--no-check", "--height", "32", "--width", "32",
                 "--output", str(tmp_path / "m.pt"), "--trust-checkpoint"]) == 0
    assert (tmp_path / "m.pt").is_file()
    assert main(["eval", str(trusted), *val, "trust_checkpoint=true"]) == 0


def test_ymir_task_refuses_a_crafted_model_unless_trusted(planted, tmp_path):
    evil, trusted, marker, images = planted
    candidates = sorted(images.iterdir())
    env = inference_workspace(tmp_path / "evil", [evil], candidates, ["disc", "box"], mining=False,
                              config={"workers_per_gpu": 0})
    assert ymir_main(["--env", str(env)]) == 1
    assert not marker.exists(), "the payload ran in the YMIR executor"
    monitor = (tmp_path / "evil" / "out" / "monitor.txt").read_text()
    assert monitor.splitlines()[0].split("\t")[3:] == ["4", str(CODE_MODEL)]
    assert "trust_checkpoint=true" in monitor and "model.pth" in monitor
    env = inference_workspace(tmp_path / "trusted", [trusted], candidates, ["disc", "box"], mining=False,
                              config={"workers_per_gpu": 0, "trust_checkpoint": "true"})
    assert ymir_main(["--env", str(env)]) == 0
    result = json.loads((tmp_path / "trusted" / "out" / "infer-result.json").read_text())
    assert len(result["images"]) == 2
