"""Train presets on CamVid for a fixed budget on this machine; print val mIoU and time per iteration.

    python bench/train_camvid.py [--models fastscnn hrnet_w18s] [--iters 1000] [--layout coco|labels]
                                 [--camvid ../shared/data/camvid] [--set amp=false layout=contiguous ...]
                                 [--reference-python VENV/bin/python] [--rounds 2]

CamVid (480x360, 11 classes, void = 255) is read either as COCO JSON (``--layout coco``; void is
left unannotated, so ``ignore_blank_area=true`` ignores it) or as label PNGs (``--layout labels``).
The budget is scaled to a CPU: test scale 480x360, training resize jitter around it, crops of
360x480, batch 4, lr scaled from each preset's design batch. Not part of the test suite: it takes
minutes per preset. The dataset's licence is research-only: it is read in place, never copied.

Job-level throughput (issue 15), per preset: the job's seconds per iteration with its evaluations and
start-up (``job s/it``), the loop's without them (``loop s/it``, :class:`mirseg.train_state.LoopClock`), the
share of the loop spent waiting for the data workers (``data wait``), and the **bare step**: the same
forward, loss, backward and SGD step, in the layout and precision the run chose, on one fixed batch
of the run's shape in this process on every usable core, median of ``--step-iters`` after
``--step-warmup`` (no loader, nothing else running). ``step share`` = bare step / loop s/it: the part of
the job's time that is the step itself (the goal: at least 85 %). The first line gives the CPU, the load
average and the run's thread split (``--set threads=N`` changes it).

Against mmsegmentation's trainer (``--reference-python``: the python of the environment ``bench/mmseg_env.sh``
makes): before each preset's run, ``bench/mmseg_trainer.py`` trains the preset's mmseg config there on the same
CamVid images with the same batch, crop, resize jitter, loader workers and torch threads, ``--iters`` iterations
without evaluation; ``mmseg s/it`` is its median seconds per iteration (mmcv's ``time``, the loader's waits
included, the first log interval left out), ``ratio`` = ``loop s/it`` / ``mmseg s/it`` (issue 15's goal: at most
0.5). ``--rounds`` repeats the pair (reference, then mirseg) and prints a row per round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import camvid  # noqa: E402  (bench/camvid.py)
from machine import cpu_signature, load_average, median_seconds, mmseg_config, train_step, trained_in  # noqa: E402  (bench/machine.py, beside this script)

from mirseg import threads  # noqa: E402
from mirseg.coerce import parse_overrides  # noqa: E402
from mirseg.presets import PRESETS  # noqa: E402
from mirseg.train import train  # noqa: E402

REFERENCE_TRAINER = Path(__file__).with_name("mmseg_trainer.py")


def reference(python: str, preset: str, root: Path, args: argparse.Namespace, torch_threads: int) -> float:
    """mmseg's trainer's seconds per iteration (``mmseg_trainer.py`` in the reference environment)."""
    with tempfile.TemporaryDirectory() as work:
        cmd = [python, str(REFERENCE_TRAINER), "--config", mmseg_config(preset), "--camvid", str(root),
               "--iters", str(args.iters), "--batch", str(args.batch), "--workers", str(args.workers),
               "--threads", str(torch_threads), "--work-dir", work]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the reference trainer failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["s_per_iter"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fastscnn"], choices=list(PRESETS))
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--layout", choices=["coco", "labels"], default="coco")
    parser.add_argument("--camvid", default=str(camvid.ROOT))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-iters", type=int, default=10, help="timed bare steps (default 10)")
    parser.add_argument("--step-warmup", type=int, default=3)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more TrainConfig keys, e.g. amp=false (fp32) or layout=channels_last")
    parser.add_argument("--reference-python", help="python of the mmseg 0.27 environment (bench/mmseg_env.sh)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per preset, each after the reference's (default 1)")
    args = parser.parse_args()
    root = camvid.require(Path(args.camvid), args.layout)
    overrides = parse_overrides(args.set)
    plan = threads.plan(int(overrides.get("threads", 0)), args.workers)
    print(f"# {cpu_signature()}, torch {torch.__version__}, load average "
          f"{load_average()}; {args.iters} iterations of batch {args.batch}, "
          f"{args.layout}" + (f", {' '.join(args.set)}" if args.set else "") + f"\n# {plan.description}")
    columns = ["preset", "val mIoU", "val mAcc", "val aAcc", "job s/it", "loop s/it", "data wait", "bare step s",
               "step share"] + (["mmseg s/it", "ratio"] if args.reference_python else [])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns), flush=True)
    for name in args.models:
        for _ in range(args.rounds):
            ref = (reference(args.reference_python, name, root, args, plan.torch_threads)
                   if args.reference_python else None)
            with tempfile.TemporaryDirectory() as work:
                cfg = camvid.train_config(name, root, work, iters=args.iters, batch=args.batch, workers=args.workers,
                                          layout=args.layout, **overrides)
                t0 = time.perf_counter()
                result = train(cfg)
                per_iter = (time.perf_counter() - t0) / args.iters
                m, t = result.last_metrics, result.timing
                choice = trained_in(result.last)
            with threads.budget(0, 0):  # the reference: every usable core, no workers
                step = median_seconds(train_step(cfg.model, cfg.samples_per_gpu, tuple(cfg.crop_size),
                                                 num_classes=len(camvid.CLASSES), memory_format=choice.memory_format,
                                                 dtype=choice.dtype), args.step_iters, warmup=args.step_warmup)
            versus = f" {ref:.3f} | {t['s_per_iter'] / ref:.2f} |" if ref is not None else ""
            print(f"| {name} | {m['mIoU']:.4f} | {m['mAcc']:.4f} | {m['aAcc']:.4f} | {per_iter:.3f} | "
                  f"{t['s_per_iter']:.3f} | {100 * t['data_share']:.0f}% | {step:.3f} | "
                  f"{100 * step / t['s_per_iter']:.0f}% |{versus}", flush=True)
    print(f"# load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
