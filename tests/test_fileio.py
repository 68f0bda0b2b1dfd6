"""Every output goes through mirseg.fileio: atomic, cleaned up on failure, with the umask's mode (never 0600)."""

from __future__ import annotations

import ast
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mirseg.checkpoint import atomic_save
from mirseg.coco_result import CocoResultWriter
from mirseg.config import InferConfig, MineConfig, TrainConfig, build_config, save_config
from mirseg.data.images import read_image, write_image
from mirseg.export import export
from mirseg.fileio import AtomicFile, atomic_path, write_atomic
from mirseg.infer import run_inference
from mirseg.mine import mine
from mirseg.ymir.protocol import Monitor, write_mining_result, write_training_result

REPO = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    """Run the test under this umask; 0o027 gives 0640 files, distinct from both 0644 and mkstemp's 0600."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _assert_outputs(folder: Path, mask: int, at_least: int) -> None:
    """Every file under ``folder`` has the umask's mode, and no temp file was left behind."""
    files = _files(folder)
    assert len(files) >= at_least, files
    assert not [p for p in files if p.name.startswith(".")], "temp files left behind"
    wrong = {str(p.relative_to(folder)): oct(_mode(p)) for p in files if _mode(p) != 0o666 & ~mask}
    assert not wrong, f"expected mode {oct(0o666 & ~mask)} under umask {oct(mask)}, got {wrong}"


# ---------------------------------------------------------------------------------------------
# The mechanism


def test_write_atomic_replaces_and_uses_the_umask(tmp_path, umask):
    target = tmp_path / "sub" / "out.txt"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_text() == "second"
    assert _mode(target) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_atomic_file_commits_or_leaves_the_old_file(tmp_path):
    target = tmp_path / "rows.tsv"
    target.write_text("old\n")
    rows = AtomicFile(target)
    rows.write("new\n")
    assert target.read_text() == "old\n"  # nothing visible before commit
    rows.abort()
    rows.abort()  # twice is harmless
    assert target.read_text() == "old\n" and _files(tmp_path) == [target]
    with pytest.raises(RuntimeError, match="boom"):
        with AtomicFile(target) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old\n" and _files(tmp_path) == [target]
    with AtomicFile(target, "wb") as f:
        f.write(b"done\n")
    assert target.read_text() == "done\n" and _files(tmp_path) == [target]
    committed = AtomicFile(target)
    committed.commit()
    with pytest.raises(ValueError, match="already committed"):
        committed.commit()
    with pytest.raises(ValueError, match="mode"):
        AtomicFile(target, "a")


def test_atomic_path_for_writers_that_want_a_name(tmp_path, umask):
    target = tmp_path / "model.pth"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and not tmp.exists()
        torch.save({"x": torch.ones(2)}, tmp)
        assert not target.exists()
    assert torch.load(target)["x"].sum() == 2 and _mode(target) == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("the writer failed")
    assert torch.load(target)["x"].sum() == 2 and _files(tmp_path) == [target]
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "never.bin"):
            pass  # a writer that wrote nothing
    assert _files(tmp_path) == [target]


# ---------------------------------------------------------------------------------------------
# Each kind of output, written by its own function


def test_every_cheap_writer_gives_the_umask_mode(tmp_path, umask):
    out = tmp_path / "out"
    atomic_save({"w": torch.zeros(3)}, out / "last.pth")
    save_config(TrainConfig(), out / "config.yaml")
    Monitor(out / "monitor.txt", "task").update(0, 0.5, force=True)
    write_mining_result(out / "result.tsv", [("a.png", 0.5)])
    write_training_result(out / "result.yaml", {"last": {"files": ["last.pth", "config.yaml"]}}, "last")
    with CocoResultWriter(out / "predictions.json", ["background", "disc"], 0) as coco:
        coco.add("a.png", np.array([[0, 1], [1, 1]], np.uint8), np.full((2, 2), 0.9, np.float32))
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255  # red, to check the channel order on the way back
    write_image(out / "picture.png", rgb)
    write_image(out / "picture.jpg", rgb)
    write_image(out / "mask.png", np.full((8, 8), 255, np.uint8))
    assert read_image(out / "picture.png")[0, 0].tolist() == [255, 0, 0]
    assert yaml.safe_load((out / "result.yaml").read_text())["best_stage_name"] == "last"
    _assert_outputs(out, umask, 9)


def test_training_outputs_are_readable_by_other_users(trained_fastscnn):
    """best.pth / last.pth used to be 0600 (mkstemp): a platform process of another uid could not read them."""
    work_dir = trained_fastscnn[0].parent
    mask = _current_umask()  # the session fixture trained under the process's umask
    for name in ("best.pth", "last.pth", "config.yaml"):
        assert _mode(work_dir / name) == 0o666 & ~mask, name
    assert not list(work_dir.glob(".*.tmp"))


@pytest.fixture
def two_images(trained_fastscnn, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for p in sorted(trained_fastscnn[2].images.iterdir())[:2]:
        shutil.copyfile(p, folder / p.name)
    return folder


def test_infer_mine_and_export_outputs_get_the_umask_mode(trained_fastscnn, two_images, tmp_path, one_torch_thread):
    ckpt = trained_fastscnn[0]
    mask = 0o027
    old = os.umask(mask)
    try:
        run_inference(build_config(InferConfig, dict(
            checkpoint=str(ckpt), images=str(two_images), out_dir=str(tmp_path / "infer"), workers_per_gpu=0,
            save_color=True, save_overlay=True, save_proba=True)))
        mine(build_config(MineConfig, dict(
            checkpoint=str(ckpt), images=str(two_images), out_dir=str(tmp_path / "mine"), workers_per_gpu=0,
            max_superpixel_per_image=32, save_masks=True, report=True)))
        export(ckpt, "onnx", tmp_path / "export" / "model.onnx", height=64, width=64)
    finally:
        os.umask(old)
    # labels, color, overlay, proba x 2 images + predictions.json + images.tsv + classes.txt
    _assert_outputs(tmp_path / "infer", mask, 11)
    # result.tsv + masks.tsv + report.html + a mask, an overlay and a thumbnail per image
    _assert_outputs(tmp_path / "mine", mask, 9)
    _assert_outputs(tmp_path / "export", mask, 2)  # model.onnx + model.onnx.json


# ---------------------------------------------------------------------------------------------
# No hand-written temp-then-rename (or direct write) outside fileio.py

_FORBIDDEN_MODULE_CALLS = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move"),
                           ("cv2", "imwrite"), ("tempfile", "mkstemp"), ("tempfile", "mktemp"),
                           ("tempfile", "NamedTemporaryFile")}
_FORBIDDEN_NAMES = {"mkstemp", "mktemp", "NamedTemporaryFile", "temp_sibling", "_temp_sibling", "_publish"}
_FORBIDDEN_METHODS = {"rename", "write_text", "write_bytes"}


def _mode_argument(call: ast.Call, position: int) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == "mode":
            return kw.value
    return call.args[position] if len(call.args) > position else None


def hand_written_writes(source: str) -> list[tuple[int, str]]:
    """(line, what) for each file write in ``source`` that bypasses mirseg.fileio."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name in _FORBIDDEN_NAMES]
        elif isinstance(node, ast.Name) and node.id in _FORBIDDEN_NAMES:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute) and node.attr in _FORBIDDEN_NAMES:
            found.append((node.lineno, node.attr))
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else None
            if (owner, func.attr) in _FORBIDDEN_MODULE_CALLS:
                found.append((node.lineno, f"{owner}.{func.attr}"))
            elif func.attr in _FORBIDDEN_METHODS:
                found.append((node.lineno, f".{func.attr}()"))
            elif func.attr == "replace" and len(node.args) == 1 and not node.keywords:
                found.append((node.lineno, "Path.replace()"))  # str.replace takes two arguments
        def writes(mode: ast.expr | None, strict: bool) -> bool:
            if isinstance(mode, ast.Constant) and isinstance(mode.value, str):
                return bool(set(mode.value) & set("wxa+"))
            return strict and mode is not None  # builtin open() with a computed mode: cannot tell, refuse
        if isinstance(func, ast.Name) and func.id == "open" and writes(_mode_argument(node, 1), strict=True):
            found.append((node.lineno, "open() for writing"))
        elif isinstance(func, ast.Attribute) and func.attr == "open" and writes(_mode_argument(node, 0), strict=False):
            found.append((node.lineno, "Path.open() for writing"))
    return found


def test_the_checker_finds_each_hand_written_pattern():
    bad = ["os.replace(tmp, path)", "tmp.replace(path)", "tmp.rename(path)", "fd, name = tempfile.mkstemp()",
           "from tempfile import NamedTemporaryFile", "from mirseg.fileio import temp_sibling",
           "path.write_text('x')", "path.write_bytes(b'x')", "cv2.imwrite('a.png', img)", "shutil.move(a, b)",
           "open(p, 'w')", "open(p, mode='xb')", "Path(p).open('a')", "path.open(mode='w')", "open(p, mode)"]
    for snippet in bad:
        assert hand_written_writes(snippet), snippet
    good = ["s.replace('a', 'b')", "dataclasses.replace(cfg, lr=1)", "open(p)", "open(p, 'rb')",
            "Image.open(buf)", "write_atomic(p, b'x')", "with atomic_path(p) as t:\n    torch.save(o, t)",
            "tempfile.TemporaryFile('w+')", "np.lib.format.open_memmap(t, mode='w+')"]
    for snippet in good:
        assert not hand_written_writes(snippet), snippet


def test_no_file_is_written_outside_fileio():
    sources = [*sorted((REPO / "mirseg").rglob("*.py")), *sorted((REPO / "bench").glob("*.py")),
               *sorted((REPO / "docs").glob("*.py"))]
    assert len(sources) > 30
    offenders = []
    for path in sources:
        if path == REPO / "mirseg" / "fileio.py":
            continue
        offenders += [f"{path.relative_to(REPO)}:{line}: {what}"
                      for line, what in hand_written_writes(path.read_text(encoding="utf-8"))]
    assert not offenders, "write through mirseg.fileio (write_atomic / AtomicFile / atomic_path):\n" + \
        "\n".join(offenders)
