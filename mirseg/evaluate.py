"""Evaluation: a network's confusion matrix and mIoU on labelled data, scored as ``mirseg infer`` predicts.

``mirseg eval`` (:func:`evaluate_checkpoint`) and training's periodic evaluation (:func:`evaluate`,
:func:`log_predictions`) go from a normalised image to the original-size label map through the
one prediction path of :mod:`mirseg.predict` (probabilities at the working size, then
``label_map``), so they score exactly the label PNGs ``mirseg infer`` writes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mirseg import dist
from mirseg.checkpoint import CHECKPOINT_FORMAT, CheckpointError, read_checkpoint, user_classes
from mirseg.config import TrainConfig
from mirseg.data.dataset import DatasetError, SegDataset
from mirseg.data.images import read_image_size
from mirseg.data.sources import load_split
from mirseg.data.transforms import EvalTransform
from mirseg.errors import ConfigError
from mirseg.metrics import ConfusionMatrix
from mirseg.models import build_model
from mirseg.predict import label_map, predict_batch, prepare_for_inference
from mirseg.visualize import colorize

log = logging.getLogger("mirseg")


def _predict_label(net: nn.Module, image: torch.Tensor, size: tuple[int, int], cfg: TrainConfig,
                   rt: dist.Runtime) -> torch.Tensor:
    """The label map ``(H, W)`` at ``size`` of a normalised ``(3, h, w)`` image at the test scale: the
    probabilities at the working size (``predict_batch``), then ``label_map``, as ``mirseg infer`` writes it."""
    proba = predict_batch(net, [image[None].to(rt.device)], tuple(image.shape[-2:]), cfg.test_mode, cfg.slide_crop,
                          cfg.slide_stride)  # (1, C, h, w)
    return label_map(proba[0], size)[0]


def confusion(model: nn.Module, dataset: SegDataset, cfg: TrainConfig, rt: dist.Runtime, num_classes: int,
              max_images: int | None = None) -> ConfusionMatrix:
    """The confusion matrix on ``dataset`` at each image's original resolution, summed over the process group.

    Images are resized to the test scale for the network; the probabilities go back to the label's
    size (bilinear) before the argmax, the one path of ``mirseg infer`` (:mod:`mirseg.predict`). In a
    process group each process takes every world_size-th image.
    """
    cm = ConfusionMatrix(num_classes)
    indices = range(rt.rank, len(dataset) if max_images is None else min(max_images, len(dataset)), rt.world_size)
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    for i in indices:
        image, label = dataset[i]  # (3, h, w) float, (H, W) int64 at the original size
        cm.update(_predict_label(net, image, tuple(label.shape[-2:]), cfg, rt).cpu(), label)
    cm.mat = dist.all_reduce_sum(cm.mat.clone(), rt).cpu()  # the sum over processes (this one's included once)
    return cm


def evaluate(model: nn.Module, dataset: SegDataset, cfg: TrainConfig, rt: dist.Runtime, num_classes: int,
             max_images: int | None = None) -> dict[str, Any]:
    """mIoU/mAcc/aAcc and per-class IoU on ``dataset`` at each image's original resolution (:func:`confusion`)."""
    return confusion(model, dataset, cfg, rt, num_classes, max_images).compute()


def print_table(class_names: list[str], metrics: dict[str, Any]) -> None:
    width = max(len(n) for n in class_names) + 2
    lines = [f"{'class':<{width}}{'IoU':>8}{'Acc':>8}"]
    for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"]):
        lines.append(f"{name:<{width}}{iou * 100:8.2f}{acc * 100:8.2f}")
    lines.append(f"{'mean':<{width}}{metrics['mIoU'] * 100:8.2f}{metrics['mAcc'] * 100:8.2f}"
                 f"   aAcc {metrics['aAcc'] * 100:.2f}")
    log.info("per-class results:\n%s", "\n".join(lines))


def log_predictions(writer: Any, net: nn.Module, val_set: SegDataset, cfg: TrainConfig, rt: dist.Runtime,
                     step: int, count: int = 3) -> None:
    """A few validation images with ground truth and prediction side by side, as TensorBoard images."""
    for i in range(min(count, len(val_set))):
        image, label = val_set.load(i)  # (H, W, 3) uint8, (H, W) uint8
        tensor, _ = val_set[i]
        pred = _predict_label(net, tensor, label.shape, cfg, rt).cpu().numpy().astype(np.uint8)
        panel = np.concatenate([image, colorize(label), colorize(pred)], axis=1)
        writer.add_image(f"val/{i}", panel, step, dataformats="HWC")


def evaluate_checkpoint(checkpoint: str | Path, cfg: TrainConfig) -> dict[str, Any]:
    """Evaluate a mirseg checkpoint on ``cfg``'s validation data; prints the per-class table.

    The network is prepared as ``mirseg infer`` runs it (:func:`mirseg.predict.prepare_for_inference`),
    so the scores are those of the label maps ``mirseg infer`` writes. Returns the metrics and
    ``"confusion"``, the confusion matrix as rows (ground truth) of columns (prediction).
    """
    ckpt = read_checkpoint(checkpoint, cfg.trust_checkpoint)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{checkpoint} is not a mirseg checkpoint (it has no class names): evaluate a "
                              "best.pth / last.pth written by `mirseg train`")
    class_names = list(ckpt["class_names"])
    rt = dist.setup(cfg.device)
    names = tuple(class_names) if cfg.val_labels else user_classes(ckpt, str(checkpoint))
    split = load_split(dataclasses.replace(cfg, class_names=names), "val")
    if not split.samples:
        raise ConfigError("nothing to evaluate: give val_ann + val_images (COCO) or val_images + val_labels")
    # img_scale=auto: the median size of the images evaluated here, as training fits its own (headers only)
    sizes = [read_image_size(s.image_path) for s in split.samples] if cfg.img_scale == "auto" else []
    cfg = cfg.resolved(sizes)
    if sizes and rt.is_main:
        log.info("img_scale %s (w, h): the median size of the %d images evaluated (img_scale=auto)",
                 list(cfg.img_scale), len(sizes))
    if split.class_names != class_names:
        raise DatasetError(f"the data's classes {split.class_names} differ from the checkpoint's {class_names}")
    model = build_model(ckpt["arch"], len(class_names))
    model.load_state_dict(ckpt["model"])
    model = prepare_for_inference(model.to(rt.device))
    dataset = SegDataset(split.samples, EvalTransform(scale=cfg.img_scale), seed=cfg.seed)
    cm = confusion(model, dataset, cfg, rt, len(class_names))
    metrics = cm.compute()
    if rt.is_main:
        print_table(class_names, metrics)
    return {**metrics, "confusion": cm.mat.tolist()}
