"""mirseg.allocator: the start-up line that says which pages a job's big CPU tensors get, checked against the
kernel's own count of page faults. Each check runs in a fresh interpreter, since PyTorch reads
``THP_MEM_ALLOC_ENABLE`` once per process, at its first allocation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from mirseg import allocator

BLOCK_MB = 256
PAGES = BLOCK_MB * 2**20 // os.sysconf("SC_PAGE_SIZE")

# A job's budget (what logs the memory line), then the page faults of filling a fresh BLOCK_MB tensor.
SCRIPT = textwrap.dedent(f"""
    import logging, resource, sys, torch
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if sys.argv[1] == "too-late":  # the switch set after torch's first allocation
        torch.ones(1 << 22)
        import os
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
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


def test_thp_mem_alloc_enable_1_gives_huge_pages_where_the_kernel_has_them():
    out = job(env={allocator.ENV_VAR: "1"})
    assert out["huge"] == "True"  # torch's allocator took its huge-page path
    mode = allocator.kernel_mode()
    if mode in ("always", "madvise"):
        assert out["memory"].startswith("memory: 2 MiB pages for tensors of 2 MiB and more (THP_MEM_ALLOC_ENABLE=1); ")
        assert int(out["faults"]) < PAGES // 4, out  # most of the block came in 2 MiB pages
    else:  # the kernel has them off, or no such thing: the log says so
        assert out["memory"].startswith("memory: 4 KiB pages (the kernel") or "no transparent" in out["memory"]


def test_by_default_a_job_has_4_kib_pages_and_says_how_to_get_huge_ones():
    out = job()
    assert out["huge"] == "False"
    assert out["memory"] == ("memory: 4 KiB pages (THP_MEM_ALLOC_ENABLE=unset; 1 gives tensors of 2 MiB and more huge "
                             "pages, faster for some networks: README, Speed on CPUs); malloc: the C library's "
                             "(LD_PRELOAD of jemalloc, tcmalloc or mimalloc reuses freed blocks without page faults: "
                             "README, Speed on CPUs)")
    assert int(out["faults"]) > PAGES // 2, out  # every 4 KiB page of the block faulted in
    assert job(env={allocator.ENV_VAR: "0"})["memory"].startswith("memory: 4 KiB pages (THP_MEM_ALLOC_ENABLE=0;")


def test_a_switch_set_after_torch_allocated_is_reported_as_too_late():
    out = job("too-late")
    assert out["huge"] == "False"
    assert "torch had allocated before THP_MEM_ALLOC_ENABLE=1 was set" in out["memory"]


def test_kernel_mode_reads_the_bracketed_word(tmp_path: Path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert allocator.kernel_mode(setting) == "madvise"
    assert allocator.kernel_mode(tmp_path / "missing") is None


def test_preloaded_names_the_malloc_replacement_the_process_has_mapped(tmp_path: Path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 42  /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
                    "7f02-7f03 rw-p 00000000 00:00 0 \n7f04-7f05 r--p 00000000 08:01 7  /usr/lib/libm.so.6\n")
    jemalloc = {"LD_PRELOAD": "/opt/libfoo.so:/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}
    assert allocator.preloaded(maps, jemalloc) == "libjemalloc.so.2"
    assert allocator.preloaded(maps, {"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}) is None  # not loaded
    assert allocator.preloaded(maps, {"LD_PRELOAD": "/usr/lib/libm.so.6"}) is None  # not an allocator
    assert allocator.preloaded(maps, {}) is None
    assert allocator.preloaded(tmp_path / "no-proc", jemalloc) == "libjemalloc.so.2"  # no /proc: the variable
    assert allocator.describe(False, "libjemalloc.so.2").endswith("; malloc: libjemalloc.so.2 (LD_PRELOAD)")


def test_a_job_names_the_preloaded_library_it_has_mapped(tmp_path: Path):
    # Any shared library will do for the loader; the name is what preloaded() reads. A copy of the C maths library
    # (mapped into every CPython) named like an allocator: the log names it, read from the job's own memory map.
    libm = next(Path(line.split()[-1]) for line in Path("/proc/self/maps").read_text().splitlines()
                if Path(line.split()[-1]).name.startswith("libm.so"))
    fake = tmp_path / "libjemalloc_test.so"
    fake.write_bytes(libm.read_bytes())
    assert job(env={"LD_PRELOAD": str(fake)})["memory"].endswith("; malloc: libjemalloc_test.so (LD_PRELOAD)")
    missing = job(env={"LD_PRELOAD": str(tmp_path / "libjemalloc.so.2")})  # the loader warns and goes on without it
    assert missing["memory"].endswith("malloc: the C library's (LD_PRELOAD of jemalloc, tcmalloc or mimalloc reuses "
                                      "freed blocks without page faults: README, Speed on CPUs)")
