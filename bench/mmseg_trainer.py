"""mmsegmentation 0.27's own trainer on CamVid, timed per iteration as the reference of ``bench/train_camvid.py``
(``--reference-python``); run by it, in the reference's virtual environment (``bench/mmseg_env.sh`` makes one).

    <reference venv>/bin/python bench/mmseg_trainer.py --config configs/fastscnn/fast_scnn_...py \
        --camvid DIR --iters 60 --batch 4 --workers 2 --threads 2 --work-dir DIR

What ``tools/train.py`` would run, on the CPU: the config's network (SyncBN made BN, 11 classes, random weights),
optimizer and lr policy, an ``IterBasedRunner`` of ``--iters`` iterations with no evaluation and no checkpoint,
and mmseg's Cityscapes training pipeline at CamVid's scale (resize of 480x360 by a ratio in [0.5, 2], random crop
360x480 with cat_max_ratio 0.75, flip, photometric distortion, normalise, pad), ``--batch`` images per iteration
from ``--workers`` loader processes (``setup_multi_processes`` first, as ``tools/train.py`` does), this process's
torch threads set to ``--threads``. Prints one JSON line: ``s_per_iter``, the median over the log intervals after
the first of mmcv's ``time`` (seconds per iteration, data loading included), and ``data_time`` likewise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from mmseg_reference import plain_bn, stand_ins  # beside this script

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
NUM_CLASSES = 11
INTERVAL = 10


def with_classes(head: object) -> object:
    """A decode or auxiliary head config (or a list of them) with CamVid's class count."""
    if isinstance(head, list):
        return [with_classes(h) for h in head]
    return {**head, "num_classes": NUM_CLASSES} if isinstance(head, dict) else head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="mmseg config path under its packaged configs/")
    parser.add_argument("--camvid", required=True, type=Path, help="images/{train,val} and labels/{train,val}")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", required=True, type=Path)
    args = parser.parse_args()
    stand_ins()
    import mmseg
    from mmcv import Config, ConfigDict
    from mmseg.apis import train_segmentor
    from mmseg.datasets import build_dataset
    from mmseg.models import build_segmentor
    from mmseg.utils import setup_multi_processes

    cfg = Config.fromfile(str(Path(mmseg.__file__).parent / ".mim" / args.config))
    model_cfg = plain_bn(cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model))
    model_cfg.update(pretrained=None, decode_head=with_classes(model_cfg["decode_head"]))
    if model_cfg.get("auxiliary_head"):
        model_cfg["auxiliary_head"] = with_classes(model_cfg["auxiliary_head"])
    model_cfg.get("backbone", {}).pop("init_cfg", None)
    crop = (360, 480)
    pipeline = [
        dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"),
        dict(type="Resize", img_scale=(480, 360), ratio_range=(0.5, 2.0)),
        dict(type="RandomCrop", crop_size=crop, cat_max_ratio=0.75), dict(type="RandomFlip", prob=0.5),
        dict(type="PhotoMetricDistortion"), dict(type="Normalize", mean=MEAN, std=STD, to_rgb=True),
        dict(type="Pad", size=crop, pad_val=0, seg_pad_val=255), dict(type="DefaultFormatBundle"),
        dict(type="Collect", keys=["img", "gt_semantic_seg"])]
    classes = tuple(f"class{i}" for i in range(NUM_CLASSES))
    train_data = dict(type="CustomDataset", data_root=str(args.camvid), img_dir="images/train",
                      ann_dir="labels/train", img_suffix=".jpg", seg_map_suffix=".png", classes=classes,
                      palette=[[i * 20] * 3 for i in range(NUM_CLASSES)], pipeline=pipeline)
    cfg.model = ConfigDict(model_cfg)
    cfg.data = ConfigDict(samples_per_gpu=args.batch, workers_per_gpu=args.workers, train=train_data)
    cfg.runner = dict(type="IterBasedRunner", max_iters=args.iters)
    cfg.checkpoint_config = dict(by_epoch=False, interval=10 ** 9, save_last=False)
    cfg.log_config = dict(interval=INTERVAL, hooks=[dict(type="TextLoggerHook", by_epoch=False)])
    cfg.workflow = [("train", 1)]
    cfg.work_dir = str(args.work_dir)
    cfg.gpu_ids, cfg.device, cfg.seed = [0], "cpu", 0
    cfg.resume_from, cfg.load_from = None, None
    setup_multi_processes(cfg)
    torch.set_num_threads(args.threads)
    model = build_segmentor(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    model.init_weights()
    dataset = build_dataset(cfg.data.train)
    timestamp = time.strftime("%Y%m%d_%H%M%S", time.localtime())
    train_segmentor(model, dataset, cfg, distributed=False, validate=False, timestamp=timestamp)
    lines = [json.loads(line) for line in (args.work_dir / f"{timestamp}.log.json").read_text().splitlines()]
    logged = [rec for rec in lines if rec.get("mode") == "train"][1:]  # the first interval: warm-up
    if not logged:
        sys.exit(f"--iters {args.iters}: too few iterations to time; give at least {2 * INTERVAL}")
    print(json.dumps({"s_per_iter": statistics.median(r["time"] for r in logged),
                      "data_time": statistics.median(r["data_time"] for r in logged),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
