"""The module map of docs/design.md is the code's: floors, no import circle, small modules, imports at the top.

Every import of every module under mirseg/ is read with ``ast`` (those at the top of the file and
those inside functions) and checked against :data:`FLOORS`:

(a) a module imports only modules of its own floor or of lower ones;
(b) no circle, whatever the floors (imports inside functions count: they only hide a circle);
(c) no module is longer than :data:`MAX_LINES`;
(d) imports sit at the top of the file; inside a function only what :data:`DEFERRED` names, each with its reason.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mirseg"

FLOORS: list[tuple[str, list[str]]] = [  # lowest first; a package name covers its modules, "mirseg" is __init__.py
    ("foundation", ["mirseg", "errors", "constants", "fileio", "coerce", "interrupt", "dist", "download",
                    "visualize", "allocator", "threads", "machine", "precision", "launch"]),
    ("parts", ["presets", "config", "models", "data", "mining", "metrics", "checkpoint", "coco_result", "loss",
               "layout", "train_state"]),
    ("shared by the jobs", ["predict", "outputs", "report", "exported", "pretrained_files", "pretrained"]),
    ("jobs", ["evaluate", "train", "infer", "mine", "export"]),
    ("platform", ["ymir"]),
    ("entry points", ["cli", "demo", "__main__"]),
]

MAX_LINES = 400
"""The longest a module may be. The limit, not a target: no module of mirseg gets a tolerance above it."""

OVER_LIMIT: dict[str, str] = {}
"""Modules known to be over :data:`MAX_LINES` and who is shortening them; an entry fails once it is not needed."""

DEFERRED: dict[str, str] = {
    "onnx": "optional dependency (pip install 'mirseg[export]'), imported only when an ONNX file is written or read",
    "onnxruntime": "optional dependency (pip install 'mirseg[export]'), imported only when an ONNX model is run",
}
"""Imports allowed inside a function anywhere, and why."""

# mirseg/cli.py imports each command's module inside the command: they import torch (~3 s), and
# `mirseg --help`, a usage error or a bad key must answer at once (test_cli_imports_no_torch_at_start).
CLI_COMMANDS = {"mirseg.train", "mirseg.evaluate", "mirseg.infer", "mirseg.mine", "mirseg.export", "mirseg.demo",
                "mirseg.pretrained", "mirseg.checkpoint", "mirseg.models", "mirseg.ymir.executor", "mirseg.dist"}


def _name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str | None, names: list[str], importer: str, level: int, is_package: bool) -> set[str]:
    """The mirseg modules an import statement loads: ``from a import b`` is ``a.b`` when that is a module."""
    if level:  # relative: from the importer's package
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[:len(base) - level + 1]
        module = ".".join(base + ([module] if module else []))
    if not module or not (module == "mirseg" or module.startswith("mirseg.")):
        return set()
    found = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
    if len(found) < len(names):  # some names are attributes of the module itself
        found.add(module)
    return found


def imports(path: Path, importer: str | None = None) -> list[tuple[int, str, bool]]:
    """(line, imported name, inside a function) for every import in ``path`` (module ``importer``, by default its
    name under the repository): mirseg modules resolved, others as their top-level package (``torch``, ``onnx``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    importer, is_package = importer or _name(path), path.name == "__init__.py"
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside |= {id(n) for n in ast.walk(node) if n is not node}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = set()
            for alias in node.names:
                targets |= _resolve(alias.name, [], importer, 0, is_package) or {alias.name.split(".")[0]}
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            targets = _resolve(node.module, names, importer, node.level, is_package)
            if not targets and not node.level:
                targets = {node.module.split(".")[0]}
        else:
            continue
        found += [(node.lineno, t, id(node) in inside) for t in sorted(targets)]
    return found


def floor_of(module: str) -> int:
    """The floor (0 = lowest) of a mirseg module; a KeyError names a module no floor lists."""
    short = module.removeprefix("mirseg.") if module != "mirseg" else "mirseg"
    for level, (_, members) in enumerate(FLOORS):
        for member in members:
            if short == member or short.startswith(member + "."):
                return level
    raise KeyError(f"{module} is on no floor: add it to FLOORS in tests/test_layout.py and to the map in "
                   "docs/design.md")


def _graph() -> dict[str, set[str]]:
    return {m: {t for _, t, _ in imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}


def test_every_module_is_on_exactly_one_floor():
    names = [n for _, members in FLOORS for n in members]
    assert len(names) == len(set(names))
    for module in MODULES:
        floor_of(module)
    for name in names:  # and no floor names a module that is gone
        assert any(m == f"mirseg.{name}" or m.startswith(f"mirseg.{name}.") for m in MODULES) or name == "mirseg", name


def test_modules_import_only_their_floor_or_lower():
    wrong = []
    for module, path in MODULES.items():
        for line, target, _ in imports(path):
            if target in MODULES and floor_of(target) > floor_of(module):
                wrong.append(f"{path.relative_to(REPO)}:{line}: {module} (floor {FLOORS[floor_of(module)][0]!r}) "
                             f"imports {target} (floor {FLOORS[floor_of(target)][0]!r})")
    assert not wrong, "a lower floor imports a higher one:\n" + "\n".join(wrong)


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (a -> b -> ... -> a), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_no_import_circle():
    circle = find_circle(_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_checks_find_what_they_look_for(tmp_path):
    """The parser sees imports inside functions and relative ones; the circle finder finds a circle."""
    src = tmp_path / "x.py"
    src.write_text("import os\nfrom mirseg.errors import ConfigError\nfrom . import fileio\n\n\nclass A:\n"
                   "    def f(self):\n        import onnx.helper\n        from mirseg import __version__, dist\n")
    assert sorted(imports(src, "mirseg.x")) == [(1, "os", False), (2, "mirseg.errors", False),
                                                (3, "mirseg.fileio", False), (8, "onnx", True), (9, "mirseg", True),
                                                (9, "mirseg.dist", True)]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    with pytest.raises(KeyError, match="on no floor"):
        floor_of("mirseg.somewhere_new")


def test_no_module_is_longer_than_the_limit():
    over = {}
    for path in MODULES.values():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            over[str(path.relative_to(REPO))] = lines
    unexplained = {p: n for p, n in over.items() if p not in OVER_LIMIT}
    assert not unexplained, f"modules over {MAX_LINES} lines (split them along a seam): {unexplained}"
    stale = sorted(set(OVER_LIMIT) - set(over))
    assert not stale, f"{stale} are within {MAX_LINES} lines now: remove them from OVER_LIMIT"


def test_imports_are_at_the_top():
    inside = []
    for module, path in MODULES.items():
        for line, target, in_function in imports(path):
            if not in_function or target in DEFERRED or (module == "mirseg.cli" and target in CLI_COMMANDS):
                continue
            inside.append(f"{path.relative_to(REPO)}:{line}: {target}")
    assert not inside, "imports inside a function (move them to the top of the file, or name an optional " \
                       "dependency in DEFERRED with the reason):\n" + "\n".join(inside)


def test_cli_imports_no_torch_at_start():
    """Why mirseg/cli.py defers its commands' imports: the parser and the config classes load without torch."""
    code = "import sys, mirseg.cli; mirseg.cli.build_parser(); print(sorted(m for m in ('torch', 'cv2') if m in " \
           "sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_design_md_shows_the_floors_of_this_test():
    """docs/design.md's module map lists the same modules on the same floors, in the same order."""
    text = (REPO / "docs" / "design.md").read_text()
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d) ([^|]+?) \| ([^|]+) \|", section, flags=re.M)
    assert rows, "docs/design.md has no module map table"
    shown = [(int(n), title.strip(), re.findall(r"`([\w.]+)`", modules)) for n, title, modules in rows]
    expected = [(level, title, members) for level, (title, members) in enumerate(FLOORS)]
    assert sorted(shown) == expected
