"""Pool-based active learning simulation: does mining pick better images to label than chance?

    python bench/active_learning.py [--rounds 3] [--initial 4] [--batch 4] [--pool 64] [--iters 300]
                                    [--seeds 0,1] [--algorithms rsal,ripu,...] [--out runs/active_learning]
    python bench/active_learning.py --camvid [--data /work/shared/data/camvid] ...

Start from ``--initial`` labelled images drawn at random from the pool (the same draw for every
algorithm of a seed), train a FastSCNN from scratch, then each round mine the unlabelled rest with
``mirseg.mine.mine`` (the full run: prediction, scoring, result.tsv), "label" the top ``--batch``
images (their ground truth joins the training set), retrain from scratch and evaluate on the
validation split. Round 0 is shared by all algorithms of a seed. Every algorithm sees the same
seeds, so the comparison with ``random`` is paired.

Data: generated scenes by default (:func:`mirseg.data.synthetic.make_dataset`: 3 shape classes on a
textured background, imbalanced: discs 55 %, boxes 30 %, triangles 15 % of the objects), or CamVid
read in place (``images/{train,val}``, ``labels/{train,val}``; never copied). Writes
``<out>/results.csv`` (dataset, algorithm, seed, round, labelled, mIoU) and ``<out>/learning_curve.png``
(mean mIoU over seeds against labelled images), and prints the mean curves.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mirseg.config import MineConfig, TrainConfig, build_config  # noqa: E402
from mirseg.data.images import write_image  # noqa: E402
from mirseg.data.synthetic import make_dataset  # noqa: E402
from mirseg.fileio import AtomicFile, write_atomic  # noqa: E402
from mirseg.infer import load_predictor  # noqa: E402
from mirseg.mine import mine  # noqa: E402
from mirseg.mining import ALGORITHMS  # noqa: E402
from mirseg.train import train  # noqa: E402

CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
                  "pedestrian", "bicyclist"]


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
                   train=dict(crop_size=[64, 64], img_scale=[128, 96], samples_per_gpu=8, lr=0.12, lr_scaling="none"),
                   mine=dict(max_superpixel_per_image=128, superpixel_cell=0))


def camvid(root: Path) -> Dataset:
    if not (root / "images" / "train").is_dir() or not (root / "labels" / "val").is_dir():
        raise SystemExit(f"{root} is not the CamVid folder (images/{{train,val}}, labels/{{train,val}}); see --data")
    pool = sorted(str(p) for p in (root / "images" / "train").glob("*.jpg"))
    return Dataset("camvid", pool, root / "labels" / "train", root / "images" / "val", root / "labels" / "val",
                   CAMVID_CLASSES,
                   train=dict(crop_size=[192, 256], img_scale=[480, 360], samples_per_gpu=8, lr=0.12,
                              lr_scaling="none"),
                   mine=dict(max_superpixel_per_image=512, superpixel_cell=0))


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


def simulate(data: Dataset, algorithms: list[str], seeds: list[int], rounds: int, initial: int, batch: int,
             iters: int, work: Path) -> list[dict]:
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        start = sorted(rng.choice(data.pool, size=initial, replace=False).tolist())
        t0 = time.perf_counter()
        ckpt0, miou0 = fit(data, start, work / f"s{seed}" / "round0", iters, seed)
        print(f"seed {seed} round 0: {initial} labelled, mIoU {miou0:.4f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        for algorithm in algorithms:
            rows.append(dict(dataset=data.name, algorithm=algorithm, seed=seed, round=0, labelled=initial,
                             mIoU=round(miou0, 4)))
            labelled, ckpt = list(start), ckpt0
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


def mean_curves(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """algorithm -> [(labelled, mean mIoU over seeds)], in round order."""
    curves: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        curves.setdefault(r["algorithm"], {}).setdefault(r["labelled"], []).append(r["mIoU"])
    return {a: [(n, float(np.mean(v))) for n, v in sorted(c.items())] for a, c in curves.items()}


# Colours (BGR) per algorithm; random is drawn dashed-grey so the baseline stands out.
_COLOURS = {"rsal": (40, 40, 220), "ripu": (200, 120, 0), "entropy": (40, 160, 40), "margin": (160, 40, 160),
            "least_confidence": (0, 150, 200), "random": (110, 110, 110)}


def plot(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """A learning-curve PNG with OpenCV (no matplotlib here): mIoU against labelled images."""
    w, h, left, right, top, bottom = 760, 480, 70, 190, 40, 55
    img = np.full((h, w, 3), 255, np.uint8)
    xs = [n for c in curves.values() for n, _ in c]
    ys = [m for c in curves.values() for _, m in c]
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
    for i, (name, curve) in enumerate(curves.items()):
        colour = _COLOURS.get(name, (0, 0, 0))
        points = [px(n, m) for n, m in curve]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--camvid", action="store_true", help="CamVid instead of generated data")
    parser.add_argument("--data", default="/work/shared/data/camvid", help="CamVid folder (read in place)")
    parser.add_argument("--pool", type=int, default=64, help="generated: pool size (default 64)")
    parser.add_argument("--initial", type=int, default=4, help="labelled images at the start (default 4)")
    parser.add_argument("--batch", type=int, default=4, help="images labelled per round (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="mining rounds (default 3)")
    parser.add_argument("--iters", type=int, default=300, help="training iterations per round (default 300)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated (default: all)")
    parser.add_argument("--out", default="runs/active_learning", help="CSV and PNG go here")
    args = parser.parse_args()
    algorithms = [a.strip().lower() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        parser.error(f"unknown algorithms {unknown}; choose from {', '.join(ALGORITHMS)}")
    if "random" not in algorithms:
        algorithms.append("random")  # the baseline every curve is compared with
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")  # no per-iteration progress bars from train()
    out = Path(args.out)
    print(f"# load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; algorithms {', '.join(algorithms)}; "
          f"seeds {seeds}; {args.initial} + {args.rounds} x {args.batch} images, {args.iters} iterations per round")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mirseg-al-") as tmp_name:
        tmp = Path(tmp_name)
        data = camvid(Path(args.data)) if args.camvid else generated(tmp / "data", args.pool, seeds[0])
        rows = simulate(data, algorithms, seeds, args.rounds, args.initial, args.batch, args.iters, tmp / "work")
    out.mkdir(parents=True, exist_ok=True)
    with AtomicFile(out / "results.csv") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    curves = mean_curves(rows)
    plot(curves, out / "learning_curve.png",
         f"{data.name}: FastSCNN, {args.iters} iterations per round, mean of {len(seeds)} seed(s)")
    counts = [n for n, _ in curves["random"]]
    print("\nmean mIoU over seeds")
    print("| algorithm | " + " | ".join(str(n) for n in counts) + " | mean over rounds >= 1 | vs random |")
    print("|---|" + "---|" * (len(counts) + 2))
    base = np.mean([m for _, m in curves["random"][1:]])
    for name, curve in curves.items():
        later = np.mean([m for _, m in curve[1:]])
        print(f"| {name} | " + " | ".join(f"{m:.4f}" for _, m in curve) + f" | {later:.4f} | {later - base:+.4f} |")
    print(f"\nwrote {out / 'results.csv'} and {out / 'learning_curve.png'} "
          f"({(time.perf_counter() - t_start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
