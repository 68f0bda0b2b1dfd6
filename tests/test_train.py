"""Training end to end on generated data: learning, resume, checkpoints, logs and bad configs."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import toy
import yaml

from mirseg import dist
from mirseg.checkpoint import read_checkpoint
from mirseg.cli import main
from mirseg.config import TrainConfig, build_config, fit_scale
from mirseg.constants import IGNORE_INDEX
from mirseg.data.images import read_image_size
from mirseg.data.sampler import IterationSampler
from mirseg.errors import ConfigError
from mirseg.loss import auto_class_weight, segmentation_loss
from mirseg.train import TrainingDiverged, train
from mirseg.train_state import LoopClock, TrainState, poly_lr


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return toy.shapes(tmp_path_factory.mktemp("shapes"))


def _cfg(shapes, work_dir, **kw):
    return toy.shapes_config(*shapes, work_dir, log_interval=10, **kw)


def test_the_toy_fastscnn_learns_the_shapes(toy_run):
    """The session's toy training (tests/toy.py): it learns, and leaves what a run leaves."""
    result, work_dir = toy_run.result, toy_run.result.work_dir
    assert result.class_names == ["background", "disc", "box"]
    assert result.best_metrics["mIoU"] > 0.8, result.best_metrics
    assert result.last_metrics == result.best_metrics  # the last evaluation was the best one
    ckpt = read_checkpoint(result.best)
    assert ckpt["arch"] == "fastscnn" and ckpt["class_names"] == result.class_names
    assert ckpt["ignore_blank_area"] is False and ckpt["metrics"]["mIoU"] == result.best_metrics["mIoU"]
    assert ckpt["background_index"] == 0 and ckpt["iteration"] == toy.ITERS
    assert ckpt["config"]["crop_size"] == [64, 64] and ckpt["config"]["lr"] == 0.12
    assert "optimizer" not in ckpt and {"optimizer", "scheduler", "best", "rng"} <= set(read_checkpoint(result.last))
    saved = yaml.safe_load((work_dir / "config.yaml").read_text())
    # The saved config holds the user classes, so it trains again as it is (background is added back).
    assert saved["class_names"] == ["disc", "box"] and saved["max_iters"] == toy.ITERS
    assert sorted(p.name for p in work_dir.glob("*.pth")) == ["best.pth", "last.pth"]
    assert list((work_dir / "tensorboard").glob("events.out.tfevents.*"))


def _weights(path):
    return read_checkpoint(path)["model"]


def test_resume_gives_the_same_weights(shapes, tmp_path):
    full = train(_cfg(shapes, tmp_path / "full", max_iters=6, interval=3, samples_per_gpu=2))

    class Interrupt(Exception):
        pass

    def stop_at_5(fraction):
        if fraction >= 5 / 6:
            raise Interrupt

    cut = _cfg(shapes, tmp_path / "cut", max_iters=6, interval=3, samples_per_gpu=2)
    with pytest.raises(Interrupt):
        train(cut, progress=stop_at_5)
    assert read_checkpoint(tmp_path / "cut" / "last.pth")["iteration"] == 3
    # Resume with data workers on: augmentation must not depend on which process loads an item.
    resumed = train(_cfg(shapes, tmp_path / "cut", max_iters=6, interval=3, samples_per_gpu=2, resume=True,
                         workers_per_gpu=2))
    a, b = _weights(full.last), _weights(resumed.last)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_label_png_layout_and_ignore_mode(shapes, tmp_path):
    tr, va = shapes
    cfg = build_config(TrainConfig, dict(
        train_images=str(tr.images), train_labels=str(tr.labels), val_images=str(va.images),
        val_labels=str(va.labels), class_names=["background", "disc", "box"], crop_size=[64, 64],
        img_scale=[128, 96], max_iters=2, interval=2, workers_per_gpu=0, work_dir=str(tmp_path / "png")))
    assert train(cfg).class_names == ["background", "disc", "box"]
    ignore = _cfg(shapes, tmp_path / "ign", max_iters=2, interval=2, ignore_black_area="true")
    result = train(ignore)
    assert result.class_names == ["disc", "box"]
    assert read_checkpoint(result.last)["ignore_blank_area"] is True


def test_checkpoint_rotation(shapes, tmp_path):
    train(_cfg(shapes, tmp_path, max_iters=4, interval=1, save_least_file=False, max_keep_ckpts=2,
               samples_per_gpu=2))
    names = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert names == ["best.pth", "iter_3.pth", "iter_4.pth", "last.pth"]


def test_nan_loss_stops_with_the_iteration(shapes, tmp_path):
    """The losses are read every log_interval (10 here), not every step: the error names the first bad iteration
    and the iterations read with it, and nothing is saved."""
    with pytest.raises(TrainingDiverged, match=r"at iteration \d+") as info:
        train(_cfg(shapes, tmp_path, max_iters=50, interval=50, lr=1e12, samples_per_gpu=2))
    found = re.search(r"loss is (\S+) at iteration (\d+) \(found reading iterations (\d+)-(\d+)\); lower lr",
                      str(info.value))
    assert found, str(info.value)
    value, bad, first, last = found[1], *map(int, found.groups()[1:])
    assert value in ("nan", "inf", "-inf") and first <= bad <= last and (first - 1) % 10 == 0 and last % 10 == 0
    assert not (tmp_path / "last.pth").exists()


def test_restore_keeps_this_runs_sgd_kernel_and_puts_back_the_state():
    """A last.pth from CUDA (fused SGD) resumed elsewhere: the momentum and the RNG come back, the kernel stays
    this run's (the saved param_groups would otherwise carry fused=True over, or drop it on the way to CUDA)."""
    def state(fused: bool | None) -> TrainState:
        torch.manual_seed(0)
        net = torch.nn.Conv2d(1, 1, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, fused=fused)
        return TrainState(net, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0),
                          torch.amp.GradScaler("cuda", enabled=False))

    saver = state(True)  # fused SGD runs on the CPU too
    saver.net(torch.ones(1, 1, 2, 2)).sum().backward()
    saver.optimizer.step()
    ckpt = {"model": saver.net.state_dict(), "iteration": 3, **saver.resume_state(None)}
    torch.rand(5)  # move the generator on: restore must put it back
    resumed = state(None)
    resumed.restore(ckpt, dist.Runtime(torch.device("cpu")))
    assert resumed.optimizer.param_groups[0]["fused"] is None and resumed.iteration == resumed.saved_at == 3
    momentum = [s["momentum_buffer"] for s in (saver.optimizer.state_dict()["state"][0],
                                               resumed.optimizer.state_dict()["state"][0])]
    assert torch.equal(*momentum) and torch.equal(torch.get_rng_state(), ckpt["rng"]["torch"])


def test_lr_scaling_and_class_weights_are_logged(shapes, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mirseg"):
        train(_cfg(shapes, tmp_path, max_iters=1, interval=1, samples_per_gpu=2, lr_scaling="linear",
                   class_weight="auto"))
    text = caplog.text
    assert "lr scaled (linear) from 0.12 (batch 32 of the preset) to 0.0075 (batch 2)" in text
    assert "class weights (auto): background=" in text


def test_the_loop_reports_where_its_time_goes(shapes, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mirseg"):
        result = train(_cfg(shapes, tmp_path, max_iters=4, interval=2, samples_per_gpu=2))
    t = result.timing
    assert t["iterations"] == 4 and t["s_per_iter"] > 0 and t["eval_s"] > 0 and 0 <= t["data_share"] <= 1
    assert t["data_s"] + t["step_s"] + t["eval_s"] == pytest.approx(t["seconds"])
    assert re.search(r"iteration 4/4: loss .* s/iteration \(\d+% waiting for data\)", caplog.text)
    assert re.search(r"trained 4 iterations: [0-9.]+ s/iteration \(\d+% waiting for data\), [0-9.]+ s evaluating",
                     caplog.text)


def test_loop_clock_counts_the_waits_for_batches_and_the_evaluation():
    def slow_batches():
        for i in range(3):
            time.sleep(0.05)
            yield i

    clock = LoopClock()
    assert list(clock.batches(slow_batches())) == [0, 1, 2]
    with clock.evaluating():
        time.sleep(0.05)
    s = clock.summary()
    assert s["iterations"] == 3 and s["data_s"] >= 0.15 and s["eval_s"] >= 0.05
    assert s["data_share"] > 0.5  # the loop did nothing but wait (0.15 s of it; a loaded machine adds a little)
    assert s["s_per_iter"] == pytest.approx((s["seconds"] - s["eval_s"]) / 3)


def test_scale_and_crop_fit_the_images_unless_given():
    """Not given, img_scale is the training images' median (w, h) and the crop the preset's clipped to it."""
    street = [(360, 480)] * 3 + [(720, 960)]  # (h, w)
    cfg = build_config(TrainConfig, {})
    assert fit_scale(cfg, street)[:2] == ((480, 360), (360, 480))
    assert "median size of the 4 training images" in fit_scale(cfg, street)[2]
    assert "the preset's [512, 1024] clipped to img_scale" in fit_scale(cfg, street)[2]
    assert fit_scale(cfg, [(480, 360)])[:2] == ((360, 480), (480, 360))  # portrait images
    big = [(1024, 2048)]  # Cityscapes-sized: the preset's crop fits, nothing is clipped
    assert fit_scale(cfg, big)[:2] == ((2048, 1024), (512, 1024)) and "clipped" not in fit_scale(cfg, big)[2]
    assert fit_scale(cfg, ())[:2] == ((2048, 1024), (512, 1024))  # nothing to look at: the preset's
    preset = build_config(TrainConfig, {"img_scale": "preset", "config_file": "hrnet_w18s"})
    assert fit_scale(preset, street)[:2] == ((2048, 1024), (512, 1024))
    given = build_config(TrainConfig, {"img_scale": [640, 480], "crop_size": [400, 400]})
    assert fit_scale(given, street) == ((640, 480), (400, 400),
                                        "img_scale [640, 480] (w, h): as given; crop_size [400, 400] (h, w): as given")
    assert build_config(TrainConfig, {"crop_size": [200, 300]}).resolved(street).crop_size == (200, 300)
    slide = build_config(TrainConfig, {"config_file": "deeplabv3plus_r18_769"}).resolved(street)
    assert (slide.crop_size, slide.slide_crop, slide.test_mode) == ((360, 480), (360, 480), "slide")
    with pytest.raises(ConfigError, match="img_scale"):
        build_config(TrainConfig, {"img_scale": "large"})


def test_training_logs_and_saves_the_fitted_scale(shapes, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mirseg"):
        train(_cfg(shapes, tmp_path, max_iters=1, interval=1, img_scale=None, crop_size=None))
    assert ("img_scale [128, 96] (w, h): the median size of the 24 training images (img_scale=preset gives the "
            "preset's [2048, 1024]); crop_size [96, 128] (h, w): the preset's [512, 1024] clipped to img_scale"
            in caplog.text)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["img_scale"] == [128, 96] and saved["crop_size"] == [96, 128]
    assert read_checkpoint(tmp_path / "last.pth")["config"]["img_scale"] == [128, 96]


@pytest.mark.parametrize("rule, lr", [("none", 0.12), ("sqrt", 0.03), ("linear", 0.0075)])
def test_lr_scaling_rules_set_the_optimizer_lr(shapes, tmp_path, caplog, rule, lr):
    with caplog.at_level(logging.INFO, logger="mirseg"):
        result = train(_cfg(shapes, tmp_path, max_iters=1, interval=1, samples_per_gpu=2, lr_scaling=rule,
                            warmup_iters=5))
    state = read_checkpoint(result.last, trust=True)["scheduler"]
    assert state["base_lrs"] == [pytest.approx(lr)]
    assert state["_last_lr"] == [pytest.approx(lr * poly_lr(lr, 1e-4, 0.9, 1, 5)(1))]  # in the warm-up
    assert f"from 0.12 (batch 32 of the preset) to {lr:g} (batch 2)" in caplog.text


def test_the_old_scale_lr_key_says_what_replaced_it():
    with pytest.raises(ConfigError, match=r"'scale_lr' \(renamed: lr_scaling \(none, sqrt or linear"):
        build_config(TrainConfig, {"scale_lr": True})


def test_class_weight_list_must_match(shapes, tmp_path):
    with pytest.raises(ValueError, match="class_weight has 2 values but there are 3 classes"):
        train(_cfg(shapes, tmp_path, max_iters=1, class_weight=[1, 2]))


def test_poly_schedule_and_auto_weights():
    f = poly_lr(0.01, 1e-4, 0.9, 100)
    assert f(0) == pytest.approx(1.0)
    assert f(100) * 0.01 == pytest.approx(1e-4)
    assert f(50) * 0.01 == pytest.approx((0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4)
    warm = poly_lr(0.01, 1e-4, 0.9, 100, warmup_iters=10)
    assert warm(0) == pytest.approx(0.1 * f(0)) and warm(5) == pytest.approx(0.55 * f(5))
    assert warm(10) == f(10) and warm(60) == f(60)  # after the warm-up: the poly schedule unchanged
    w = auto_class_weight(torch.tensor([900, 100, 0]).numpy())
    assert w[1] > w[0] and w[2] == 1.0


# ---------------------------------------------------------------------------------------------
# The loss and the sampler on their own


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, float]]:
    """(class, -log softmax) of every labelled pixel, by hand: log-sum-exp over the class axis of (N, K, H, W)."""
    out = []
    for n, y, x in zip(*torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)):
        z = logits[n, :, y, x].double()
        k = int(labels[n, y, x])
        out.append((k, float(torch.log(torch.exp(z).sum()) - z[k])))
    return out


def test_segmentation_loss_ignores_255_and_weights_the_aux_heads_and_classes():
    g = torch.Generator().manual_seed(0)
    decode, aux0, aux1 = (torch.randn(2, 3, 4, 5, generator=g) * 3 for _ in range(3))
    labels = torch.randint(0, 3, (2, 4, 5), generator=g)
    labels[0, :2] = IGNORE_INDEX  # 10 of 40 pixels unlabelled
    labels[1, 3, 4] = IGNORE_INDEX
    mean = {name: sum(v for _, v in _nll(t, labels)) / 29 for name, t in
            (("decode", decode), ("aux0", aux0), ("aux1", aux1))}
    total, parts = segmentation_loss({"out": decode, "aux": [aux0, aux1]}, labels, (0.4, 0.25))
    assert float(parts["decode"]) == pytest.approx(mean["decode"], rel=1e-5)
    assert float(parts["aux0"]) == pytest.approx(mean["aux0"], rel=1e-5)
    assert float(parts["aux1"]) == pytest.approx(mean["aux1"], rel=1e-5)
    want = mean["decode"] + 0.4 * mean["aux0"] + 0.25 * mean["aux1"]
    assert float(total) == pytest.approx(want, rel=1e-5) and float(parts["total"]) == pytest.approx(want, rel=1e-5)
    # An ignored pixel has no effect whatever its logits; no aux heads in eval mode: the decode head alone.
    changed = decode.clone()
    changed[0, :, :2] = 1000.0
    assert float(segmentation_loss({"out": changed}, labels, (0.4,))[0]) == pytest.approx(mean["decode"], rel=1e-5)
    # Class weights: PyTorch's weighted mean, sum(w[y] * nll) / sum(w[y]) over the labelled pixels.
    w = torch.tensor([0.5, 2.0, 1.0])
    pixels = _nll(decode, labels)
    by_hand = sum(float(w[k]) * v for k, v in pixels) / sum(float(w[k]) for k, _ in pixels)
    weighted, parts = segmentation_loss({"out": decode}, labels, (), class_weight=w)
    assert float(weighted) == pytest.approx(by_hand, rel=1e-5) and set(parts) == {"decode", "total"}
    # fp16 logits (autocast) are scored in fp32.
    half, _ = segmentation_loss({"out": decode.half()}, labels, ())
    assert half.dtype == torch.float32 and float(half) == pytest.approx(mean["decode"], rel=1e-2)


def _stream(n: int, batch: int, start: int, stop: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    return list(IterationSampler(n, batch, seed=7, start_iter=start, max_iters=stop, rank=rank, world_size=world))


def test_iteration_sampler_epochs_rank_slices_and_resume():
    n = 5
    batches = _stream(n, 2, 0, 10)  # 20 positions: four epochs of five items
    assert len(IterationSampler(n, 2, 7, 0, 10)) == 10 and len(IterationSampler(n, 2, 7, 4, 10)) == 6
    flat = [i for b in batches for i in b]
    epochs = [flat[e * n:(e + 1) * n] for e in range(4)]
    for e, indices in enumerate(epochs):
        # Index e*n + item: each epoch is a permutation of the items, and SegDataset seeds item's augmentation
        # from (seed, epoch, item).
        assert sorted(i - e * n for i in indices) == list(range(n)), (e, indices)
    assert len({tuple(i % n for i in indices) for indices in epochs}) > 1  # a new order each epoch
    assert _stream(n, 2, 0, 10) == batches  # drawn from the seed alone
    # Resume: starting at iteration 4 gives exactly the batches an uninterrupted run takes from there.
    assert _stream(n, 2, 4, 10) == batches[4:]
    # Two processes of batch 2 split the stream of one process of batch 4: rank r takes its half of each step.
    whole = _stream(n, 4, 0, 5)
    rank0, rank1 = _stream(n, 2, 0, 5, rank=0, world=2), _stream(n, 2, 0, 5, rank=1, world=2)
    assert [a + b for a, b in zip(rank0, rank1)] == whole
    assert _stream(n, 2, 3, 5, rank=1, world=2) == rank1[3:]


def test_cli_train_then_eval(shapes, tmp_path, capsys):
    tr, va = shapes
    work = tmp_path / "cli"
    args = [f"train_ann={tr.ann}", f"train_images={tr.images}", f"val_ann={va.ann}", f"val_images={va.images}",
            "crop_size=[64,64]", "img_scale=[128,96]", "max_iters=2", "interval=2", "workers_per_gpu=0",
            f"work_dir={work}"]
    assert main(["train", *args]) == 0
    assert main(["eval", str(work / "last.pth"), f"val_ann={va.ann}", f"val_images={va.images}"]) == 0
    assert "mIoU" in capsys.readouterr().out


def test_eval_img_scale_auto_fits_the_images_it_evaluates(shapes, tmp_path, caplog):
    """Not the preset's Cityscapes scale: the median (w, h) of the evaluated images, as training fits its own."""
    tr, va = shapes
    work = tmp_path / "cli"
    assert main(["train", f"train_ann={tr.ann}", f"train_images={tr.images}", f"val_ann={va.ann}",
                 f"val_images={va.images}", "crop_size=[64,64]", "img_scale=[64,48]", "max_iters=1", "interval=1",
                 "workers_per_gpu=0", f"work_dir={work}"]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mirseg"):
        assert main(["eval", str(work / "last.pth"), f"val_ann={va.ann}", f"val_images={va.images}",
                     "img_scale=auto"]) == 0
    sizes = [read_image_size(p) for p in sorted(Path(va.images).iterdir())]
    expected = [int(np.median([w for _, w in sizes])), int(np.median([h for h, _ in sizes]))]
    assert f"img_scale {expected} (w, h): the median size of the {len(sizes)} images evaluated" in caplog.text


def test_cli_reports_bad_keys(tmp_path, caplog):
    assert main(["train", "max_iter=3"]) == 2
    assert "did you mean 'max_iters'" in caplog.text
    cfg = tmp_path / "c.yaml"
    cfg.write_text("config_file: configs/fastscnn/nope.py\n")
    assert main(["train", str(cfg)]) == 2
    assert "unknown preset or mmseg config" in caplog.text
    assert Path(cfg).exists()


@pytest.mark.slow  # two torch processes start: ~9 s (CI runs it; test_interrupt has its torchrun twin)
def test_torchrun_two_cpu_processes(shapes, tmp_path):
    """DistributedDataParallel over gloo: two processes train one model and rank 0 alone writes it."""
    import subprocess
    import sys

    tr, va = shapes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mirseg",
           "train", f"train_ann={tr.ann}", f"train_images={tr.images}", f"val_ann={va.ann}",
           f"val_images={va.images}", "max_iters=4", "interval=2", "crop_size=[64,64]", "img_scale=[128,96]",
           "samples_per_gpu=2", "workers_per_gpu=0", "device=cpu", "lr_scaling=linear", f"work_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best:") == 1  # one summary line, from rank 0
    assert "to 0.015 (batch 4)" in proc.stdout + proc.stderr  # the total batch counts both processes
    ckpt = read_checkpoint(tmp_path / "last.pth")
    assert ckpt["iteration"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                          if v.is_floating_point())
