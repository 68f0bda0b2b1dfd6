"""Pool-based active learning simulation: does mining pick better images to label than chance?

    python bench/active_learning.py [--seeds 0,1] [--algorithms rsal,ripu,...] [--jobs 2] [--out DIR]
    python bench/active_learning.py --camvid --seeds 0,1,2 [--data /work/shared/data/camvid] [--scale 240x180]
    options: [--initial N|share] [--final N|share] [--rounds R] [--iters I] [--pool N] [--no-full]

Start from ``--initial`` labelled images drawn at random from the pool (the same draw for every
algorithm of a seed), train a FastSCNN from scratch, then each round mine the unlabelled rest with
``mirseg.mine.mine`` (the full run: prediction, scoring, result.tsv), "label" the top images (their
ground truth joins the training set) so that ``--final`` is reached after ``--rounds`` equal batches,
retrain from scratch and evaluate on the validation split. Round 0 is shared by all algorithms of a
seed, and every algorithm sees the same seeds, so the comparison with ``random`` is paired. Each seed
also trains once on the whole pool at the same budget (the ceiling the mined sets are measured against).

Data: generated scenes by default (:func:`mirseg.data.synthetic.make_dataset`: 3 shape classes on a
textured background, imbalanced: discs 55 %, boxes 30 %, triangles 15 % of the objects; 4 -> 16 of 64
images in 3 rounds), or CamVid read in place (``images/{train,val}``, ``labels/{train,val}``; never
copied), trained and evaluated at ``--scale`` (default 240x180, half the resolution: CPU-sized), from
10 % of the 367 training images to 25 % in 2 rounds. Trainings run as ``--jobs`` processes of one torch
thread each. Writes ``<out>/results.csv`` (dataset, algorithm, seed, round, labelled, mIoU),
``<out>/table.md`` (mean ± std per round, the share of the full-pool mIoU, the paired gain on random)
and ``<out>/learning_curve.png``, and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TQDM_DISABLE", "1")  # no per-iteration bars from train(); read when tqdm is imported

import camvid as camvid_data  # noqa: E402  (bench/camvid.py, beside this script)
from machine import cpu_signature, load_average  # noqa: E402  (bench/machine.py)

from mirseg.config import MineConfig, TrainConfig, build_config  # noqa: E402
from mirseg.data.images import write_image  # noqa: E402
from mirseg.data.synthetic import make_dataset  # noqa: E402
from mirseg.fileio import AtomicFile, write_atomic  # noqa: E402
from mirseg.infer import load_predictor  # noqa: E402
from mirseg.mine import mine  # noqa: E402
from mirseg.mining import ALGORITHMS  # noqa: E402
from mirseg.train import train  # noqa: E402


class Dataset:
    """Where the pool and the validation split live, and how to train on a subset of the pool."""

    def __init__(self, name: str, pool: list[str], labels: Path, val_images: Path, val_labels: Path,
                 class_names: list[str], train: dict, mine: dict) -> None:
        self.name, self.pool, self.labels = name, pool, labels
        self.val_images, self.val_labels, self.class_names = val_images, val_labels, class_names
        self.train_overrides, self.mine_overrides = train, mine


def generated(root: Path, pool: int, seed: int) -> Dataset:
    tr = make_dataset(root / "pool", pool, size=(96, 128), num_classes=3, seed=100 + seed, labels=True)
    va = make_dataset(root / "val", 32, size=(96, 128), num_classes=3, seed=200 + seed, labels=True)
    return Dataset("generated", sorted(str(p) for p in tr.images.iterdir()), tr.labels, va.images, va.labels,
                   ["background", *tr.class_names],
                   train=dict(crop_size=[64, 64], img_scale=[128, 96], samples_per_gpu=8, lr=0.12, lr_scaling="none",
                              pretrained="none"),
                   mine=dict(max_superpixel_per_image=128, superpixel_cell=0))


def camvid(root: Path, scale: tuple[int, int]) -> Dataset:
    camvid_data.require(root, "labels", "--data")
    pool = sorted(str(p) for p in (root / "images" / "train").glob("*.jpg"))
    return Dataset("camvid", pool, root / "labels" / "train", root / "images" / "val", root / "labels" / "val",
                   camvid_data.CLASSES,
                   train=dict(crop_size=[scale[1], scale[0]], img_scale=list(scale), samples_per_gpu=4, lr=0.12,
                              lr_scaling="none", pretrained="none"),
                   mine=dict(max_superpixel_per_image=512, superpixel_cell=0, img_scale=list(scale)))


def fit(data: Dataset, labelled: list[str], work: Path, iters: int, seed: int) -> tuple[Path, float]:
    """Train from scratch on ``labelled``; (best checkpoint, its validation mIoU)."""
    work.mkdir(parents=True, exist_ok=True)
    listing = work / "labelled.txt"
    write_atomic(listing, "\n".join(labelled) + "\n")
    cfg = build_config(TrainConfig, dict(
        config_file="fastscnn", train_images=str(listing), train_labels=str(data.labels),
        val_images=str(data.val_images), val_labels=str(data.val_labels), class_names=data.class_names,
        max_iters=iters, interval=iters, log_interval=iters, workers_per_gpu=0, seed=seed, work_dir=str(work),
        **data.train_overrides))
    result = train(cfg)
    return Path(result.best), float(result.best_metrics["mIoU"])


def pick(data: Dataset, algorithm: str, ckpt: Path, labelled: list[str], batch: int, work: Path,
         seed: int) -> list[str]:
    """The ``batch`` best unlabelled images according to ``algorithm`` (mined with the round's model)."""
    taken = set(labelled)
    rest = [p for p in data.pool if p not in taken]
    listing = work / f"unlabelled_{algorithm}.txt"
    write_atomic(listing, "\n".join(rest) + "\n")
    cfg = build_config(MineConfig, dict(checkpoint=str(ckpt), images=str(listing), out_dir=str(work / algorithm),
                                        mining_algorithm=algorithm, max_kept_mining_image=batch, workers_per_gpu=0,
                                        seed=seed, **data.mine_overrides))
    result = mine(cfg, predictor=load_predictor(ckpt, device="cpu"))
    return [p for p, _ in result.ranking[:batch]]


def arm(data: Dataset, algorithm: str, seed: int, start: list[str], ckpt0: Path, rounds: int, batch: int,
        iters: int, work: Path) -> list[dict]:
    """Rounds 1.. of one algorithm from the seed's shared round 0: mine, label the top ``batch``, retrain."""
    rows, labelled, ckpt = [], list(start), ckpt0
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        round_dir = work / f"s{seed}" / algorithm / f"round{r}"
        round_dir.mkdir(parents=True, exist_ok=True)
        labelled += pick(data, algorithm, ckpt, labelled, batch, round_dir, seed)
        ckpt, miou = fit(data, labelled, round_dir / "train", iters, seed)
        rows.append(dict(dataset=data.name, algorithm=algorithm, seed=seed, round=r, labelled=len(labelled),
                         mIoU=round(miou, 4)))
        print(f"seed {seed} {algorithm:16s} round {r}: {len(labelled)} labelled, mIoU {miou:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def _one_thread() -> None:
    """Each job keeps to one torch thread: --jobs of them share the cores without OpenMP contention."""
    os.environ["MIRSEG_THREADS"] = "1"  # the jobs' thread budget (mirseg.threads) would otherwise give them more
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")


def simulate(data: Dataset, algorithms: list[str], seeds: list[int], rounds: int, initial: int, batch: int,
             iters: int, work: Path, jobs: int, full: bool) -> tuple[list[dict], dict[int, Path]]:
    """Round 0 (and the full-pool run) per seed, then every (seed, algorithm) arm, ``jobs`` at a time.
    Returns the rows and the full-pool best checkpoint per seed."""
    starts = {s: sorted(np.random.default_rng(s).choice(data.pool, size=initial, replace=False).tolist())
              for s in seeds}
    rows: list[dict] = []
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as ex:
        first = {s: ex.submit(fit, data, starts[s], work / f"s{s}" / "round0", iters, s) for s in seeds}
        whole = {s: ex.submit(fit, data, list(data.pool), work / f"s{s}" / "full", iters, s) for s in seeds} \
            if full else {}
        arms = []
        for s in seeds:
            ckpt0, miou0 = first[s].result()
            print(f"seed {s} round 0: {initial} labelled, mIoU {miou0:.4f}", flush=True)
            rows += [dict(dataset=data.name, algorithm=a, seed=s, round=0, labelled=initial, mIoU=round(miou0, 4))
                     for a in algorithms]
            arms += [ex.submit(arm, data, a, s, starts[s], ckpt0, rounds, batch, iters, work) for a in algorithms]
        full_models = {}
        for s, f in whole.items():
            full_models[s], miou = f.result()
            print(f"seed {s} full pool: {len(data.pool)} labelled, mIoU {miou:.4f}", flush=True)
            rows.append(dict(dataset=data.name, algorithm="full pool", seed=s, round="full",
                             labelled=len(data.pool), mIoU=round(miou, 4)))
        for f in arms:
            rows += f.result()
    return rows, full_models


def curves_of(rows: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """algorithm -> [(labelled, mean mIoU, std over seeds)] in round order; the full-pool rows apart."""
    by: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if r["round"] != "full":
            by.setdefault(r["algorithm"], {}).setdefault(r["labelled"], []).append(r["mIoU"])
    return {a: [(n, float(np.mean(v)), float(np.std(v))) for n, v in sorted(c.items())] for a, c in by.items()}


def table(rows: list[dict], pool: int) -> str:
    """The markdown table: mean ± std per round, the share of the full-pool mIoU, the paired gain on random."""
    curves = curves_of(rows)
    full = [r["mIoU"] for r in rows if r["round"] == "full"]
    counts = [n for n, _, _ in curves["random"]]
    head = " | ".join(f"{n} ({100 * n / pool:.0f} %)" for n in counts)
    lines = [f"| algorithm | {head} | last round / full pool | last round vs random (paired) |",
             "|---|" + "---|" * (len(counts) + 2)]
    last = max(r["round"] for r in rows if r["round"] != "full")
    random_last = {r["seed"]: r["mIoU"] for r in rows if r["algorithm"] == "random" and r["round"] == last}
    for name, curve in curves.items():
        cells = " | ".join(f"{m:.4f} ± {sd:.4f}" for _, m, sd in curve)
        mine_last = {r["seed"]: r["mIoU"] for r in rows if r["algorithm"] == name and r["round"] == last}
        gain = [mine_last[s] - random_last[s] for s in mine_last if s in random_last]
        share = f"{100 * curve[-1][1] / np.mean(full):.1f} %" if full else "-"
        lines.append(f"| {name} | {cells} | {share} | {np.mean(gain):+.4f} ± {np.std(gain):.4f} |")
    if full:
        blank = " | " * (len(counts) - 1)
        lines.append(f"| full pool ({pool} images) |{blank} {np.mean(full):.4f} ± {np.std(full):.4f} | 100 % | |")
    return "\n".join(lines)


# Colours (BGR) per algorithm; random is drawn dashed-grey so the baseline stands out.
_COLOURS = {"rsal": (40, 40, 220), "ripu": (200, 120, 0), "entropy": (40, 160, 40), "margin": (160, 40, 160),
            "least_confidence": (0, 150, 200), "random": (110, 110, 110)}


def plot(curves: dict[str, list[tuple[int, float, float]]], path: Path, title: str,
         full: float | None = None) -> None:
    """A learning-curve PNG with OpenCV (no matplotlib here): mean mIoU against labelled images, bars of
    ± one std over seeds, and the full-pool mean as a dotted line."""
    w, h, left, right, top, bottom = 760, 480, 70, 190, 40, 55
    img = np.full((h, w, 3), 255, np.uint8)
    xs = [n for c in curves.values() for n, _, _ in c]
    ys = [m + k * sd for c in curves.values() for _, m, sd in c for k in (-1, 1)] + ([full] if full else [])
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0 = max(0.0, np.floor(min(ys) * 20) / 20 - 0.05)
    y1 = min(1.0, np.ceil(max(ys) * 20) / 20 + 0.05)

    def px(n: float, m: float) -> tuple[int, int]:
        return (int(left + (n - x0) / (x1 - x0) * (w - left - right)),
                int(h - bottom - (m - y0) / (y1 - y0) * (h - top - bottom)))

    font = cv2.FONT_HERSHEY_SIMPLEX
    for k in range(int(round((y1 - y0) / 0.05)) + 1):  # horizontal grid every 0.05 mIoU
        m = y0 + 0.05 * k
        cv2.line(img, px(x0, m), px(x1, m), (225, 225, 225), 1)
        cv2.putText(img, f"{m:.2f}", (8, px(x0, m)[1] + 4), font, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
    for n in sorted(set(xs)):
        cv2.line(img, px(n, y0), px(n, y0 + (y1 - y0) * 0.01), (60, 60, 60), 1)
        cv2.putText(img, str(n), (px(n, y0)[0] - 8, h - bottom + 18), font, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
    cv2.rectangle(img, px(x0, y1), px(x1, y0), (60, 60, 60), 1)
    cv2.putText(img, "labelled images", (left + (w - left - right) // 2 - 50, h - 12), font, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.putText(img, "mIoU", (8, top - 14), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, title, (left, 24), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    if full is not None:
        for x in range(px(x0, full)[0], px(x1, full)[0], 8):
            cv2.line(img, (x, px(x0, full)[1]), (x + 3, px(x0, full)[1]), (0, 0, 0), 1)
        cv2.putText(img, "full pool", (px(x1, full)[0] + 6, px(x1, full)[1] + 4), font, 0.4, (0, 0, 0), 1,
                    cv2.LINE_AA)
    for i, (name, curve) in enumerate(curves.items()):
        colour = _COLOURS.get(name, (0, 0, 0))
        points = [px(n, m) for n, m, _ in curve]
        for n, m, sd in curve:  # error bars, nudged sideways so they do not hide each other
            x = px(n, m)[0] + 3 * (i - len(curves) // 2)
            cv2.line(img, (x, px(n, m - sd)[1]), (x, px(n, m + sd)[1]), colour, 1, cv2.LINE_AA)
        for a, b in zip(points, points[1:]):
            if name == "random":  # dashed
                for t in np.linspace(0, 1, 12)[::2]:
                    p = (int(a[0] + (b[0] - a[0]) * t), int(a[1] + (b[1] - a[1]) * t))
                    q = (int(a[0] + (b[0] - a[0]) * (t + 1 / 11)), int(a[1] + (b[1] - a[1]) * (t + 1 / 11)))
                    cv2.line(img, p, q, colour, 2, cv2.LINE_AA)
            else:
                cv2.line(img, a, b, colour, 2, cv2.LINE_AA)
        for p in points:
            cv2.circle(img, p, 4, colour, -1, cv2.LINE_AA)
        ly = top + 12 + 22 * i
        for x in range(w - right + 15, w - right + 40, 10 if name == "random" else 25):
            cv2.line(img, (x, ly), (min(x + (5 if name == "random" else 25), w - right + 40), ly), colour, 2,
                     cv2.LINE_AA)
        cv2.putText(img, name, (w - right + 48, ly + 4), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    write_image(path, img[..., ::-1], (cv2.IMWRITE_PNG_COMPRESSION, 9))  # drawn in OpenCV's BGR


def _count(value: str, pool: int) -> int:
    """A number of images, or a share of the pool when it is below 1 (0.1: 10 %)."""
    v = float(value)
    return max(1, round(v * pool)) if v < 1 else int(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--camvid", action="store_true", help="CamVid instead of generated data")
    parser.add_argument("--data", default=str(camvid_data.ROOT), help="CamVid folder (read in place)")
    parser.add_argument("--scale", default="240x180", help="CamVid: WxH it is trained and evaluated at")
    parser.add_argument("--pool", type=int, default=64, help="generated: pool size (default 64)")
    parser.add_argument("--initial", help="labelled at the start: a count, or a share of the pool below 1 "
                                          "(default: 4 generated, 0.10 CamVid)")
    parser.add_argument("--final", help="labelled after the last round (count or share; default: 16 generated, "
                                        "0.25 CamVid); the rounds add equal batches")
    parser.add_argument("--rounds", type=int, help="mining rounds (default: 3 generated, 2 CamVid)")
    parser.add_argument("--iters", type=int, help="training iterations per round (default: 300 generated, "
                                                  "600 CamVid)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--algorithms", help="comma-separated (default: all generated; rsal,ripu,entropy CamVid); "
                                             "random is always added")
    parser.add_argument("--no-full", action="store_true", help="skip the full-pool training per seed")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once, one torch thread each (default 2)")
    parser.add_argument("--out", default="runs/active_learning", help="CSV, table and PNG go here")
    args = parser.parse_args()
    cam = args.camvid
    chosen = args.algorithms or ("rsal,ripu,entropy" if cam else ",".join(ALGORITHMS))
    algorithms = [a.strip().lower() for a in chosen.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        parser.error(f"unknown algorithms {unknown}; choose from {', '.join(ALGORITHMS)}")
    if "random" not in algorithms:
        algorithms.append("random")  # the baseline every curve is compared with
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rounds, iters = args.rounds or (2 if cam else 3), args.iters or (600 if cam else 300)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="mirseg-al-") as tmp_name:
        tmp = Path(tmp_name)
        scale = tuple(int(v) for v in args.scale.lower().split("x"))
        data = camvid(Path(args.data), scale) if cam else generated(tmp / "data", args.pool, seeds[0])
        n = len(data.pool)
        initial = _count(args.initial or ("0.10" if cam else "4"), n)
        final = _count(args.final or ("0.25" if cam else "16"), n)
        batch = max(1, -(-(final - initial) // rounds))  # ceil: the last round reaches at least final
        print(f"# {cpu_signature()}; load average {load_average()}; {data.name} "
              f"({n} pool images{f' at {scale[0]}x{scale[1]}' if cam else ''}); algorithms {', '.join(algorithms)}; "
              f"seeds {seeds}; {initial} + {rounds} x {batch} images, {iters} iterations of batch "
              f"{data.train_overrides['samples_per_gpu']} per round; {args.jobs} one-thread jobs", flush=True)
        t_start = time.perf_counter()
        rows, full_models = simulate(data, algorithms, seeds, rounds, initial, batch, iters, tmp / "work",
                                     args.jobs, full=not args.no_full)
        out.mkdir(parents=True, exist_ok=True)
        if full_models:  # kept for bench/mine.py's score quality: a model of the whole pool, at this budget
            write_atomic(out / "full_pool_model.pth", full_models[seeds[0]].read_bytes())
    rows.sort(key=lambda r: (r["algorithm"], r["seed"], -1 if r["round"] == "full" else r["round"]))
    with AtomicFile(out / "results.csv") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    text = table(rows, n)
    write_atomic(out / "table.md", text + "\n")
    full = [r["mIoU"] for r in rows if r["round"] == "full"]
    size = f" at {scale[0]}x{scale[1]}" if cam else ""
    plot(curves_of(rows), out / "learning_curve.png",
         f"{data.name}{size}: FastSCNN, {iters} it per round, mean +/- std of {len(seeds)} seed(s)",
         float(np.mean(full)) if full else None)
    print(f"\nval mIoU, mean ± std over seeds {seeds}\n{text}")
    print(f"\nwrote {out / 'results.csv'}, {out / 'table.md'}, {out / 'learning_curve.png'} and the seed "
          f"{seeds[0]} full-pool model {out / 'full_pool_model.pth'} "
          f"({(time.perf_counter() - t_start) / 60:.1f} min; load average now "
          f"{load_average()})")


if __name__ == "__main__":
    main()
