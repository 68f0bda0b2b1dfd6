"""mirseg.allocator: a job's big CPU tensors on transparent huge pages, asked for before torch's first allocation,
and the start-up log saying what took effect. Each process-level check runs in a fresh interpreter, since PyTorch
reads ``THP_MEM_ALLOC_ENABLE`` once per process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mirseg import allocator, cli

BLOCK_MB = 256
PAGES = BLOCK_MB * 2**20 // os.sysconf("SC_PAGE_SIZE")

# A job's budget (what logs the memory line), then the page faults of filling a fresh BLOCK_MB tensor.
SCRIPT = textwrap.dedent(f"""
    import logging, resource, sys, torch
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if sys.argv[1] == "allocate-first":
        torch.ones(1 << 22)
    from mirseg import machine, threads
    with threads.budget(0, 0):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones({BLOCK_MB} * 2**20 // 4)
        print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print("huge", machine.huge_pages())
""")


def job(first: str = "", env: dict[str, str] | None = None) -> dict[str, str]:
    """The memory log line, the page faults and machine.huge_pages() of a job in a fresh interpreter."""
    environ = {k: v for k, v in os.environ.items() if k != allocator.ENV_VAR}
    done = subprocess.run([sys.executable, "-c", SCRIPT, first], capture_output=True, text=True, timeout=120,
                          env={**environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    out = {"memory": next(line for line in lines if line.startswith("memory: "))}
    out.update(line.split(" ", 1) for line in lines if line.split(" ", 1)[0] in ("faults", "huge"))
    return out


def test_a_job_gets_huge_pages_where_the_kernel_gives_them():
    out = job()
    assert out["huge"] == "True"  # torch's allocator took its huge-page path: the request came first
    mode = allocator.kernel_mode()
    if mode in ("always", "madvise"):
        assert out["memory"].startswith("memory: 2 MiB pages for tensors of 2 MiB and more")
        assert int(out["faults"]) < PAGES // 4, out  # most of the block came in 2 MiB pages
    else:  # the kernel has them off, or no such thing: the log says so
        assert out["memory"].startswith("memory: 4 KiB pages (the kernel") or "no transparent" in out["memory"]


def test_thp_mem_alloc_enable_0_leaves_4_kib_pages():
    out = job(env={allocator.ENV_VAR: "0"})
    assert out["huge"] == "False"
    assert out["memory"] == "memory: 4 KiB pages (THP_MEM_ALLOC_ENABLE=0)"
    assert int(out["faults"]) > PAGES // 2, out  # every 4 KiB page of the block faulted in


def test_a_process_that_allocated_before_the_job_is_told_how_to_get_huge_pages():
    out = job("allocate-first")
    assert out["huge"] == "False"
    assert "torch had allocated before THP_MEM_ALLOC_ENABLE=1 was set" in out["memory"]


def test_request_keeps_what_the_environment_says(monkeypatch):
    monkeypatch.setenv(allocator.ENV_VAR, "0")
    allocator.request()
    assert os.environ[allocator.ENV_VAR] == "0"
    monkeypatch.delenv(allocator.ENV_VAR)
    allocator.request()
    assert os.environ[allocator.ENV_VAR] == "1"


def test_the_command_line_requests_huge_pages_before_anything_else(monkeypatch):
    monkeypatch.delenv(allocator.ENV_VAR, raising=False)
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert os.environ[allocator.ENV_VAR] == "1"


def test_kernel_mode_reads_the_bracketed_word(tmp_path: Path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert allocator.kernel_mode(setting) == "madvise"
    assert allocator.kernel_mode(tmp_path / "missing") is None
