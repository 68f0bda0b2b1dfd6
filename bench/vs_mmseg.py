"""mirseg's networks against mmsegmentation 0.27's, on this machine, as ratios measured in one run (issue 15's goals:
inference fp32 <= 0.5x the reference's best eager layout, bf16 <= 0.25x; a training step <= 0.5x).

    bash bench/mmseg_env.sh /tmp/mmseg-venv          # once: mmseg 0.27 + mmcv 1.6 (no compiled ops), torch pinned
    python bench/vs_mmseg.py --reference-python /tmp/mmseg-venv/bin/python \
        [--models fastscnn hrnet_w18s deeplabv3plus_r18 ocrnet_hr18s] [--rounds 3] [--repeat 5]

For each network and each of ``--rounds`` rounds, the reference (``bench/mmseg_reference.py`` in the reference's
environment, a subprocess this one waits for) and then mirseg are timed back to back with the same threads, and
the round's ratio is mirseg's time over the reference's; the table gives the median ratio, so that a drift of the
machine's speed between rounds moves both sides of a ratio alike.

* **same network**: on the first round the reference saves its weights (random, BatchNorm statistics of random
  batches), an input and its logits; mirseg's network loads the weights unchanged and must give the same logits
  (the maximum difference is printed, relative to the largest logit) or the bench stops.
* **inference**: one 1x3x``--size`` image, ms. mirseg as ``mirseg infer`` runs it (eval, BatchNorm folded), in
  the faster of NCHW and channels-last (``layout=auto`` picks by timing); the reference in the faster of NCHW and
  channels-last as mmseg runs it (the goal's reference: mmseg 0.27 folds no BatchNorm), and, in a column of its
  own, with mmcv's ``fuse_conv_bn`` as well: what is left of the ratio when the reference is given mirseg's own
  inference step. bf16 autocast columns on a CPU with native bf16. With onnxruntime installed (``mirseg[export]``)
  also the same weights exported by ``mirseg export`` and run by ONNX Runtime, as ``mirseg infer model.onnx`` does,
  against the reference as mmseg runs it.
* **training step**: batch 2, 3x``--train-size``, s (``bench/machine.train_step``: forward, the loop's loss with
  the auxiliary heads, backward, SGD; the reference: ``forward_train``, ``_parse_losses``, backward, SGD), the
  faster layout on each side.

Both sides run in the environment the bench starts in (``THP_MEM_ALLOC_ENABLE=1``: huge pages for both, see
``mirseg.allocator``). Check the machine is idle first: the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from machine import (  # noqa: E402  (bench/machine.py, beside this script)
    LAYOUTS,
    cpu_signature,
    infer_times,
    load_average,
    median_seconds,
    mmseg_config,
    native_bf16,
    train_step,
)

from mirseg.checkpoint import atomic_save, make_checkpoint  # noqa: E402
from mirseg.export import export  # noqa: E402
from mirseg.exported import ort_session  # noqa: E402
from mirseg.models import MODELS, build_model  # noqa: E402

REFERENCE = Path(__file__).with_name("mmseg_reference.py")


def reference(python: str, config: str, args: argparse.Namespace, bf16: bool, weights: Path | None) -> dict:
    """The reference's timings (``mmseg_reference.py``'s JSON line), or the bench stops with its error output."""
    cmd = [python, str(REFERENCE), "--config", config, "--size", f"{args.size[0]}x{args.size[1]}",
           "--train-size", f"{args.train_size[0]}x{args.train_size[1]}", "--repeat", str(args.repeat),
           "--threads", str(torch.get_num_threads())]
    cmd += ["--bf16"] * bf16 + ["--no-train"] * args.no_train + (["--weights", str(weights)] if weights else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # this environment: the same pages
    if done.returncode != 0:
        raise SystemExit(f"the reference failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_network(arch: str, weights: Path) -> float:
    """The largest difference between mirseg's and the reference's logits on the reference's input and weights,
    relative to the largest logit; loading checks every key and shape."""
    saved = torch.load(weights, weights_only=True)
    model = build_model(arch, 19)
    model.load_state_dict(saved["state_dict"])
    with torch.inference_mode():
        ours = model.eval()(saved["input"])["out"]
    ref = saved["logits"]
    return float((ours - ref).abs().max() / ref.abs().max())


def ours_infer(arch: str, size: tuple[int, int], dtypes: list, repeat: int) -> dict[str, float]:
    """{"<layout>/<dtype>": seconds per image} of ``arch`` as ``mirseg infer`` runs it (machine.infer_times)."""
    torch.manual_seed(0)
    times, _ = infer_times(build_model(arch, 19).eval(), torch.randn(1, 3, *size), dtypes, repeat, lambda: None)
    return {f"{layout}/{name(dtype)}": t for (layout, dtype), t in times.items()}


def ours_onnx(arch: str, weights: Path, size: tuple[int, int], repeat: int) -> float | None:
    """Seconds per 1x3x``size`` image of the network (the reference's weights) exported by ``mirseg export`` and run
    by ONNX Runtime, as ``mirseg infer model.onnx`` runs it; None without onnxruntime (``mirseg[export]``)."""
    try:
        import onnxruntime  # noqa: F401  (optional: pip install 'mirseg[export]')
    except ImportError:
        return None
    ckpt, onnx = weights.with_suffix(".pth"), weights.with_suffix(".onnx")
    if not onnx.exists():
        model = build_model(arch, 19)
        model.load_state_dict(torch.load(weights, weights_only=True)["state_dict"])
        names = ["background"] + [f"class{i}" for i in range(1, 19)]
        atomic_save(make_checkpoint(model.eval(), arch, names, config={"config_file": arch}), ckpt)
        export(ckpt, "onnx", onnx, height=size[0], width=size[1], check=False)
    session = ort_session(onnx)
    x = torch.randn(1, 3, *size).numpy()
    return median_seconds(lambda: session.run(["logits"], {"image": x}), repeat)


def ours_train(arch: str, size: tuple[int, int], dtypes: list, repeat: int) -> dict[str, float]:
    return {f"{layout}/{name(dtype)}": median_seconds(train_step(arch, 2, size, memory_format=fmt, dtype=dtype),
                                                       max(repeat // 2, 2))
            for layout, fmt in LAYOUTS.items() for dtype in dtypes}


def name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else "bf16"


def best(times: dict[str, float], dtype: str, folded: bool = False) -> tuple[str, float]:
    """(variant, seconds) of the fastest ``dtype`` variant; of the reference's, those with BatchNorm folded
    (``folded``) or, by default, as mmseg runs its networks (neither its test script nor its inference API folds)."""
    key = min((k for k in times if k.endswith("/" + dtype) and ("+fused" in k) == folded), key=times.__getitem__)
    return key.split("/")[0], times[key]


def pair(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-python", required=True, help="python of the mmseg 0.27 environment")
    parser.add_argument("--models", nargs="+", default=["fastscnn", "hrnet_w18s", "deeplabv3plus_r18", "ocrnet_hr18s"],
                        choices=list(MODELS))
    parser.add_argument("--size", type=pair, default=(512, 1024), help="inference input HxW (default 512x1024)")
    parser.add_argument("--train-size", type=pair, default=(512, 512), help="training crop HxW (default 512x512)")
    parser.add_argument("--rounds", type=int, default=3, help="reference-then-mirseg rounds per network (default 3)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per figure, median (training: half)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = native_bf16()
    dtypes = [None, torch.bfloat16] if bf16 else [None]
    # "infer+": against the reference with BatchNorm folded as well, mirseg's own inference step given to it
    # "onnx": mirseg's ONNX export on ONNX Runtime (fp32), against the reference as mmseg runs it
    kinds = (["infer/fp32", "infer+/fp32", "onnx/fp32"] + ["infer/bf16", "infer+/bf16"] * bf16
             + ([] if args.no_train else ["train/fp32"] + ["train/bf16"] * bf16))
    print(f"# {cpu_signature()}, {args.threads} threads, torch {torch.__version__}, load average {load_average()}")
    print(f"# inference 1x3x{args.size[0]}x{args.size[1]} ms, train step batch 2 3x{args.train_size[0]}x"
          f"{args.train_size[1]} s; each figure the median of {args.repeat} runs, each ratio the median of "
          f"{args.rounds} rounds (reference, then mirseg)")
    header = ["network", "same logits (max rel diff)"]
    for kind in kinds:
        task, dtype = kind.split("/")
        if task == "infer+":
            header += [f"infer {dtype} mmseg BN folded", f"infer {dtype} ratio to it"]
        elif task == "onnx":
            header += ["infer mirseg onnxruntime", "onnxruntime ratio to mmseg"]
        else:
            header += [f"{task} {dtype} mirseg", f"{task} {dtype} mmseg", f"{task} {dtype} ratio"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    with tempfile.TemporaryDirectory(prefix="mirseg-vs-mmseg-") as tmp:
        for arch in args.models:
            config = mmseg_config(arch)
            rows: dict[str, list[tuple[str, float, str, float]]] = {k: [] for k in kinds}
            diff = None
            for r in range(args.rounds):
                weights = Path(tmp) / f"{arch}.pt" if r == 0 else None
                ref = reference(args.reference_python, config, args, bf16, weights)
                if weights is not None:
                    diff = same_network(arch, weights)
                    if diff > 1e-4:
                        raise SystemExit(f"{arch}: mirseg's logits differ from mmseg's by {diff:.2e} (relative)")
                onnx = ours_onnx(arch, Path(tmp) / f"{arch}.pt", args.size, args.repeat)
                ours = {"infer": ours_infer(arch, args.size, dtypes, args.repeat),
                        "onnx": {} if onnx is None else {"ORT/fp32": onnx},
                        "train": {} if args.no_train else ours_train(arch, args.train_size, dtypes, args.repeat)}
                for kind in kinds:
                    task, dtype = kind.split("/")
                    if task == "onnx" and onnx is None:
                        continue
                    rows[kind].append((*best(ours[task.rstrip("+")], dtype),
                                       *best(ref["infer" if task == "onnx" else task.rstrip("+")], dtype,
                                             folded=task == "infer+")))
            cells = [arch, f"{diff:.1e}"]
            for kind in kinds:
                scale, unit = (1, "s") if kind.startswith("train") else (1000, "ms")
                runs = rows[kind]
                if not runs:  # no onnxruntime here
                    cells += ["n/a", "n/a"]
                    continue
                mid = statistics.median(o / t for _, o, _, t in runs)
                ours_s = statistics.median(o for _, o, _, _ in runs)
                ref_s = statistics.median(t for _, _, _, t in runs)
                ours_how = statistics.mode(h for h, _, _, _ in runs)
                ref_how = statistics.mode(h for _, _, h, _ in runs)
                digits = 0 if unit == "ms" else 3
                if kind.startswith("infer+"):
                    cells += [f"{scale * ref_s:.{digits}f} ({ref_how})", f"{mid:.2f}"]
                elif kind.startswith("onnx"):
                    cells += [f"{scale * ours_s:.{digits}f}", f"{mid:.2f}"]
                else:
                    cells += [f"{scale * ours_s:.{digits}f} ({ours_how})", f"{scale * ref_s:.{digits}f} ({ref_how})",
                              f"{mid:.2f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
    print(f"# load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
