"""Speed of the networks on this machine, side by side: inference and one training step, fp32 and bf16, NCHW
and channels-last, against what the machine's matrix units can do.

    python bench/models.py [--models fastscnn hrnet_w18s] [--size 512x1024] [--repeat 5] [--threads 2]

The first line: the CPU model, the load average, torch and its threads, whether the CPU has native
bf16 (AVX512-BF16 / AMX / Arm BF16: ``mirseg.machine.native_bf16``), and the median GFLOP/s of a
``--gemm``-square (2048) matrix product in fp32 and in bf16: each network's figure below can be read
as a share of that limit. Then one row per network:

- params, GFLOP of one 1x3x``--size`` forward pass;
- inference, ms per image at 1x3x``--size`` (default 512x1024), as ``mirseg infer`` runs the network
  (eval, BatchNorm folded) in NCHW and in channels-last, in fp32 and under bf16 autocast, and the
  best fp32 GFLOP/s with its share of the fp32 GEMM's;
- the bf16/fp32 label agreement (argmax of the logits, channels-last);
- one training step, seconds (batch 2, 3x``--train-size``, default 512x512: forward, the training
  loop's loss ``mirseg.loss.segmentation_loss`` with the auxiliary heads, backward, SGD with
  momentum and weight decay), in NCHW and channels-last, fp32 and bf16;
- the job: ``mirseg infer`` (``run_inference``, 2 loader workers, batch 2, label PNGs and the COCO RLE JSON,
  the layout chosen as ``layout=auto`` does) over ``--job-images`` generated images of ``--size`` with
  random weights, images/s (best of 2 after a warm-up), and the best fp32 forward as a share of its time
  per image (issue 15's goal: at least 80 %; ``--job-images 0`` leaves it out). Training as a job is
  ``bench/train_camvid.py`` (minutes per network): it prints the loop against the bare step.

On a CPU without native bf16 the bf16 columns are emulated by oneDNN (several times slower than fp32, so
not what ``amp`` runs: see README "Speed on CPUs"); ``--no-emulated-bf16`` leaves them out there. Every
figure is the median of ``--repeat`` runs after one warm-up (training: ``max(repeat // 2, 2)``). Check the
machine is idle first (``uptime``; the load average is printed at the start and the end).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from machine import LAYOUTS, cpu_signature, infer_times, median_seconds, native_bf16, random_checkpoint, train_step  # noqa: E402  (bench/machine.py, beside this script)

from mirseg.config import InferConfig, build_config  # noqa: E402
from mirseg.data.synthetic import make_dataset  # noqa: E402
from mirseg.infer import load_predictor, run_inference  # noqa: E402
from mirseg.models import MODELS, build_model  # noqa: E402
from mirseg.precision import DTYPE_NAMES  # noqa: E402


def gemm_gflops(n: int, dtype: torch.dtype, device: torch.device, repeat: int, sync: Callable[[], None]) -> float:
    """GFLOP/s of an n x n by n x n matrix product in ``dtype`` (2 n^3 FLOP)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    return 2 * n**3 / median_seconds(lambda: torch.mm(a, b), repeat, sync) / 1e9


def gflop(model: torch.nn.Module, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 1e9


def infer_job(name: str, images: Path, size: tuple[int, int], work: Path, device: torch.device) -> float:
    """Images per second of ``run_inference`` over ``images`` with a random-weight ``name`` checkpoint at ``size``
    (H, W), best of 2 after a warm-up run."""
    ckpt = work / f"{name}.pth"
    random_checkpoint(name, ckpt, size)
    predictor = load_predictor(ckpt, device=device)
    cfg = build_config(InferConfig, {"checkpoint": str(ckpt), "images": str(images), "out_dir": str(work / "out"),
                                     "device": str(device), "samples_per_gpu": 2, "workers_per_gpu": 2})
    count = len(list(images.iterdir()))
    run_inference(cfg, predictor=predictor)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        run_inference(cfg, predictor=predictor)
        best = min(best, time.perf_counter() - t0)
    return count / best


def pair(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.1f}"


def fmt_s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--size", type=pair, default=(512, 1024), help="inference input HxW (default 512x1024)")
    parser.add_argument("--train-size", type=pair, default=(512, 512), help="training crop HxW (default 512x512)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--gemm", type=int, default=2048, help="side of the square GEMM of the first line")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step timings")
    parser.add_argument("--job-images", type=int, default=4, help="images of the infer job (default 4; 0: skip)")
    parser.add_argument("--no-emulated-bf16", action="store_true",
                        help="on a CPU without native bf16, leave the bf16 columns out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    half = torch.bfloat16 if device.type == "cpu" else torch.float16
    half_name = DTYPE_NAMES[half]
    native = device.type != "cpu" or native_bf16()
    dtypes = [None] + ([half] if native or not args.no_emulated_bf16 else [])
    g32 = gemm_gflops(args.gemm, torch.float32, device, args.repeat, sync)
    # Emulated bf16 GEMMs run at a few GFLOP/s: a smaller one, once, says as much.
    n16 = args.gemm if native else min(args.gemm, 1024)
    g16 = gemm_gflops(n16, half, device, args.repeat if native else 1, sync)
    print(f"# {cpu_signature()}, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}, device {device}, "
          f"{args.threads} threads, native bf16 {'yes' if native_bf16() else 'no'}; GEMM: {args.gemm}^2 fp32 "
          f"{g32:.0f} GFLOP/s, {n16}^2 {half_name}{'' if native else ' (emulated)'} {g16:.0f} GFLOP/s", flush=True)
    h, w = args.size
    th, tw = args.train_size
    emulated = "" if native else " left out (no native bf16)" if args.no_emulated_bf16 else " emulated (no native bf16)"
    print(f"# inference: 1x3x{h}x{w}, BN folded, ms per image; train step: batch 2, 3x{th}x{tw}, s; medians of "
          f"{args.repeat} runs; {half_name} columns{emulated}")
    header = ["network", "params (M)", "GFLOP", "fp32 NCHW", "fp32 CL", f"{half_name} NCHW", f"{half_name} CL",
              "best fp32 GFLOP/s (% GEMM)", "label agree", "train fp32 NCHW", "train fp32 CL",
              f"train {half_name} NCHW", f"train {half_name} CL", "infer job img/s (bare forward share)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    work = Path(tempfile.mkdtemp(prefix="mirseg-models-"))
    job_images = (make_dataset(work / "data", args.job_images, size=(h, w), num_classes=3, seed=0).images
                  if args.job_images > 0 else None)
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name, 19).eval().to(device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        x = torch.randn(1, 3, h, w, device=device)
        flops = gflop(model, x)
        times, agree = infer_times(model, x, dtypes, args.repeat, sync)
        best32 = min(times["NCHW", None], times["CL", None])
        train = {}
        for lay, fmt in LAYOUTS.items():
            for dtype in dtypes:
                train[lay, dtype] = None if args.no_train else \
                    median_seconds(train_step(name, 2, args.train_size, device=device, memory_format=fmt, dtype=dtype),
                                   max(args.repeat // 2, 2), sync)
        row = [name, f"{params:.2f}", f"{flops:.1f}", fmt_ms(times["NCHW", None]), fmt_ms(times["CL", None]),
               fmt_ms(times.get(("NCHW", half))), fmt_ms(times.get(("CL", half))),
               f"{flops / best32:.0f} ({100 * flops / best32 / g32:.0f} %)",
               "n/a" if agree is None else f"{agree:.4f}",
               fmt_s(train["NCHW", None]), fmt_s(train["CL", None]), fmt_s(train.get(("NCHW", half))),
               fmt_s(train.get(("CL", half)))]
        if job_images is not None:
            ips = infer_job(name, job_images, args.size, work, device)
            row.append(f"{ips:.2f} ({100 * ips * best32:.0f} %)")
        else:
            row.append("-")
        print("| " + " | ".join(row) + " |", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
