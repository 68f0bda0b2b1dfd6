"""Mining speed and memory (images/s of every algorithm, its overhead over plain inference, peak RSS vs pool
size), or, with labelled images, the quality of every algorithm's image scores.

    python bench/mine.py [--size 1024x2048] [--images 12] [--classes 19] [--repeat 2]
                         [--algorithms rsal,ripu,...] [--memory 100,1000] [--memory-size 128x256]
    python bench/mine.py --camvid --checkpoint best.pth [--img-scale 240x180] [--ripu-scores mean,budget,topk]
    python bench/mine.py --images DIR --labels DIR --checkpoint best.pth [--out DIR] [--device cpu]

**Score quality** (``--camvid``: CamVid val, ``/work/shared/data/camvid/{images,labels}/val``; or any
``--images`` folder with label PNGs of the same stems in ``--labels``, 255 = void): a trained
checkpoint's real error on every labelled image against every algorithm's score of it, as a
table of Spearman correlations and top-20 % precision (:mod:`score_quality`, beside this script).
``--img-scale WxH`` sets the working size (default: the checkpoint's test scale); ``--ripu-scores``
gives RIPU one row per ``ripu_image_score``; ``--out`` keeps the mining outputs and writes
``per_image.tsv`` (each image's errors and scores).

**Speed.** A FastSCNN checkpoint with ``--classes`` outputs (random weights, BatchNorm statistics
calibrated on random inputs so the logits have a realistic scale; the cost does not depend on
what the weights learned) and ``--images`` generated PNG scenes of ``--size`` (H x W). The working
scale is the image size (``img_scale`` = W x H: 1024x2048 runs the way the Cityscapes presets
do). "plain inference" is ``iter_predictions`` over the same images with the same batch (2) and
loader workers (2), every probability map produced and dropped; each algorithm is a full
``mine()`` run (result.tsv written, no masks). Best of ``--repeat`` interleaved runs after a
warm-up. The overhead column is mining time / plain inference time (target for RSAL and RIPU:
at most 1.3); the last, the bare forward pass (``machine.bare_forward_ms``: the network alone on one
1x3xHxW input) as a share of each row's time per image (issue 15's goal: at least 80 %).

**Memory.** ``--memory 100,1000``: RSAL over the first N of 1000 generated ``--memory-size``
images, each N in a fresh subprocess, which reports its own peak RSS (``ru_maxrss`` of the
process) and that of its loader workers (``RUSAGE_CHILDREN``). Target: equal within 10 %
(per-image summaries are a few KB; no probability map is kept).

The machine's load average is printed at the start and the end: timings on a busy machine are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import camvid  # noqa: E402  (bench/camvid.py, beside this script)
from machine import bare_forward_ms, cpu_signature, load_average, random_checkpoint  # noqa: E402  (bench/machine.py, beside this script)
from score_quality import default_arms, markdown, per_image_tsv, score_quality  # noqa: E402  (beside this script)

from mirseg.config import MineConfig, build_config  # noqa: E402
from mirseg.data.synthetic import make_dataset  # noqa: E402
from mirseg.fileio import write_atomic  # noqa: E402
from mirseg.infer import iter_predictions, load_predictor  # noqa: E402
from mirseg.mine import mine  # noqa: E402
from mirseg.mining import ALGORITHMS  # noqa: E402
from mirseg.mining.ripu import IMAGE_SCORES  # noqa: E402


def mine_config(ckpt: Path, images: str, out_dir: Path, algorithm: str, **extra) -> MineConfig:
    return build_config(MineConfig, dict(checkpoint=str(ckpt), images=images, out_dir=str(out_dir),
                                         mining_algorithm=algorithm, samples_per_gpu=2, workers_per_gpu=2,
                                         device="cpu", **extra))


def plain_seconds(predictor, paths: list[str]) -> float:
    t0 = time.perf_counter()
    for pred in iter_predictions(predictor, paths, samples_per_gpu=2, workers_per_gpu=2):
        assert pred.error is None, pred.error
    return time.perf_counter() - t0


def speed(args: argparse.Namespace, tmp: Path) -> None:
    h, w = args.size
    data = make_dataset(tmp / "speed", args.count, size=(h, w), num_classes=3, seed=0)
    paths = sorted(str(p) for p in data.images.iterdir())
    warm = tmp / "warm.txt"
    write_atomic(warm, "\n".join(paths[:2]) + "\n")
    ckpt = tmp / "fastscnn.pth"
    random_checkpoint("fastscnn", ckpt, (h, w), args.classes)
    predictor = load_predictor(ckpt, device="cpu")
    algorithms = args.algorithms
    print(f"## speed: {args.count} generated {h}x{w} PNG images, img_scale {w}x{h}, FastSCNN with {args.classes} "
          f"classes, batch 2, 2 loader workers, fp32, best of {args.repeat}")
    plain_seconds(predictor, paths[:2])
    for a in algorithms:
        mine(mine_config(ckpt, str(warm), tmp / "out", a), predictor=predictor)
    best = {name: float("inf") for name in ["plain inference", *algorithms]}
    for _ in range(args.repeat):
        best["plain inference"] = min(best["plain inference"], plain_seconds(predictor, paths))
        for a in algorithms:
            t0 = time.perf_counter()
            result = mine(mine_config(ckpt, str(data.images), tmp / "out", a), predictor=predictor)
            best[a] = min(best[a], time.perf_counter() - t0)
            assert len(result.ranking) == len(paths) and not result.failed
    base = best["plain inference"]
    forward = bare_forward_ms(predictor.model, (h, w), max(args.repeat, 3))
    print(f"bare forward (1x3x{h}x{w}, fp32, {torch.get_num_threads()} threads): {forward:.0f} ms")
    print("| algorithm | images/s | ms/image | x plain inference | share of bare forward |")
    print("|---|---|---|---|---|")
    for name, t in best.items():
        print(f"| {name} | {len(paths) / t:.2f} | {1000 * t / len(paths):.0f} | {t / base:.2f} | "
              f"{100 * forward * len(paths) / (1000 * t):.0f}% |", flush=True)


def memory(args: argparse.Namespace, tmp: Path) -> None:
    counts = args.memory
    h, w = args.memory_size
    data = make_dataset(tmp / "pool", max(counts), size=(h, w), num_classes=3, seed=1)
    paths = sorted(str(p) for p in data.images.iterdir())
    ckpt = tmp / "fastscnn_mem.pth"
    random_checkpoint("fastscnn", ckpt, (h, w), args.classes)
    print(f"\n## memory: RSAL over N generated {h}x{w} images, img_scale {w}x{h}, a fresh process per N")
    print("| candidates | peak RSS main (MB) | peak RSS loader worker (MB) | seconds |")
    print("|---|---|---|---|")
    peaks = []
    for n in counts:
        lst = tmp / f"pool_{n}.txt"
        write_atomic(lst, "\n".join(paths[:n]) + "\n")
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", str(ckpt), str(lst), str(tmp / f"mem_{n}")],
                             check=True, capture_output=True, text=True).stdout
        rss = json.loads(out.strip().splitlines()[-1])
        peaks.append(rss["self_mb"])
        print(f"| {n} | {rss['self_mb']:.0f} | {rss['children_mb']:.0f} | {time.perf_counter() - t0:.1f} |",
              flush=True)
    print(f"peak RSS ratio {counts[-1]} vs {counts[0]} candidates: {peaks[-1] / peaks[0]:.3f}")


def child(ckpt: str, images: str, out_dir: str) -> None:
    """Mine ``images`` with RSAL and print the peak RSS of this process and of its loader workers (MB)."""
    result = mine(mine_config(Path(ckpt), images, Path(out_dir), "rsal"))
    assert not result.failed
    # ru_maxrss is in KiB on Linux.
    print(json.dumps({"self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def quality(args: argparse.Namespace, out: Path) -> None:
    """The score-quality table (module docstring) for ``args.checkpoint`` on ``args.images`` + ``args.labels``."""
    arms = default_arms(args.algorithms, args.ripu_scores)
    predictor = load_predictor(args.checkpoint, args.device, img_scale=args.img_scale)
    w, h = predictor.img_scale
    print(f"## score quality: {args.checkpoint} ({predictor.arch}, classes {', '.join(predictor.class_names)}) on "
          f"{args.images} (labels {args.labels}, values = those class indices), img_scale {w}x{h}, batch "
          f"{args.batch}, {args.workers} loader workers, {predictor.device}")
    t0 = time.perf_counter()
    errors, rows = score_quality(args.checkpoint, args.images, args.labels, out, arms, samples_per_gpu=args.batch,
                                 workers_per_gpu=args.workers, predictor=predictor)
    pixel = np.array([e.pixel_error for e in errors])
    print(f"{len(errors)} images; pixel error mean {np.nanmean(pixel):.3f} (min {np.nanmin(pixel):.3f}, max "
          f"{np.nanmax(pixel):.3f}); mIoU error mean {np.nanmean([e.miou_error for e in errors]):.3f}; "
          f"top-20% precision of random scores: 0.2 expected; {time.perf_counter() - t0:.0f} s")
    print(markdown(rows), flush=True)
    if args.out:
        write_atomic(out / "per_image.tsv", per_image_tsv(errors, rows))
        print(f"per-image errors and scores: {out / 'per_image.tsv'}")


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 1024x2048, got {text!r}") from None
    return h, w


def _scale(text: str) -> tuple[int, int]:
    """``WxH`` as img_scale's (w, h)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 240x180, got {text!r}") from None
    return w, h


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=_size, default=(1024, 2048), help="speed: image size HxW (default 1024x2048)")
    parser.add_argument("--images", default=None,
                        help="speed: generated images (default 12); with --labels: the labelled image folder")
    parser.add_argument("--classes", type=int, default=19, help="model output classes (default 19, Cityscapes)")
    parser.add_argument("--repeat", type=int, default=2, help="speed: timed repetitions (default 2)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated (default: all)")
    parser.add_argument("--memory", default="100,1000", help="memory: candidate counts, '' to skip")
    parser.add_argument("--memory-size", type=_size, default=(128, 256), help="memory: image size (default 128x256)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed table")
    quality_args = parser.add_argument_group("score quality (instead of speed and memory)")
    quality_args.add_argument("--camvid", action="store_true",
                              help=f"CamVid val: {camvid.ROOT}/images/val + labels/val")
    quality_args.add_argument("--labels", help="label PNG folder for --images (same stems, 255 = void)")
    quality_args.add_argument("--checkpoint", help="the trained mirseg checkpoint to measure")
    quality_args.add_argument("--img-scale", type=_scale, default=None,
                              help="working size WxH, e.g. 240x180 (default: the checkpoint's test scale)")
    quality_args.add_argument("--ripu-scores", default=",".join(IMAGE_SCORES),
                              help=f"RIPU rows, one per ripu_image_score (default {','.join(IMAGE_SCORES)}; '' = "
                                   "the default only)")
    quality_args.add_argument("--batch", type=int, default=2, help="samples_per_gpu (default 2)")
    quality_args.add_argument("--workers", type=int, default=2, help="workers_per_gpu (default 2)")
    quality_args.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    quality_args.add_argument("--out", help="keep the mining outputs here, with per_image.tsv (default: a temp dir)")
    args = parser.parse_args()
    args.algorithms = [a.strip().lower() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in args.algorithms if a not in ALGORITHMS]
    if unknown:
        parser.error(f"unknown algorithms {unknown}; choose from {', '.join(ALGORITHMS)}")
    args.ripu_scores = [v.strip().lower() for v in args.ripu_scores.split(",") if v.strip()]
    if set(args.ripu_scores) - set(IMAGE_SCORES):
        parser.error(f"--ripu-scores: choose from {', '.join(IMAGE_SCORES)}")
    scoring = args.camvid or args.labels is not None
    if scoring:
        if args.camvid:
            args.images = args.images or str(camvid.ROOT / "images" / "val")
            args.labels = args.labels or str(camvid.ROOT / "labels" / "val")
        if not args.checkpoint or not args.images:
            parser.error("score quality needs --checkpoint and --images (with --labels or --camvid)")
    else:
        try:
            args.count = int(args.images or 12)
        except ValueError:
            parser.error(f"--images is a number of generated images for the speed table, got {args.images!r} "
                         "(a folder needs --labels: the score-quality table)")
    args.memory = sorted(int(v) for v in args.memory.split(",") if v.strip())
    print(f"# {cpu_signature()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), "
          f"load average {load_average()}")
    with tempfile.TemporaryDirectory(prefix="mirseg-mine-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if scoring:
            quality(args, Path(args.out) if args.out else tmp)
        else:
            if not args.no_speed:
                speed(args, tmp)
            if args.memory:
                memory(args, tmp)
    print(f"# load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
