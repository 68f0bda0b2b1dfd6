"""bench/score_quality.py (``bench/mine.py --camvid``): rank statistics by hand, real errors, every algorithm's row."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from mirseg.data.images import write_image
from mirseg.data.labelfolder import load_label_folder
from mirseg.data.synthetic import make_dataset
from mirseg.infer import iter_predictions, load_predictor
from mirseg.mining import ALGORITHMS, baselines
from mirseg.predict import label_map

REPO = Path(__file__).resolve().parents[1]


def _bench(name: str):
    """A bench script as a module (bench/ is not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


sq = _bench("score_quality")


def test_spearman_and_average_ranks_by_hand():
    assert sq.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    np.testing.assert_allclose(sq.average_ranks([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    # Ties: Pearson of the average ranks ([1, 2.5, 2.5, 4] against [1, 2, 3, 4]) = 4.5 / sqrt(4.5 * 5).
    assert sq.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert sq.spearman([3, 2, 1], [1, 5, 9]) == pytest.approx(-1.0)
    assert sq.spearman([1, 2, math.nan, 3], [1, 2, 0, 3]) == pytest.approx(1.0)  # pairs with a nan are left out
    assert math.isnan(sq.spearman([1, 1, 1], [1, 2, 3]))  # a constant score ranks nothing


def test_top_fifth_precision_by_hand():
    errors = {f"p{i}": e for i, e in enumerate([0.9, 0.1, 0.8, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.05])}  # worst: p0, p2
    assert sq.top_fifth_precision(["p0", "p2", *[f"p{i}" for i in (1, 3, 4, 5, 6, 7, 8, 9)]], errors) == 1.0
    assert sq.top_fifth_precision(["p0", "p1", *[f"p{i}" for i in (2, 3, 4, 5, 6, 7, 8, 9)]], errors) == 0.5
    assert sq.top_fifth_precision(["p9", "p1", *[f"p{i}" for i in range(2, 9)], "p0"], errors) == 0.0
    assert sq.top_fifth_precision(["a", "b"], {"a": 0.1, "b": 0.2}) == 0.0  # one image per fifth


def test_real_errors_of_a_label_the_model_predicts_and_of_one_it_never_does(tmp_path, trained_fastscnn):
    ckpt, _, _ = trained_fastscnn
    data = make_dataset(tmp_path / "d", 2, size=(96, 128), num_classes=2, seed=11, labels=True)
    predictor = load_predictor(ckpt, "cpu")
    paths = sorted(str(p) for p in data.images.iterdir())
    for i, pred in enumerate(iter_predictions(predictor, paths, workers_per_gpu=0)):
        own = label_map(pred.proba, pred.size)[0].numpy().astype(np.uint8)  # (H, W) the model's own answer
        label = own if i == 0 else (own + 1) % 3  # image 1: every pixel labelled as a class it did not predict
        label[:10] = 255  # void rows count for nothing
        write_image(data.labels / Path(pred.path).name, label)
    samples = load_label_folder(data.images, data.labels, predictor.num_classes)
    errors = sq.image_errors(predictor, samples, workers_per_gpu=0)
    assert [e.path for e in errors] == paths
    assert (errors[0].pixel_error, errors[0].miou_error) == (0.0, 0.0)
    assert (errors[1].pixel_error, errors[1].miou_error) == (1.0, 1.0)


def test_score_quality_rows_for_every_algorithm(tmp_path, trained_fastscnn):
    ckpt, _, _ = trained_fastscnn
    data = make_dataset(tmp_path / "d", 10, size=(96, 128), num_classes=2, seed=7, labels=True)
    arms = sq.default_arms(list(ALGORITHMS), ["mean", "topk"])
    errors, rows = sq.score_quality(ckpt, data.images, data.labels, tmp_path / "out", arms, device="cpu",
                                    workers_per_gpu=0)
    assert [r.arm.name for r in rows] == ["rsal", "ripu (mean, default)", "ripu (topk)", "random", "entropy",
                                          "margin", "least_confidence"]
    assert len(errors) == 10 and len({e.pixel_error for e in errors}) > 1  # errors that can be ranked
    for r in rows:
        assert math.isfinite(r.spearman_pixel) and math.isfinite(r.spearman_miou), r.arm.name
        assert -1 <= r.spearman_pixel <= 1 and r.top_precision in (0.0, 0.5, 1.0)
        assert set(r.scores) == {e.path for e in errors}
    # random's row is the Spearman correlation of its seeded scores (mine's result.tsv) and the errors.
    paths = [e.path for e in errors]
    random = next(r for r in rows if r.arm.name == "random")
    expected = baselines.random_scores(paths, seed=0)
    np.testing.assert_allclose([random.scores[p] for p in paths], expected, rtol=1e-8)
    assert random.spearman_pixel == pytest.approx(sq.spearman(expected, [e.pixel_error for e in errors]))
    # The two RIPU rows differ only in the image score: both mined the same images.
    (mean,), (topk,) = ([r for r in rows if r.arm.name.startswith(f"ripu ({k}")] for k in ("mean", "topk"))
    assert mean.scores != topk.scores
    table = sq.markdown(rows)
    assert table.splitlines()[0].startswith("| algorithm | Spearman vs pixel error |") and len(table.splitlines()) == 9
    tsv = sq.per_image_tsv(errors, rows).splitlines()
    assert len(tsv) == 11 and tsv[0].split("\t")[:3] == ["path", "pixel_error", "miou_error"]
