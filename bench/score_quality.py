"""Per-image score quality: does a mining score rank labelled images by the model's real error on them?

Run by ``python bench/mine.py --camvid --checkpoint best.pth`` (or ``--images DIR --labels DIR``);
the functions are importable (``tests/test_score_quality.py`` loads this file by path).

A trained checkpoint is loaded once (:func:`mirseg.infer.load_predictor`, optionally at another
working size ``img_scale``) and used for everything:

1. **Real errors.** One pass of :func:`mirseg.infer.iter_predictions` over the labelled images (the
   batches, workers and precision ``mirseg mine`` uses); each image's probabilities at the working
   size are resized to its label (:func:`mirseg.predict.label_map`, as ``mirseg eval`` and ``mirseg
   infer`` do) and compared in a :class:`mirseg.metrics.ConfusionMatrix` of its own, void (255) left
   out: ``pixel error = 1 - pixel accuracy`` and ``mIoU error = 1 - the image's mIoU`` (a nan-mean of
   the IoU of the classes present in its label or its prediction).
2. **Scores.** Every algorithm mines the same images through :func:`mirseg.mine.mine` with that
   predictor (so the same network, working size and batches: the forward the errors come from),
   each in its own ``out_dir``; the scores are those of ``result.tsv``.
3. **Quality**, per algorithm: the Spearman rank correlation of score and pixel error, and of score
   and mIoU error (ties get average ranks, as ``scipy.stats.spearmanr``; scipy is not a dependency);
   and the **top-20 % precision**: the share of the fifth of images ranked first by the miner that is
   among the fifth with the largest pixel error (random: 0.2 expected).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mirseg.config import MineConfig, build_config
from mirseg.data.dataset import DatasetError, Sample, size_mismatch
from mirseg.data.labelfolder import load_label_folder
from mirseg.fileio import write_atomic
from mirseg.infer import iter_predictions, load_predictor
from mirseg.metrics import ConfusionMatrix
from mirseg.mine import mine
from mirseg.mining import ALGORITHMS
from mirseg.predict import Predictor, label_map


@dataclass(frozen=True)
class RealError:
    """The model's real error on one labelled image (nan when the label has no non-void pixel)."""

    path: str  # the image path as mined (result.tsv's first column)
    pixel_error: float  # 1 - pixel accuracy over the non-void pixels
    miou_error: float  # 1 - mIoU over the classes in the label or the prediction


@dataclass(frozen=True)
class Arm:
    """One row of the table: an algorithm and the MineConfig keys it runs with."""

    name: str  # as printed
    algorithm: str  # mining_algorithm
    keys: tuple[tuple[str, Any], ...] = ()  # extra MineConfig keys, e.g. (("ripu_image_score", "topk"),)


@dataclass(frozen=True)
class Quality:
    """How well one arm's image scores follow the real errors."""

    arm: Arm
    spearman_pixel: float
    spearman_miou: float
    top_precision: float
    scores: dict[str, float]  # path -> score, as in result.tsv
    ranking: list[str]  # paths, best first, as in result.tsv


def default_arms(algorithms: Sequence[str], ripu_scores: Sequence[str] = ()) -> list[Arm]:
    """One arm per algorithm at its defaults; ``ripu`` once per ``ripu_image_score`` in ``ripu_scores`` instead."""
    default = MineConfig().ripu_image_score
    arms = []
    for a in algorithms:
        if a == "ripu" and ripu_scores:
            arms += [Arm(f"ripu ({s}{', default' if s == default else ''})", a, (("ripu_image_score", s),))
                     for s in ripu_scores]
        else:
            arms.append(Arm(a, a))
    return arms


def average_ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values`` (n,), tied values sharing the mean of their ranks: (n,) float64."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size)
    ranks[order] = np.arange(1, v.size + 1)
    uniq, inverse = np.unique(v, return_inverse=True)  # ties: the mean rank of each distinct value
    return (np.bincount(inverse, weights=ranks) / np.bincount(inverse))[inverse] if uniq.size < v.size else ranks


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rho of two equally long sequences over the pairs where both are finite; nan if either is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        return math.nan
    ra, rb = average_ranks(a[keep]), average_ranks(b[keep])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / norm) if norm > 0 else math.nan


def top_fifth_precision(ranking: Sequence[str], errors: Mapping[str, float]) -> float:
    """Share of the first fifth of ``ranking`` (paths, best first) among the fifth of largest ``errors``.

    Both fifths have ``max(1, round(n / 5))`` images, n the paths with a finite error; ties in the
    error go to the earlier path of ``ranking``.
    """
    ranked = [p for p in ranking if math.isfinite(errors[p])]
    n = max(1, round(len(ranked) / 5))
    worst = set(sorted(ranked, key=lambda p: -errors[p])[:n])  # sorted is stable: ties in ranking order
    return len(worst.intersection(ranked[:n])) / n


def image_errors(predictor: Predictor, samples: Sequence[Sample], *, samples_per_gpu: int = 2,
                 workers_per_gpu: int = 2, amp: bool = False) -> list[RealError]:
    """The real error of ``predictor`` on each labelled sample (``image_path``, ``load_label()``), in order."""
    by_path = {s.image_path: s for s in samples}
    out = []
    for pred in iter_predictions(predictor, [s.image_path for s in samples], samples_per_gpu=samples_per_gpu,
                                 workers_per_gpu=workers_per_gpu, amp=amp):
        if pred.error is not None:
            raise DatasetError(f"cannot score {pred.path}: {pred.error}")
        sample = by_path[pred.path]
        label = sample.load_label()  # (H, W) uint8, 255 void
        if tuple(label.shape) != tuple(pred.size):
            raise DatasetError(size_mismatch(sample, pred.size, label.shape))
        predicted, _ = label_map(pred.proba, tuple(label.shape))  # (H, W) int64 at the label's size
        cm = ConfusionMatrix(predictor.num_classes)
        cm.update(predicted.cpu(), torch.from_numpy(label.copy()))  # copy: Pillow arrays are read-only
        m = cm.compute()
        out.append(RealError(pred.path, 1.0 - float(m["aAcc"]), 1.0 - float(m["mIoU"])))
    return out


def score_quality(checkpoint: str | Path, images: str | Path, labels: str | Path, out_dir: str | Path,
                  arms: Sequence[Arm] | None = None, *, img_scale: tuple[int, int] | None = None,
                  device: str = "auto", samples_per_gpu: int = 2, workers_per_gpu: int = 2,
                  predictor: Predictor | None = None) -> tuple[list[RealError], list[Quality]]:
    """The real per-image errors of ``checkpoint`` on the images of ``images`` that have a label PNG (same
    stem) in ``labels``, and each arm's :class:`Quality` (default: every algorithm at its defaults).

    ``img_scale`` (w, h): the working size instead of the checkpoint's. ``predictor``: ``checkpoint``
    already loaded (then ``img_scale`` and ``device`` are its own). ``out_dir`` receives ``images.txt``
    (the list mined) and one ``<algorithm>-<n>/`` folder of mining outputs per arm.
    """
    out = Path(out_dir)
    if predictor is None:
        predictor = load_predictor(checkpoint, device, img_scale=img_scale)
    samples = load_label_folder(images, labels, predictor.num_classes)
    listing = out / "images.txt"
    write_atomic(listing, "".join(f"{s.image_path}\n" for s in samples))
    base = dict(checkpoint=str(checkpoint), images=str(listing), samples_per_gpu=samples_per_gpu,
                workers_per_gpu=workers_per_gpu, device=str(predictor.device))
    cfg = build_config(MineConfig, {**base, "out_dir": str(out)})
    amp = cfg.fp16 if predictor.device.type == "cuda" else cfg.bf16  # autocast as mine() decides it
    errors = image_errors(predictor, samples, samples_per_gpu=samples_per_gpu, workers_per_gpu=workers_per_gpu,
                          amp=amp)
    by_path = {e.path: e for e in errors}
    rows = []
    for i, arm in enumerate(arms if arms is not None else default_arms(list(ALGORITHMS))):
        cfg = build_config(MineConfig, {**base, **dict(arm.keys), "mining_algorithm": arm.algorithm,
                                        "out_dir": str(out / f"{arm.algorithm}-{i}")})
        result = mine(cfg, predictor=predictor)
        if result.failed:
            raise DatasetError(f"{arm.name} could not read {result.failed[0][0]}: {result.failed[0][1]}")
        scores = dict(result.ranking)
        paths = [e.path for e in errors]
        s = [scores[p] for p in paths]
        rows.append(Quality(arm, spearman(s, [by_path[p].pixel_error for p in paths]),
                            spearman(s, [by_path[p].miou_error for p in paths]),
                            top_fifth_precision([p for p, _ in result.ranking],
                                                {p: by_path[p].pixel_error for p in paths}),
                            scores, [p for p, _ in result.ranking]))
    return errors, rows


def markdown(rows: Sequence[Quality]) -> str:
    """The table: arm | Spearman vs pixel error | Spearman vs (1 - image mIoU) | top-20 % precision."""
    def f(v: float) -> str:
        return "n/a" if not math.isfinite(v) else f"{v:+.3f}"

    lines = ["| algorithm | Spearman vs pixel error | Spearman vs (1 - image mIoU) | top-20% precision |",
             "|---|---|---|---|"]
    lines += [f"| {r.arm.name} | {f(r.spearman_pixel)} | {f(r.spearman_miou)} | {r.top_precision:.2f} |" for r in rows]
    return "\n".join(lines)


def per_image_tsv(errors: Sequence[RealError], rows: Sequence[Quality]) -> str:
    """One line per image: path, pixel error, mIoU error, then each arm's score (a header line first)."""
    head = "\t".join(["path", "pixel_error", "miou_error", *(r.arm.name for r in rows)])
    body = ["\t".join([e.path, f"{e.pixel_error:.6f}", f"{e.miou_error:.6f}",
                       *(f"{r.scores[e.path]:.9g}" for r in rows)]) for e in errors]
    return "\n".join([head, *body]) + "\n"


__all__ = ["Arm", "RealError", "Quality", "average_ranks", "default_arms", "image_errors", "markdown",
           "per_image_tsv", "score_quality", "spearman", "top_fifth_precision"]
