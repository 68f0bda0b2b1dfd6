"""Does a second job slow a training step proportionally? FastSCNN forward+backward, alone and two at once.

    python bench/threads.py [--settings default auto:0 auto:2 threads:1] [--repeat 20] [--batch 2] [--size 128]

Each setting is a thread choice for one training process:

- ``default``: torch's own (one thread per core; what an untuned job gets);
- ``auto:W``: mirseg's budget (:func:`mirseg.threads.plan`) for a job with ``workers_per_gpu=W`` on this
  machine (usable cores minus ``min(W, cores // 4)``, at least 1);
- ``threads:N``: ``threads=N``, e.g. the README's advice for two jobs on two cores (``threads=1``).

Per setting, two identical processes start and warm up; the first runs ``--repeat`` steps (SGD, the
training loss, batch ``--batch`` of ``--size`` squared random images) alone while the second waits, then
both run them at the same moment. The table gives the median step of each and the slowdown, together / alone: 2.0
means the cores are shared fairly, far above it that the threads wait for each other (OpenMP barriers).
Data workers are not started: ``auto:W`` is the torch share such a job keeps for the main process. The
processes get no OMP_NUM_THREADS / MIRSEG_THREADS from the environment, so each setting is what it says.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from machine import cpu_signature, train_step  # noqa: E402  (bench/machine.py, beside this script)

from mirseg.threads import cpu_info, plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _threads_for(setting: str) -> int | None:
    """The torch threads of ``setting`` in this process (None: torch's default)."""
    kind, _, value = setting.partition(":")
    if kind == "default":
        return None
    if kind == "auto":
        return plan(0, int(value or 0), env={}).torch_threads
    if kind == "threads":
        return plan(int(value), 0, env={}).torch_threads
    raise SystemExit(f"unknown setting {setting!r}: default, auto:W or threads:N")


def child(setting: str, repeat: int, batch: int, size: int) -> None:
    """One process: warm up, say "ready", then for each "go" line on stdin time ``repeat`` steps and print
    them as JSON; stop at the end of stdin."""
    n = _threads_for(setting)
    if n is not None:
        torch.set_num_threads(n)
    one_step = train_step("fastscnn", batch, (size, size))

    def step() -> float:
        t0 = time.perf_counter()
        one_step()
        return time.perf_counter() - t0

    step(), step()  # the first steps allocate and pick kernels
    print("ready", flush=True)
    while sys.stdin.readline():  # readline, not iteration: each "go" is answered as soon as it arrives
        times = [step() for _ in range(repeat)]
        print(json.dumps({"threads": torch.get_num_threads(), "times": times}), flush=True)


def run(setting: str, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Two warm processes of ``setting``: the first times its steps alone, then both at the same moment."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MIRSEG_THREADS")}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, __file__, "--child", setting, "--repeat", str(args.repeat), "--batch", str(args.batch),
           "--size", str(args.size)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]

    def go(ps: list[subprocess.Popen]) -> list[dict]:
        for p in ps:
            p.stdin.write("go\n")
            p.stdin.flush()
        return [json.loads(p.stdout.readline()) for p in ps]

    try:
        for p in procs:  # both warm and waiting (the second idles while the first runs alone)
            if p.stdout.readline().strip() != "ready":
                raise SystemExit(f"a {setting} process failed before its first step (exit {p.wait()})")
        alone = go(procs[:1])[0]
        return alone, go(procs)
    finally:
        for p in procs:
            p.stdin.close()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--settings", nargs="+", default=["default", "auto:0", "auto:2", "threads:1"])
    parser.add_argument("--repeat", type=int, default=20, help="timed steps per process")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=128, help="square input size")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.repeat, args.batch, args.size)
        return
    cpu = cpu_info()
    print(f"# {cpu_signature()}, {cpu.usable} usable cores (affinity {cpu.affinity}, cgroup quota "
          f"{'none' if cpu.quota is None else f'{cpu.quota:g}'}), load average {os.getloadavg()[0]:.2f}; "
          f"FastSCNN train step, batch {args.batch}, {args.size}x{args.size}, median of {args.repeat}")
    print("| setting | torch threads | alone (s) | two at once (s) | slowdown |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for setting in args.settings:
        alone, both = run(setting, args)
        t1 = statistics.median(alone["times"])
        t2 = statistics.mean(statistics.median(r["times"]) for r in both)
        print(f"| {setting} | {alone['threads']} | {t1:.3f} | {t2:.3f} | {t2 / t1:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
