"""Mining: score values pinned on hand-built maps, invariants, superpixel caps, and `mirseg mine` end to end."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mirseg.config import MineConfig, build_config
from mirseg.errors import ConfigError
from mirseg.mining import ALGORITHMS, MiningParams, baselines, get_algorithm, ripu, rsal
from mirseg.mining.regions import region_means, region_modes, take_budget
from mirseg.mining.select import power_order, rank, select
from mirseg.mining.superpixels import SUPERPIXEL_ALGORITHMS, consecutive, grid, superpixels
from mirseg.mining.uncertainty import bvsb, entropy, get_uncertainty, least_confidence, margin, top2


def _proba(*pixels: list[float], h: int = 1) -> torch.Tensor:
    """(C, h, len(pixels)) from per-pixel class probabilities, repeated over h rows."""
    p = torch.tensor(pixels, dtype=torch.float32).T  # (C, W)
    return p[:, None, :].repeat(1, h, 1)


# ---------------------------------------------------------------------------------------------
# Per-pixel uncertainty


def test_uncertainty_values_two_and_three_classes():
    p = _proba([0.8, 0.2], [0.5, 0.5], [1.0, 0.0])
    torch.testing.assert_close(bvsb(p)[0], torch.tensor([0.25, 1.0, 0.0]))
    torch.testing.assert_close(margin(p)[0], torch.tensor([0.4, 1.0, 0.0]))
    torch.testing.assert_close(least_confidence(p)[0], torch.tensor([0.4, 1.0, 0.0]))
    h = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2)) / math.log(2)
    torch.testing.assert_close(entropy(p)[0], torch.tensor([h, 1.0, 0.0]))

    q = _proba([0.2, 0.5, 0.3], [1 / 3, 1 / 3, 1 / 3])
    torch.testing.assert_close(bvsb(q)[0], torch.tensor([0.6, 1.0]))
    torch.testing.assert_close(margin(q)[0], torch.tensor([0.8, 1.0]))
    torch.testing.assert_close(least_confidence(q)[0], torch.tensor([0.75, 1.0]))
    torch.testing.assert_close(entropy(q)[0, 1], torch.tensor(1.0))


def test_top2_batched_and_ties_go_to_the_lowest_class():
    p = torch.rand(2, 5, 4, 6).softmax(1)
    p1, p2, idx = top2(p)
    ref = p.topk(2, dim=1)
    torch.testing.assert_close(p1, ref.values[:, 0])
    torch.testing.assert_close(p2, ref.values[:, 1])
    assert torch.equal(idx.long(), p.argmax(1))
    _, _, tie = top2(_proba([0.4, 0.4, 0.2], [0.2, 0.4, 0.4]))
    assert tie[0].tolist() == [0, 1]


def test_uncertainty_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 classes"):
        bvsb(torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        entropy(torch.ones(3, 3))
    with pytest.raises(ValueError, match="did you mean 'entropy'"):
        get_uncertainty("entropie")
    assert get_uncertainty("BvSB") is bvsb


# ---------------------------------------------------------------------------------------------
# Superpixels


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random colour field with a few flat blobs: an image superpixels can latch on to."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (h, w, 3)).astype(np.float32), (0, 0), max(1.0, min(h, w) / 20))
    img = (img - img.min()) / max(float(np.ptp(img)), 1e-6) * 255
    for _ in range(3):
        cv2.circle(img, (int(rng.integers(w)), int(rng.integers(h))), max(2, min(h, w) // 6),
                   tuple(float(v) for v in rng.uniform(0, 255, 3)), -1)
    return img.astype(np.uint8)


@pytest.mark.parametrize("algorithm", SUPERPIXEL_ALGORITHMS)
@pytest.mark.parametrize(("size", "max_count", "cell"), [((64, 96), 1024, 8), ((64, 96), 50, 0),
                                                         ((360, 480), 300, 8), ((360, 480), 300, 0)])
def test_superpixels_stay_under_the_cap(algorithm, size, max_count, cell):
    labels = superpixels(_texture(*size), algorithm.upper(), max_count, cell)
    k = int(labels.max()) + 1
    assert labels.shape == size and labels.dtype == np.int32
    assert 1 <= k <= max_count
    assert np.array_equal(np.unique(labels), np.arange(k))  # consecutive: every label is a region
    if min(size) >= 360:
        assert k >= 0.5 * max_count  # close to the cap, not the original's ~M/4


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 7), (12, 200), (200, 12), (40, 40)])
@pytest.mark.parametrize("algorithm", SUPERPIXEL_ALGORITHMS)
def test_superpixels_of_tiny_images_do_not_crash(algorithm, size):
    # OpenCV segfaults on several of these shapes; they must fall back to a grid.
    labels = superpixels(_texture(*size, seed=3), algorithm, 16)
    assert labels.shape == size and 1 <= labels.max() + 1 <= 16
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))


def test_superpixels_are_deterministic_and_checked():
    img = _texture(120, 160, seed=5)
    for algorithm in SUPERPIXEL_ALGORITHMS:
        assert np.array_equal(superpixels(img, algorithm, 200, 4), superpixels(img, algorithm, 200, 4))
    with pytest.raises(ValueError, match="did you mean 'slico'"):
        superpixels(img, "slicoo", 100)
    with pytest.raises(ValueError, match="uint8 RGB"):
        superpixels(img.astype(np.float32), "slic", 100)


def test_grid_and_consecutive():
    g = grid(5, 7, 6)  # side 3: ceil(5/3) * ceil(7/3) = 2 * 3 = 6 cells
    assert g.max() == 5 and g[0, 0] == 0 and g[0, 3] == 1 and g[3, 0] == 3 and g[4, 6] == 5
    assert grid(4, 4, 1).max() == 0
    assert consecutive(np.array([[7, 7, 3], [9, 3, 3]])).tolist() == [[1, 1, 0], [2, 0, 0]]


# ---------------------------------------------------------------------------------------------
# Region statistics and RSAL


def test_region_means_and_modes_by_hand():
    labels = np.array([[0, 0, 1], [1, 2, 2]])
    values = np.array([[0.2, 0.4, 1.0], [0.0, 0.3, 0.3]])
    means, counts = region_means(values, labels)
    np.testing.assert_allclose(means, [0.3, 0.5, 0.3])
    assert counts.tolist() == [2, 2, 2]
    classes = np.array([[1, 1, 2], [0, 2, 1]])
    # region 0: {1, 1} -> 1; region 1: {2, 0} tie -> 0 (lowest); region 2: {2, 1} tie -> 1
    assert region_modes(classes, labels, num_classes=3).tolist() == [1, 0, 1]
    means, counts = region_means(values, labels, num_regions=4)  # an empty region: mean 0, count 0
    assert counts.tolist() == [2, 2, 2, 0] and means[3] == 0
    with pytest.raises(ValueError, match="same"):
        region_means(values, labels[:, :2])


def test_rsal_summary_by_hand():
    # 2 classes, 4 pixels in a row; superpixel 0 = pixels 0-1, superpixel 1 = pixels 2-3.
    p = _proba([0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5])
    labels = np.array([[0, 0, 1, 1]])
    s = rsal.summarize(p, labels)
    np.testing.assert_allclose(s.scores, [(0.25 + 0.4 / 0.6) / 2, (0.3 / 0.7 + 1.0) / 2], rtol=1e-6)
    assert s.classes.tolist() == [0, 0]  # superpixel 1: one pixel of each class (0.5/0.5 ties to 0) -> 0
    e = rsal.summarize(p, labels, uncertainty="entropy")
    assert e.scores[1] > e.scores[0]


def test_rsal_class_weights_threshold_and_choice():
    a = rsal.RsalSummary(np.array([0.5, 0.5, 0.5], np.float32), np.array([0, 0, 1], np.int16))
    b = rsal.RsalSummary(np.array([0.5, 0.5, 0.5], np.float32), np.array([1, 1, 1], np.int16))
    np.testing.assert_allclose(rsal.class_weights([a, b], 3), [math.exp(-2 / 6), math.exp(-4 / 6), 1.0])

    scores = np.arange(100, dtype=np.float64)  # R = 100
    assert rsal.threshold(scores, max_kept=2, topk=3) == 94.0  # m = min(6, 20) = 6: the 6th largest
    assert rsal.threshold(scores, max_kept=100, topk=3) == 80.0  # m = min(300, 20): the 80 % floor
    assert rsal.threshold(scores[::-1].copy(), max_kept=2, topk=3) == 94.0  # order does not matter
    assert rsal.threshold(np.array([0.3]), 5000, 3) == 0.3  # one region: it is the threshold
    assert rsal.threshold(np.zeros(0), 10, 3) == math.inf

    chosen = rsal.choose(np.array([0.1, 0.9, 0.5, 0.7, 0.3]), topk=2, tau=0.4)
    assert chosen.tolist() == [1, 3, 2]  # top 2 unconditionally, then 0.5 >= tau; 0.3 stops it
    assert rsal.choose(np.array([0.2, 0.1]), topk=3, tau=0.0).tolist() == [0, 1]  # fewer than k: all


def test_rsal_pool_scores_by_hand():
    a = rsal.RsalSummary(np.array([0.9, 0.2, 0.6], np.float32), np.array([0, 0, 1], np.int16))
    b = rsal.RsalSummary(np.array([0.4, 0.8], np.float32), np.array([1, 1], np.int16))
    pool = rsal.score_pool([a, b], num_classes=2, topk=1, max_kept=1, class_balance=False)
    # R = 5, m = min(1, floor(1.0)) = 1: tau = the largest = 0.9
    assert pool.threshold == pytest.approx(0.9)
    np.testing.assert_allclose(pool.scores, [0.9, 0.8], rtol=1e-6)
    assert [c.tolist() for c in pool.chosen] == [[0], [1]]

    bal = rsal.score_pool([a, b], num_classes=2, topk=2, max_kept=1, class_balance=True)
    w0, w1 = math.exp(-2 / 5), math.exp(-3 / 5)  # class 0 dominates 2 of 5 superpixels, class 1 three
    np.testing.assert_allclose(bal.weights, [w0, w1])
    np.testing.assert_allclose(bal.scores, [0.9 * w0 + 0.6 * w1, 0.8 * w1 + 0.4 * w1], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# RIPU


def test_ripu_impurity_by_hand():
    pred = torch.tensor([[0, 0, 1], [0, 0, 1], [2, 2, 2]])
    imp = ripu.impurity(pred, num_classes=3, radius=1)

    def h(*q):
        return -sum(x * math.log(x) for x in q if x > 0) / math.log(3)

    assert imp[1, 1].item() == pytest.approx(h(4 / 9, 2 / 9, 3 / 9), rel=1e-5)  # the whole map
    assert imp[0, 0].item() == pytest.approx(0.0, abs=1e-7)  # in-image window {0, 0, 0, 0}: pure
    assert imp[0, 2].item() == pytest.approx(h(1 / 2, 1 / 2), rel=1e-5)  # {0, 1, 0, 1}
    assert imp[2, 0].item() == pytest.approx(h(2 / 4, 2 / 4), rel=1e-5)  # {0, 0, 2, 2}
    with pytest.raises(ValueError, match="at least 2 classes"):
        ripu.impurity(pred, num_classes=1, radius=1)


def test_ripu_border_windows_are_not_biased_low():
    # A uniform prediction: entropy 1 everywhere, so every window's uncertainty is 1, corners included
    # (the original divided corner windows by 9 instead of their 4 in-image pixels: 4/9).
    p = torch.full((2, 5, 5), 0.5)
    p[0, :, :2], p[1, :, :2] = 0.5 - 1e-4, 0.5 + 1e-4  # argmax: class 1 in columns 0-1, class 0 from column 2
    u = ripu.window_sum(entropy(p), 1) / ripu.valid_count(5, 5, 1)
    torch.testing.assert_close(u[0, 0], torch.tensor(1.0), atol=1e-6, rtol=0)
    a = ripu.region_scores(p, 1)
    assert a[0, 0] == 0  # a pure window
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) / math.log(2)
    assert a[0, 2].item() == pytest.approx(h, rel=1e-4)  # columns 1-3: shares (2/3, 1/3), uncertainty ~1


def test_ripu_windows_do_not_overlap():
    a = torch.zeros(10, 10)
    a[5, 5], a[5, 6], a[6, 4], a[5, 9], a[0, 0] = 1.0, 0.95, 0.9, 0.8, 0.5
    centres, values = ripu.select_windows(a, radius=1, k=3)
    # (5, 6) and (6, 4) are within 2 of (5, 5): their windows would share pixels.
    assert centres.tolist() == [[5, 5], [5, 9], [0, 0]]
    np.testing.assert_allclose(values, [1.0, 0.8, 0.5])
    mask = ripu.window_mask((10, 10), centres, 1)
    assert [(mask == i + 1).sum() for i in range(3)] == [9, 6, 4]  # border windows are clipped
    # Any map: chosen centres are pairwise more than 2r apart in at least one axis.
    c, _ = ripu.select_windows(torch.rand(30, 40), radius=2, k=6)
    assert len(c) == 6
    for i in range(6):
        for j in range(i):
            assert max(abs(c[i] - c[j])) > 4
    # No room for k windows: what fits.
    assert len(ripu.select_windows(torch.rand(3, 3), radius=1, k=3)[0]) == 1


def test_ripu_image_scores_from_the_window_scores():
    torch.manual_seed(0)
    p = torch.rand(3, 20, 24).softmax(0)
    a = ripu.region_scores(p, 1)  # (20, 24)
    top = ripu.summarize(p, radius=1, k=3, image_score_method="topk")
    assert top.score == pytest.approx(sum(a[y, x].item() for y, x in top.centres), rel=1e-6)  # the k windows' sum
    assert top.values[0] == pytest.approx(a.max().item(), rel=1e-6)
    mean = ripu.summarize(p, radius=1, k=3)  # the default
    assert mean.score == pytest.approx(a.double().mean().item(), rel=1e-9)
    np.testing.assert_array_equal(mean.centres, top.centres)  # the windows are kept whatever the score
    best = np.sort(a.numpy().reshape(-1))[::-1]
    budget = ripu.summarize(p, radius=1, k=3, image_score_method="Budget", budget=0.1)  # ceil(48) windows
    assert budget.score == pytest.approx(best[:48].mean(), rel=1e-6)
    assert ripu.summarize(p, 1, 3, "budget", budget=1e-6).score == pytest.approx(best[0], rel=1e-6)  # >= 1 window
    with pytest.raises(ConfigError, match="did you mean 'mean'"):
        ripu.summarize(p, 1, 3, "meen")
    with pytest.raises(ConfigError, match="ripu_image_score"):
        MiningParams(ripu_image_score="max")


def _impure_patches(count: int, h: int = 60, w: int = 80) -> torch.Tensor:
    """(3, h, w): confident class 2 everywhere but ``count`` separate 6x6 patches of an unsure 0/1 checkerboard."""
    p = torch.zeros(3, h, w)
    p[2] = 0.98
    p[:2] = 0.01
    for i in range(count):
        y, x = 6 + 16 * (i // 4), 6 + 18 * (i % 4)  # up to 12 patches, 10+ pixels apart
        yy, xx = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
        odd = ((yy + xx) % 2).bool()  # (6, 6)
        patch = torch.stack([torch.where(odd, 0.45, 0.5), torch.where(odd, 0.5, 0.45), torch.full((6, 6), 0.05)])
        p[:, y:y + 6, x:x + 6] = patch
    return p


def test_ripu_image_score_grows_with_the_uncertain_regions_instead_of_saturating():
    """One unsure, impure patch in a clean image against eight: the top-k sum cannot tell them apart (its 3
    windows fit in one patch), the mean and the budget score rank the eight-patch image higher."""
    one, many = _impure_patches(1), _impure_patches(8)
    top = [ripu.summarize(p, 1, 3, "topk").score for p in (one, many)]
    assert top[0] > 0 and top[0] == pytest.approx(top[1], rel=1e-9)  # saturated: equal scores
    for method in ("mean", "budget"):
        s_one, s_many = (ripu.summarize(p, 1, 3, method, budget=0.022).score for p in (one, many))
        assert s_many > 2 * s_one > 0, method
    # The default MiningParams rank the same way through the miner.
    miner, params = get_algorithm("ripu"), MiningParams()
    scores, _ = miner.score_pool([miner.summarize(p, None, params) for p in (one, many)], ["a", "b"], 3, params)
    assert scores[1] > 2 * scores[0]


# ---------------------------------------------------------------------------------------------
# Baselines and selection


def test_reductions():
    m = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    assert baselines.reduce(m, "mean") == 4.5
    assert baselines.reduce(m, "MAX") == 9
    assert baselines.reduce(m, "sum") == 45
    assert baselines.reduce(m, "topk", 20) == 8.5  # the 2 best of 10
    assert baselines.reduce(m, "topk", 25) == 8.0  # ceil(2.5) = 3 pixels: 7, 8, 9
    with pytest.raises(ValueError, match="did you mean 'mean'"):
        baselines.reduce(m, "meen")


def test_random_scores_are_seeded_and_order_free():
    keys = [f"img_{i}.jpg" for i in range(50)]
    s = baselines.random_scores(keys, seed=1)
    assert np.all((s > 0) & (s < 1)) and len(set(s.tolist())) == 50
    np.testing.assert_array_equal(baselines.random_scores(keys[::-1], seed=1), s[::-1])
    assert not np.array_equal(baselines.random_scores(keys, seed=2), s)


def test_rank_breaks_ties_by_key():
    assert rank([0.5, 0.9, 0.5, 0.1], keys=["b", "z", "a", "c"]).tolist() == [1, 2, 0, 3]
    assert select([0.5, 0.9, 0.5], 2).tolist() == [1, 0]


@pytest.mark.parametrize("beta", [1.0, 2.0, 0.0])
def test_power_sampling_first_pick_is_proportional_to_score_power(beta):
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    w = scores**beta
    trials = 4000
    firsts = np.bincount([select(scores, 1, "power", beta, seed=s)[0] for s in range(trials)], minlength=4)
    # Binomial std of a share p over 4000 draws is at most 0.008; 0.03 is > 3.5 sigma. Seeds are fixed.
    np.testing.assert_allclose(firsts / trials, w / w.sum(), atol=0.03)


def test_power_sampling_is_seeded_order_free_and_complete():
    keys = [f"c{i}" for i in range(20)]
    scores = np.linspace(0.05, 1.0, 20)
    a = power_order(scores, 3.0, seed=7, keys=keys)
    assert sorted(a.tolist()) == list(range(20))  # a full order: every candidate once
    np.testing.assert_array_equal(power_order(scores, 3.0, seed=7, keys=keys), a)
    perm = np.random.default_rng(0).permutation(20)
    b = power_order(scores[perm], 3.0, seed=7, keys=[keys[i] for i in perm])
    assert [keys[perm[i]] for i in b] == [keys[i] for i in a]  # same draw whatever the input order
    assert not np.array_equal(power_order(scores, 3.0, seed=8, keys=keys), a)
    zero = power_order(np.array([0.0, 0.5, 0.2]), 1.0, seed=0)
    assert zero[-1] == 0  # weight 0 is never drawn before a positive one
    with pytest.raises(ValueError, match=">= 0"):
        power_order(np.array([-1.0, 1.0]))


# ---------------------------------------------------------------------------------------------
# The miners: lookup, parameters, invariants


def test_algorithm_lookup_and_params():
    assert get_algorithm("RSAL") is ALGORITHMS["rsal"]
    assert get_algorithm(" Least_Confidence ").name == "least_confidence"
    with pytest.raises(ValueError, match="did you mean 'ripu'"):
        get_algorithm("ripuu")
    with pytest.raises(ValueError, match="superpixel_algorithm.*did you mean 'seeds'"):
        MiningParams(superpixel_algorithm="seed")
    with pytest.raises(ValueError, match="topk_superpixel_score"):
        MiningParams(topk_superpixel_score=0)


def test_mining_params_are_mine_config_keys_by_name():
    """MiningParams takes its names, types and defaults from MineConfig: the two cannot drift apart."""
    keys = {f.name: f for f in dataclasses.fields(MineConfig)}
    knobs = dataclasses.fields(MiningParams)
    assert len(knobs) == 13
    for knob in knobs:
        assert knob.name in keys, f"MiningParams.{knob.name} is no MineConfig key"
        assert (knob.type, knob.default) == (keys[knob.name].type, keys[knob.name].default), knob.name
    # Every knob is carried over from the config, not just the ones that happen to keep their defaults.
    changed = dict(superpixel_algorithm="seeds", max_superpixel_per_image=7, superpixel_cell=0,
                   uncertainty_method="entropy", topk_superpixel_score=2, max_kept_mining_image=9, class_balance=False,
                   ripu_region_radius=3, ripu_image_score="budget", reduction="topk", topk_percent=5.0, seed=4,
                   region_budget=0.05)
    assert set(changed) == {k.name for k in knobs}
    assert MiningParams.from_config(build_config(MineConfig, changed)) == MiningParams(**changed)
    with pytest.raises(ConfigError, match="topk_percent must be in"):
        MiningParams.from_config(build_config(MineConfig, {"topk_percent": 0}))


def _scene(uncertain: bool, seed: int, h: int = 48, w: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    """A 3-class probability map and an image: confident everywhere, or unsure with mixed predictions."""
    rng = np.random.default_rng(seed)
    img = _texture(h, w, seed)
    regions = torch.from_numpy(superpixels(img, "slic", 40)).long() % 3  # class per region: mixed labels
    onehot = torch.nn.functional.one_hot(regions, 3).permute(2, 0, 1).float()  # (3, h, w)
    sharp = 1.0 + 1.5 * rng.random() if uncertain else 8.0 + rng.random()
    logits = onehot * (0.3 if uncertain else 1.0) * sharp + 0.05 * torch.from_numpy(rng.standard_normal((3, h, w)))
    return logits.float().softmax(0), img


def _pool_scores(name: str, scenes: list[tuple[torch.Tensor, np.ndarray]], keys: list[str],
                 params: MiningParams) -> np.ndarray:
    miner = get_algorithm(name)
    summaries = [miner.summarize(p, img, params) for p, img in scenes] if miner.summarize else []
    scores, chosen = miner.score_pool(summaries, keys, 3, params)
    assert len(scores) == len(chosen) == len(keys)
    return scores


@pytest.mark.parametrize("name", [n for n in ALGORITHMS if n != "random"])
def test_confident_images_score_below_uncertain_ones(name):
    params = MiningParams(max_superpixel_per_image=64, superpixel_cell=0, max_kept_mining_image=2)
    scenes = [_scene(False, 0), _scene(True, 1), _scene(False, 2), _scene(True, 3)]
    s = _pool_scores(name, scenes, ["a", "b", "c", "d"], params)
    assert min(s[1], s[3]) > max(s[0], s[2]), s


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_shuffling_the_candidates_changes_no_score(name):
    params = MiningParams(max_superpixel_per_image=64, superpixel_cell=0, max_kept_mining_image=2, seed=3)
    scenes = [_scene(i % 2 == 1, i) for i in range(6)]
    keys = [f"img{i}.png" for i in range(6)]
    s = _pool_scores(name, scenes, keys, params)
    perm = [4, 0, 5, 2, 1, 3]
    t = _pool_scores(name, [scenes[i] for i in perm], [keys[i] for i in perm], params)
    np.testing.assert_allclose(t, s[perm], rtol=1e-12)


def test_take_budget_by_hand():
    labels = np.array([[0, 0, 1, 1, 1],
                       [2, 2, 1, 1, 1],
                       [3, 3, 3, 3, 4]])  # region sizes 2, 6, 2, 4, 1 of 15 pixels
    # 0.3 * 15 = 4.5 pixels: region 3 (4 px) is 0.5 short, 3 + 0 (6 px) 1.5 over: the closer prefix is one region.
    assert take_budget(labels, [3, 0, 1], 0.3).tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]]
    # 0.4 * 15 = 6: 3 + 0 is exact; ids follow the order, the other regions stay 0.
    out = take_budget(labels, [3, 0, 1], 0.4)
    assert out.tolist() == [[2, 2, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]]
    assert take_budget(labels, [1], 0.01).max() == 1  # at least one region
    assert (take_budget(labels, [4, 0, 1, 2, 3], 1.0) > 0).all()
    with pytest.raises(ValueError, match="region_budget.*in \\(0, 1\\]"):
        take_budget(labels, [0], 0)
    with pytest.raises(ValueError, match="labels in 0..4"):
        take_budget(labels, [5], 0.5)


def test_ripu_budget_windows_merge_and_rank_by_the_best_window():
    a = torch.zeros(10, 12)
    a[2, 2], a[2, 3] = 0.9, 0.8  # overlapping windows: one region
    a[7, 9] = 0.7  # a window of its own
    out = ripu.budget_windows(a, 1, 16 / 120)  # 16 pixels: the two windows at (2, 2) and (2, 3), 3x4
    assert out.max() == 1 and (out == 1).sum() == 12 and out[1:4, 1:5].min() == 1
    out = ripu.budget_windows(a, 1, 21 / 120)  # + the window at (7, 9): 12 + 9 = 21
    assert out.max() == 2 and (out == 2).sum() == 9 and (out[6:9, 8:11] == 2).all()
    assert (ripu.budget_windows(a, 0, 2 / 120) > 0).sum() == 2  # r = 0: single pixels


@pytest.mark.parametrize("budget", [0.022, 0.05, 0.15])
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_region_masks_cover_the_budget_in_whole_ranked_regions(name, budget):
    # Generated 96x128 scenes; the working map is the probabilities' size (random: the image's).
    params = MiningParams(max_superpixel_per_image=256, superpixel_cell=0, region_budget=budget, seed=2)
    miner = get_algorithm(name)
    scenes = [_scene(True, i, 96, 128) for i in range(3)]
    summaries = [miner.summarize(p, img, params) for p, img in scenes] if miner.summarize else []
    _, chosen = miner.score_pool(summaries, ["a", "b", "c"], 3, params)
    p, img = scenes[0]
    regions = miner.regions(None if name == "random" else p, img, chosen[0], params)
    assert regions.shape == (96, 128) and regions.dtype == np.int32
    assert abs((regions > 0).mean() - budget) <= 0.1 * budget, (regions > 0).mean()
    n = int(regions.max())
    assert sorted(np.unique(regions).tolist()) == list(range(n + 1))  # ids 1..n, no gap
    if name == "ripu":  # merged windows, numbered by their best window
        a = ripu.region_scores(p, params.ripu_region_radius).numpy()
        best = [a[regions == i].max() for i in range(1, n + 1)]
        assert best == sorted(best, reverse=True)
        return
    labels = superpixels(img, params.superpixel_algorithm, 256, 0)
    taken = [int(np.unique(labels[regions == i]).item()) for i in range(1, n + 1)]  # each region one superpixel
    for i, lab in enumerate(taken):
        assert np.array_equal(regions == i + 1, labels == lab)  # ... and the whole of it
    if name == "rsal":
        assert taken == chosen[0][:n].tolist()  # the image's superpixels by weighted score
    elif name == "random":
        again = miner.regions(None, img, chosen[0], params)
        assert np.array_equal(again, regions)  # seeded
        assert not np.array_equal(miner.regions(None, img, chosen[1], params), regions)  # another image's order
    else:
        u, _ = region_means(get_uncertainty(name)(p), labels)
        assert np.all(np.diff(u[taken]) <= 0) and u[taken[-1]] >= np.median(u)  # most uncertain first


def test_rsal_ranking_starts_with_the_superpixels_that_make_the_score():
    params = MiningParams(max_superpixel_per_image=64, superpixel_cell=0, max_kept_mining_image=1)
    scenes = [_scene(True, i) for i in range(3)]
    summaries = [get_algorithm("rsal").summarize(p, img, params) for p, img in scenes]
    pool = rsal.score_pool(summaries, 3, 3, 1)
    for chosen, ranked, s in zip(pool.chosen, pool.ranked, summaries):
        assert sorted(ranked.tolist()) == list(range(len(s.scores)))  # every superpixel once
        assert ranked[:len(chosen)].tolist() == chosen.tolist()


def test_region_budget_is_checked(tmp_path, caplog):
    from mirseg.cli import main
    from mirseg.errors import EXIT_ERROR

    with pytest.raises(ValueError, match="region_budget"):
        MiningParams(region_budget=1.5)
    # On the command line: exit 2 with one line naming the key and the range, before anything is loaded.
    assert main(["mine", str(tmp_path / "none.pth"), str(tmp_path), "region_budget=0", f"out_dir={tmp_path}/o"]) \
        == EXIT_ERROR
    assert "region_budget is the share of an image's pixels a mask covers: in (0, 1], got 0.0" in caplog.text
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# The run: `mirseg mine` end to end


@pytest.fixture(scope="module")
def pool(trained_fastscnn, tmp_path_factory):
    """Candidates: the 8 validation images, a corrupt image and a zero-byte file."""
    import shutil

    _, _, val = trained_fastscnn
    root = tmp_path_factory.mktemp("pool")
    images = root / "images"
    shutil.copytree(val.images, images)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (images / "empty.jpg").write_bytes(b"")
    return images


def test_cli_mine_writes_tsv_masks_and_reports_bad_candidates(trained_fastscnn, pool, tmp_path, caplog):
    from mirseg.cli import main

    ckpt = trained_fastscnn[0]
    out = tmp_path / "mine"
    assert main(["mine", str(ckpt), str(pool), f"out_dir={out}", "save_masks=true", "workers_per_gpu=0",
                 "mining_algorithm=RSAL", "max_kept_mining_image=3", "samples_per_gpu=3",
                 "max_superpixel_per_image=128"]) == 0
    lines = (out / "result.tsv").read_text().splitlines()
    rows = [line.split("\t") for line in lines]
    listed = sorted(str(p) for p in pool.iterdir())
    assert sorted(r[0] for r in rows) == listed  # every candidate exactly once, path as listed
    scores = [float(r[1]) for r in rows]
    assert all(math.isfinite(s) for s in scores) and scores == sorted(scores, reverse=True)
    assert {r[0] for r in rows[-2:]} == {str(pool / "corrupt.png"), str(pool / "empty.jpg")}
    assert scores[-1] == scores[-2] == -1 and min(scores[:-2]) >= 0
    assert "could not be read" in caplog.text and "empty.jpg" in caplog.text

    masks = sorted((out / "masks").iterdir())
    assert len(masks) == 3 and len(list((out / "overlays").iterdir())) == 3
    top3 = [Path(r[0]).stem for r in rows[:3]]
    assert sorted(m.stem for m in masks) == sorted(top3)
    for m in masks:
        mask = cv2.imread(str(m), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (96, 128) and set(np.unique(mask)) <= {0, 255} and (mask == 255).any()
    assert len((out / "masks.tsv").read_text().splitlines()) == 3
    assert not (out / "report.html").exists() and not (out / "thumbs").exists()  # report=false: no page


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_mine_api_every_algorithm_ranks_every_candidate_and_masks_the_budget(trained_fastscnn, pool, tmp_path,
                                                                             algorithm):
    from mirseg.config import MineConfig, build_config
    from mirseg.mine import mine

    seen = []
    cfg = build_config(MineConfig, dict(checkpoint=str(trained_fastscnn[0]), images=str(pool),
                                        out_dir=str(tmp_path), mining_algorithm=algorithm, workers_per_gpu=0,
                                        save_masks=True, max_kept_mining_image=3, reduction="topk",
                                        region_budget=0.05, max_superpixel_per_image=256))
    result = mine(cfg, progress=seen.append)
    assert len(result.ranking) == 10 and len({p for p, _ in result.ranking}) == 10
    assert sorted(p for p, _ in result.failed) == [str(pool / "corrupt.png"), str(pool / "empty.jpg")]
    assert [p for p, _ in result.ranking[-2:]] == [str(pool / "corrupt.png"), str(pool / "empty.jpg")]
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert result.tsv.read_text().count("\n") == 10
    # Every algorithm masks its top images, each mask covering the budget; masks.tsv says the share.
    assert len(result.masks) == 3
    rows = [line.split("\t") for line in (tmp_path / "masks.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == [p for p, _ in result.ranking[:3]]
    for path, mask, overlay, share in rows:
        m = cv2.imread(str(tmp_path / mask), cv2.IMREAD_UNCHANGED)
        assert m.shape == (96, 128) and (tmp_path / overlay).is_file()
        assert float(share) == pytest.approx((m == 255).mean(), abs=1e-6)
        assert abs(float(share) - 0.05) <= 0.005, (path, share)


def test_pixel_stats_across_blocks_match_a_plain_reference():
    # 300x300 pixels span two blocks of the chunked pass.
    torch.manual_seed(1)
    p = torch.randn(5, 300, 300).mul(3).softmax(0)
    from mirseg.mining.uncertainty import pixel_stats

    s = pixel_stats(p, entropy=True)
    ref = p.topk(2, dim=0).values
    torch.testing.assert_close(s.p1, ref[0])
    torch.testing.assert_close(s.p2, ref[1])
    assert torch.equal(s.index.long(), p.argmax(0))
    torch.testing.assert_close(s.entropy, -(p * p.log()).sum(0) / math.log(5))


@pytest.mark.parametrize("radius", [1, 2, 8])  # 8: (17^2 > 255) takes the float path
def test_ripu_impurity_matches_brute_force(radius):
    rng = np.random.default_rng(radius)
    pred = rng.integers(0, 4, size=(12, 19))
    pred[:, :6] = 2  # a pure area too
    got = ripu.impurity(torch.from_numpy(pred).to(torch.uint8), 4, radius).numpy()
    h, w = pred.shape
    for y in range(h):
        for x in range(w):
            win = pred[max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1].ravel()
            q = np.bincount(win, minlength=4) / win.size
            want = -sum(v * math.log(v) for v in q if v > 0) / math.log(4)
            assert got[y, x] == pytest.approx(want, abs=1e-5), (y, x)
    sums = ripu.window_sum(torch.ones(4, 5), 1)
    assert sums[0, 0] == 4 and sums[1, 1] == 9 and sums[0, 2] == 6
    assert torch.equal(ripu.valid_count(4, 5, 1), sums)


def test_rsal_summary_on_a_coarser_superpixel_grid():
    # 4x4 probabilities, 2x2 superpixel grid: each grid cell is a 2x2 block of working pixels.
    p1 = torch.tensor([[0.9, 0.5, 0.8, 0.8],
                       [0.7, 0.6, 0.8, 0.8],
                       [0.3, 0.3, 0.2, 0.2],
                       [0.3, 0.3, 0.2, 0.2]])
    p = torch.stack([p1, 1 - p1])  # class 0 where p1 > 0.5
    labels = np.array([[0, 1], [1, 1]])
    s = rsal.summarize(p, labels)
    u = torch.minimum(p1, 1 - p1) / torch.maximum(p1, 1 - p1)  # BvSB per pixel
    blocks = u.reshape(2, 2, 2, 2).mean(dim=(1, 3))  # (2, 2) block means
    np.testing.assert_allclose(s.scores, [blocks[0, 0], blocks[[0, 1, 1], [1, 0, 1]].mean()], rtol=1e-6)
    # Dominant class: the argmax at each cell centre, pixels (1, 1), (1, 3), (3, 1), (3, 3) -> 0, 0, 1, 1.
    assert s.classes.tolist() == [0, 1]
    with pytest.raises(ValueError, match="larger"):
        rsal.summarize(p, np.zeros((5, 4), np.int64))


def _mine(ckpt: Path, images: str | Path, out: Path, **extra):
    from mirseg.config import MineConfig, build_config
    from mirseg.mine import mine

    return mine(build_config(MineConfig, dict(checkpoint=str(ckpt), images=str(images), out_dir=str(out),
                                              workers_per_gpu=0, **extra)))


def test_mine_result_does_not_depend_on_the_candidate_order(trained_fastscnn, pool, tmp_path):
    paths = sorted(str(p) for p in pool.iterdir())
    shuffled = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))]
    (tmp_path / "a.txt").write_text("\n".join(paths) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(shuffled) + "\n")
    # One image per forward pass: another order puts an image into a batch of another size (the unreadable
    # ones leave gaps in the batch groups), and oneDNN's kernels for one image and for several differ in the
    # last bits (~1e-7). What is checked here is that the pool's scoring and ranking are order-free.
    a = _mine(trained_fastscnn[0], tmp_path / "a.txt", tmp_path / "a", max_superpixel_per_image=96, samples_per_gpu=1)
    b = _mine(trained_fastscnn[0], tmp_path / "b.txt", tmp_path / "b", max_superpixel_per_image=96, samples_per_gpu=1)
    assert a.ranking == b.ranking
    assert (tmp_path / "a" / "result.tsv").read_text() == (tmp_path / "b" / "result.tsv").read_text()


def test_mine_power_sampling_writes_priorities(trained_fastscnn, pool, tmp_path):
    runs = [_mine(trained_fastscnn[0], pool, tmp_path / f"r{i}", mining_algorithm="margin", sampling="power",
                  power_beta=1.0, seed=seed) for i, seed in enumerate((5, 5, 6))]
    scores = [s for _, s in runs[0].ranking]
    assert scores[:8] == [(8 - i) / 8 for i in range(8)] and scores[8:] == [-1.0, -1.0]
    assert runs[0].ranking == runs[1].ranking  # seeded
    assert [p for p, _ in runs[0].ranking] != [p for p, _ in runs[2].ranking]
    assert sorted(p for p, _ in runs[0].ranking[:8]) == sorted(str(p) for p in pool.glob("img_*.png"))


def test_mine_with_only_bad_candidates(trained_fastscnn, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "b.png").write_bytes(b"not an image")
    (bad / "a.jpg").write_bytes(b"")
    result = _mine(trained_fastscnn[0], bad, tmp_path / "out", save_masks=True)
    assert result.ranking == [(str(bad / "a.jpg"), -1.0), (str(bad / "b.png"), -1.0)]
    assert len(result.failed) == 2 and "empty" in result.failed[0][1] and result.masks == []
    with pytest.raises(ValueError, match="did you mean 'ripu'"):
        _mine(trained_fastscnn[0], bad, tmp_path / "out", mining_algorithm="RIPUU")


def test_mine_with_bf16_on_a_cpu_without_it_says_so_once(trained_fastscnn, pool, tmp_path, caplog, monkeypatch):
    """Two prediction passes (the ranking, then the top images' masks), one line saying bf16 means fp32 here."""
    import logging

    from mirseg import machine
    from mirseg.config import MineConfig, build_config
    from mirseg.mine import mine

    monkeypatch.setattr(machine, "native_bf16", lambda: False)
    monkeypatch.delenv("MIRSEG_CPU_BF16", raising=False)
    cfg = build_config(MineConfig, dict(checkpoint=str(trained_fastscnn[0]), images=str(pool), out_dir=str(tmp_path),
                                        mining_algorithm="RSAL", workers_per_gpu=0, save_masks=True,
                                        max_kept_mining_image=2, bf16=True, device="cpu"))
    with caplog.at_level(logging.INFO, logger="mirseg"):
        result = mine(cfg)
    assert len(result.masks) == 2  # the second pass ran
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("amp:")]
    assert said == [f"amp: {machine.cpu_model()} has no native bfloat16 (AVX512-BF16, AMX or Arm BF16); running in "
                    "fp32 (MIRSEG_CPU_BF16=1 forces bf16)"]
