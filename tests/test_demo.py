"""``mirseg demo --quick``: the README's first command, end to end, and the folder it leaves."""

from __future__ import annotations

import json

import cv2
import yaml

from mirseg.cli import main


def test_demo_quick_leaves_a_complete_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SUMMARY.md" in printed and "train/" in printed  # the layout and where to read next
    summary = (out / "SUMMARY.md").read_text()
    for heading in ("## Validation", "## Inference", "## Mining", "## YMIR executor", "## Contact sheet"):
        assert heading in summary
    assert "FAILED" not in summary
    # Training, inference and mining outputs.
    assert (out / "train" / "best.pth").is_file() or (out / "train" / "last.pth").is_file()
    overlays = list((out / "infer" / "overlay").glob("*.jpg"))
    assert len(overlays) == 6
    coco = json.loads((out / "infer" / "predictions.json").read_text())
    assert len(coco["images"]) == 6
    for algorithm in ("rsal", "random"):
        rows = (out / "mine" / algorithm / "result.tsv").read_text().splitlines()
        assert len(rows) == 16
    assert list((out / "mine" / "rsal" / "masks").glob("*.png"))
    # The YMIR run: a model with stages, a mining list and an inference file.
    result = yaml.safe_load((out / "ymir" / "training" / "out" / "models" / "result.yaml").read_text())
    assert result["best_stage_name"] in result["model_stages"]
    assert (out / "ymir" / "mining_infer" / "out" / "result.tsv").is_file()
    assert (out / "ymir" / "mining_infer" / "out" / "infer-result.json").is_file()
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[1] == 3 * 256
    # Running it again replaces the earlier demo instead of failing or mixing the two.
    assert main(["demo", "--quick", "--out", str(out)]) == 0


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "precious.txt").read_text() == "keep me"
