"""bench/gpu_check.py, the GPU check kit, in its CPU fallback: the one table, its sections and rows, the time guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_NETS = ["fastscnn", "hrnet_w18s", "deeplabv3plus_r18"]  # the kit's default without CUDA


def _kit(tmp_path: Path, *args: str) -> tuple[list[str], list[dict[str, str]]]:
    """Run the kit on the CPU; its stdout lines and the rows of its JSON copy."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--tiny", "--out", str(tmp_path),
                           *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    lines = proc.stdout.splitlines()
    assert data["table"] == proc.stdout.rstrip("\n") and lines[0] == data["header"]
    return lines, data["rows"]


def _table(lines: list[str]) -> list[list[str]]:
    """The markdown table's body rows, split into cells."""
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| section")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]


def test_time_guard_skips_every_section_and_still_prints_the_table(tmp_path):
    """With no time left every check is a 'skipped: time' row: the table keeps every section and network."""
    lines, rows = _kit(tmp_path, "--budget", "0")
    assert lines[0].startswith("# mirseg GPU check: device cpu, torch ") and "load average" in lines[0]
    assert lines[2].split("|")[1:-1] == [f" {c} " for c in ("section", "check", "device", "measured", "unit",
                                                            "original (V100)", "ratio", "result")]
    cells = _table(lines)
    assert [c[0] for c in cells] == ["a"] * 3 + ["b"] * 3 + ["c", "d", "e"]
    assert all(c[2] == "cpu" and c[-1] == "skipped: time" for c in cells)
    assert [c[1] for c in cells[:3]] == [f"{n} inference" for n in CPU_NETS]
    assert [r["result"] for r in rows] == [c[-1] for c in sorted(cells, key=lambda c: "dceab".index(c[0]))]


@pytest.mark.slow  # ~35 s on 2 busy cores, most of it the three YMIR subprocesses
def test_tiny_cpu_run_fills_every_section(tmp_path):
    lines, rows = _kit(tmp_path, "--nets", "fastscnn")
    cells = {(c[0], c[1]): c for c in _table(lines)}
    fps = cells[("a", "fastscnn fp32 1x3x64x128")]
    assert float(fps[3]) > 0 and fps[5] == "56.45" and fps[6] == "-"  # the V100 figure; no ratio at this size
    assert float(cells[("b", "fastscnn train 2x3x64x64")][3]) > 0
    assert cells[("b", "fastscnn peak memory")][-1] == "n/a: CUDA only"
    agree = [c for k, c in cells.items() if k[0] == "c"]
    assert [c[1].split()[0] for c in agree] == ["labels", "rsal", "entropy"]
    assert all(0.0 <= float(c[3]) <= 1.0 for c in agree)
    # On a CPU the resume is bit-exact: the loss curves are identical.
    assert cells[("d", "resume at 10 of 20: max abs loss difference")][3::4] == ["0.00e+00", "pass"]
    assert [(k[1], c[-1]) for k, c in cells.items() if k[0] == "e"] == [
        ("ymir training task", "pass"), ("ymir mining task", "pass"), ("ymir inference task", "pass")]
    assert not [r for r in rows if r["result"].startswith(("error", "skipped", "FAIL"))]
