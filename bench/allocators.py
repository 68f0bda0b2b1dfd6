"""The system allocator (glibc malloc) against one loaded with ``LD_PRELOAD``, per network, in one run.

    python bench/allocators.py --preload /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 [--models fastscnn,ocrnet_hr18s]
                               [--rounds 3] [--job-images 6]

glibc hands every block above its mmap threshold (at most 32 MiB) a fresh mapping and unmaps it on ``free``: each
large activation is page-faulted in and zeroed again at every pass (on this project's 2-core VM the faults of one
FastSCNN forward at 1024x2048 cost about 0.2 s of kernel time). jemalloc, tcmalloc and mimalloc keep freed memory
for the next request of the same size; they are swapped in without rebuilding anything, by ``LD_PRELOAD`` (see the
README, Speed on CPUs).

Each figure is measured in a fresh interpreter, the system allocator's and the preloaded one's back to back, for
``--rounds`` rounds; the table gives each one's median and the median of the per-round ratios (preloaded / system,
below 1: faster). Per network: inference (1x3x512x1024, prepared as ``mirseg infer`` does: BN folded, channels-last,
fp32) and one training step (batch 2, 3x512x512, the loop's loss, SGD), each the median of 3 after a warm-up; for
FastSCNN also the inference job, ``iter_predictions`` over ``--job-images`` generated 1024x2048 PNGs (decoding
in 2 workers, the softmax at full size), in ms per image. The load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from machine import bare_forward_ms, cpu_signature, load_average, median_seconds, random_checkpoint, train_step  # noqa: E402  (bench/machine.py)

from mirseg.data.sources import list_images  # noqa: E402
from mirseg.data.synthetic import make_dataset  # noqa: E402
from mirseg.infer import iter_predictions  # noqa: E402
from mirseg.models import build_model  # noqa: E402
from mirseg.predict import load_predictor, prepare_for_inference  # noqa: E402

DEFAULT_MODELS = "fastscnn,hrnet_w18s,deeplabv3plus_r18,ocrnet_hr18s"
JOB_SIZE = (1024, 2048)


def measure(what: str, arch: str, job_images: int) -> float:
    """One figure in this process: seconds per inference / training step / job image."""
    if what == "infer":
        return bare_forward_ms(prepare_for_inference(build_model(arch, 19)), (512, 1024), 3) / 1000
    if what == "train":
        return median_seconds(train_step(arch, 2, (512, 512)), 3)
    with tempfile.TemporaryDirectory(prefix="mirseg-alloc-") as tmp_name:  # what == "job"
        tmp = Path(tmp_name)
        paths = list_images(str(make_dataset(tmp / "data", job_images, size=JOB_SIZE, num_classes=3, seed=0).images))
        random_checkpoint(arch, tmp / "model.pth", JOB_SIZE)
        predictor = load_predictor(tmp / "model.pth", device="cpu")
        for _ in iter_predictions(predictor, paths[:2]):  # warm-up: the layout choice, oneDNN's kernels
            pass
        t0 = time.perf_counter()
        for _ in iter_predictions(predictor, paths):
            pass
        return (time.perf_counter() - t0) / len(paths)


def child(what: str, arch: str, preload: str | None, job_images: int) -> float:
    """:func:`measure` in a fresh interpreter, with ``preload`` as LD_PRELOAD (None: the system allocator)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    done = subprocess.run([sys.executable, __file__, "--child", what, arch, str(job_images)], env=env,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{what} {arch} with LD_PRELOAD={preload or ''} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        what, arch, job_images = sys.argv[2], sys.argv[3], int(sys.argv[4])
        print(json.dumps({"seconds": measure(what, arch, job_images)}))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preload", required=True, help="the allocator's shared library (libjemalloc.so.2, ...)")
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS})")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each system then preloaded (default 3)")
    parser.add_argument("--job-images", type=int, default=6, help="FastSCNN job: generated images (default 6)")
    args = parser.parse_args()
    if not Path(args.preload).is_file():
        parser.error(f"--preload {args.preload}: no such file; give the allocator's .so, e.g. "
                     "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 (Debian/Ubuntu package libjemalloc2)")
    print(f"# {cpu_signature()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), "
          f"preloaded: {args.preload}; load average {load_average()}")
    print(f"# each figure: a fresh interpreter, system then preloaded, {args.rounds} rounds; medians, and the median "
          "of the per-round ratios")
    rows = [(what, arch) for arch in args.models.split(",") if arch for what in ("infer", "train")]
    rows += [("job", "fastscnn")] if "fastscnn" in args.models.split(",") else []
    header = ("network", "figure", "system", "preloaded", "ratio")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    labels = {"infer": "inference 1x3x512x1024, ms", "train": "training step, batch 2 at 512x512, ms",
              "job": f"inference job, {JOB_SIZE[0]}x{JOB_SIZE[1]} PNGs, ms/image"}
    for what, arch in rows:
        pairs = [(child(what, arch, None, args.job_images), child(what, arch, args.preload, args.job_images))
                 for _ in range(args.rounds)]
        system = statistics.median(s for s, _ in pairs)
        preloaded = statistics.median(p for _, p in pairs)
        ratio = statistics.median(p / s for s, p in pairs)
        print(f"| {arch} | {labels[what]} | {1000 * system:.0f} | {1000 * preloaded:.0f} | {ratio:.2f} |", flush=True)
    print(f"# load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
