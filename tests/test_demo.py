"""``mirseg demo --quick``: the README's first command, end to end, and the folder it leaves."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import mirseg.demo as demo
import mirseg.ymir.workspace as workspace
from mirseg.cli import main
from mirseg.data.synthetic import STREET_CLASSES, make_street_dataset
from mirseg.errors import ConfigError
from mirseg.visualize import PALETTE
from mirseg.ymir.protocol import read_env, read_index
from mirseg.ymir.training import _annotation_file

CLASSES = ["background", *STREET_CLASSES]
TINY = dataclasses.replace(demo.QUICK, train=4, val=2, pool=4, iters=4, ymir_iters=2)


def _has_swatch(band_rgb: np.ndarray, color: np.ndarray) -> bool:
    """A solid SWATCH x SWATCH square of exactly ``color`` somewhere in the band (text strokes are thinner)."""
    mask = np.all(band_rgb == color, axis=2).astype(np.uint8)
    return bool(cv2.erode(mask, np.ones((demo.SWATCH, demo.SWATCH), np.uint8)).any())


def _check_sheet(path: Path, rows: int, row_height: int) -> None:
    """Column titles over both groups of rows, and a legend with every class's palette colour."""
    sheet = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    legend_height = demo._legend(CLASSES, 3 * 256).shape[0]
    assert legend_height == demo.LEGEND_LINE  # six short names fit on one line
    assert sheet.shape == (rows * row_height + 2 * demo.TITLE_BAND + legend_height, 3 * 256, 3)
    second_band = 3 * row_height + demo.TITLE_BAND
    for top in (0, second_band):
        band = sheet[top:top + demo.TITLE_BAND]
        assert (band[:2] == 255).all()  # a white band, not image content
        for col in range(3):  # a title over every column: dark text pixels
            assert (band[:, col * 256:(col + 1) * 256].max(axis=2) < 128).sum() > 30, (top, col)
    legend = sheet[-legend_height:]
    for k in range(len(CLASSES)):
        assert _has_swatch(legend, PALETTE[k]), CLASSES[k]
    assert not _has_swatch(legend, PALETTE[len(CLASSES)])  # only the model's classes


def _check_demo_folder(out: Path, plan: demo.Plan) -> None:
    """What a successful demo of ``plan`` leaves in ``out``."""
    assert (out / demo.MARKER).is_file()
    summary = (out / "SUMMARY.md").read_text()
    for heading in ("## Validation", "## Inference", "## Mining", "## YMIR executor", "## Contact sheet"):
        assert heading in summary
    assert "FAILED" not in summary
    assert "- training: ok" in summary and "- mining+infer: ok" in summary
    # Training, inference and mining outputs.
    assert (out / "train" / "best.pth").is_file() or (out / "train" / "last.pth").is_file()
    overlays = list((out / "infer" / "overlay").glob("*.jpg"))
    assert len(overlays) == plan.val
    coco = json.loads((out / "infer" / "predictions.json").read_text())
    assert len(coco["images"]) == plan.val
    for algorithm in ("rsal", "random"):
        rows = (out / "mine" / algorithm / "result.tsv").read_text().splitlines()
        assert len(rows) == plan.pool
    assert list((out / "mine" / "rsal" / "masks").glob("*.png"))
    # The YMIR run: a model with stages, a mining list and an inference file; its index files hold absolute paths.
    result = yaml.safe_load((out / "ymir" / "training" / "out" / "models" / "result.yaml").read_text())
    assert result["best_stage_name"] in result["model_stages"]
    assert (out / "ymir" / "mining_infer" / "out" / "result.tsv").is_file()
    assert (out / "ymir" / "mining_infer" / "out" / "infer-result.json").is_file()
    for entry in read_index(out / "ymir" / "training" / "in" / "train-index.tsv", "training"):
        assert Path(entry).is_absolute() and Path(entry).is_file()
    # 3 validation rows and 3 RSAL picks, each 64x128 scaled to 128x256 plus 2 px above and below.
    _check_sheet(out / "contact_sheet.png", rows=6, row_height=128 + 4)


# The quick demo's sizes with a few iterations: its whole folder, in seconds (3 validation scenes and 3 RSAL picks
# on the contact sheet, as in the quick demo).
SMALL = dataclasses.replace(demo.QUICK, train=4, val=3, pool=12, iters=4, ymir_iters=2)


def test_demo_quick_relative_then_absolute_out(tmp_path, monkeypatch, capsys):
    """The README's command with the default relative --out, from another working directory (the quick demo's
    sizes, a few iterations); then an absolute --out onto the same folder, which replaces the earlier demo before
    anything else (that run is stopped in its training step)."""
    monkeypatch.setattr(demo, "QUICK", SMALL)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick"]) == 0
    out = tmp_path / "mirseg-demo"
    printed = capsys.readouterr().out
    assert "SUMMARY.md" in printed and "train/" in printed  # the layout and where to read next
    _check_demo_folder(out, SMALL)

    stale = out / "data" / "stale.txt"
    stale.write_text("from the first run")

    def stopped(cfg, **kwargs):
        assert not stale.exists() and Path(cfg.work_dir) == out.resolve() / "train"  # replaced, not mixed
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "train", stopped)
    with pytest.raises(KeyboardInterrupt):
        main(["demo", "--quick", "--out", str(out.resolve())])
    assert not stale.exists() and (out / demo.MARKER).is_file()


@pytest.mark.slow  # the real quick demo, twice (~30 s)
def test_the_quick_demo_relative_then_absolute_out_in_full(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick"]) == 0
    out = tmp_path / "mirseg-demo"
    _check_demo_folder(out, demo.QUICK)
    stale = out / "data" / "stale.txt"
    stale.write_text("from the first run")
    assert main(["demo", "--quick", "--out", str(out.resolve())]) == 0
    assert not stale.exists()  # replaced, not mixed
    _check_demo_folder(out, demo.QUICK)


def test_failed_ymir_step_exits_non_zero_and_says_why(tmp_path, monkeypatch, caplog):
    """A YMIR task that fails (here: a misspelt config key) -> exit code 1, SUMMARY.md says FAILED and the reason,
    the other steps' outputs are all there."""
    monkeypatch.setattr(demo, "QUICK", TINY)
    original = workspace.training_workspace

    def with_typo(*args, **kwargs):
        return original(*args[:5], {**args[5], "max_iterz": 3}, **kwargs)

    monkeypatch.setattr(demo, "training_workspace", with_typo)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 1
    summary = (out / "SUMMARY.md").read_text()
    assert summary.startswith(demo.SUMMARY_TITLE)
    assert "**FAILED**: YMIR training, see" in summary
    assert "- training: **FAILED**: " in summary and "max_iterz" in summary and "max_iters" in summary
    assert "- mining+infer: ok" in summary
    assert (out / "contact_sheet.png").is_file() and (out / "infer" / "predictions.json").is_file()
    assert any("FAILED" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


def test_interrupted_demo_is_replaced_by_the_next_run(tmp_path, monkeypatch):
    """Ctrl-C during training leaves a folder with the marker and a SUMMARY.md saying where it stopped; the next
    run replaces that folder (here it fails in training with a user error: exit 2 and the reason)."""
    monkeypatch.setattr(demo, "QUICK", TINY)
    out = tmp_path / "demo"

    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["demo", "--quick", "--out", str(out)])
    assert (out / demo.MARKER).is_file() and list((out / "data" / "train" / "images").glob("*.png"))
    assert "**FAILED** at step 2/6 training: interrupted" in (out / "SUMMARY.md").read_text()
    (out / "SUMMARY.md").unlink()  # interrupted before the summary, even: the marker alone is enough
    (out / "partial.bin").write_bytes(b"half")

    def bad_key(cfg, **kwargs):
        raise ConfigError("train.yaml: lr must be positive")

    monkeypatch.setattr(demo, "train", bad_key)
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert not (out / "partial.bin").exists()
    summary = (out / "SUMMARY.md").read_text()
    assert "**FAILED** at step 2/6 training: ConfigError: train.yaml: lr must be positive" in summary


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path, caplog):
    (tmp_path / "precious.txt").write_text("keep me")
    (tmp_path / "SUMMARY.md").write_text("# my own notes\n")  # a SUMMARY.md that is not a demo's
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert (tmp_path / "SUMMARY.md").read_text() == "# my own notes\n"
    message = caplog.records[-1].getMessage()
    assert str(tmp_path) in message and demo.MARKER in message and "new or empty folder" in message


def test_demo_refuses_a_file_as_out(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(ConfigError, match="is a file"):
        demo.run_demo(target, quick=True)
    assert target.read_text() == "keep me"


def test_demo_replaces_a_summary_only_folder_of_an_older_demo(tmp_path):
    """Demos from before the marker are recognised by their SUMMARY.md's title."""
    (tmp_path / "SUMMARY.md").write_text(f"{demo.SUMMARY_TITLE}\n\nold\n")
    (tmp_path / "old.txt").write_text("x")
    demo._prepare_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.MARKER]


def test_legend_wraps_and_shows_every_class():
    names = [f"class number {k}" for k in range(12)]
    band = demo._legend(names, 400)
    assert band.shape[1] == 400 and band.shape[0] >= 3 * demo.LEGEND_LINE  # wrapped onto several lines
    assert band.shape[0] % demo.LEGEND_LINE == 0
    for k in range(12):
        assert _has_swatch(band, PALETTE[k]), k
    assert (band[:, -8:] == 255).all()  # nothing drawn past the right margin


def test_workspace_writes_absolute_paths_whatever_the_cwd(tmp_path, monkeypatch):
    """A relative root (``mirseg demo``'s default --out) gives the same absolute paths the platform writes;
    the task is then readable from any working directory."""
    data = make_street_dataset(tmp_path / "data", 3, (32, 64), seed=0, labels=True)
    monkeypatch.chdir(tmp_path)
    coco = workspace.ymir_coco([(data.ann, data.images)], data.class_names, "source")
    names = sorted(p.name for p in data.images.iterdir())
    env_path = workspace.training_workspace("ws/training", coco, "source", names[:1], data.class_names)
    infer_env = workspace.inference_workspace("ws/mine", [data.ann], sorted(data.images.iterdir()), data.class_names)
    monkeypatch.chdir(tmp_path / "data")  # somewhere else
    assert env_path.is_absolute() and infer_env.is_absolute()
    env = read_env(env_path)
    for index in (env.training_index_file, env.val_index_file):
        for line in index.read_text().splitlines():
            image, ann = line.split("\t")
            assert Path(image).is_absolute() and Path(image).is_file()
            assert Path(ann).is_absolute() and Path(ann).is_file()
    for entry in read_index(read_env(infer_env).candidate_index_file, "candidate"):
        assert Path(entry).is_absolute() and Path(entry).is_file()
    params = yaml.safe_load(read_env(infer_env).config_file.read_text())
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in params["model_params_path"])


def test_relative_annotation_entry_is_relative_to_the_index(tmp_path, monkeypatch):
    """One rule for relative index entries, both columns: relative to the index file's folder, not the cwd."""
    (tmp_path / "in" / "annotations").mkdir(parents=True)
    index = tmp_path / "in" / "train-index.tsv"
    index.write_text("assets/a.png\tannotations/coco.json\n")
    monkeypatch.chdir(tmp_path)
    assert _annotation_file(index, env=None) == tmp_path / "in" / "annotations" / "coco.json"
    index.write_text(f"assets/a.png\t{tmp_path / 'x.json'}\n")
    assert _annotation_file(index, env=None) == tmp_path / "x.json"
