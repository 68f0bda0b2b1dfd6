"""``mirseg mine``: rank a pool of unlabelled images so that labelling the top ones helps the model most.

One pass predicts every candidate (batched, decoding in worker processes, autocast when asked) at
the working resolution (``img_scale``, default the checkpoint's test scale) and keeps only a small
summary per image (:mod:`mirseg.mining`), so memory does not grow with the probability maps of the
pool. The pool is then scored, ranked and written to ``out_dir/result.tsv``. With ``save_masks`` a
second pass re-predicts only the top images to draw their chosen regions.

Output files:

- ``result.tsv``: ``path<TAB>score``, one line per candidate, best first, the path exactly as listed
  (what YMIR's ``write_mining_result`` writes; YMIR keeps the top N). Every score is finite:
  real scores are >= 0, and a candidate that cannot be read is written last with **-1**
  (below every real score; YMIR parses the column as a float, so ``-inf`` would be rejected).
  With ``sampling=power`` the score column is the selection priority ``(n - i) / n`` of the i-th
  drawn image (any top-N of the file is then a power sample), not the algorithm's score.
- ``masks/<name>.png`` (with ``save_masks``): the chosen regions 255, else 0, at the original
  image size (a PNG whatever the input format; the original reused the image's extension and so
  wrote lossy JPEG masks); ``overlays/<name>.jpg``: the image with the chosen regions highlighted.
  The regions cover ``region_budget`` of the image (:mod:`mirseg.mining`: whole superpixels, or
  RIPU's merged windows, best first). ``<name>`` is the image's stem, made unique as ``mirseg
  infer`` does (``x``, ``x__2``, ...), and ``masks.tsv`` maps each image path to its mask, its
  overlay and its labelled share (masked pixels / pixels). At most ``max_saved_masks`` of the top
  ``max_kept_mining_image`` images get one. ``random`` (no model) cuts the original image.
- ``report.html`` and ``thumbs/<name>.jpg`` (with ``report``, which implies ``save_masks``): the page
  of :mod:`mirseg.report`.
- ``resume.jsonl``, only while a run is unfinished: each image's summary (the pool-wide scores of
  RSAL need every image's) and each mask done, one line each. SIGINT / SIGTERM finish the images
  in flight and stop with exit code 130 / 143; ``resume=true`` then skips what is done and writes
  the same result.tsv and masks an uninterrupted run writes.

Under ``torchrun`` both passes are shared out in whole batch groups (:class:`mirseg.dist.Shards`, as
``mirseg infer`` does): each process predicts and summarises its candidates, and rank 0 gets every
summary in the candidates' order, a few groups at a time, never a probability map. Rank 0 alone
computes the pool-wide scores (RSAL's class weights and threshold over all the summaries) and
writes result.tsv, masks.tsv, the report and the journal; each process writes the masks and
overlays of the top images it drew. The files are byte for byte those of one process, and the
journal is one process's, so a run resumes with any number of processes.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from mirseg import dist, interrupt
from mirseg.config import MineConfig, check_output_dirs
from mirseg.data.images import ImageError, read_image, write_image
from mirseg.data.sources import list_images
from mirseg.fileio import write_atomic
from mirseg.infer import JOURNAL, ImagePrediction, group_size, iter_predictions, load_predictor
from mirseg.mining import Miner, MiningParams, get_algorithm, ripu, rsal
from mirseg.mining.select import power_order, rank
from mirseg.outputs import output_names
from mirseg.precision import autocast_dtype
from mirseg.predict import Predictor
from mirseg.report import ReportImage, render, thumbnail
from mirseg.threads import budgeted

log = logging.getLogger("mirseg")

FAILED_SCORE = -1.0
"""Score written for a candidate that could not be read: below every real score (they are >= 0)."""

# Overlay colours (RGB): chosen regions are tinted and outlined, the rest dimmed.
_TINT = np.array([255, 200, 0], np.float32)
_EDGE = np.array([255, 40, 40], np.uint8)


@dataclass
class MineResult:
    """What :func:`mine` produced."""

    ranking: list[tuple[str, float]]  # (path as listed, score written), best first, every candidate once
    tsv: Path  # out_dir/result.tsv
    failed: list[tuple[str, str]]  # (path, reason) of the unreadable candidates (ranked last)
    masks: list[Path] = field(default_factory=list)  # masks written (save_masks)


def _unique(paths: Sequence[str], warn: bool = True) -> list[str]:
    """The paths without repeats (first occurrence kept): every candidate is ranked once."""
    seen: set[str] = set()
    out = [p for p in paths if not (p in seen or seen.add(p))]
    if warn and len(out) < len(paths):
        log.warning("%d candidate paths are listed more than once; each is ranked once", len(paths) - len(out))
    return out


_SUMMARY_TYPES = {cls.__name__: cls for cls in (rsal.RsalSummary, ripu.RipuSummary)}


def encode_summary(obj: Any) -> Any:
    """A mining summary as JSON, exactly (arrays as dtype + shape + base64 bytes) for the resume journal."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.ndarray, np.generic)):
        a = np.ascontiguousarray(obj)
        return {"ndarray": a.dtype.str, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii"),
                "scalar": isinstance(obj, np.generic)}
    if dataclasses.is_dataclass(obj) and type(obj).__name__ in _SUMMARY_TYPES:
        return {"summary": type(obj).__name__,
                "fields": {f.name: encode_summary(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    raise TypeError(f"cannot journal a mining summary of type {type(obj).__name__}: add it to mine._SUMMARY_TYPES")


def decode_summary(data: Any) -> Any:
    """The inverse of :func:`encode_summary`."""
    if isinstance(data, dict) and "ndarray" in data:
        a = np.frombuffer(base64.b64decode(data["data"]), dtype=np.dtype(data["ndarray"])).reshape(data["shape"])
        return a[()] if data["scalar"] else a.copy()  # a writable array, as summarize made it
    if isinstance(data, dict) and "summary" in data:
        return _SUMMARY_TYPES[data["summary"]](**{k: decode_summary(v) for k, v in data["fields"].items()})
    return data


def draw_regions(image: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB picture: regions > 0 tinted and outlined, the rest dimmed; ``regions`` (H, W) int."""
    chosen = regions > 0
    out = image.astype(np.float32) * 0.55  # dim everything ...
    out[chosen] = image[chosen] * 0.6 + _TINT * 0.4  # ... and tint the chosen regions instead
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    edge = np.zeros(regions.shape, bool)  # a pixel on a region's border: its right or lower neighbour differs
    edge[:, :-1] |= regions[:, :-1] != regions[:, 1:]
    edge[:-1, :] |= regions[:-1, :] != regions[1:, :]
    edge &= chosen | np.pad(chosen[:, 1:], ((0, 0), (0, 1))) | np.pad(chosen[1:, :], ((0, 1), (0, 0)))
    edge = cv2.dilate(edge.astype(np.uint8), np.ones((2, 2), np.uint8)) > 0  # 2 px: visible when scaled
    out[edge] = _EDGE
    return out


def _score_pool(miner: Miner, cfg: MineConfig, params: MiningParams, summaries: list, ok: list[str],
                num_classes: int) -> tuple[list[tuple[str, float]], list, list[int], np.ndarray]:
    """(ranking of the readable candidates, chosen regions per readable candidate, their order, their scores)."""
    scores, chosen = miner.score_pool(summaries, ok, num_classes, params)
    if cfg.sampling == "power":
        order = power_order(scores, cfg.power_beta, cfg.seed, keys=ok)
        n = len(order)
        ranking = [(ok[i], (n - j) / n) for j, i in enumerate(order)]
    else:
        order = rank(scores, keys=ok)
        ranking = [(ok[i], float(scores[i])) for i in order]
    return ranking, list(chosen), [int(i) for i in order], np.asarray(scores, dtype=np.float64)


@budgeted
def mine(cfg: MineConfig, progress: Callable[[float], None] | None = None, *,
         predictor: Predictor | None = None) -> MineResult:
    """Score every candidate of ``cfg.images`` with ``cfg.mining_algorithm`` and write ``out_dir/result.tsv``.

    Unreadable candidates (corrupt, empty, missing) are reported in ``failed`` and ranked last;
    they never stop the run. ``progress`` is called with the fraction done, ending at 1.0.
    ``predictor``: an already loaded network to use instead of ``cfg.checkpoint`` (benchmarks and
    active-learning loops mine repeatedly); its img_scale and device then apply.
    SIGINT / SIGTERM, ``cfg.resume`` and torchrun: see the module docstring.
    """
    miner = get_algorithm(cfg.mining_algorithm)
    params = MiningParams.from_config(cfg)
    check_output_dirs(cfg)  # an out_dir that is a file fails before the model is loaded
    rt = dist.setup(cfg.device if predictor is None else predictor.device.type)
    paths = _unique(list_images(cfg.images), warn=rt.is_main)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = interrupt.job_settings(cfg, paths, cfg.checkpoint if miner.uses_model else None)
    with interrupt.graceful_stop("the images in flight") as stop:
        journal = dist.on_main(lambda: interrupt.Journal.open(out_dir / JOURNAL, "mine", settings, cfg.resume,
                                                              f"out_dir {out_dir}"), rt)  # rank 0 alone journals
        try:
            result = _mine(cfg, miner, params, paths, out_dir, progress, predictor, stop, journal, rt)
            dist.on_main(lambda: journal.finish(), rt)
        finally:
            if journal is not None:
                journal.close()  # kept unless finish() ran: an interrupted or failed run resumes from it
    return result


def _mine(cfg: MineConfig, miner: Miner, params: MiningParams, paths: list[str], out_dir: Path,
          progress: Callable[[float], None] | None, predictor: Predictor | None, stop: interrupt.StopRequest,
          journal: interrupt.Journal | None, rt: dist.Runtime) -> MineResult:
    report = progress or (lambda _: None)
    save_masks = cfg.save_masks or cfg.report  # the report shows the masks' overlays
    share = 0.9 if save_masks and miner.regions is not None else 1.0  # of the progress bar for pass 1

    # Rank 0 holds every candidate's summary (a few KB each) and writes the files the pool decides.
    failed: list[tuple[str, str]] = []
    ok: list[str] = []
    summaries: list = []

    def add(path: str, error: str | None, summary: Any = None, replay: bool = False) -> None:
        if error is not None:
            failed.append((path, error))
        else:
            summaries.append(summary)
            ok.append(path)
        if not replay:  # the journal line comes after the summary exists: on disk means done
            journal.append({"kind": "image", "path": path, "error": error, "summary": encode_summary(summary)})

    # Replay what an interrupted run finished (resume=true): pass-1 summaries, then masks written.
    for rec in journal.records if journal else ():
        if rec["kind"] == "image":
            add(rec["path"], rec["error"], decode_summary(rec["summary"]), replay=True)
    start = dist.broadcast(len(ok) + len(failed), rt)
    if start and rt.is_main:
        log.info("resuming: %d of %d candidates were done by the interrupted run", start, len(paths))
    num_classes = 0
    amp = False
    if miner.uses_model:
        if predictor is None:
            predictor = load_predictor(cfg.checkpoint, rt.device, img_scale=cfg.img_scale,
                                       trust_checkpoint=cfg.trust_checkpoint)
        num_classes = predictor.num_classes
        amp = cfg.fp16 if predictor.device.type == "cuda" else cfg.bf16
        # Where amp means nothing (a CPU without native bf16), say so once here, not once per prediction pass.
        amp = amp and autocast_dtype(predictor.device, amp) is not None
    model = predictor if miner.uses_model else None  # pass 1 of random only decodes
    if rt.is_main:
        where = "(no model needed)" if model is None else f"on {model.device} at img_scale {model.img_scale}"
        log.info("mining %d images with %s %s%s%s", len(paths), miner.name, where, " (autocast)" if amp else "",
                 f" x {rt.world_size} processes" if rt.distributed else "")
    # Each process summarises its share of the candidates (whole batch groups), rank 0 merges them in order.
    shards = dist.Shards(len(paths) - start, group_size(cfg.samples_per_gpu) if model is not None else 1, rt)
    local = _summaries(miner, params, model, cfg, amp, [paths[start + i] for i in shards.indices()], stop)
    for path, error, summary in shards.merge(local, lambda: stop.signum):
        add(path, error, summary)
        report(share * (len(ok) + len(failed)) / len(paths))
    if start + shards.done < len(paths):
        raise interrupt.stopped_after(shards.signum, start + shards.done, len(paths), out_dir, "candidates")

    def score() -> tuple[list[tuple[str, float]], list, list[int], np.ndarray]:  # on rank 0: the pool-wide step
        ranking, chosen, order, scores = _score_pool(miner, cfg, params, summaries, ok, num_classes)
        failed.sort()  # order-independent output: the unreadable ones by path
        ranking += [(path, FAILED_SCORE) for path, _ in failed]
        write_atomic(out_dir / "result.tsv", "".join(f"{path}\t{score:.9g}\n" for path, score in ranking).encode())
        if failed:
            log.warning("%d of %d candidates could not be read and are ranked last with score %g: %s", len(failed),
                        len(paths), FAILED_SCORE, "; ".join(f"{p}: {e}" for p, e in failed[:5])
                        + (" ..." if len(failed) > 5 else ""))
        return ranking, chosen, order, scores

    ranking, chosen, order, scores = dist.on_main(score, rt) or ([], [], [], np.zeros(0))
    masks: list[Path] = []
    saved: list[dict] = []
    if save_masks and miner.regions is None:
        if rt.is_main:
            log.info("%s chooses no regions: no masks written", miner.name)
    elif save_masks:
        top = order[:min(cfg.max_kept_mining_image, cfg.max_saved_masks, len(order))]
        top_paths, top_chosen = dist.broadcast(([ok[i] for i in top], [chosen[i] for i in top]), rt)
        masks, saved = _save_masks(miner, params, predictor, cfg, amp, top_paths, top_chosen, out_dir,
                                   lambda f: report(share + (1 - share) * f), stop, journal, rt)
    if cfg.report:
        dist.on_main(lambda: _write_report(cfg, miner, predictor, out_dir, ranking, dict(zip(ok, scores.tolist())),
                                           saved, len(failed)), rt)
    report(1.0)
    ranking, failed, masks = dist.broadcast((ranking, failed, masks), rt)  # every process returns the same result
    if rt.is_main:
        log.info("ranked %d candidates -> %s", len(ranking), out_dir / "result.tsv")
    return MineResult(ranking, out_dir / "result.tsv", failed, masks)


def _summaries(miner: Miner, params: MiningParams, predictor: Predictor | None, cfg: MineConfig, amp: bool,
               paths: list[str], stop: interrupt.StopRequest) -> Iterator[tuple[str, str | None, Any]]:
    """``(path, error, summary)`` of each of ``paths`` (this process's share), in order."""
    if predictor is None:  # no forward pass (random), but each candidate is decoded: unreadable ones are reported alike
        for path in paths:
            if stop:
                return
            try:
                read_image(path)
                yield path, None, None
            except ImageError as exc:
                yield path, str(exc), None
        return
    assert miner.summarize is not None
    for pred in iter_predictions(predictor, paths, samples_per_gpu=cfg.samples_per_gpu,
                                 workers_per_gpu=cfg.workers_per_gpu, amp=amp, layout=cfg.layout,
                                 keep_image=miner.uses_image, stop=lambda: bool(stop)):
        yield pred.path, pred.error, None if pred.error else miner.summarize(pred.proba, pred.image, params)


def _originals(paths: list[str], stop: interrupt.StopRequest) -> Iterator[ImagePrediction]:
    """The images as decoded, for an algorithm without a model (random): no probabilities, no working size."""
    for index, path in enumerate(paths):
        if stop:
            return
        try:
            image = read_image(path)
        except ImageError as exc:
            yield ImagePrediction(index, path, (0, 0), None, None, str(exc))
            continue
        yield ImagePrediction(index, path, image.shape[:2], None, image, None, image)


def _class_shares(proba: torch.Tensor | None) -> list[float] | None:
    """The predicted (argmax) share of each class at the working size, rounded for the journal; None: no model."""
    if proba is None:
        return None
    counts = torch.bincount(proba.argmax(0).reshape(-1), minlength=proba.shape[0]).cpu().numpy()  # (C,)
    return [round(float(c) / max(1, int(counts.sum())), 6) for c in counts]


def _save_masks(miner: Miner, params: MiningParams, predictor: Predictor | None, cfg: MineConfig, amp: bool,
                paths: list[str], chosen: list, out_dir: Path, report: Callable[[float], None],
                stop: interrupt.StopRequest, journal: interrupt.Journal | None,
                rt: dist.Runtime) -> tuple[list[Path], list[dict]]:
    """Second pass over the top images only: recompute their regions, write mask PNGs and overlay JPEGs
    (and thumbnails for the report). Returns the masks written and one record per image that got one.

    Each image's mask is journalled once written; a resumed run starts after the last one journalled.
    Under torchrun each process draws its share of the images, rank 0 journals them and writes masks.tsv.
    """
    assert miner.regions is not None
    names = output_names(paths)
    done_before = [rec for rec in journal.records if rec["kind"] == "mask"] if journal else []
    saved: list[dict] = [rec for rec in done_before if rec["mask"]]
    start = dist.broadcast(len(done_before), rt)
    shards = dist.Shards(len(paths) - start, group_size(cfg.samples_per_gpu) if predictor is not None else 1, rt)
    mine = [start + i for i in shards.indices()]
    if predictor is None:  # random: no model, its regions are cut from the original image
        preds: Iterable[ImagePrediction] = _originals([paths[i] for i in mine], stop)
    else:
        preds = iter_predictions(predictor, [paths[i] for i in mine], samples_per_gpu=cfg.samples_per_gpu,
                                 workers_per_gpu=cfg.workers_per_gpu, amp=amp, layout=cfg.layout, keep_image=True,
                                 keep_original=True, stop=lambda: bool(stop))
    records = (_draw_mask(miner, params, cfg, pred, names[mine[pred.index]], chosen[mine[pred.index]], out_dir)
               for pred in preds)
    for done, rec in enumerate(shards.merge(records, lambda: stop.signum), start=start + 1):
        journal.append(rec)
        if rec["mask"]:
            saved.append(rec)
        report(done / len(paths))
    done = start + shards.done
    if done < len(paths):
        raise interrupt.stopped_after(shards.signum, done, len(paths), out_dir, "images (result.tsv is complete)",
                                      "save", before="the masks of ")
    dist.on_main(lambda: write_atomic(out_dir / "masks.tsv", "".join(rec["line"] for rec in saved).encode()), rt)
    return [out_dir / rec["mask"] for rec in saved], saved  # rank 0's (the others have none)


def _draw_mask(miner: Miner, params: MiningParams, cfg: MineConfig, pred: ImagePrediction, name: str, chosen: Any,
               out_dir: Path) -> dict[str, Any]:
    """Write one image's mask, overlay (and thumbnail); its journal record (``mask`` None: unreadable now)."""
    if pred.error is not None:  # readable in pass 1, gone now
        log.warning("no mask for %s: %s", pred.path, pred.error)
        return {"kind": "mask", "path": pred.path, "mask": None, "line": None}
    assert miner.regions is not None
    regions = miner.regions(pred.proba, pred.image, chosen, params)  # (h, w) int32 working size
    h, w = pred.size
    regions = cv2.resize(regions, (w, h), interpolation=cv2.INTER_NEAREST)  # (H, W) original size
    mask, overlay, thumb = f"masks/{name}.png", f"overlays/{name}.jpg", f"thumbs/{name}.jpg"
    write_image(out_dir / mask, np.where(regions > 0, 255, 0).astype(np.uint8))
    picture = draw_regions(pred.original, regions)
    write_image(out_dir / overlay, picture)
    if cfg.report:
        write_image(out_dir / thumb, thumbnail(picture))
    labelled = round(float(np.count_nonzero(regions)) / regions.size, 6)  # the masked share at the original size
    return {"kind": "mask", "path": pred.path, "mask": mask, "overlay": overlay, "thumb": thumb, "share": labelled,
            "classes": _class_shares(pred.proba), "line": f"{pred.path}\t{mask}\t{overlay}\t{labelled:.6f}\n"}


def _write_report(cfg: MineConfig, miner: Miner, predictor: Predictor | None, out_dir: Path,
                  ranking: list[tuple[str, float]], scores: dict[str, float], saved: list[dict], failed: int) -> None:
    """``report.html`` beside result.tsv: the images that got masks, in ranking order, and the pool's scores."""
    position = {path: i + 1 for i, (path, _) in enumerate(ranking)}
    images = [ReportImage(position[rec["path"]], rec["path"], scores[rec["path"]], rec["share"], rec["mask"],
                          rec["overlay"], rec["thumb"], None if rec["classes"] is None else tuple(rec["classes"]))
              for rec in saved]
    info = [("algorithm", miner.name), ("checkpoint", cfg.checkpoint if miner.uses_model else "(none: no model)"),
            ("candidates", f"{len(ranking)} ({failed} unreadable, ranked last)"),
            ("region budget", f"{100 * cfg.region_budget:g} % of each image"), ("sampling", cfg.sampling),
            ("ranking", "result.tsv"), ("masks", "masks.tsv")]
    if predictor is not None:
        info.insert(2, ("working size", f"img_scale {list(predictor.img_scale)}"))
    page = render(images, list(scores.values()), title=f"mirseg mine: {miner.name} on {cfg.images}", info=info,
                  class_names=predictor.class_names if predictor is not None else [])
    write_atomic(out_dir / "report.html", page.encode())
    log.info("report of the top %d images -> %s", len(images), out_dir / "report.html")


__all__ = ["FAILED_SCORE", "MineResult", "draw_regions", "mine"]
