"""Which lr rule trains best at the YMIR default batch? CamVid train -> val; prints a markdown table.

    python bench/lr_rules.py [--camvid ../shared/data/camvid] [--presets fastscnn,hrnet_w18s]
                             [--iters fastscnn=1000,hrnet_w18s=300] [--rules none,sqrt,linear,none+warmup,...]
                             [--batch 2] [--scale 240x180] [--seeds 0] [--jobs 2]

The mmseg presets' lr were set for their design batch (FastSCNN 0.12 at 4 GPUs x 8, the others 0.01
at 4 x 2 or 8 x 2). At another total batch ``lr_scaling`` keeps it (``none``) or multiplies it by
(batch / design)^0.5 (``sqrt``) or ^1 (``linear``); ``+warmup`` adds a linear warm-up from 0.1x over
the first 10 % of the iterations. Every row trains from random weights (no model-zoo file can be
downloaded here) for the same iterations of batch ``--batch`` in one process, on CamVid downscaled
to ``--scale`` (WxH; crops of that whole size), and is evaluated once at the end on val at that scale.

Each run is a ``mirseg train`` subprocess with one torch thread; ``--jobs`` of them run at once (two
one-thread jobs on two cores do not slow each other the way two two-thread jobs do). Not part of the
test suite (minutes per row). CamVid's licence is research-only: it is read in place, never copied.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from camvid import CLASSES, ROOT  # noqa: E402  (bench/camvid.py, beside this script)
from machine import cpu_signature, load_average  # noqa: E402  (bench/machine.py)

from mirseg.checkpoint import read_checkpoint  # noqa: E402
from mirseg.presets import PRESETS  # noqa: E402
from mirseg.train import LR_EXPONENTS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_one(camvid: Path, preset: str, rule: str, iters: int, batch: int, scale: tuple[int, int], seed: int,
            work: Path) -> dict:
    """One training as a subprocess; its final val metrics and wall time."""
    scaling, _, warm = rule.partition("+")
    w, h = scale
    keys = [f"config_file={preset}", f"train_images={camvid / 'images' / 'train'}",
            f"train_labels={camvid / 'labels' / 'train'}", f"val_images={camvid / 'images' / 'val'}",
            f"val_labels={camvid / 'labels' / 'val'}", f"class_names=[{','.join(CLASSES)}]",
            f"samples_per_gpu={batch}", "workers_per_gpu=0", f"max_iters={iters}", f"interval={iters}",
            f"log_interval={iters}", f"img_scale=[{w},{h}]", f"crop_size=[{h},{w}]", "test_mode=whole",
            f"lr_scaling={scaling}", f"warmup_iters={iters // 10 if warm else 0}", "pretrained=none",
            f"seed={seed}", f"work_dir={work}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mirseg", "train", *keys], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{preset} {rule} seed {seed} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = read_checkpoint(work / "last.pth")["metrics"]
    return dict(preset=preset, rule=rule, seed=seed, mIoU=float(metrics["mIoU"]), aAcc=float(metrics["aAcc"]),
                seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--camvid", default=str(ROOT))
    parser.add_argument("--presets", default="fastscnn,hrnet_w18s")
    parser.add_argument("--iters", default="fastscnn=1000,hrnet_w18s=300", help="preset=iterations,...")
    parser.add_argument("--rules", default="none,sqrt,linear,none+warmup,sqrt+warmup")
    parser.add_argument("--batch", type=int, default=2, help="total batch (default 2, the YMIR default)")
    parser.add_argument("--scale", default="240x180", help="WxH CamVid is trained and evaluated at")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once, one thread each")
    args = parser.parse_args()
    camvid = Path(args.camvid)
    if not (camvid / "labels" / "val").is_dir():
        sys.exit(f"CamVid not found at {camvid}; pass --camvid")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    iters = {k: int(v) for k, v in (item.split("=") for item in args.iters.split(","))}
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    for rule in rules:
        if rule.partition("+")[0] not in LR_EXPONENTS or rule.partition("+")[2] not in ("", "warmup"):
            parser.error(f"unknown rule {rule!r}: one of {', '.join(LR_EXPONENTS)}, optionally +warmup")
    seeds = [int(s) for s in args.seeds.split(",")]
    scale = tuple(int(v) for v in args.scale.lower().split("x"))
    print(f"# {cpu_signature()}; load average {load_average()}; batch {args.batch}, "
          f"CamVid at {scale[0]}x{scale[1]}, random init, {args.jobs} one-thread jobs at once", flush=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mirseg-lr-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        # The slowest preset first, so the pool's last minutes are not one long job alone.
        order = sorted(presets, key=lambda p: -iters[p] * (5 if "hrnet" in p or "ocr" in p else 1))
        futures = [pool.submit(run_one, camvid, p, r, iters[p], args.batch, scale, s, Path(tmp) / f"{p}-{r}-{s}")
                   for p in order for r in rules for s in seeds]
        rows = []
        for f in futures:
            rows.append(f.result())
            r = rows[-1]
            print(f"{r['preset']:12s} {r['rule']:14s} seed {r['seed']}: mIoU {r['mIoU']:.4f} "
                  f"({r['seconds']:.0f} s)", flush=True)
    print(f"\nval mIoU after the same iterations (mean over seeds {seeds}; the lr each rule gave)")
    print("| rule | " + " | ".join(f"{p} ({iters[p]} it)" for p in presets) + " |")
    print("|---|" + "---|" * len(presets))
    for rule in rules:
        cells = []
        for p in presets:
            got = [r["mIoU"] for r in rows if r["preset"] == p and r["rule"] == rule]
            lr = PRESETS[p].lr * (args.batch / PRESETS[p].batch_size) ** LR_EXPONENTS[rule.partition("+")[0]]
            spread = f" ± {np.std(got):.3f}" if len(got) > 1 else ""
            cells.append(f"{np.mean(got):.4f}{spread} (lr {lr:.4g})")
        print(f"| {rule} | " + " | ".join(cells) + " |")
    print(f"\n{(time.perf_counter() - t_start) / 60:.1f} min; load average now "
          f"{load_average()}")


if __name__ == "__main__":
    main()
