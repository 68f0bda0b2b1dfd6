"""bf16 against fp32 on real data (issue 15): does a bf16 training run reach fp32's mIoU on CamVid, and does
bf16 inference give fp32's labels?

    python bench/bf16_camvid.py [--models fastscnn] [--iters 1000] [--seeds 0 1] [--camvid DIR] [--batch 4]
                                [--workers 2] [--set KEY=VALUE ...]

Per preset and seed, two ``mirseg train`` runs on CamVid (:func:`camvid.train_config`: 360x480 crops, test
scale 480x360, the preset's schedule over ``--iters``), the same in everything but the precision: ``amp=false``
(fp32) and ``amp=true`` with ``MIRSEG_CPU_BF16=1`` (bf16 autocast whatever the layout probe finds faster; on a
CPU without native bf16 oneDNN emulates it: the same arithmetic, slowly). Both are scored alike, by training's
final evaluation, in fp32, on CamVid val (101 images, void ignored). Each row gives the val mIoU, the layout
and precision the run trained in (from its last.pth) and the loop's seconds per iteration.

Then each trained network infers CamVid val as ``mirseg infer`` does (:func:`mirseg.infer.iter_predictions`,
channels-last, labels at the original size) once in fp32 and once in bf16: ``label agree`` is the share of
pixels (void included) whose label is the same in both, and ``mIoU fp32 / bf16 infer`` score each against
the labels.

Issue 15's goals: label agreement at least 99.5 %; bf16 training's mIoU within 0.5 point of fp32's. The
closing lines give, per seed, bf16's mIoU minus fp32's, and with two or more seeds the spread of fp32's
mIoU over the seeds: the run-to-run noise a difference of precision is to be read against. Minutes per run
(FastSCNN: about 0.5 s per iteration on 2 cores): not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TQDM_DISABLE", "1")  # no per-iteration bars from train(); read when tqdm is imported

import camvid  # noqa: E402  (bench/camvid.py, beside this script)
from machine import amp_labels, cpu_signature, load_average, pixel_agreement, trained_in  # noqa: E402  (bench/machine.py)

from mirseg import threads  # noqa: E402
from mirseg.coerce import parse_overrides  # noqa: E402
from mirseg.data.labelfolder import load_label_folder  # noqa: E402
from mirseg.infer import load_predictor  # noqa: E402
from mirseg.metrics import ConfusionMatrix  # noqa: E402
from mirseg.precision import DTYPE_NAMES, ENV_VAR  # noqa: E402
from mirseg.train import train  # noqa: E402


def bf16_forced(on: bool) -> AbstractContextManager:
    """``MIRSEG_CPU_BF16=1`` inside when ``on`` (bf16 autocast whatever the probe finds faster), the environment
    restored on the way out."""
    return mock.patch.dict(os.environ, {ENV_VAR: "1"} if on else {})


def inference(checkpoint: Path, root: Path, workers: int) -> dict[str, float]:
    """``checkpoint`` on CamVid val in fp32 and in bf16: label agreement and each one's mIoU."""
    predictor = load_predictor(checkpoint, "cpu", img_scale=(480, 360), test_mode="whole")
    samples = load_label_folder(root / "images" / "val", root / "labels" / "val", predictor.num_classes)
    with bf16_forced(True):  # amp=True means bf16 with it; the fp32 pass has no autocast either way
        labels = amp_labels(predictor, [s.image_path for s in samples], workers, "channels_last")
    cms = {amp: ConfusionMatrix(predictor.num_classes) for amp in labels}
    for i, sample in enumerate(samples):
        target = torch.from_numpy(sample.load_label().copy())  # (H, W) uint8, 255 void
        for amp, cm in cms.items():
            cm.update(labels[amp][i], target)
    return {"mIoU fp32": float(cms[False].compute()["mIoU"]), "mIoU bf16": float(cms[True].compute()["mIoU"]),
            "agree": pixel_agreement(labels[False], labels[True])}


def run(preset: str, seed: int, bf16: bool, root: Path, args: argparse.Namespace,
        overrides: dict[str, Any]) -> dict[str, Any]:
    """One training run and the inference of its network; the row's figures."""
    with bf16_forced(bf16), tempfile.TemporaryDirectory(prefix="mirseg-bench-bf16-") as work:
        cfg = camvid.train_config(preset, root, work, iters=args.iters, batch=args.batch, workers=args.workers,
                                  **{"amp": bf16, "seed": seed, "pretrained": "none", **overrides})
        result = train(cfg)
        choice = trained_in(result.last)
        if bf16 and choice.dtype != torch.bfloat16:
            raise SystemExit(f"the bf16 run trained in {DTYPE_NAMES[choice.dtype]}: {ENV_VAR}=1 was not honoured")
        return {"mIoU": float(result.last_metrics["mIoU"]), "s_per_iter": result.timing["s_per_iter"],
                "trained": f"{choice.layout} {DTYPE_NAMES[choice.dtype]}", **inference(result.last, root, args.workers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fastscnn"])
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--camvid", default=str(camvid.ROOT))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="more TrainConfig keys")
    args = parser.parse_args()
    root = camvid.require(Path(args.camvid))
    overrides = parse_overrides(args.set)
    plan = threads.plan(int(overrides.get("threads", 0)), args.workers)
    print(f"# {cpu_signature()}, torch {torch.__version__}, "
          f"load average {load_average()}; {args.iters} iterations of batch {args.batch}, seeds {args.seeds}"
          + (f", {' '.join(args.set)}" if args.set else "") + f"\n# {plan.description}")
    print("| preset | seed | amp | trained in | val mIoU | loop s/it | label agree fp32/bf16 infer "
          "| mIoU fp32 infer | mIoU bf16 infer |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    rows: dict[tuple[str, int, bool], dict[str, Any]] = {}
    for preset in args.models:
        for seed in args.seeds:
            for bf16 in (False, True):
                t0 = time.perf_counter()
                r = rows[preset, seed, bf16] = run(preset, seed, bf16, root, args, overrides)
                print(f"| {preset} | {seed} | {'bf16' if bf16 else 'fp32'} | {r['trained']} | {r['mIoU']:.4f} | "
                      f"{r['s_per_iter']:.3f} | {100 * r['agree']:.2f} % | {r['mIoU fp32']:.4f} | "
                      f"{r['mIoU bf16']:.4f} |  <!-- {time.perf_counter() - t0:.0f} s -->", flush=True)
    for preset in args.models:
        deltas = [100 * (rows[preset, s, True]["mIoU"] - rows[preset, s, False]["mIoU"]) for s in args.seeds]
        fp32 = [100 * rows[preset, s, False]["mIoU"] for s in args.seeds]
        spread = f"; fp32 over seeds: {min(fp32):.2f}-{max(fp32):.2f} (sd {statistics.stdev(fp32):.2f})" \
            if len(fp32) > 1 else ""
        agree = [100 * rows[preset, s, b]["agree"] for s in args.seeds for b in (False, True)]
        print(f"# {preset}: bf16 - fp32 training, val mIoU points per seed: "
              f"{', '.join(f'{d:+.2f}' for d in deltas)}{spread}; label agreement {min(agree):.2f}-"
              f"{max(agree):.2f} % (goals: within 0.5 point, at least 99.5 %)")
    print(f"# load average at the end: {load_average()}; mean pixel agreement over runs "
          f"{np.mean([r['agree'] for r in rows.values()]):.4f}")


if __name__ == "__main__":
    main()
