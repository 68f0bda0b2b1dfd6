"""The correctness runs of bench/gpu_check.py (sections c, d, e), each returning what it measured.

* :func:`agreement`: a FastSCNN trained briefly on generated shapes (the tests' toy training, tests/toy.py),
  its labels over a generated pool (``mirseg infer``'s path) and its RSAL and entropy rankings (``mirseg mine``)
  with and without autocast.
* :func:`resume_curves`: the loss curves of 20 iterations run through and of the same run stopped by a real
  SIGTERM at iteration 10 and resumed.
* :func:`ymir_tasks`: a YMIR training, mining and inference task, each run as the platform runs it (``python -m
  mirseg.ymir --env in/env.yaml`` in a subprocess, the /in tree of :mod:`mirseg.ymir.workspace`), with
  ``gpu_count: 1`` on CUDA and ``gpu_count: 0`` on the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from machine import amp_labels, pixel_agreement  # bench/machine.py, beside this file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mirseg.config import MineConfig, TrainConfig, build_config
from mirseg.data.synthetic import SyntheticSet, make_dataset
from mirseg.errors import Interrupted
from mirseg.infer import load_predictor
from mirseg.mine import mine
from mirseg.train import train
from mirseg.ymir.workspace import inference_workspace, training_workspace, ymir_coco

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["disc", "box"]


@dataclass(frozen=True)
class Shapes:
    """Generated discs and boxes to train on (c, d), and the sizes to train with."""

    train: SyntheticSet
    val: SyntheticSet
    size: tuple[int, int]  # (h, w) of every image
    crop: int  # square training crop

    @classmethod
    def make(cls, root: Path, size: tuple[int, int], crop: int) -> Shapes:
        return cls(make_dataset(root / "train", 24, size=size, num_classes=2, seed=1, labels=True),
                   make_dataset(root / "val", 4, size=size, num_classes=2, seed=2, labels=True), size, crop)

    def config(self, work: Path, device: torch.device, **keys: object) -> TrainConfig:
        """The tests' toy FastSCNN training on these shapes, into ``work``; ``keys`` override."""
        h, w = self.size
        values = dict(train_ann=str(self.train.ann), train_images=str(self.train.images), val_ann=str(self.val.ann),
                      val_images=str(self.val.images), crop_size=[self.crop] * 2, img_scale=[w, h], samples_per_gpu=8,
                      workers_per_gpu=0, lr=0.12, lr_scaling="none", pretrained="none", device=str(device),
                      work_dir=str(work))
        return build_config(TrainConfig, {**values, **keys})


def agreement(shapes: Shapes, work: Path, device: torch.device, iters: int, pool_size: int,
              topk: int) -> tuple[float, dict[str, float]]:
    """(share of equal labels with and without autocast over a generated pool of ``pool_size`` images,
    {algorithm: share of the top ``topk`` candidates both rankings choose}) of a model trained ``iters`` steps."""
    ckpt = train(shapes.config(work / "toy", device, max_iters=iters, interval=iters)).last
    pool = make_dataset(work / "pool", pool_size, size=shapes.size, num_classes=2, seed=5).images
    paths = sorted(str(p) for p in pool.iterdir())
    labels = amp_labels(load_predictor(ckpt, device), paths)
    share = pixel_agreement(labels[False], labels[True])
    overlaps = {}
    for algorithm in ("rsal", "entropy"):
        tops = []
        for amp in (False, True):  # fp16 is mirseg mine's autocast on CUDA, bf16 on the CPU
            cfg = build_config(MineConfig, {"checkpoint": str(ckpt), "images": str(pool), "device": str(device),
                                            "out_dir": str(work / f"mine_{algorithm}_{amp}"), "workers_per_gpu": 0,
                                            "mining_algorithm": algorithm, "max_superpixel_per_image": 64,
                                            "fp16": amp, "bf16": amp})
            tops.append({path for path, _ in mine(cfg).ranking[:topk]})
        overlaps[algorithm] = len(tops[0] & tops[1]) / topk
    return share, overlaps


def _curve(work: Path) -> list[tuple[int, float]]:
    events = EventAccumulator(str(work / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("loss/total")]


def resume_curves(shapes: Shapes, work: Path, device: torch.device,
                  again: bool = False) -> tuple[list[tuple[int, float]], ...]:
    """The (iteration, loss) curves of 20 iterations run through, and stopped by SIGTERM at 10 and resumed;
    with ``again``, also of a second run through (how far two uninterrupted runs differ on this device)."""
    keys = dict(max_iters=20, interval=10, log_interval=1)
    train(shapes.config(work / "full", device, **keys))
    if again:
        train(shapes.config(work / "again", device, **keys))
    calls = []

    def sigterm_at_10(fraction: float) -> None:  # the progress callback: a real signal, the real stop path
        calls.append(fraction)
        if len(calls) == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        train(shapes.config(work / "cut", device, **keys), progress=sigterm_at_10)
        raise AssertionError("the SIGTERM at iteration 10 did not stop the run")
    except Interrupted:
        pass
    train(shapes.config(work / "cut", device, resume=True, **keys))
    return (_curve(work / "full"), _curve(work / "cut")) + ((_curve(work / "again"),) if again else ())


def _task(env: Path, ok: Callable[[Path], str], timeout: float) -> tuple[float, str]:
    """(seconds, "pass" or what went wrong) of one task; ``ok(out)`` is "" when its outputs are right."""
    t0 = time.perf_counter()
    child = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-m", "mirseg.ymir", "--env", str(env)], capture_output=True,
                              text=True, cwd=env.parent, env=child, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, f"FAIL: no exit within {timeout:.0f} s"
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return time.perf_counter() - t0, f"FAIL: exit {proc.returncode}: {last[0][:160]}"
    wrong = ok(env.parents[1] / "out")
    return time.perf_counter() - t0, f"FAIL: {wrong}" if wrong else "pass"


def ymir_tasks(work: Path, cuda: bool, size: tuple[int, int], crop: int, iters: int,
              timeout: Callable[[], float]) -> Iterator[tuple[str, float, str]]:
    """``(task, seconds, result)`` for the training task, then a mining and an inference task on its model.

    ``size`` (h, w) of the generated images, ``crop`` the square training crop, ``iters`` the training's length;
    ``timeout()`` the seconds a task may still take.
    """
    tr = make_dataset(work / "src" / "tr", 8, size=size, num_classes=2, seed=1)
    va = make_dataset(work / "src" / "va", 4, size=size, num_classes=2, seed=11, prefix="val")
    images = work / "src" / "all"
    coco = ymir_coco([(tr.ann, tr.images), (va.ann, va.images)], CLASSES, images)
    val_names = [e["file_name"] for e in coco["images"] if e["file_name"].startswith("val")]
    gpus = {"gpu_count": 1, "gpu_id": "0"} if cuda else {"gpu_count": 0, "gpu_id": ""}
    h, w = size
    options = f"crop_size=[{crop},{crop}] img_scale=[{w},{h}] lr=0.12 lr_scaling=none pretrained=none"
    config = {"max_iters": iters, "interval": iters, "samples_per_gpu": 4, "workers_per_gpu": 0,
              "config_file": "fastscnn", "cfg_options": options, **gpus}
    device = "cuda" if cuda else "cpu"

    def trained(out: Path) -> str:
        stages = yaml.safe_load((out / "models" / "result.yaml").read_text()).get("model_stages")
        saved = yaml.safe_load((out / "models" / "config.yaml").read_text())["device"]
        return "" if stages and saved == device else f"stages {stages}, trained on {saved}, not {device}"

    env = training_workspace(work / "train", coco, images, val_names, CLASSES, config)
    yield ("training", *_task(env, trained, timeout()))
    models = work / "train" / "out" / "models"
    candidates = sorted(images.iterdir())

    def mined(out: Path) -> str:
        rows = (out / "result.tsv").read_text().splitlines()
        return "" if len(rows) == len(candidates) else f"result.tsv has {len(rows)} of {len(candidates)} rows"

    def inferred(out: Path) -> str:
        listed = json.loads((out / "infer-result.json").read_text())["images"]
        return "" if len(listed) == len(candidates) else f"infer-result.json has {len(listed)} of {len(candidates)}"

    for name, ok in (("mining", mined), ("inference", inferred)):
        env = inference_workspace(work / name, [models / "last.pth", models / "config.yaml"], candidates, CLASSES,
                                  mining=name == "mining", infer=name == "inference", stage="last",
                                  config={"samples_per_gpu": 2, "workers_per_gpu": 0, "mining_algorithm": "RSAL",
                                          "max_superpixel_per_image": 64, **gpus})
        yield (name, *_task(env, ok, timeout()))
