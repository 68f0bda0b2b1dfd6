"""The README and docs say only what is true: its commands parse, its walkthrough runs, generated docs are current."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from mirseg.cli import build_parser, main
from mirseg.config import reference_markdown
from mirseg.data.synthetic import make_dataset
from mirseg.ymir.templates import markdown_table

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _mirseg_argv(line: str) -> list[str] | None:
    """The mirseg arguments of a command line (``mirseg ...``, ``... -m mirseg ...``, ``... && mirseg ...``)."""
    line = line.split("#", 1)[0].strip()
    for part in line.split("&&"):
        words = shlex.split(part)
        if words[:1] == ["mirseg"]:
            return words[1:]
        if "-m" in words and words[words.index("-m") + 1:words.index("-m") + 2] == ["mirseg"]:
            return words[words.index("-m") + 2:]
    return None


def test_readme_starts_with_the_demo_and_the_test_command():
    first = _bash_blocks(README)[0].splitlines()
    commands = [line for line in first if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[0].endswith("mirseg demo") and commands[1] == "python -m pytest -q"
    ci = (REPO / ".ci" / "run").read_text()
    assert "\npython -m pytest -q\n" in ci  # CI runs exactly the README's test command


def test_every_mirseg_command_in_the_readme_parses():
    parser = build_parser()
    found = 0
    for block in _bash_blocks(README):
        for line in block.splitlines():
            argv = _mirseg_argv(line) if line.strip() and not line.startswith("#") else None
            if argv is None:
                continue
            try:
                parser.parse_args(argv)
            except SystemExit as exc:
                pytest.fail(f"README command does not parse: {line!r} ({exc})")
            found += 1
    assert found >= 8


def _walkthrough() -> list[str]:
    block = README.split("<!-- walkthrough", 1)[1]
    return [line for line in _bash_blocks(block)[0].splitlines() if line.startswith("mirseg ")]


# Appended to the README's commands so that the walkthrough runs in seconds (later keys win).
FAST = {
    "train": ["max_iters=40", "interval=20", "crop_size=[64,64]", "img_scale=[128,96]", "samples_per_gpu=4",
              "workers_per_gpu=0", "lr=0.05", "scale_lr=false"],
    "eval": [], "infer": ["workers_per_gpu=0"], "mine": ["workers_per_gpu=0", "max_superpixel_per_image=64"],
    "export": ["--height", "96", "--width", "128"],
}


def test_readme_walkthrough_runs(tmp_path, monkeypatch):
    data = tmp_path / "my_data"
    (data / "images").mkdir(parents=True)
    for name, n, seed in (("train", 12, 1), ("val", 4, 2)):
        split = make_dataset(tmp_path / "gen" / name, n, num_classes=2, seed=seed, prefix=name)
        for p in split.images.iterdir():
            shutil.copy(p, data / "images" / p.name)
        shutil.copy(split.ann, data / f"{name}.json")
    pool = make_dataset(tmp_path / "gen" / "pool", 5, num_classes=2, seed=3, prefix="pool")
    shutil.copytree(pool.images, data / "pool")
    monkeypatch.chdir(tmp_path)
    commands = _walkthrough()
    assert [shlex.split(c)[1] for c in commands] == ["train", "eval", "infer", "mine", "export"]
    for command in commands:
        argv = shlex.split(command)[1:]
        assert main(argv + FAST[argv[0]]) == 0, command
    assert (tmp_path / "runs/shapes/best.pth").is_file() and (tmp_path / "runs/shapes/config.yaml").is_file()
    assert len(list((tmp_path / "runs/infer/overlay").iterdir())) == 16
    assert (tmp_path / "runs/infer/predictions.json").is_file()
    assert len((tmp_path / "runs/mine/result.tsv").read_text().splitlines()) == 5
    assert (tmp_path / "runs/shapes/model.onnx").is_file()


def test_configuration_reference_is_current():
    text = (REPO / "docs" / "configuration.md").read_text()
    assert text == reference_markdown(), "regenerate: python -m mirseg.config > docs/configuration.md"


def test_readme_ymir_table_is_current():
    assert markdown_table() in README


def test_readme_links_and_pictures_exist():
    for target in re.findall(r"\]\(((?:docs|bench)/[^)#]+)\)", README):
        assert (REPO / target).exists(), f"README links {target}, which does not exist"
