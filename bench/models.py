"""Speed of the eight networks on this machine: inference and one training step.

    python bench/models.py [--models fastscnn hrnet_w18s] [--repeat 5] [--threads 2]

For each architecture it prints parameter counts, GFLOP of one 1x3x512x1024 forward pass, the
median inference time in fp32 as written (NCHW, BN unfolded), fp32 as mirseg runs it (BN folded,
channels-last), bf16 autocast, the bf16/fp32 label agreement, and the median time of one training
step (forward, losses, backward, SGD step) at batch 2, 3x512x512. Check the machine is idle first
(`uptime`); the figures are medians of ``--repeat`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from machine import cpu_model  # noqa: E402  (bench/machine.py, beside this script)

from mirseg.constants import IGNORE_INDEX  # noqa: E402
from mirseg.models import MODELS, build_model  # noqa: E402
from mirseg.predict import prepare_for_inference  # noqa: E402


def median_time(fn, repeat: int) -> float:
    fn()  # warm-up: oneDNN picks and caches kernels on the first call
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gflop(model: torch.nn.Module, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 1e9


def train_step_time(name: str, repeat: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = build_model(name, 19).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(2, 3, 512, 512, device=device)
    y = torch.randint(0, 19, (2, 512, 512), device=device)
    y[:, :8] = IGNORE_INDEX

    def step() -> None:
        out = model(x)
        loss = F.cross_entropy(out["out"], y, ignore_index=IGNORE_INDEX)
        for w, aux in zip(model.aux_weights, out["aux"]):
            loss = loss + w * F.cross_entropy(aux, y, ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return median_time(step, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    print(f"# {cpu_model()}, torch {torch.__version__}, device {device}, "
          f"{args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("# inference: 1x3x512x1024, median of", args.repeat, "runs; train step: batch 2, 3x512x512")
    header = ("network", "params (M)", "GFLOP", "fp32 plain s", "fp32 fused+CL s", "GFLOP/s",
              f"{str(bf16_dtype).split('.')[-1]} s", "label agree", "train step s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name, 19).eval().to(device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        x = torch.randn(1, 3, 512, 1024, device=device)
        flops = gflop(model, x)

        def run(m, inp, dtype=None):
            def fn():
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    out = m(inp)["out"]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return out
            return fn

        t_plain = median_time(run(model, x), args.repeat)
        fast = prepare_for_inference(copy.deepcopy(model), channels_last=True)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        t_fast = median_time(run(fast, x_cl), args.repeat)
        t_half = median_time(run(fast, x_cl, bf16_dtype), args.repeat)
        ref = run(fast, x_cl)().argmax(1)
        agree = (run(fast, x_cl, bf16_dtype)().float().argmax(1) == ref).float().mean().item()
        t_train = float("nan") if args.no_train else train_step_time(name, max(args.repeat // 2, 2), device)
        row = (name, f"{params:.2f}", f"{flops:.1f}", f"{t_plain:.3f}", f"{t_fast:.3f}", f"{flops / t_fast:.0f}",
               f"{t_half:.3f}", f"{agree:.4f}", f"{t_train:.2f}")
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
