"""``mirseg demo``: the whole job on generated street scenes, on the CPU, in minutes.

Data: street-like scenes (sky, building, road, car, person) generated in code. The model is
trained on day scenes only; the unlabelled pool mixes day, fog and night scenes, so a good mining
algorithm should send the fog and night images to the labellers first. Steps: train FastSCNN ->
per-class IoU -> inference with overlays -> mine the pool with RSAL and random -> the same data
once through the YMIR executor in a temporary /in + /out -> SUMMARY.md and a contact sheet.

The folder's first file is the marker ``.mirseg-demo``, so a folder left by an interrupted demo is
still known as a demo's and the next run replaces it; any other non-empty folder is refused. A
failed step is written to SUMMARY.md (FAILED and the reason) and makes the command exit non-zero.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from mirseg.config import InferConfig, MineConfig, TrainConfig, build_config
from mirseg.data.images import read_image, write_image
from mirseg.data.synthetic import make_street_dataset
from mirseg.errors import EXIT_FAILED, EXIT_OK, ConfigError
from mirseg.fileio import write_atomic
from mirseg.infer import run_inference
from mirseg.mine import mine
from mirseg.train import train
from mirseg.visualize import PALETTE, colorize
from mirseg.ymir.executor import run
from mirseg.ymir.protocol import read_env
from mirseg.ymir.workspace import inference_workspace, training_workspace, ymir_coco

log = logging.getLogger("mirseg")

MARKER = ".mirseg-demo"
"""Written first into the output folder: ``mirseg demo`` may replace a folder that has it."""
SUMMARY_TITLE = "# mirseg demo"


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


@dataclass(frozen=True)
class DemoResult:
    """What a demo run left: SUMMARY.md, the contact sheet, and the steps that failed (step -> reason)."""

    summary: Path
    sheet: Path | None
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.failures else EXIT_OK


def _domain(path: str) -> str:
    return Path(path).name.split("_", 1)[0]


def _is_demo_folder(out: Path) -> bool:
    """A folder this command made: it has the marker, or (demos before the marker) its SUMMARY.md is a demo's."""
    if (out / MARKER).is_file():
        return True
    summary = out / "SUMMARY.md"
    return summary.is_file() and summary.read_text(errors="replace").startswith(SUMMARY_TITLE)


def _prepare_folder(out: Path) -> None:
    """An empty ``out`` with the marker in it; an earlier (or interrupted) demo's folder is replaced."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: pass a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        if not _is_demo_folder(out):
            raise ConfigError(f"--out {out} is not empty and is not a mirseg demo's folder (it has no {MARKER} "
                              f"file), so the demo will not delete it: pass a new or empty folder as --out, or move "
                              f"{out}'s files away yourself")
        log.info("replacing the earlier demo in %s", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # First, before anything slow: an interrupted run still leaves a folder the next run may replace.
    write_atomic(out / MARKER, "made by `mirseg demo`; the next `mirseg demo` with this --out replaces the folder\n")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_demo(out_dir: str | Path = "mirseg-demo", quick: bool = False, seed: int = 0) -> DemoResult:
    """Run the demo into ``out_dir`` (replacing an earlier demo there).

    A failed YMIR task is recorded and the demo goes on; any other failing step ends it. Either
    way SUMMARY.md says FAILED and why; an exception is re-raised after writing it.
    """
    plan = QUICK if quick else FULL
    out = Path(out_dir)
    _prepare_folder(out)
    t0 = time.perf_counter()
    steps: list[str] = []  # steps started; the last one is where an exception came from
    try:
        result = _run_steps(out, plan, seed, steps, t0)
    except BaseException as exc:  # Ctrl-C included: the folder says where the demo stopped and why
        step = steps[-1] if steps else "start"
        try:
            _failed_summary(out, step, _reason(exc) if not isinstance(exc, KeyboardInterrupt) else "interrupted")
        except OSError as write_error:  # the original error matters more than the summary
            log.warning("could not write %s: %s", out / "SUMMARY.md", write_error)
        raise
    print(_layout(out))
    seconds = time.perf_counter() - t0
    if result.failures:
        failed = "; ".join(f"{step}: {why}" for step, why in result.failures.items())
        log.error("mirseg demo: %d step(s) FAILED: %s", len(result.failures), failed)
        print(f"\nmirseg demo FAILED after {seconds:.0f} s ({', '.join(result.failures)}): read {result.summary}")
    else:
        print(f"\nmirseg demo finished in {seconds:.0f} s: read {result.summary}")
    return result


def _run_steps(out: Path, plan: Plan, seed: int, steps: list[str], t0: float) -> DemoResult:
    h, w = plan.size
    steps.append("1/6 data")
    log.info("demo 1/6: generating street scenes (%dx%d) in %s", h, w, out / "data")
    train_set = make_street_dataset(out / "data" / "train", plan.train, plan.size, seed=seed, prefix="train")
    val_set = make_street_dataset(out / "data" / "val", plan.val, plan.size, seed=seed + 1, prefix="val",
                                  labels=True)
    pool = make_street_dataset(out / "data" / "pool", plan.pool, plan.size, seed=seed + 2, prefix="pool",
                               domains={"day": 0.5, "fog": 0.25, "night": 0.25})

    steps.append("2/6 training")
    log.info("demo 2/6: training FastSCNN for %d iterations on %d day scenes", plan.iters, plan.train)
    cfg = build_config(TrainConfig, dict(
        config_file="fastscnn", train_ann=str(train_set.ann), train_images=str(train_set.images),
        val_ann=str(val_set.ann), val_images=str(val_set.images), crop_size=[plan.crop, plan.crop],
        img_scale=[w, h], samples_per_gpu=8, workers_per_gpu=0, lr=0.12, lr_scaling="none", max_iters=plan.iters,
        interval=max(plan.iters // 2, 1), work_dir=str(out / "train"), device="cpu", seed=seed,
        pretrained="none"))  # the same run on every machine, whatever weights it has downloaded
    result = train(cfg)
    checkpoint = result.best or result.last

    steps.append("3/6 inference")
    log.info("demo 3/6: inference on the validation scenes, with overlays")
    infer = run_inference(build_config(InferConfig, dict(
        checkpoint=str(checkpoint), images=str(val_set.images), out_dir=str(out / "infer"), workers_per_gpu=0,
        device="cpu", save_color=True, save_overlay=True)))

    steps.append("4/6 mining")
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

    steps.append("5/6 YMIR executor")
    log.info("demo 5/6: the same data through the YMIR executor (temporary /in and /out)")
    ymir = _run_ymir(out / "ymir", train_set, val_set, pool, plan, checkpoint)

    steps.append("6/6 contact sheet and summary")
    log.info("demo 6/6: contact sheet and summary")
    sheet = _contact_sheet(out, val_set, mined["rsal"], keep, result.class_names)
    summary = _summary(out, plan, result, infer, mined, origins, keep, ymir, sheet, time.perf_counter() - t0)
    failures = {f"YMIR {task}": why for task, why in ymir.items() if why != "ok"}
    return DemoResult(summary, sheet, failures)


def _ymir_status(env: Path, rc: int) -> str:
    """"ok", or the reason the task failed: the error text the executor left in monitor.txt."""
    if rc == 0:
        return "ok"
    monitor = read_env(env).monitor_file
    lines = monitor.read_text(errors="replace").splitlines()[1:] if monitor.is_file() else []
    return " ".join(line.strip() for line in lines if line.strip()) or f"exit code {rc} (see the log above)"


def _run_ymir(root: Path, train_set, val_set, pool, plan: Plan, checkpoint: Path) -> dict[str, str]:
    """A YMIR training task and a mining + inference task on the demo data: task -> "ok" or why it failed."""
    images = root / "source"
    coco = ymir_coco([(train_set.ann, train_set.images), (val_set.ann, val_set.images)], train_set.class_names,
                     images)
    val_names = [p.name for p in sorted(val_set.images.iterdir())]
    env = training_workspace(root / "training", coco, images, val_names, train_set.class_names, {
        "max_iters": plan.ymir_iters, "interval": plan.ymir_iters, "samples_per_gpu": 4, "workers_per_gpu": 0,
        "pretrained": "none",
        "cfg_options": f"crop_size=[{plan.crop},{plan.crop}] img_scale=[{plan.size[1]},{plan.size[0]}]"})
    status = {"training": _ymir_status(env, run(env))}
    candidates = sorted(pool.images.iterdir())
    env = inference_workspace(root / "mining_infer", [checkpoint, checkpoint.parent / "config.yaml"], candidates,
                              train_set.class_names, config={"workers_per_gpu": 0, "max_superpixel_per_image": 256})
    status["mining+infer"] = _ymir_status(env, run(env))
    return status


def _fit(image: np.ndarray, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    return cv2.resize(image, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_NEAREST)


# Text on the contact sheet: OpenCV's Hershey font, dark grey on white.
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.45
INK = (40, 40, 40)
TITLE_BAND = 24  # px: the band of column titles above each group of rows
SWATCH = 14  # px: side of a legend colour swatch
LEGEND_LINE = 24  # px: height of one line of the legend
VAL_TITLES = ("validation image", "ground truth", "prediction (overlay)")
MINED_TITLES = ("pool image (RSAL's top picks)", "superpixels to label", "picks on the image")


def _text_width(text: str) -> int:
    return cv2.getTextSize(text, FONT, FONT_SCALE, 1)[0][0]


def _put(image: np.ndarray, text: str, x: int, baseline: int) -> None:
    cv2.putText(image, text, (x, baseline), FONT, FONT_SCALE, INK, 1, cv2.LINE_AA)


def _title_band(titles: Sequence[str], column_width: int) -> np.ndarray:
    """(TITLE_BAND, len(titles) * column_width, 3) white band with each title centred over its column."""
    band = np.full((TITLE_BAND, column_width * len(titles), 3), 255, np.uint8)
    for i, title in enumerate(titles):
        x = i * column_width + max((column_width - _text_width(title)) // 2, 2)
        _put(band, title, x, TITLE_BAND - 8)
    return band


def _legend(class_names: Sequence[str], width: int) -> np.ndarray:
    """(n * LEGEND_LINE, width, 3) white band: "classes:" then a swatch of PALETTE[k] and the name of class k,
    wrapped onto more lines when they do not fit the width."""
    items = [("classes (ground truth, prediction):", None)] + [(n, k) for k, n in enumerate(class_names)]
    placed: list[tuple[int, int, str, int | None]] = []  # (line, x, text, class index or None)
    line, x = 0, 8
    for text, k in items:
        need = (SWATCH + 6 if k is not None else 0) + _text_width(text)
        if x > 8 and x + need > width - 8:
            line, x = line + 1, 8
        placed.append((line, x, text, k))
        x += need + 18
    band = np.full(((line + 1) * LEGEND_LINE, width, 3), 255, np.uint8)
    for line, x, text, k in placed:
        top = line * LEGEND_LINE + (LEGEND_LINE - SWATCH) // 2
        if k is not None:
            # A grey frame around the swatch so black (background) and light colours show on white.
            cv2.rectangle(band, (x - 1, top - 1), (x + SWATCH, top + SWATCH), (150, 150, 150), 1)
            band[top:top + SWATCH, x:x + SWATCH] = PALETTE[k]
            x += SWATCH + 6
        _put(band, text, x, top + SWATCH - 2)
    return band


def _contact_sheet(out: Path, val_set, rsal, keep: int, class_names: Sequence[str], width: int = 256) -> Path:
    """Validation rows [image | ground truth | prediction overlay], then the top RSAL picks [image | chosen
    superpixels | picks on the image]; each group under a band of column titles, the class legend at the bottom."""
    def row(images: Sequence[np.ndarray]) -> np.ndarray:
        return np.pad(np.concatenate([_fit(x, width) for x in images], 1), ((2, 2), (0, 0), (0, 0)),
                      constant_values=255)

    parts = [_title_band(VAL_TITLES, width)]
    for p in sorted(val_set.images.iterdir())[:3]:
        truth = colorize(cv2.imread(str(val_set.labels / p.name), cv2.IMREAD_GRAYSCALE))
        parts.append(row([read_image(p), truth, read_image(out / "infer" / "overlay" / f"{p.stem}.jpg")]))
    parts.append(_title_band(MINED_TITLES, width))
    for path, _ in rsal.ranking[:min(keep, 3)]:
        stem = Path(path).stem
        picture = out / "mine" / "rsal" / "overlays" / f"{stem}.jpg"
        mask = out / "mine" / "rsal" / "masks" / f"{stem}.png"
        image = read_image(path)
        chosen = read_image(picture) if picture.is_file() else image
        regions = np.repeat(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)[..., None], 3, 2) if mask.is_file() \
            else np.zeros_like(image)
        parts.append(row([image, regions, chosen]))
    parts.append(_legend(class_names, 3 * width))
    path = out / "contact_sheet.png"
    write_image(path, np.concatenate(parts, 0))
    return path


def _failed_summary(out: Path, step: str, reason: str) -> Path:
    """SUMMARY.md of a demo that stopped at ``step``."""
    path = out / "SUMMARY.md"
    write_atomic(path, f"{SUMMARY_TITLE}\n\n**FAILED** at step {step}: {reason}\n\nThe outputs of the earlier steps "
                 "are in this folder. Fix the cause and run `mirseg demo` again with the same `--out`: it replaces "
                 "this folder.\n")
    return path


def _summary(out: Path, plan: Plan, result, infer, mined, origins, keep: int, ymir: dict[str, str], sheet: Path,
             seconds: float) -> Path:
    m = result.best_metrics or result.last_metrics
    failed = [task for task, status in ymir.items() if status != "ok"]
    lines = [SUMMARY_TITLE, ""]
    if failed:
        lines += [f"**FAILED**: YMIR {' and '.join(failed)}, see [YMIR executor](#ymir-executor).", ""]
    lines += [f"Generated street scenes {plan.size[1]}x{plan.size[0]}; FastSCNN trained {plan.iters} iterations on "
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
              "`mine/rsal/overlays/`.", "", "## YMIR executor", ""]
    lines += [f"- {task}: ok (`ymir/`)" if status == "ok" else f"- {task}: **FAILED**: {status} (`ymir/`)"
              for task, status in ymir.items()]
    lines += ["", "## Contact sheet", "", f"`{sheet.name}`: three validation scenes (image, ground truth, prediction), "
              "then the top RSAL picks (image, chosen superpixels, picks on the image), each group under its column "
              "titles; the class colours are in the legend at the bottom.", ""]
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
