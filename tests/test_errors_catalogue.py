"""docs/errors.md, the catalogue of bad input: every row names a test that exists, and the exit codes
it lists are the ones mirseg/errors.py defines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mirseg import errors

REPO = Path(__file__).resolve().parents[1]
CATALOGUE = REPO / "docs" / "errors.md"
TEST_REF = re.compile(r"`(tests/test_\w+\.py)::(test_\w+)`")


def _rows() -> list[str]:
    """The table rows of the catalogue's sections after the exit codes (one bad input each)."""
    text = CATALOGUE.read_text(encoding="utf-8")
    body = text.split("## Command line and configuration", 1)[1]
    return [ln for ln in body.splitlines() if ln.startswith("| ") and not ln.startswith(("| bad input", "| event"))
            and not set(ln) <= set("|- :")]


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_entry_names_a_test_that_exists():
    rows = _rows()
    assert len(rows) > 40
    missing = []
    for row in rows:
        refs = TEST_REF.findall(row)
        assert refs, f"a catalogue row without a test: {row}"
        for file, name in refs:
            if not (REPO / file).is_file() or name not in _test_functions(REPO / file):
                missing.append(f"{file}::{name}")
    assert not missing, f"docs/errors.md names tests that do not exist: {missing}"


def test_exit_codes_are_the_ones_mirseg_defines():
    text = CATALOGUE.read_text(encoding="utf-8")
    table = text.split("## Exit codes", 1)[1].split("##", 1)[0]
    listed = {int(code) for code in re.findall(r"^\|\s*(\d+)\s*\|", table, re.M)}
    defined = {errors.EXIT_OK, errors.EXIT_FAILED, errors.EXIT_ERROR, errors.EXIT_SIGINT, errors.EXIT_SIGTERM}
    assert listed == defined
    for row in _rows():
        exit_cell = row.split("|")[-3].strip()
        codes = {int(c) for c in re.findall(r"\d+", exit_cell)}
        assert codes and codes <= defined, f"unknown exit code in: {row}"


def test_troubleshooting_links_the_catalogue():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    assert "docs/errors.md" in section
