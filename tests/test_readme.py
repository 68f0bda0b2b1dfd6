"""The README and docs say only what is true: its commands parse, its walkthrough runs, generated docs are current."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from mirseg.cli import build_parser, main
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


CI = REPO / ".ci" / "run"


def _ci(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CI), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _readme_commands() -> list[str]:
    first = _bash_blocks(README)[0].splitlines()
    return [line for line in first if line.strip() and not line.startswith("#")]


def test_readme_starts_with_the_demo_and_the_test_command():
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0].startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==")
    assert commands[0].endswith("mirseg demo") and commands[1] == "python -m pytest -q"


def test_ci_takes_its_commands_from_the_readme():
    """.ci/run runs the README's first block as it is: its extraction gives exactly the README's two commands,
    it follows the file it reads (not a copy of today's commands), and it does not repeat them itself."""
    printed = _ci("--print-commands", "README.md")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.splitlines() == _readme_commands()
    script = CI.read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    for command in _readme_commands():
        for part in command.split(" && "):
            assert part not in code, f".ci/run repeats the README's {part!r}: take it from README.md"
    assert "run_commands README.md" in script and "git clone" in script and "export RUN_SLOW=1" in script
    assert "set -euo pipefail" in script and "\nruff check mirseg tests bench\n" in script


def test_ci_reads_only_the_first_bash_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n```python\nprint(1)\n```\n\n```bash\n# a comment\n\necho one && echo two\n"
                      "echo three\n```\n\n```bash\necho later\n```\n")
    printed = _ci("--print-commands", str(readme))
    assert printed.stdout.splitlines() == ["echo one && echo two", "echo three"]


@pytest.mark.parametrize(("block", "code", "made"), [
    # State carries from one command to the next (the venv activated by command 1 runs command 2).
    (["mkdir sub && cd sub && export CI_X=kept", "echo $CI_X > x.txt"], 0, ["sub/x.txt"]),
    # pytest's "no tests ran" (5) fails the run, with its code, and nothing after it runs.
    (["echo 1 > a.txt", "(exit 5)", "echo 1 > b.txt"], 5, ["a.txt"]),
    # A failure inside an `a && b && c` line fails the run; the rest of the line does not run.
    (["false && echo 1 > a.txt && true", "echo 1 > b.txt"], 1, []),
])
def test_ci_runs_the_commands_in_one_shell_and_stops_at_a_failure(tmp_path, block, code, made):
    (tmp_path / "README.md").write_text("```bash\n" + "\n".join(block) + "\n```\n")
    result = _ci("--run-commands", "README.md", cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.txt")) == made
    if made == ["sub/x.txt"]:
        assert (tmp_path / "sub" / "x.txt").read_text() == "kept\n"
    if code:
        assert f"FAILED (exit code {code})" in result.stderr


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
              "workers_per_gpu=0", "lr=0.05", "lr_scaling=none"],
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


def _docs_tool(name: str):
    """A script of docs/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_current():
    text = (REPO / "docs" / "configuration.md").read_text()
    assert text == _docs_tool("make_configuration").reference_markdown(), \
        "regenerate: python docs/make_configuration.py"


def test_readme_ymir_table_is_current():
    assert markdown_table() in README


def test_readme_links_and_pictures_exist():
    for target in re.findall(r"\]\(((?:docs|bench)/[^)#]+)\)", README):
        assert (REPO / target).exists(), f"README links {target}, which does not exist"
