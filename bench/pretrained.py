"""What a pretrained start buys on CamVid (train -> val) at an equal short budget; prints a markdown table.

    python bench/pretrained.py [--preset fastscnn] [--iters 500] [--source street|camvid-half]
                               [--source-iters 500] [--limit N] [--camvid ../shared/data/camvid]

No real model-zoo file can be downloaded here, so a stand-in is trained first on other data: the
generated street scenes (``--source street``, 5 classes) or CamVid train at half the resolution
(``--source camvid-half``). Its weights are written as an mmseg model-zoo checkpoint under the
preset's published file name in a temp weights folder, and the CamVid run with ``pretrained=auto``
finds it there as it would find the real file (classifiers re-initialised when the class count
differs; the log's warning that its sha256 is not the published one is expected). Against it: the
same run with ``pretrained=none``. For presets with an ImageNet backbone
(``--preset hrnet_w18s``, ...) a third row starts from the stand-in's backbone alone, written in the
ImageNet layout (no ``backbone.`` prefix, a classification head). Same seed, data, schedule and
budget for every row; test scale 480x360, crops 360x480, batch 4. Not part of the test suite
(minutes per row). CamVid's licence is research-only: it is read in place, never copied.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from camvid import CLASSES, ROOT, require  # noqa: E402  (bench/camvid.py, beside this script)
from machine import cpu_signature, load_average  # noqa: E402  (bench/machine.py)

from mirseg import pretrained  # noqa: E402
from mirseg.checkpoint import read_checkpoint  # noqa: E402
from mirseg.config import TrainConfig, build_config  # noqa: E402
from mirseg.data.synthetic import make_street_dataset  # noqa: E402
from mirseg.fileio import write_atomic  # noqa: E402
from mirseg.presets import PRESETS  # noqa: E402
from mirseg.train import train  # noqa: E402


def _list(images: Path, limit: int, out: Path) -> str:
    """The image folder, or a list file of its first ``limit`` images (a quick check of the script)."""
    if not limit:
        return str(images)
    write_atomic(out, "".join(f"{p}\n" for p in sorted(images.iterdir())[:limit]))
    return str(out)


def _run(args: argparse.Namespace, work: Path, data: dict, scale: tuple[int, int], iters: int,
         **keys) -> tuple[dict, float, str]:
    """Train ``args.preset`` for ``iters``; returns (last val metrics, s/iter, the saved pretrained value)."""
    w, h = scale
    cfg = build_config(TrainConfig, dict(
        data, config_file=args.preset, max_iters=iters, interval=iters, samples_per_gpu=args.batch,
        workers_per_gpu=args.workers, crop_size=[h, w], img_scale=[w, h], test_mode="whole", work_dir=str(work),
        log_interval=max(iters // 20, 1), seed=args.seed, **keys))
    t0 = time.perf_counter()
    result = train(cfg)
    saved = read_checkpoint(result.last)["config"]["pretrained"]
    return result.last_metrics, (time.perf_counter() - t0) / iters, saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fastscnn", choices=list(PRESETS))
    parser.add_argument("--iters", type=int, default=500, help="CamVid budget of every row")
    parser.add_argument("--source", choices=["street", "camvid-half"], default="street")
    parser.add_argument("--source-iters", type=int, default=500, help="training of the stand-in model-zoo file")
    parser.add_argument("--source-images", type=int, default=200, help="generated street scenes (--source street)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images of each split (a check)")
    parser.add_argument("--camvid", default=str(ROOT))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    root = require(Path(args.camvid), "coco")
    model = PRESETS[args.preset].model
    load = load_average()  # at the start

    with tempfile.TemporaryDirectory(prefix="mirseg-bench-pretrained-") as tmp:
        tmp = Path(tmp)
        camvid = {"class_names": CLASSES, "ignore_blank_area": True, "train_ann": str(root / "train.json"),
                  "val_ann": str(root / "val.json"),
                  "train_images": _list(root / "images" / "train", args.limit, tmp / "train.txt"),
                  "val_images": _list(root / "images" / "val", args.limit, tmp / "val.txt")}

        # 1. The stand-in for a model-zoo file.
        if args.source == "street":
            n = args.limit or args.source_images
            tr = make_street_dataset(tmp / "street" / "train", n, size=(360, 480), seed=args.seed + 100)
            va = make_street_dataset(tmp / "street" / "val", max(n // 8, 2), size=(360, 480), seed=args.seed + 200)
            source = {"train_ann": str(tr.ann), "train_images": str(tr.images), "val_ann": str(va.ann),
                      "val_images": str(va.images)}
            source_metrics, _, _ = _run(args, tmp / "source", source, (480, 360), args.source_iters,
                                        pretrained="none")
            source_name = f"generated street scenes ({n} images, {len(tr.class_names)} classes)"
        else:
            source_metrics, _, _ = _run(args, tmp / "source", camvid, (240, 180), args.source_iters,
                                        pretrained="none")
            source_name = "CamVid train at 240x180"
        state = read_checkpoint(tmp / "source" / "last.pth")["model"]
        zoo = pretrained.zoo_file(args.preset)
        zoo_dir = tmp / "weights-zoo"
        zoo_dir.mkdir()
        torch.save({"meta": {"source": source_name}, "state_dict": state}, zoo_dir / zoo.name)

        # 2. The rows: scratch, the model-zoo stand-in, and (where the preset has one) its backbone as ImageNet file.
        rows = [("scratch (pretrained=none)", "-", {"pretrained": "none"}),
                ("model-zoo stand-in (pretrained=auto)", source_name, {"weights_dir": str(zoo_dir)})]
        backbone = pretrained.imagenet_file(model)
        if backbone is not None:
            bb_dir = tmp / "weights-imagenet"
            bb_dir.mkdir()
            layout = {k[len(pretrained.PREFIX):]: v for k, v in state.items() if k.startswith(pretrained.PREFIX)}
            layout.update({f"{backbone.ignore[-1]}weight": torch.zeros(1000, 8), f"{backbone.ignore[-1]}bias":
                           torch.zeros(1000)})  # the head an ImageNet file carries, ignored on loading
            torch.save(layout, bb_dir / backbone.name)
            rows.append(("its backbone as ImageNet file (pretrained=auto)", source_name, {"weights_dir": str(bb_dir)}))
        results = []
        for label, origin, keys in rows:
            metrics, per_iter, saved = _run(args, tmp / f"run{len(results)}", camvid, (480, 360), args.iters, **keys)
            results.append((label, origin, metrics, per_iter, Path(saved.split("@")[0]).name if saved != "none"
                            else "none"))

    print(f"\n# {args.preset} on CamVid train -> val, {args.iters} iterations of batch {args.batch} per row "
          f"(seed {args.seed}{f', first {args.limit} images' if args.limit else ''})")
    print(f"# CPU: {cpu_signature()}, {os.cpu_count()} cores; load average {load} at the start"
          f"; torch {torch.__version__}")
    print(f"# stand-in: {source_name}, {args.source_iters} iterations, its own val mIoU "
          f"{source_metrics.get('mIoU', float('nan')):.4f}\n")
    print("| start | trained before on | file the run started from | val mIoU | val mAcc | val aAcc | s/iter |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for label, origin, m, per_iter, used in results:
        print(f"| {label} | {origin} | {used} | {m['mIoU']:.4f} | {m['mAcc']:.4f} | {m['aAcc']:.4f} | "
              f"{per_iter:.3f} |", flush=True)


if __name__ == "__main__":
    main()
