"""CUDA only (``pytest -m cuda``; skipped without a GPU): resume within a tolerance with the AMP loss scale, a
training step that does not wait for the GPU, fp16 inference that agrees with fp32, pinned-memory loading, and
``mirseg infer`` writing its files on a helper thread.

bench/gpu_check.py measures the same things at full size, with speed and memory besides.
"""

from __future__ import annotations

import os
import signal
import warnings

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mirseg.checkpoint import read_checkpoint
from mirseg.config import InferConfig, TrainConfig, build_config
from mirseg.data.labelfolder import read_label_png
from mirseg.data.sources import list_images
from mirseg.data.synthetic import make_dataset
from mirseg.errors import Interrupted
from mirseg.infer import iter_predictions, load_predictor, run_inference
from mirseg.predict import label_map
from mirseg.train import train

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda_tiny")
    tr = make_dataset(root / "tr", 8, size=(48, 64), num_classes=2, seed=1)
    va = make_dataset(root / "va", 2, size=(48, 64), num_classes=2, seed=2)
    return dict(train_ann=str(tr.ann), train_images=str(tr.images), val_ann=str(va.ann), val_images=str(va.images),
                crop_size=[32, 32], img_scale=[64, 48], samples_per_gpu=4, workers_per_gpu=0, device="cuda",
                pretrained="none", amp=True)


def _cfg(tiny, work_dir, **kw) -> TrainConfig:
    return build_config(TrainConfig, {**tiny, "work_dir": str(work_dir), **kw})


def _curve(work_dir) -> list[tuple[int, float]]:
    events = EventAccumulator(str(work_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("loss/total")]


def test_resume_on_cuda_keeps_the_loss_scale_and_the_loss_curve(tiny, tmp_path):
    """SIGTERM at iteration 10 of 20 and a resume: the curve of an uninterrupted run, within a tolerance (cuDNN's
    algorithm choice and atomic adds are not bit-reproducible), and last.pth carries the GradScaler state."""
    keys = dict(max_iters=20, interval=10, log_interval=1)
    full = train(_cfg(tiny, tmp_path / "full", **keys))
    calls = []

    def sigterm_at_10(fraction: float) -> None:
        calls.append(fraction)
        if len(calls) == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted, match="at iteration 10/20"):
        train(_cfg(tiny, tmp_path / "cut", **keys), progress=sigterm_at_10)
    cut = read_checkpoint(tmp_path / "cut" / "last.pth")
    assert cut["iteration"] == 10 and "scale" in cut["scaler"] and len(cut["rng"]["cuda"]) >= 1
    train(_cfg(tiny, tmp_path / "cut", resume=True, **keys))
    a, b = _curve(tmp_path / "full"), _curve(tmp_path / "cut")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 21))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= 1e-2
    ends = read_checkpoint(full.last), read_checkpoint(tmp_path / "cut" / "last.pth")
    assert ends[0]["scaler"]["scale"] == ends[1]["scaler"]["scale"]  # no skipped step re-learnt the scale


def test_the_training_step_does_not_wait_for_the_gpu(tiny, tmp_path):
    """Synchronising CUDA calls (a loss read as a number, scaler.step's inf check) in a run of 10 iterations and in
    one of 30: the set-up, the single loss read and the evaluation are the same, so 20 more steps add none."""
    def syncs(iters: int) -> int:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(_cfg(tiny, tmp_path / str(iters), max_iters=iters, interval=iters, log_interval=iters))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(w.message) for w in seen)

    short, long = syncs(10), syncs(30)
    assert short > 0  # the check sees syncs at all (the final loss read, evaluation, the checkpoint)
    assert long - short < 20, (short, long)  # fewer than one per added iteration


def test_fp16_labels_agree_with_fp32_and_pinned_cuda_with_cpu(trained_fastscnn):
    """mirseg infer's path on the toy model: fp16 autocast labels >= 99.5 % equal to fp32; CUDA fp32 (pinned
    loader memory, a worker process, non-blocking copies) >= 99.5 % equal to the CPU's."""
    ckpt, _, val = trained_fastscnn
    paths = list_images(val.images)

    def labels(device: str, amp: bool, workers: int = 0) -> list[torch.Tensor]:
        predictor = load_predictor(ckpt, device=device)
        return [label_map(p.proba, p.size)[0].cpu()
                for p in iter_predictions(predictor, paths, workers_per_gpu=workers, amp=amp)]

    def share(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return sum(int((x == y).sum()) for x, y in zip(a, b)) / sum(x.numel() for x in a)

    fp32 = labels("cuda", amp=False, workers=1)
    assert share(fp32, labels("cuda", amp=True)) >= 0.995
    assert share(fp32, labels("cpu", amp=False)) >= 0.995


def test_infer_on_cuda_writes_on_a_helper_thread_the_files_a_cpu_run_writes(trained_fastscnn, tmp_path):
    """On a GPU run_inference encodes and writes each image on a helper thread (mirseg.threads.in_background):
    every image's files and record are there, in input order, and the labels match a CPU run's (>= 99.5 %)."""
    ckpt, _, val = trained_fastscnn

    def run(device: str) -> tuple[list[str], list[np.ndarray]]:
        out = tmp_path / device
        cfg = build_config(InferConfig, {"checkpoint": str(ckpt), "images": str(val.images), "out_dir": str(out),
                                         "device": device, "samples_per_gpu": 2, "workers_per_gpu": 1})
        result = run_inference(cfg)
        assert not result.failed
        rows = (out / "images.tsv").read_text().splitlines()[1:]
        names = [r.split("\t")[1] for r in rows]
        return names, [read_label_png(out / "labels" / f"{n}.png") for n in names]

    cuda_names, cuda_labels = run("cuda")
    cpu_names, cpu_labels = run("cpu")
    assert cuda_names == cpu_names and len(cuda_names) == len(list_images(val.images))
    same = sum(int((a == b).sum()) for a, b in zip(cuda_labels, cpu_labels))
    assert same / sum(a.size for a in cpu_labels) >= 0.995
