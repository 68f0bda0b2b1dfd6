"""End-to-end inference speed: PyTorch eager vs ONNX Runtime, per architecture.

    python bench/infer.py [--models fastscnn,hrnet_w18s] [--images 8] [--size 1024x2048] [--repeat 3]

For each network it makes a 19-class checkpoint (random weights, BatchNorm statistics calibrated on
random inputs so the logits have a realistic scale), generates ``--images`` scenes of ``--size``
(H x W, PNG, like Cityscapes) in a temp folder, and measures:

* **images/s end to end**: ``run_inference`` over the folder (decode and resize in ``--workers``
  processes, forward, resize back, argmax, label PNG and COCO RLE JSON written), the best of
  ``--repeat`` runs after a one-image warm-up; the working scale is the image size itself
  (``img_scale`` = W x H), so 1024x2048 images run as the Cityscapes presets do.
* **forward ms**: the network alone on one 1x3xHxW input, median of ``--repeat`` after a warm-up;
* **share of bare forward**: images/s x forward seconds, the part of the job's time that is the network
  (the goal of issue 15: at least 80 %). The rest is decoding, the softmax and label map at full size,
  and encoding the PNG and RLE outputs, which on a small CPU share the network's cores.

Backends: ``torch`` (eager, BatchNorm folded, channels-last, fp32), ``torch+amp`` with ``--amp``
(bf16 autocast on CPU, fp16 on CUDA), ``onnxruntime`` (CPU provider, the ``mirseg export`` model).
Check the machine is idle first: the load average is printed at the start and the end. On a
machine with few cores, the decoding workers compete with the forward pass: compare ``--workers 0``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from machine import cpu_signature, load_average, median_seconds, random_checkpoint  # noqa: E402  (bench/machine.py, beside this script)

from mirseg.config import InferConfig, build_config  # noqa: E402
from mirseg.data.synthetic import make_dataset  # noqa: E402
from mirseg.export import export  # noqa: E402
from mirseg.exported import OnnxModule, onnx_predictor  # noqa: E402
from mirseg.fileio import write_atomic  # noqa: E402
from mirseg.infer import load_predictor, run_inference  # noqa: E402
from mirseg.models import MODELS  # noqa: E402
from mirseg.precision import autocast_dtype  # noqa: E402


def forward_fn(predictor, amp: bool, x: torch.Tensor):
    """One forward pass of the predictor's network on ``x`` (1, 3, H, W), as a no-argument function."""

    if isinstance(predictor.model, OnnxModule):
        session, x_np = predictor.model.session, x.cpu().numpy()
        return lambda: session.run(["logits"], {"image": x_np})
    dtype = autocast_dtype(x.device, amp)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        cast = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.inference_mode(), cast:
            predictor.model(x_cl)["out"].float()
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    return forward


def end_to_end(cfg: InferConfig, predictor, num_images: int, repeat: int, warm_dir: Path) -> float:
    """Images per second of run_inference, best of ``repeat`` runs after a one-image warm-up run."""
    run_inference(build_config(InferConfig, {**_values(cfg), "images": str(warm_dir)}), predictor=predictor)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = run_inference(cfg, predictor=predictor)
        best = min(best, time.perf_counter() - t0)
        assert not result.failed, result.failed
    return num_images / best


def _values(cfg: InferConfig) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: all eight)")
    parser.add_argument("--images", type=int, default=8, help="generated images per run (default 8)")
    parser.add_argument("--size", default="1024x2048", help="image size HxW (default 1024x2048)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions (default 3)")
    parser.add_argument("--amp", action="store_true", help="also time torch with autocast (bf16 CPU / fp16 CUDA)")
    parser.add_argument("--device", default="cpu", help="torch device (ONNX Runtime always runs on CPU)")
    parser.add_argument("--workers", type=int, default=2, help="workers_per_gpu: image-decoding processes (default 2)")
    parser.add_argument("--batch", type=int, default=2, help="samples_per_gpu (default 2)")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size must be HxW, e.g. 1024x2048, got {args.size!r}")
    device = torch.device(args.device)

    import onnxruntime

    print(f"# {cpu_signature()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), "
          f"onnxruntime {onnxruntime.__version__}, device {device}, load average "
          f"{load_average()}")
    print(f"# {args.images} generated {h}x{w} PNG images, img_scale {w}x{h} (no resize), 19 classes, batch "
          f"{args.batch}, {args.workers} loader workers; outputs: label PNG + COCO RLE JSON; best of {args.repeat} "
          "runs")
    header = ("model", "backend", "images/s end to end", "forward ms", "share of bare forward")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    with tempfile.TemporaryDirectory(prefix="mirseg-bench-") as tmp_name:
        tmp = Path(tmp_name)
        data = make_dataset(tmp / "data", args.images, size=(h, w), num_classes=3, seed=0)
        warm = tmp / "warm"
        warm.mkdir()
        first = sorted(data.images.iterdir())[0]
        write_atomic(warm / first.name, first.read_bytes())
        for arch in models:
            ckpt = tmp / f"{arch}.pth"
            random_checkpoint(arch, ckpt, (h, w))
            cfg = build_config(InferConfig, dict(checkpoint=str(ckpt), images=str(data.images),
                                                 out_dir=str(tmp / "out"), device=str(device),
                                                 samples_per_gpu=args.batch, workers_per_gpu=args.workers))
            x = torch.randn(1, 3, h, w, device=device)
            predictor = load_predictor(ckpt, device=device)
            backends = [("torch", predictor, False)]
            if args.amp:
                backends.append(("torch+amp", predictor, True))
            onnx_path = export(ckpt, "onnx", tmp / f"{arch}.onnx", height=min(h, 256), width=min(w, 512), check=False)
            backends.append(("onnxruntime", onnx_predictor(onnx_path), False))
            for name, pred, amp in backends:
                forward = forward_fn(pred, amp, x)
                ms = 1000 * median_seconds(forward, args.repeat)
                run_cfg = build_config(InferConfig, {**_values(cfg), "amp": amp})
                ips = end_to_end(run_cfg, pred, args.images, args.repeat, warm)
                print(f"| {arch} | {name} | {ips:.2f} | {ms:.0f} | {100 * ips * ms / 1000:.0f}% |", flush=True)
    print(f"# load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
