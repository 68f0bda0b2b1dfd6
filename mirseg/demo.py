"""``mirseg demo``: the whole job on generated street scenes, on the CPU, in minutes.

Data: street-like scenes (sky, building, road, car, person) generated in code. The model is
trained on day scenes only; the unlabelled pool mixes day, fog and night scenes, so a good mining
algorithm should send the fog and night images to the labellers first. Steps: train FastSCNN ->
per-class IoU -> inference with overlays -> mine the pool with RSAL and random -> the same data
once through the YMIR executor in a temporary /in + /out -> SUMMARY.md and a contact sheet.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mirseg.data.images import write_image
from mirseg.fileio import write_atomic

log = logging.getLogger("mirseg")


@dataclass(frozen=True)
class Plan:
    """How big the demo is."""

    size: tuple[int, int]  # (h, w) of the generated scenes
    crop: int  # square training crop
    train: int  # labelled day scenes
    val: int  # validation day scenes
    pool: int  # unlabelled scenes: half day, a quarter fog, a quarter night
    iters: int  # training iterations
    ymir_iters: int  # iterations of the YMIR training run


QUICK = Plan(size=(64, 128), crop=64, train=16, val=6, pool=16, iters=120, ymir_iters=8)
FULL = Plan(size=(128, 256), crop=128, train=60, val=12, pool=120, iters=1200, ymir_iters=30)


def toy_fastscnn(root: str | Path) -> tuple[Path, object, object, dict]:
    """A FastSCNN trained in ~15 s on generated shapes (background, disc, box; 96x128): for tests and docs.

    Returns (best checkpoint, train SyntheticSet, val SyntheticSet, best metrics).
    """
    from mirseg.config import TrainConfig, build_config
    from mirseg.data.synthetic import make_dataset
    from mirseg.train import train

    root = Path(root)
    tr = make_dataset(root / "train", 24, num_classes=2, seed=1, labels=True)
    va = make_dataset(root / "val", 8, num_classes=2, seed=2, labels=True)
    cfg = build_config(TrainConfig, dict(
        train_ann=str(tr.ann), train_images=str(tr.images), val_ann=str(va.ann), val_images=str(va.images),
        crop_size=[64, 64], img_scale=[128, 96], samples_per_gpu=8, workers_per_gpu=0, lr=0.12, scale_lr=False,
        max_iters=300, interval=300, work_dir=str(root / "run")))
    result = train(cfg)
    return Path(result.best), tr, va, result.best_metrics


def _domain(path: str) -> str:
    return Path(path).name.split("_", 1)[0]


def run_demo(out_dir: str | Path = "mirseg-demo", quick: bool = False, seed: int = 0) -> Path:
    """Run the demo into ``out_dir`` (replacing an earlier demo there); returns the SUMMARY.md path."""
    from mirseg.config import InferConfig, MineConfig, TrainConfig, build_config
    from mirseg.data.synthetic import make_street_dataset
    from mirseg.infer import run_inference
    from mirseg.mine import mine
    from mirseg.train import train

    plan = QUICK if quick else FULL
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not (out / "SUMMARY.md").is_file():
            raise ValueError(f"{out} exists and is not an earlier demo's folder: choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    h, w = plan.size

    log.info("demo 1/6: generating street scenes (%dx%d) in %s", h, w, out / "data")
    train_set = make_street_dataset(out / "data" / "train", plan.train, plan.size, seed=seed, prefix="train")
    val_set = make_street_dataset(out / "data" / "val", plan.val, plan.size, seed=seed + 1, prefix="val",
                                  labels=True)
    pool = make_street_dataset(out / "data" / "pool", plan.pool, plan.size, seed=seed + 2, prefix="pool",
                               domains={"day": 0.5, "fog": 0.25, "night": 0.25})

    log.info("demo 2/6: training FastSCNN for %d iterations on %d day scenes", plan.iters, plan.train)
    cfg = build_config(TrainConfig, dict(
        config_file="fastscnn", train_ann=str(train_set.ann), train_images=str(train_set.images),
        val_ann=str(val_set.ann), val_images=str(val_set.images), crop_size=[plan.crop, plan.crop],
        img_scale=[w, h], samples_per_gpu=8, workers_per_gpu=0, lr=0.12, scale_lr=False, max_iters=plan.iters,
        interval=max(plan.iters // 2, 1), work_dir=str(out / "train"), device="cpu", seed=seed))
    result = train(cfg)
    checkpoint = result.best or result.last

    log.info("demo 3/6: inference on the validation scenes, with overlays")
    infer = run_inference(build_config(InferConfig, dict(
        checkpoint=str(checkpoint), images=str(val_set.images), out_dir=str(out / "infer"), workers_per_gpu=0,
        device="cpu", save_color=True, save_overlay=True)))

    log.info("demo 4/6: mining %d pool scenes with RSAL and random", plan.pool)
    keep = max(plan.pool // 4, 1)
    mined = {}
    for algorithm in ("rsal", "random"):
        mined[algorithm] = mine(build_config(MineConfig, dict(
            checkpoint=str(checkpoint), images=str(pool.images), out_dir=str(out / "mine" / algorithm),
            mining_algorithm=algorithm, max_superpixel_per_image=256, max_kept_mining_image=keep,
            workers_per_gpu=0, device="cpu", seed=seed, save_masks=algorithm == "rsal")))
    origins = {a: Counter(_domain(p) for p, _ in r.ranking[:keep]) for a, r in mined.items()}
    lines = [f"  {a:7s} top {keep}: " + ", ".join(f"{origins[a].get(d, 0)} {d}" for d in ("day", "fog", "night"))
             for a in mined]
    log.info("where the images to label next come from (the model saw only day scenes):\n%s", "\n".join(lines))

    log.info("demo 5/6: the same data through the YMIR executor (temporary /in and /out)")
    ymir = _run_ymir(out / "ymir", train_set, val_set, pool, plan, checkpoint)

    log.info("demo 6/6: contact sheet and summary")
    sheet = _contact_sheet(out, val_set, mined["rsal"], keep)
    summary = _summary(out, plan, result, infer, mined, origins, keep, ymir, sheet, time.perf_counter() - t0)
    print(_layout(out))
    print(f"\nmirseg demo finished in {time.perf_counter() - t0:.0f} s: read {summary}")
    return summary


def _run_ymir(root: Path, train_set, val_set, pool, plan: Plan, checkpoint: Path) -> dict[str, str]:
    """A YMIR training task and a mining + inference task on the demo data; returns what each produced."""
    from mirseg.ymir.executor import run
    from mirseg.ymir.workspace import inference_workspace, training_workspace, ymir_coco

    images = root / "source"
    coco = ymir_coco([(train_set.ann, train_set.images), (val_set.ann, val_set.images)], train_set.class_names,
                     images)
    val_names = [p.name for p in sorted(val_set.images.iterdir())]
    env = training_workspace(root / "training", coco, images, val_names, train_set.class_names, {
        "max_iters": plan.ymir_iters, "interval": plan.ymir_iters, "samples_per_gpu": 4, "workers_per_gpu": 0,
        "cfg_options": f"crop_size=[{plan.crop},{plan.crop}] img_scale=[{plan.size[1]},{plan.size[0]}]"})
    status = {"training": "ok" if run(env) == 0 else "FAILED"}
    candidates = sorted(pool.images.iterdir())
    env = inference_workspace(root / "mining_infer", [checkpoint, checkpoint.parent / "config.yaml"], candidates,
                              train_set.class_names, config={"workers_per_gpu": 0, "max_superpixel_per_image": 256})
    status["mining+infer"] = "ok" if run(env) == 0 else "FAILED"
    return status


def _fit(image: np.ndarray, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    return cv2.resize(image, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_NEAREST)


def _contact_sheet(out: Path, val_set, rsal, keep: int, width: int = 256) -> Path:
    """Rows of [image | ground truth | prediction overlay] for validation, then mined pool images."""
    from mirseg.data import read_image
    from mirseg.visualize import colorize

    rows = []
    for p in sorted(val_set.images.iterdir())[:3]:
        image = read_image(p)
        truth = colorize(cv2.imread(str(val_set.labels / p.name), cv2.IMREAD_GRAYSCALE))
        overlay = read_image(out / "infer" / "overlay" / f"{p.stem}.jpg")
        rows.append(np.concatenate([_fit(x, width) for x in (image, truth, overlay)], 1))
    for path, _ in rsal.ranking[:min(keep, 3)]:
        stem = Path(path).stem
        picture = out / "mine" / "rsal" / "overlays" / f"{stem}.jpg"
        mask = out / "mine" / "rsal" / "masks" / f"{stem}.png"
        image = read_image(path)
        chosen = read_image(picture) if picture.is_file() else image
        regions = np.repeat(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)[..., None], 3, 2) if mask.is_file() \
            else np.zeros_like(image)
        rows.append(np.concatenate([_fit(x, width) for x in (image, regions, chosen)], 1))
    sheet = np.concatenate([np.pad(r, ((2, 2), (0, 0), (0, 0)), constant_values=255) for r in rows], 0)
    path = out / "contact_sheet.png"
    write_image(path, sheet)
    return path


def _summary(out: Path, plan: Plan, result, infer, mined, origins, keep: int, ymir: dict[str, str], sheet: Path,
             seconds: float) -> Path:
    m = result.best_metrics or result.last_metrics
    lines = ["# mirseg demo", "",
             f"Generated street scenes {plan.size[1]}x{plan.size[0]}; FastSCNN trained {plan.iters} iterations on "
             f"{plan.train} day scenes, on the CPU, in a {seconds:.0f} s run.", "",
             "## Validation (day scenes)", "", "| class | IoU |", "| --- | --- |"]
    lines += [f"| {n} | {iou:.3f} |" for n, iou in zip(result.class_names, m.get("IoU", []))]
    lines += [f"| **mean** | **{m.get('mIoU', float('nan')):.3f}** |", "",
              f"mAcc {m.get('mAcc', float('nan')):.3f}, aAcc {m.get('aAcc', float('nan')):.3f}. "
              f"Checkpoints: `train/`.", "",
              "## Inference", "", f"{infer.num_images} validation images -> `infer/` (labels, color, overlay, "
              "predictions.json in COCO RLE).", "",
              "## Mining: which pool images to label next", "",
              f"The pool has {plan.pool} unlabelled scenes: half day, a quarter fog, a quarter night. The model "
              f"has seen only day scenes, so the fog and night scenes are where labels help most. The top {keep}:",
              "", "| algorithm | day | fog | night |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {c.get('day', 0)} | {c.get('fog', 0)} | {c.get('night', 0)} |" for a, c in origins.items()]
    lines += ["", "Rankings: `mine/<algorithm>/result.tsv`; RSAL's chosen superpixels: `mine/rsal/masks/`, "
              "`mine/rsal/overlays/`.", "",
              "## YMIR executor", "", *[f"- {task}: {status} (`ymir/`)" for task, status in ymir.items()], "",
              "## Contact sheet", "", f"`{sheet.name}`: three validation scenes (image, ground truth, prediction), "
              "then the top RSAL picks (image, chosen superpixels, overlay).", ""]
    path = out / "SUMMARY.md"
    write_atomic(path, "\n".join(lines))
    return path


def _layout(out: Path, depth: int = 2) -> str:
    """The output folder as an indented tree, folders with their file counts."""
    lines = [f"{out}/"]

    def walk(folder: Path, level: int) -> None:
        for p in sorted(folder.iterdir()):
            if p.is_dir():
                count = sum(1 for f in p.rglob("*") if f.is_file())
                lines.append(f"{'  ' * level}{p.name}/  ({count} files)")
                if level < depth:
                    walk(p, level + 1)
            elif level == 1:
                lines.append(f"{'  ' * level}{p.name}")

    walk(out, 1)
    return "\n".join(lines)
