"""Training: one readable loop from a config to checkpoints, metrics and TensorBoard logs.

``train(cfg)`` is what ``mirseg train`` and the YMIR executor call. The loop is iteration-based,
as the original mmseg configs are: SGD with momentum, poly learning-rate decay over ``max_iters``,
cross-entropy (ignore 255, mean over labelled pixels) on the decode head plus the weighted
auxiliary heads (:func:`mirseg.loss.segmentation_loss`), evaluation and checkpoints every
``interval`` iterations.

It reads top to bottom: ``_train`` is the set-up in named steps (data, model + weights, optimiser +
schedule, class weights, resume, loader, logs) and then the loop. What the loop changes and
``last.pth`` keeps is a :class:`~mirseg.train_state.TrainState`; ``_Run`` is the fixed context the
helpers share. The sample order is :class:`~mirseg.data.sampler.IterationSampler`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from mirseg import dist, interrupt, layout, pretrained, threads
from mirseg.checkpoint import atomic_save, make_checkpoint, read_checkpoint
from mirseg.config import TrainConfig, check_output_dirs, fit_scale, save_config, to_dict
from mirseg.data.check import check_data, crop_padding_warning
from mirseg.data.dataset import DatasetError, SegDataset, label_histogram
from mirseg.data.images import opencv_threads
from mirseg.data.sampler import IterationSampler
from mirseg.data.sources import load_split
from mirseg.data.transforms import EvalTransform, TrainTransform
from mirseg.errors import ConfigError, Interrupted, MirsegError, MissingFileError
from mirseg.evaluate import evaluate, log_predictions, print_table
from mirseg.loss import auto_class_weight, segmentation_loss
from mirseg.models import build_model
from mirseg.train_state import LoopClock, LossWindow, TrainState, poly_lr, rank_rng_states

log = logging.getLogger("mirseg")


class TrainingDiverged(MirsegError, RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    """Where the run left its checkpoints and what it measured."""

    work_dir: Path
    best: Path | None
    last: Path
    best_metrics: dict[str, Any] = field(default_factory=dict)
    last_metrics: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)  # LoopClock.summary(): s/iteration, data share


LR_EXPONENTS = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
"""``lr_scaling``: the lr is ``lr * (total batch / the preset's design batch) ** exponent``."""


# ---------------------------------------------------------------------------------------------
# What a run carries


@dataclass
class TrainData:
    """The checked training and validation sets and the model's classes (background first when there is one)."""

    train_set: SegDataset
    val_set: SegDataset
    class_names: list[str]


@dataclass
class _Run:
    """The fixed context of one run: config, process group, data, and rank 0's logs (None on other ranks)."""

    cfg: TrainConfig
    rt: dist.Runtime
    data: TrainData
    writer: Any = None  # TensorBoard SummaryWriter
    bar: Any = None  # tqdm progress bar
    losses: LossWindow = field(default_factory=LossWindow)  # on the device until _read_losses
    t0: float = field(default_factory=time.perf_counter)
    clock: LoopClock = field(default_factory=LoopClock)  # restarted when the loop starts

    def close_logs(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------------
# The run: the set-up in named steps, then the loop


@threads.budgeted
def train(cfg: TrainConfig, progress: Callable[[float], None] | None = None) -> TrainResult:
    """Train ``cfg.model`` on the configured data; returns where the best and last checkpoints are.

    ``progress`` (optional) is called with the fraction done, for the YMIR monitor.

    SIGINT / SIGTERM (see :mod:`mirseg.interrupt`) end the current iteration, save a resumable
    ``last.pth`` at it and raise :class:`~mirseg.errors.Interrupted`; ``resume=True`` then continues
    to the weights an uninterrupted run reaches (bit-exact on CPU). Under torchrun every process
    stops at the same iteration.
    """
    with interrupt.graceful_stop("the current iteration") as stop:
        return _train(cfg, progress, stop)


def _train(cfg: TrainConfig, progress: Callable[[float], None] | None, stop: interrupt.StopRequest) -> TrainResult:
    check_output_dirs(cfg)  # a work_dir that is a file fails before any work
    rt = dist.setup(cfg.device)
    torch.manual_seed(cfg.seed + rt.rank)
    if rt.device.type == "cuda":
        # Every batch has the crop's shape: timing cuDNN's algorithms once pays for the whole run (as mmseg's
        # cudnn_benchmark; evaluation's sizes are timed once each). A CUDA resume is exact within a tolerance.
        torch.backends.cudnn.benchmark = True
    # The order matters for exact resume: the model's initialisation draws from the seeded generator.
    cfg, data = _load_data(cfg, rt)
    cfg, model = _build_model(cfg, len(data.class_names), rt)
    state = _make_optimizer(cfg, model, rt)
    class_weight = _class_weight(cfg, data, rt)
    if cfg.resume:
        _resume(state, cfg, data.class_names, rt)
    state.steps = layout.for_training(model, cfg.model, rt.device, cfg.crop_size, cfg.layout, cfg.amp, state.steps)
    if rt.distributed:
        state.model = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index]
                                                          if rt.device.type == "cuda" else None)
    loader = _loader(data.train_set, cfg, rt, state.iteration)
    run = _open_logs(cfg, rt, data, state.iteration)
    model, aux_weights, steps = state.model, state.net.aux_weights, state.steps

    last_metrics: dict[str, Any] = {}
    model.train()
    # One OpenCV thread per loader worker (they already run in parallel), set around the fork: calling
    # cv2.setNumThreads inside a forked worker deadlocks once this process's OpenCV pool has run.
    with opencv_threads(1 if cfg.workers_per_gpu > 0 else None):
        batches = iter(loader)
    _stop_if_signalled(run, state, stop)  # a signal during the set-up
    run.clock = LoopClock()
    for it, (images, labels) in enumerate(run.clock.batches(batches), start=state.iteration):
        images = images.to(rt.device, memory_format=steps.memory_format, non_blocking=True)  # pinned on CUDA: queued
        labels = labels.to(rt.device, non_blocking=True)
        with steps.autocast(rt.device.type):  # fp16 on CUDA with amp (and the scaler), bf16 on a bf16 CPU, or fp32
            out = model(images)
        loss, parts = segmentation_loss(out, labels, aux_weights, class_weight)  # parts: tensors on the device
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        state.iteration = done = it + 1
        # Nothing above waits for the GPU. The losses are read (checked for NaN, logged) every log_interval
        # iterations and before a checkpoint, so a diverged run never saves and names its first bad iteration.
        run.losses.add(done, parts)
        evaluating = done % cfg.interval == 0 or done == cfg.max_iters
        logging_now = done % cfg.log_interval == 0 or done == cfg.max_iters
        if evaluating or logging_now:
            _read_losses(run, state, logging_now)
        if rt.is_main:
            run.bar.update(1)
            if progress is not None:
                progress(done / cfg.max_iters)
        if evaluating:
            with run.clock.evaluating():
                model.eval()
                metrics = evaluate(model, data.val_set, cfg, rt, len(data.class_names)) if len(data.val_set) else {}
                model.train()
                last_metrics = metrics
                _after_eval(run, state, metrics, rank_rng_states(rt))
        # Checked after every step, so a run stops within one iteration. Under torchrun this is one tiny
        # all_reduce per iteration, which on GPUs waits for the step (a single process never waits here).
        if done < cfg.max_iters:  # on the last iteration the run is complete anyway
            _stop_if_signalled(run, state, stop)
    if rt.is_main and run.clock.iterations:
        log.info("trained %d iterations: %s, %.1f s evaluating", run.clock.iterations, run.clock.line(),
                 run.clock.eval_s)
    run.close_logs()
    dist.teardown(rt)
    if rt.is_main and last_metrics:
        print_table(data.class_names, last_metrics)
    work_dir = Path(cfg.work_dir)
    best_path = work_dir / "best.pth"
    return TrainResult(work_dir=work_dir, best=best_path if best_path.exists() else None, last=work_dir / "last.pth",
                       best_metrics=state.best.get("metrics", {}), last_metrics=last_metrics,
                       class_names=data.class_names, timing=run.clock.summary())


# -- set-up


def _load_data(cfg: TrainConfig, rt: dist.Runtime) -> tuple[TrainConfig, TrainData]:
    """The checked train and val sets; ``cfg`` gets the resolved user classes, so its saved copy trains again."""
    train_split, val_split = load_split(cfg, "train"), load_split(cfg, "val")
    class_names = train_split.class_names
    # Every image header and label, before the model: all problems in one error (or skipped). Each rank
    # checks for itself (reading headers is cheap), so all ranks agree on the samples without a broadcast.
    checked = check_data({"train": train_split.samples, "val": val_split.samples}, len(class_names),
                         workers=cfg.workers_per_gpu, skip_bad=cfg.skip_bad_images, report=rt.is_main)
    sizes = checked["train"].sizes
    if rt.is_main:
        log.info("%s", fit_scale(cfg, sizes)[2])
    cfg = cfg.resolved(sizes)  # the preset's numbers, with the scale and crop fitted to these images
    padding = crop_padding_warning(checked["train"].sizes, cfg.crop_size, cfg.img_scale, cfg.ratio_range)
    if padding and rt.is_main:
        log.warning("%s", padding)
    cfg = dataclasses.replace(cfg, class_names=tuple(train_split.user_classes))
    train_tf = TrainTransform(crop_size=cfg.crop_size, scale=cfg.img_scale, ratio_range=cfg.ratio_range,
                              cat_max_ratio=cfg.cat_max_ratio)
    train_set = SegDataset(checked["train"].samples, train_tf, seed=cfg.seed)
    val_set = SegDataset(checked["val"].samples, EvalTransform(scale=cfg.img_scale), seed=cfg.seed)
    if len(train_set) == 0:
        raise DatasetError("the training set is empty: check train_ann / train_images / train_labels")
    return cfg, TrainData(train_set, val_set, class_names)


def _build_model(cfg: TrainConfig, num_classes: int, rt: dist.Runtime) -> tuple[TrainConfig, nn.Module]:
    """The network with its starting weights (``weights=``, else the pretrained start), on the device."""
    model = build_model(cfg.model, num_classes)
    cfg = pretrained.initialise(model, cfg, verbose=rt.is_main)  # cfg records the start it used
    if rt.distributed and rt.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # one BN statistic across GPUs
    return cfg, model.to(rt.device)


def _make_optimizer(cfg: TrainConfig, model: nn.Module, rt: dist.Runtime) -> TrainState:
    """SGD with momentum, the poly schedule over ``max_iters`` and the AMP scaler, at iteration 0."""
    total_batch, design = cfg.samples_per_gpu * rt.world_size, cfg.preset.batch_size
    lr = cfg.lr * (total_batch / design) ** LR_EXPONENTS[cfg.lr_scaling]
    if rt.is_main and total_batch != design:
        how = "kept" if cfg.lr_scaling == "none" else f"scaled ({cfg.lr_scaling})"
        log.info("lr %s from %g (batch %d of the preset) to %g (batch %d); lr_scaling: none, sqrt or linear",
                 how, cfg.lr, design, lr, total_batch)
    # fused on CUDA: GradScaler hands it the inf check on the device (scaler.step reads it back for other SGDs).
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                fused=rt.device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lr(lr, min(cfg.min_lr, lr), cfg.power,
                                                                     cfg.max_iters, cfg.warmup_iters))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and rt.device.type == "cuda")
    return TrainState(model, optimizer, scheduler, scaler)


def _class_weight(cfg: TrainConfig, data: TrainData, rt: dist.Runtime) -> torch.Tensor | None:
    """The loss's per-class weights: ``class_weight=auto`` from the label histogram, a list as given, else None."""
    names = data.class_names
    if cfg.class_weight == "auto":
        weights = auto_class_weight(label_histogram(data.train_set, len(names)))
        log.info("class weights (auto): %s", ", ".join(f"{n}={w:.3f}" for n, w in zip(names, weights)))
        return torch.tensor(weights, device=rt.device)
    if cfg.class_weight:
        if len(cfg.class_weight) != len(names):
            raise ConfigError(f"class_weight has {len(cfg.class_weight)} values but there are {len(names)} classes "
                              f"({', '.join(names)})")
        return torch.tensor(cfg.class_weight, device=rt.device, dtype=torch.float32)
    return None


def _resume(state: TrainState, cfg: TrainConfig, class_names: list[str], rt: dist.Runtime) -> None:
    """Load ``work_dir/last.pth`` into ``state`` and the random generators: the run goes on as if never stopped."""
    work_dir = Path(cfg.work_dir)
    last_path = work_dir / "last.pth"
    if not last_path.is_file():
        raise MissingFileError(f"nothing to resume in {work_dir}: it has no last.pth (a run saves one at every "
                               "interval and when it is interrupted); check work_dir, or train without --resume")
    ckpt = read_checkpoint(last_path, cfg.trust_checkpoint)
    if ckpt.get("class_names") != class_names:
        raise ConfigError(f"{last_path} was trained on classes {ckpt.get('class_names')}, not {class_names}")
    state.restore(ckpt, rt)
    log.info("resumed from %s at iteration %d", last_path, state.iteration)


def _loader(train_set: SegDataset, cfg: TrainConfig, rt: dist.Runtime, start_iter: int) -> DataLoader:
    """Batches for iterations ``start_iter + 1 .. max_iters``, the same whether the run was resumed or not."""
    sampler = IterationSampler(len(train_set), cfg.samples_per_gpu, cfg.seed, start_iter, cfg.max_iters,
                               rt.rank, rt.world_size)
    # The loader gets its own generator: drawing worker seeds from the global one would shift the
    # dropout randomness of a resumed run against an uninterrupted one.
    return DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.workers_per_gpu,
                      pin_memory=rt.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed),
                      worker_init_fn=threads.worker_init)


def _open_logs(cfg: TrainConfig, rt: dist.Runtime, data: TrainData, start_iter: int) -> _Run:
    """Rank 0 saves config.yaml and opens TensorBoard (from ``start_iter``) and the progress bar."""
    run = _Run(cfg, rt, data)
    if not rt.is_main:
        return run
    work_dir = Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, work_dir / "config.yaml")
    run.writer = SummaryWriter(cfg.tensorboard_dir or str(work_dir / "tensorboard"), purge_step=start_iter + 1)
    log.info("training %s on %d images (%d classes: %s), validating on %d; %d iterations of batch %d on %s",
             cfg.model, len(data.train_set), len(data.class_names), ", ".join(data.class_names), len(data.val_set),
             cfg.max_iters, cfg.samples_per_gpu * rt.world_size, rt.device)
    run.bar = tqdm(total=cfg.max_iters, initial=start_iter, unit="it", dynamic_ncols=True, desc="train",
                   mininterval=2.0)
    return run


# -- in the loop


def _read_losses(run: _Run, state: TrainState, log_them: bool) -> None:
    """Read the losses kept since the last read (one wait for the device): raise :class:`TrainingDiverged` at the
    first non-finite total; with ``log_them``, rank 0 shows the last iteration's in the bar, TensorBoard and log."""
    (parts, bad), done, lr = run.losses.take(), state.iteration, state.optimizer.param_groups[0]["lr"]
    if bad:
        raise TrainingDiverged(f"loss is {bad}; lower lr (now {lr:g}) or check the labels")
    if not (log_them and run.rt.is_main and parts):
        return
    run.bar.set_postfix(loss=f"{parts['total']:.4f}", lr=f"{lr:.2e}")
    for k, v in parts.items():
        run.writer.add_scalar(f"loss/{k}", v, done)
    run.writer.add_scalar("lr", lr, done)
    timing = run.clock.summary()
    run.writer.add_scalar("time/s_per_iter", timing["s_per_iter"], done)
    run.writer.add_scalar("time/data_share", timing["data_share"], done)
    log.info("iteration %d/%d: loss %.4f (%s)  lr %.3e  %s", done, run.cfg.max_iters, parts["total"],
             ", ".join(f"{k} {v:.4f}" for k, v in parts.items() if k != "total"), lr, run.clock.line(timing))


def _after_eval(run: _Run, state: TrainState, metrics: dict[str, Any], rank_rng: list[Any] | None) -> None:
    """Rank 0 logs the evaluation (TensorBoard scalars and images) and saves best/last/iteration checkpoints."""
    cfg, done = run.cfg, state.iteration
    work_dir = Path(cfg.work_dir)
    if run.rt.is_main:
        if metrics:
            log.info("iteration %d/%d: mIoU %.4f  mAcc %.4f  aAcc %.4f  (%.1f s)", done, cfg.max_iters,
                     metrics["mIoU"], metrics["mAcc"], metrics["aAcc"], time.perf_counter() - run.t0)
            for key in ("mIoU", "mAcc", "aAcc"):
                run.writer.add_scalar(f"val/{key}", metrics[key], done)
            for name, iou in zip(run.data.class_names, metrics["IoU"]):
                if math.isfinite(iou):
                    run.writer.add_scalar(f"val_IoU/{name}", iou, done)
            log_predictions(run.writer, state.net, run.data.val_set, cfg, run.rt, done)
        score = metrics.get("mIoU", float("nan"))
        is_best = math.isfinite(score) and score > state.best["mIoU"]
        if is_best:
            state.best.update({"mIoU": score, "iteration": done, "metrics": metrics})
        atomic_save(_checkpoint(run, state, metrics, rank_rng, resumable=True), work_dir / "last.pth")
        if is_best:
            atomic_save(_checkpoint(run, state, metrics), work_dir / "best.pth")
            log.info("new best mIoU %.4f at iteration %d -> %s", score, done, work_dir / "best.pth")
        if not cfg.save_least_file:
            atomic_save(_checkpoint(run, state, metrics), work_dir / f"iter_{done}.pth")
            if cfg.max_keep_ckpts > 0:
                kept = sorted(work_dir.glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
                for old in kept[:-cfg.max_keep_ckpts]:
                    old.unlink()
    dist.barrier(run.rt)
    state.saved_at = done


def _checkpoint(run: _Run, state: TrainState, metrics: dict[str, Any], rank_rng: list[Any] | None = None,
                resumable: bool = False) -> dict[str, Any]:
    """The checkpoint at ``state.iteration``; ``resumable`` adds what ``resume=true`` needs (last.pth)."""
    return make_checkpoint(state.net, run.cfg.model, run.data.class_names, ignore_blank_area=run.cfg.ignore_blank_area,
                           config=to_dict(run.cfg), iteration=state.iteration, metrics=metrics,
                           resume_state=state.resume_state(rank_rng) if resumable else None)


def _stop_if_signalled(run: _Run, state: TrainState, stop: interrupt.StopRequest) -> None:
    """If any process got SIGINT / SIGTERM: save a resumable last.pth at this iteration (rank 0), close the
    logs and raise :class:`Interrupted`; otherwise nothing."""
    signum = dist.agreed_signal(stop.signum, run.rt)
    if signum is None:
        return
    cfg, rt, done = run.cfg, run.rt, state.iteration
    last_path = Path(cfg.work_dir) / "last.pth"
    unsaved = done > state.saved_at
    if unsaved:
        _read_losses(run, state, log_them=False)  # weights past a NaN loss are not saved
    rank_rng = rank_rng_states(rt) if unsaved else None
    if rt.is_main and unsaved:
        # No metrics: they would belong to an earlier iteration than the weights.
        atomic_save(_checkpoint(run, state, {}, rank_rng, resumable=True), last_path)
    run.close_logs()
    dist.barrier(rt)  # nobody exits (and makes torchrun kill the group) before rank 0 has saved
    dist.teardown(rt)
    name = interrupt.signal_name(signum)
    if done == 0:
        raise Interrupted(f"interrupted by {name} before the first iteration: nothing saved, nothing to resume",
                          signum)
    how = f"mirseg train {shlex.quote(str(Path(cfg.work_dir) / 'config.yaml'))} --resume"
    raise Interrupted(f"interrupted by {name} at iteration {done}/{cfg.max_iters}; saved {last_path}; resume with: "
                      f"{how}" + (" (under the same torchrun command)" if rt.distributed else ""), signum)
