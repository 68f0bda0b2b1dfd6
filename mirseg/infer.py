"""Predictors and ``mirseg infer``: from a checkpoint (or an ONNX export) and image files to result files.

Layers, each used by the next and by mining and the YMIR executor (the maths on tensors is
:mod:`mirseg.predict`, the per-image result files :mod:`mirseg.outputs`):

* :func:`load_predictor` (from :mod:`mirseg.predict`) -> :class:`~mirseg.predict.Predictor`: a
  checkpoint's network, ready to run (eval, BatchNorm folded, channels-last, on its device), with
  the test scale and mode it was evaluated with (:func:`mirseg.exported.onnx_predictor`: the same
  for an ONNX export).
* :func:`iter_predictions`: image paths -> one :class:`ImagePrediction` per path, in input order,
  with the softmax at the working resolution (keep-ratio ``img_scale``). Images are decoded and
  resized in DataLoader worker processes; a batch only stacks images of the same working size
  (never padding) out of a fixed group of consecutive images, so the batches, and with them the
  last bits of every result, are the same however a run is split; test-time flip and multi-scale
  average the probabilities (:func:`mirseg.predict.predict_batch`); an unreadable image yields an
  entry with ``error`` set.
* :func:`run_inference`: ``mirseg infer``: label / colour PNGs, overlays, ``.npy`` probabilities and
  a COCO RLE JSON, streamed to disk one image at a time. Original-size results resize the
  probabilities (:func:`mirseg.predict.label_map`), as ``mirseg eval`` does. Under ``torchrun`` the
  processes share the images and the files are those of one process.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mirseg import dist, interrupt
from mirseg.coco_result import CocoResultWriter, encode_result
from mirseg.config import InferConfig, check_output_dirs
from mirseg.data.images import ImageError, opencv_threads, read_image
from mirseg.data.sources import list_images
from mirseg.data.transforms import normalize_pixels, rescale_size, resize_pair
from mirseg.errors import ConfigError
from mirseg.exported import onnx_predictor
from mirseg.fileio import AtomicFile, write_atomic
from mirseg.layout import choose, forward_timer
from mirseg.outputs import ImageOutputs, output_names
from mirseg.precision import autocast_dtype
from mirseg.predict import Predictor, batch_limit, load_predictor, predict_batch
from mirseg.threads import budgeted, in_background, worker_init

log = logging.getLogger("mirseg")


@dataclass
class ImagePrediction:
    """The prediction for one input path; ``error`` is set (and ``proba`` None) when it could not be read."""

    index: int  # position in the input path list
    path: str
    size: tuple[int, int]  # (H, W) of the original image, (0, 0) when unreadable
    proba: torch.Tensor | None  # (C, h, w) fp32 softmax at the working resolution, on the predictor's device
    # (a view into its batch, possibly channels-last: use .reshape / .contiguous(), not .view)
    image: np.ndarray | None  # (h, w, 3) uint8 RGB at the working resolution, only with keep_image=True
    error: str | None  # why the image could not be read
    original: np.ndarray | None = None  # (H, W, 3) uint8 RGB as decoded, only with keep_original=True


@dataclass
class _Loaded:
    """What a loader worker hands to the main process for one path."""

    index: int
    path: str
    size: tuple[int, int] = (0, 0)  # (H, W) original
    work_size: tuple[int, int] = (0, 0)  # (h, w) at img_scale
    views: list[torch.Tensor] = field(default_factory=list)  # (h_s, w_s, 3) uint8 RGB, one per TTA scale
    image: np.ndarray | None = None
    original: np.ndarray | None = None
    error: str | None = None

    def pin_memory(self) -> _Loaded:
        """The DataLoader's pin-memory thread calls this (on CUDA): page-locked views copy to the GPU asynchronously."""
        self.views = [v.pin_memory() for v in self.views]
        return self

    @property
    def key(self) -> tuple[tuple[int, int], ...]:
        """Items with equal keys stack into one batch: every view has the same size."""
        return (self.work_size, *(tuple(v.shape[:2]) for v in self.views))


class _ImageDataset(torch.utils.data.Dataset):
    """Decode and resize (one view per TTA scale) one image; errors become ``_Loaded.error``. The views stay uint8
    RGB, normalised where the network runs (:func:`_predict_batch`): a quarter of the bytes to move, channels-last."""

    def __init__(self, paths: Sequence[str], img_scale: tuple[int, int], ratios: tuple[float, ...],
                 keep_image: bool, keep_original: bool) -> None:
        self.paths, self.img_scale, self.ratios = list(paths), img_scale, ratios
        self.keep_image, self.keep_original = keep_image, keep_original

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> _Loaded:
        path = str(self.paths[index])
        try:
            image = read_image(path)  # (H, W, 3) uint8 RGB
            h, w = image.shape[:2]
            work = rescale_size(h, w, self.img_scale)
            out = _Loaded(index, path, (h, w), work, original=image if self.keep_original else None)
            for r in self.ratios:
                # mmseg's MultiScaleFlipAug: the scale times the ratio (int()), then the keep-ratio fit
                scale = self.img_scale if r == 1.0 else (int(self.img_scale[0] * r), int(self.img_scale[1] * r))
                resized, _ = resize_pair(image, None, rescale_size(h, w, scale))
                out.views.append(torch.from_numpy(np.ascontiguousarray(resized)))  # (h_s, w_s, 3) uint8
                if self.keep_image and out.image is None and resized.shape[:2] == work:
                    out.image = resized
            if self.keep_image and out.image is None:
                out.image = resize_pair(image, None, work)[0]
            return out
        except ImageError as exc:
            return _Loaded(index, path, error=str(exc))
        except Exception as exc:  # a hostile file can make OpenCV or numpy fail in other ways: report, go on
            return _Loaded(index, path, error=f"cannot load image {path}: {type(exc).__name__}: {exc}")


def _identity(item: _Loaded) -> _Loaded:
    return item


def _predict_batch(predictor: Predictor, items: list[_Loaded], flip: bool, dtype: torch.dtype | None) -> torch.Tensor:
    """Probabilities ``(B, C, h, w)`` at the items' working size, averaged over TTA views (scales x flips)."""
    # Each pinned view is copied on its own and stacked on the device (stacking on the host would unpin them).
    views = [normalize_pixels(torch.stack([it.views[v].to(predictor.device, non_blocking=True) for it in items]))
             .permute(0, 3, 1, 2) for v in range(len(items[0].views))]  # (B, 3, h_s, w_s) fp32 channels-last
    return predict_batch(predictor.model, views, items[0].work_size, predictor.test_mode, predictor.slide_crop,
                         predictor.slide_stride, flip=flip, dtype=dtype, memory_format=predictor.memory_format)


def _tune(predictor: Predictor, work_size: tuple[int, int], layout: str,
          dtype: torch.dtype | None) -> torch.dtype | None:
    """Put the predictor's network in the layout :func:`mirseg.layout.choose` finds fastest for ``work_size`` (h, w)
    (or the ``layout`` key's); returns the autocast dtype to use, ``dtype`` or, where fp32 was faster, None."""
    if next(predictor.model.parameters(), None) is None:  # an ONNX session: no layout of ours to choose
        return dtype
    size = tuple(min(a, b) for a, b in zip(predictor.slide_crop, work_size)) if predictor.test_mode == "slide" \
        else work_size  # what one pass of the network sees
    choice = choose(predictor.arch, "infer", predictor.device, size, layout, dtype, forward_timer(predictor.model))
    predictor.model.to(memory_format=choice.memory_format)
    predictor.memory_format = choice.memory_format
    return choice.dtype


def iter_predictions(
    predictor: Predictor,
    paths: Sequence[str],
    *,
    samples_per_gpu: int = 2,
    workers_per_gpu: int = 2,
    amp: bool = False,
    layout: str = "auto",
    flip: bool = False,
    scales: Sequence[float] = (),
    keep_image: bool = False,
    keep_original: bool = False,
    stop: Callable[[], bool] | None = None,
) -> Iterator[ImagePrediction]:
    """One :class:`ImagePrediction` per path, in input order; unreadable images yield ``error``, never raise.

    ``samples_per_gpu`` images of the same working size go through the network together (on a CPU no more
    than :func:`mirseg.predict.batch_limit` lets: 2^20 pixels); batches are
    formed within fixed groups of :func:`group_size` consecutive images (``2 * samples_per_gpu``: the
    first, the next, ...; an image waits for its batch at most until its group ends, so memory stays
    bounded), so a batch's members depend on the group alone, never on where the iteration started
    (:class:`mirseg.dist.Shards` hands whole groups to the processes of a torchrun run). Decoding runs
    in ``workers_per_gpu`` processes (0: in this one). ``amp``: autocast (:func:`mirseg.precision.autocast_dtype`);
    ``layout``: the network's memory layout, ``auto`` chosen at the first batch (:mod:`mirseg.layout`).
    ``flip`` / ``scales`` (ratios of ``img_scale``, e.g. ``(0.75, 1.0, 1.25)``): test-time augmentation,
    probabilities averaged over every view at the working resolution. ``keep_image`` / ``keep_original``
    attach the working-size / decoded image.

    ``stop`` (e.g. a :class:`mirseg.interrupt.StopRequest`) is asked at the end of each group, when every
    image taken is yielded; when it is true the iteration ends there. The images yielded are then whole
    groups of an uninterrupted run, predicted in the same batches, and the rest of the run is
    ``iter_predictions(paths[len(yielded):])``, with the same groups: a resumed run predicts bit-identically.
    """
    if samples_per_gpu < 1:
        raise ConfigError(f"samples_per_gpu must be >= 1, got {samples_per_gpu}")
    if workers_per_gpu < 0:
        raise ConfigError(f"workers_per_gpu must be >= 0, got {workers_per_gpu}")
    ratios = tuple(float(s) for s in scales) or (1.0,)
    if min(ratios) <= 0:
        raise ConfigError(f"scales must be positive ratios of img_scale, e.g. [0.75, 1.0, 1.25], got {list(scales)}")
    if not paths:
        return
    dtype = autocast_dtype(predictor.device, amp)
    dataset = _ImageDataset(paths, predictor.img_scale, ratios, keep_image, keep_original)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers_per_gpu,
                                         collate_fn=_identity, pin_memory=predictor.device.type == "cuda",
                                         worker_init_fn=worker_init)
    with opencv_threads(1 if workers_per_gpu > 0 else None):
        loaded = iter(loader)  # forks the workers
    group = group_size(samples_per_gpu)
    buckets: dict[tuple, list[_Loaded]] = {}  # working sizes -> loaded items waiting for a batch, in input order
    done: dict[int, ImagePrediction] = {}  # finished, waiting for the earlier ones
    next_out = 0

    tuned: list[torch.dtype | None] = []  # the autocast dtype, once the first batch has chosen the layout

    def run(key: tuple) -> None:
        items = buckets.pop(key)
        if not tuned:
            tuned.append(_tune(predictor, items[0].work_size, layout, dtype))
        proba = _predict_batch(predictor, items, flip, tuned[0])
        for it, p in zip(items, proba):
            done[it.index] = ImagePrediction(it.index, it.path, it.size, p, it.image, None, it.original)

    for item in loaded:
        if item.error is not None:
            log.warning("skipping %s: %s", item.path, item.error)
            done[item.index] = ImagePrediction(item.index, item.path, (0, 0), None, None, item.error)
        else:
            bucket = buckets.setdefault(item.key, [])
            bucket.append(item)
            if len(bucket) >= batch_limit(predictor.device, max(v.shape[0] * v.shape[1] for v in item.views),
                                          samples_per_gpu):
                run(item.key)
        end_of_group = (item.index + 1) % group == 0 or item.index + 1 == len(paths)
        while end_of_group and buckets:  # the group's partial batches, oldest first: no batch spans two groups
            run(min(buckets, key=lambda k: buckets[k][0].index))
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1
        if end_of_group and stop is not None and stop():
            return  # a clean point: every image taken so far is yielded, none waits in a batch


def group_size(samples_per_gpu: int) -> int:
    """How many consecutive images :func:`iter_predictions` batches among: ``2 * samples_per_gpu``."""
    return 2 * samples_per_gpu


JOURNAL = "resume.jsonl"
"""In ``out_dir`` while a run is unfinished: one line per image done (see :class:`mirseg.interrupt.Journal`)."""


@dataclass
class InferResult:
    """What ``run_inference`` wrote."""

    out_dir: Path
    num_images: int  # images listed, including the failed ones
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of images that could not be read
    coco_json: Path | None = None  # predictions.json, when save_coco
    class_names: list[str] = field(default_factory=list)  # the model's classes: label value i is class_names[i]
    index_tsv: Path | None = None  # images.tsv: coco image id, output name, input path, status


@budgeted
def run_inference(cfg: InferConfig, progress: Callable[[float], None] | None = None, *,
                  predictor: Predictor | None = None) -> InferResult:
    """``mirseg infer``: predict every image of ``cfg.images`` and write the outputs ``cfg`` asks for.

    Under ``cfg.out_dir``: ``labels/<name>.png`` (class index per pixel, uint8), ``color/<name>.png``
    (indexed PNG in the PALETTE colours), ``overlay/<name>.jpg``, ``proba/<name>.npy`` (float16
    (C, H, W)), ``predictions.json`` (COCO RLE), ``images.tsv`` (one row per input: COCO image id,
    output name, path, ``ok`` or the error) and ``classes.txt`` (line i: the name of label value i).
    ``<name>`` is the image's file stem, made unique by :func:`mirseg.outputs.output_names`. Every file is written
    atomically; all outputs are at each image's original size. Unreadable images are logged, listed
    in ``failed`` and ``images.tsv``, and skipped. ``progress`` gets the fraction done after each image.

    ``cfg.checkpoint`` may also be an ONNX export (``.onnx``, run with ONNX Runtime, see
    :func:`mirseg.exported.onnx_predictor`); ``predictor`` replaces loading ``cfg.checkpoint`` altogether.

    SIGINT / SIGTERM finish the image(s) in flight, keep ``out_dir/resume.jsonl`` (one line per image
    done, see :class:`mirseg.interrupt.Journal`) and raise :class:`~mirseg.errors.Interrupted`; with
    ``cfg.resume`` a rerun skips the images done and writes the same files an uninterrupted run writes.

    Under ``torchrun`` (one process per GPU) the processes share the images in whole groups of
    :func:`group_size` consecutive images (:class:`mirseg.dist.Shards`; batches are formed within a
    group, so every image is predicted bit for bit as in one process). Each process writes the files
    of its images; rank 0 gets every image's record in input order and alone writes predictions.json,
    images.tsv, classes.txt and the journal: ``out_dir`` ends up byte-identical to one process's (it
    must be on a disk every process writes to). The journal is one process's too, so a run
    interrupted under torchrun resumes with any number of processes, and the other way round.
    Every process returns the same :class:`InferResult`.
    """
    check_output_dirs(cfg)  # an out_dir that is a file fails before the model is loaded
    if not cfg.checkpoint and predictor is None:
        raise ConfigError("checkpoint is empty: give a mirseg checkpoint, e.g. `mirseg infer runs/train/best.pth "
                         "photos/`")
    onnx = predictor is None and str(cfg.checkpoint).lower().endswith(".onnx")
    rt = dist.setup("cpu" if onnx else cfg.device if predictor is None else predictor.device.type)
    if onnx:
        predictor = onnx_predictor(cfg.checkpoint, cfg.img_scale, cfg.test_mode, cfg.slide_crop, cfg.slide_stride)
    elif predictor is None:
        predictor = load_predictor(cfg.checkpoint, rt.device, cfg.img_scale, cfg.test_mode, cfg.slide_crop,
                                   cfg.slide_stride, trust_checkpoint=cfg.trust_checkpoint)
    paths = list_images(cfg.images)
    names = output_names(paths)
    out_dir = Path(cfg.out_dir)
    skip = () if predictor.background_index is None else (predictor.background_index,)
    outputs = ImageOutputs(out_dir, cfg.save_labels, cfg.save_color, cfg.save_overlay, cfg.save_proba,
                           predictor.num_classes, skip)
    outputs.make_dirs()
    out_dir.mkdir(parents=True, exist_ok=True)
    if rt.is_main:
        write_atomic(out_dir / "classes.txt", "".join(f"{n}\n" for n in predictor.class_names).encode())
        log.info("inferring %d images with %s (%s, img_scale %s, %s) on %s%s -> %s", len(paths), cfg.checkpoint,
                 predictor.arch, predictor.img_scale, predictor.test_mode, predictor.device,
                 f" x {rt.world_size} processes" if rt.distributed else "", out_dir)
    encode = (partial(encode_result, num_classes=predictor.num_classes, background_index=predictor.background_index)
              if cfg.save_coco else None)
    # Rank 0 alone writes predictions.json, images.tsv and the journal (None elsewhere).
    coco: CocoResultWriter | None = None
    rows: AtomicFile | None = None
    journal: interrupt.Journal | None = None
    failed: list[tuple[str, str]] = []

    def add(rec: dict[str, Any]) -> None:  # one image's lines, replayed from the journal or merged from a process
        image_id = coco.add_encoded(rec["image"], rec["anns"]) if coco and rec["image"] is not None else None
        if rec["error"] is not None:
            failed.append((rec["path"], rec["error"]))
        rows.write(_row(image_id, rec["name"], rec["path"], rec["error"]))

    def open_outputs() -> int:
        nonlocal coco, rows, journal
        coco = (CocoResultWriter(out_dir / "predictions.json", predictor.class_names, predictor.background_index,
                                 list_failed=False) if cfg.save_coco else None)
        rows = AtomicFile(out_dir / "images.tsv")  # committed into place below
        journal = interrupt.Journal.open(out_dir / JOURNAL, "infer", interrupt.job_settings(cfg, paths, cfg.checkpoint),
                                         cfg.resume, f"out_dir {out_dir}")
        rows.write("image_id\tname\tpath\tstatus\n")
        for rec in journal.records:  # replay what an interrupted run finished (resume=true)
            add(rec)
        if journal.records:
            log.info("resuming: %d of %d images were done by the interrupted run", len(journal.records), len(paths))
        return len(journal.records)

    def close_outputs() -> None:
        rows.commit()
        if coco:
            coco.close()
        journal.finish()

    try:
        start = dist.broadcast(dist.on_main(open_outputs, rt), rt)
        shards = dist.Shards(len(paths) - start, group_size(cfg.samples_per_gpu), rt)  # this process's images
        mine = [start + i for i in shards.indices()]
        with interrupt.graceful_stop("the images in flight") as stop, contextlib.ExitStack() as writing:
            preds = iter_predictions(predictor, [paths[i] for i in mine], samples_per_gpu=cfg.samples_per_gpu,
                                     workers_per_gpu=cfg.workers_per_gpu, amp=cfg.amp, layout=cfg.layout, flip=cfg.flip,
                                     scales=cfg.scales, keep_original=cfg.save_overlay, stop=lambda: bool(stop))
            # Each image's outputs are written, then (rank 0) its journal line: a line on disk means the image is done.
            # On a GPU the encoding and writing run on a helper thread while the GPU runs the next batch (the label
            # map, torch, stays here); on a CPU they would share its cores for nothing, and stop a signal later.
            def label(p: ImagePrediction) -> tuple:  # here: (prediction, name, label, confidence)
                name = names[mine[p.index]]
                return p, name, *(outputs.label_map(name, p.proba, p.size) if p.error is None else (None, None))

            def write(job: tuple) -> dict[str, Any]:  # on the helper thread
                p, name, label_np, conf = job
                return outputs.record(name, p.path, p.error, label_np, conf, p.original, encode)

            records = writing.enter_context(contextlib.closing(  # closed on the way out: no write outlives the job
                in_background(write, (label(p) for p in preds), depth=2 if predictor.device.type == "cuda" else 0)))
            for rec in shards.merge(records, lambda: stop.signum):  # rank 0: every image, in input order
                add(rec)
                journal.append(rec)
                if progress is not None:
                    progress(len(journal.records) / len(paths))
        done = start + shards.done
        if done < len(paths):
            raise interrupt.stopped_after(shards.signum, done, len(paths), out_dir)
        dist.on_main(close_outputs, rt)
    except BaseException:
        if rows:
            rows.abort()
        if coco:
            coco.abort()
        if journal is not None:
            journal.close()  # kept: resume=true continues from it
        raise
    failed = dist.broadcast(failed, rt)
    if failed and rt.is_main:
        log.warning("%d of %d images could not be read (listed in %s): %s", len(failed), len(paths),
                    out_dir / "images.tsv", "; ".join(p for p, _ in failed[:5]) + (" ..." if len(failed) > 5 else ""))
    return InferResult(out_dir=out_dir, num_images=len(paths), failed=failed,
                       coco_json=out_dir / "predictions.json" if cfg.save_coco else None,
                       class_names=list(predictor.class_names), index_tsv=out_dir / "images.tsv")


def _row(image_id: int | None, name: str, path: str, error: str | None) -> str:
    """One line of images.tsv (image_id, name, path, status), the same for a replayed and a new image."""
    return f"{image_id or ''}\t{name}\t{path}\t{_one_line(error or 'ok')}\n"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
