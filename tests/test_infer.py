"""Prediction: whole and sliding-window logits, the prediction API, `mirseg infer` and its outputs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mirseg import predict
from mirseg.checkpoint import read_checkpoint
from mirseg.cli import main
from mirseg.coco_result import CocoResultWriter, class_annotations, class_rles, encode_mask, mask_bbox
from mirseg.config import InferConfig, build_config, eval_config
from mirseg.data.sources import list_images
from mirseg.data.synthetic import make_dataset
from mirseg.evaluate import evaluate_checkpoint
from mirseg.infer import iter_predictions, load_predictor, run_inference
from mirseg.metrics import ConfusionMatrix
from mirseg.models import build_model
from mirseg.outputs import output_names
from mirseg.predict import label_map, predict_logits, predict_proba, sliding_window
from mirseg.visualize import PALETTE


def test_slide_matches_mmseg(parity_dir, fill):
    model = build_model("fastscnn", 19)
    model.load_state_dict(fill.fill_state_dict(model.state_dict()))
    x = fill.parity_input((2, 3, 64, 128))
    ours = predict_logits(model, x, mode="slide", crop_size=(48, 48), stride=(32, 32)).numpy()
    ref = np.load(parity_dir / "fastscnn_slide_crop48_stride32.npz")["logits"]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


class _Position(nn.Module):
    """A 'model' whose logits are the input itself: slide results can be computed by hand."""

    def forward(self, x):
        return {"out": x}


@pytest.mark.parametrize("size", [(10, 13), (4, 5), (7, 7)])
def test_slide_of_identity_is_identity(size):
    # Averaging identical copies of a pixel gives the pixel back, whatever the window layout;
    # this covers clipped border windows and images smaller than the crop.
    x = torch.randn(2, 3, *size)
    out = sliding_window(_Position(), x, crop_size=(6, 6), stride=(4, 3), max_batch=3)
    torch.testing.assert_close(out, x)


def test_slide_window_count_is_mmsegs():
    counted = []

    class Count(nn.Module):
        def forward(self, x):
            counted.append(x.shape)
            return {"out": torch.zeros(x.shape[0], 2, *x.shape[2:])}

    sliding_window(Count(), torch.zeros(1, 3, 64, 128), (48, 48), (32, 32), max_batch=100)
    # rows: ceil((64-48)/32)+1 = 2, cols: ceil((128-48)/32)+1 = 4
    assert counted == [torch.Size([8, 3, 48, 48])]


def test_predict_logits_restores_train_mode_and_checks_mode():
    model = build_model("fastscnn", 3).train()
    x = torch.randn(1, 3, 32, 48)
    out = predict_logits(model, x)
    assert out.shape == (1, 3, 32, 48) and model.training
    with pytest.raises(ValueError, match="crop_size"):
        predict_logits(model, x, mode="slide")
    with pytest.raises(ValueError, match="unknown inference mode"):
        predict_logits(model, x, mode="tiles")


def test_predict_proba_sums_to_one_at_requested_size():
    p = predict_proba(torch.randn(2, 4, 8, 8), size=(16, 12))
    assert p.shape == (2, 4, 16, 12)
    torch.testing.assert_close(p.sum(1), torch.ones(2, 16, 12))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_the_softmax_in_place_is_the_softmax_written_over_the_logits(fmt):
    logits = (3 * torch.randn(2, 19, 24, 40)).contiguous(memory_format=fmt)
    kept = logits.clone()
    expected = predict_proba(logits)  # not in place: the logits stay as they were
    torch.testing.assert_close(expected, kept.softmax(dim=1))  # (channels-last: another kernel, same values)
    assert torch.equal(logits, kept)
    out = predict_proba(logits, inplace=True)
    assert out.data_ptr() == logits.data_ptr() and out.is_contiguous(memory_format=fmt)
    assert torch.equal(out, expected)  # bit for bit what the softmax into a new tensor gives


# ---------------------------------------------------------------------------------------------
# The prediction API and `mirseg infer` on the trained toy model (tests/conftest.py::trained_fastscnn).



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _infer_cfg(ckpt, images, out_dir, **kw) -> InferConfig:
    values = {"checkpoint": str(ckpt), "images": str(images), "out_dir": str(out_dir), "workers_per_gpu": 0}
    return build_config(InferConfig, {**values, **kw})


def _labels(pred) -> np.ndarray:
    """Original-size label map of an ImagePrediction."""
    return label_map(pred.proba, pred.size)[0].numpy()


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), rgb[..., ::-1])


def test_load_predictor_uses_the_checkpoints_test_scale(trained_fastscnn, tmp_path):
    ckpt, _, _ = trained_fastscnn
    p = load_predictor(ckpt, device="cpu")
    assert (p.arch, p.img_scale, p.test_mode) == ("fastscnn", (128, 96), "whole")
    assert p.class_names == ["background", "disc", "box"] and p.background_index == 0
    assert not p.model.training
    q = load_predictor(ckpt, device="cpu", img_scale=(64, 48), test_mode="slide", slide_crop=(32, 32),
                       slide_stride=(16, 16))
    assert (q.img_scale, q.test_mode, q.slide_crop, q.slide_stride) == ((64, 48), "slide", (32, 32), (16, 16))
    torch.save({"a": torch.zeros(1)}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="not a mirseg checkpoint"):
        load_predictor(tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="test_mode"):
        load_predictor(ckpt, test_mode="tiles")


def test_list_images_folder_glob_and_list_file(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    for rel in ("a/2.png", "a/1.jpg", "a/sub/3.PNG", "a/notes.txt", "b/4.bmp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            (tmp_path / rel).write_text("not an image list\n")
        else:
            cv2.imwrite(str(tmp_path / rel), img)
    a = tmp_path / "a"
    assert list_images(a) == [str(a / "1.jpg"), str(a / "2.png"), str(a / "sub" / "3.PNG")]
    assert list_images(str(tmp_path / "a" / "*.png")) == [str(a / "2.png")]
    # "**" recurses; files that are not images (notes.txt) are left out
    assert list_images(str(tmp_path / "**" / "*.*")) == [str(a / "1.jpg"), str(a / "2.png"), str(a / "sub" / "3.PNG"),
                                                          str(tmp_path / "b" / "4.bmp")]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\nb/4.bmp\n\n{a / '1.jpg'}\tsome/label.png\nmissing.jpg\n")
    assert list_images(lst) == [str(tmp_path / "b" / "4.bmp"), str(a / "1.jpg"), str(tmp_path / "missing.jpg")]
    assert list_images(a / "1.jpg") == [str(a / "1.jpg")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="no images found"):
        list_images(str(tmp_path / "*.gif"))


def test_output_names_never_collide():
    paths = ["a/x.jpg", "b/x.jpg", "x.png", "c/x__2.png", "d/X.jpg", "y.jpg"]
    names = output_names(paths)
    assert names == ["x", "x__3", "x__4", "x__2", "X__5", "y"]
    assert len({n.lower() for n in names}) == len(paths)


def test_cli_infer_predicts_the_toy_images(trained_fastscnn, tmp_path):
    ckpt, _, val = trained_fastscnn
    out = tmp_path / "out"
    rc = main(["infer", str(ckpt), str(val.images), f"out_dir={out}", "save_color=true", "save_overlay=true",
               "save_proba=true", "samples_per_gpu=3", "workers_per_gpu=1"])
    assert rc == 0
    assert (out / "classes.txt").read_text().split() == ["background", "disc", "box"]
    names = sorted(p.stem for p in val.images.glob("*.png"))
    rows = (out / "images.tsv").read_text().splitlines()
    assert rows[0] == "image_id\tname\tpath\tstatus" and [r.split("\t")[1] for r in rows[1:]] == names
    correct = total = 0
    for name in names:
        label = cv2.imread(str(out / "labels" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        truth = cv2.imread(str(val.labels / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert label.shape == truth.shape == (96, 128) and label.dtype == np.uint8
        correct += int((label == truth).sum())
        total += truth.size
        # colour PNG: an indexed PNG whose indices are the labels and whose palette is PALETTE
        color = Image.open(out / "color" / f"{name}.png")
        assert color.mode == "P" and np.array_equal(np.array(color), label)
        assert np.array_equal(np.array(color.convert("RGB")), PALETTE[label])
        assert cv2.imread(str(out / "overlay" / f"{name}.jpg")).shape == (96, 128, 3)
        proba = np.load(out / "proba" / f"{name}.npy")
        assert proba.shape == (3, 96, 128) and proba.dtype == np.float16
        assert (proba.astype(np.float32).argmax(0) == label).mean() > 0.99  # float16 rounding may flip ties
    assert correct / total > 0.9, correct / total
    assert not list(out.rglob(".*"))  # no temp files left behind


def test_batched_and_unbatched_give_identical_labels(trained_fastscnn):
    ckpt, _, val = trained_fastscnn
    p = load_predictor(ckpt, device="cpu")
    paths = list_images(val.images)
    one = list(iter_predictions(p, paths, samples_per_gpu=1, workers_per_gpu=0))
    many = list(iter_predictions(p, paths, samples_per_gpu=4, workers_per_gpu=2))
    assert [r.index for r in many] == list(range(len(paths))) and [r.path for r in many] == paths
    for a, b in zip(one, many):
        assert np.array_equal(_labels(a), _labels(b))
        torch.testing.assert_close(a.proba, b.proba, atol=1e-5, rtol=0)


class _Recorder(nn.Module):
    """Wraps a model and records the input shape of every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.shapes = model, []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.model(x)


def test_mixed_sizes_in_one_batch_come_back_at_their_own_sizes(trained_fastscnn, tmp_path):
    ckpt, _, val = trained_fastscnn
    src = cv2.imread(str(sorted(val.images.glob("*.png"))[0]))[..., ::-1]  # (96, 128, 3) RGB
    sizes = {"a": (48, 64), "b": (96, 128), "c": (80, 200), "d": (192, 256), "e": (96, 96)}
    for name, (h, w) in sizes.items():
        _write_rgb(tmp_path / "imgs" / f"{name}.png", cv2.resize(src, (w, h), interpolation=cv2.INTER_AREA))
    p = load_predictor(ckpt, device="cpu")
    p.model = _Recorder(p.model)
    paths = list_images(tmp_path / "imgs")
    batched = list(iter_predictions(p, paths, samples_per_gpu=4, workers_per_gpu=0))
    # a, b, d fit 128x96 at the same size and share one forward pass; c (51x128) and e (96x96) go alone
    assert sorted(p.model.shapes) == sorted([(3, 3, 96, 128), (1, 3, 51, 128), (1, 3, 96, 96)])
    assert [r.size for r in batched] == list(sizes.values())
    p.model.shapes.clear()
    single = list(iter_predictions(p, paths, samples_per_gpu=1, workers_per_gpu=0))
    assert len(p.model.shapes) == 5
    for a, b in zip(batched, single):
        assert np.array_equal(_labels(a), _labels(b))
    result = run_inference(_infer_cfg(ckpt, tmp_path / "imgs", tmp_path / "out", samples_per_gpu=4))
    for name, size in sizes.items():
        assert cv2.imread(str(tmp_path / "out" / "labels" / f"{name}.png"), cv2.IMREAD_UNCHANGED).shape == size
    assert result.num_images == 5 and not result.failed


def test_a_cpu_batch_holds_at_most_its_pixel_budget(trained_fastscnn, tmp_path, monkeypatch):
    """With the budget at three 96x96 images, samples_per_gpu=4 runs the 96x128 images two at a time and the 96x96
    ones three at a time (the fourth alone, at the group's end); on a GPU samples_per_gpu alone decides."""
    ckpt, _, val = trained_fastscnn
    src = cv2.imread(str(sorted(val.images.glob("*.png"))[0]))[..., ::-1]  # (96, 128, 3) RGB
    for i in range(4):
        _write_rgb(tmp_path / "imgs" / f"a{i}.png", src)
        _write_rgb(tmp_path / "imgs" / f"b{i}.png", np.ascontiguousarray(src[:, :96]))
    monkeypatch.setattr(predict, "CPU_BATCH_PIXELS", 3 * 96 * 96)
    p = load_predictor(ckpt, device="cpu")
    p.model = _Recorder(p.model)
    got = list(iter_predictions(p, list_images(tmp_path / "imgs"), samples_per_gpu=4, workers_per_gpu=0))
    assert [g.size for g in got] == [(96, 128)] * 4 + [(96, 96)] * 4
    assert p.model.shapes == [(2, 3, 96, 128), (2, 3, 96, 128), (3, 3, 96, 96), (1, 3, 96, 96)]
    assert predict.batch_limit(torch.device("cuda"), 96 * 128, 4) == 4
    assert predict.batch_limit(torch.device("cpu"), 2000 * 2000, 4) == 1  # never 0


def test_coco_json_round_trips_through_pycocotools(trained_fastscnn, tmp_path):
    from pycocotools.coco import COCO

    ckpt, _, val = trained_fastscnn
    result = run_inference(_infer_cfg(ckpt, val.images, tmp_path / "out"))
    coco = COCO(str(result.coco_json))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["disc", "box"]  # no background
    assert coco.getCatIds() == [1, 2]  # ids are the model's class indices = label PNG values
    assert len(coco.getImgIds()) == 8
    for img in coco.loadImgs(coco.getImgIds()):
        assert "/" not in img["file_name"] and (val.images / img["file_name"]).is_file()
        label = cv2.imread(str(tmp_path / "out" / "labels" / f"{Path(img['file_name']).stem}.png"),
                           cv2.IMREAD_UNCHANGED)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert sorted(a["category_id"] for a in anns) == sorted(set(np.unique(label).tolist()) - {0})
        for a in anns:
            mask = coco.annToMask(a)
            assert np.array_equal(mask.astype(bool), label == a["category_id"])
            assert isinstance(a["area"], int) and a["area"] == int(mask.sum())
            ys, xs = np.nonzero(mask)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 1
            assert 0.0 < a["score"] <= 1.0 and a["confidence"] == a["score"]


def test_corrupt_image_is_reported_and_skipped(trained_fastscnn, tmp_path, caplog):
    ckpt, _, val = trained_fastscnn
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    good = sorted(val.images.glob("*.png"))[:4]
    for f in good:
        (imgs / f.name).write_bytes(f.read_bytes())
    (imgs / "img_0001x.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")  # sorts between good ones
    (imgs / "img_0002x.jpg").write_bytes(b"")
    progress: list[float] = []
    with caplog.at_level(logging.WARNING, logger="mirseg"):
        result = run_inference(_infer_cfg(ckpt, imgs, tmp_path / "out", workers_per_gpu=2), progress=progress.append)
    assert result.num_images == 6
    assert [Path(p).name for p, _ in result.failed] == ["img_0001x.png", "img_0002x.jpg"]
    assert "cannot decode" in result.failed[0][1] and "empty" in result.failed[1][1]
    assert "img_0001x.png" in caplog.text and "img_0002x.jpg" in caplog.text
    for f in good:
        assert (tmp_path / "out" / "labels" / f.name).is_file()
    data = json.loads(result.coco_json.read_text())
    assert [i["file_name"] for i in data["images"]] == [f.name for f in good]
    rows = [r.split("\t") for r in (tmp_path / "out" / "images.tsv").read_text().splitlines()[1:]]
    status = {r[2]: r[3] for r in rows}
    assert status[str(imgs / "img_0000.png")] == "ok" and "cannot decode" in status[str(imgs / "img_0001x.png")]
    assert progress == pytest.approx([i / 6 for i in range(1, 7)])
    # the iterator: one entry per path, in order, errors in place
    preds = list(iter_predictions(load_predictor(ckpt, device="cpu"), list_images(imgs), samples_per_gpu=2,
                                  workers_per_gpu=0))
    assert [r.error is None for r in preds] == [True, True, False, True, False, True]
    assert preds[2].size == (0, 0) and preds[2].proba is None


def test_all_failed_gives_exit_code_1(trained_fastscnn, tmp_path):
    ckpt, _, _ = trained_fastscnn
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    assert main(["infer", str(ckpt), str(tmp_path / "bad.jpg"), f"out_dir={tmp_path / 'out'}",
                 "workers_per_gpu=0"]) == 1


def test_same_stem_in_two_folders_keeps_both(trained_fastscnn, tmp_path):
    ckpt, _, val = trained_fastscnn
    a, b = sorted(val.images.glob("*.png"))[:2]
    for sub, src in (("one", a), ("two", b)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "same.png").write_bytes(src.read_bytes())
    result = run_inference(_infer_cfg(ckpt, tmp_path, tmp_path / "out", save_color=True))
    assert sorted(p.name for p in (tmp_path / "out" / "labels").iterdir()) == ["same.png", "same__2.png"]
    rows = [r.split("\t") for r in result.index_tsv.read_text().splitlines()[1:]]
    assert [(r[1], Path(r[2]).parent.name) for r in rows] == [("same", "one"), ("same__2", "two")]
    first = cv2.imread(str(tmp_path / "out" / "labels" / "same.png"), cv2.IMREAD_UNCHANGED)
    direct = list(iter_predictions(load_predictor(ckpt, device="cpu"), [str(tmp_path / "one" / "same.png")],
                                   workers_per_gpu=0))
    assert np.array_equal(first, _labels(direct[0]))


def test_eval_scores_exactly_the_labels_infer_writes(trained_fastscnn, tmp_path, capsys):
    """`mirseg eval` and `mirseg infer` share one prediction path (probabilities at the working size, then resized
    to the label's size): eval's confusion matrix is the one of the label PNGs infer writes. The images are
    150x203, so the network sees them resized (to 94x128) and every label map is resized back."""
    ckpt, _, _ = trained_fastscnn
    data = make_dataset(tmp_path / "data", 4, size=(150, 203), num_classes=2, seed=7, labels=True)
    keys = [f"val_images={data.images}", f"val_labels={data.labels}", "device=cpu"]
    metrics = evaluate_checkpoint(ckpt, eval_config(read_checkpoint(ckpt)["config"], None, keys))
    out = tmp_path / "infer"
    assert main(["infer", str(ckpt), str(data.images), f"out_dir={out}", "workers_per_gpu=0", "device=cpu"]) == 0
    cm = ConfusionMatrix(3)
    for truth in sorted(data.labels.iterdir()):
        written = cv2.imread(str(out / "labels" / truth.name), cv2.IMREAD_UNCHANGED)  # (150, 203) uint8
        cm.update(torch.from_numpy(written), torch.from_numpy(cv2.imread(str(truth), cv2.IMREAD_UNCHANGED)))
    assert int(cm.mat.sum()) == 4 * 150 * 203
    assert metrics["confusion"] == cm.mat.tolist()
    assert {k: metrics[k] for k in ("mIoU", "mAcc", "aAcc", "IoU", "Acc")} == cm.compute()
    capsys.readouterr()
    assert main(["eval", str(ckpt), *keys]) == 0
    assert f"mIoU {cm.compute()['mIoU']:.4f}" in capsys.readouterr().out


def test_tta_amp_and_slide_stay_close_to_plain(trained_fastscnn):
    ckpt, _, val = trained_fastscnn
    p = load_predictor(ckpt, device="cpu")
    paths = list_images(val.images)[:2]
    plain = [_labels(r) for r in iter_predictions(p, paths, workers_per_gpu=0)]
    variants = {
        "flip+scales": iter_predictions(p, paths, workers_per_gpu=0, flip=True, scales=(0.75, 1.25)),
        "amp": iter_predictions(p, paths, workers_per_gpu=0, amp=True),
        "slide": iter_predictions(load_predictor(ckpt, device="cpu", test_mode="slide", slide_crop=(64, 64),
                                                 slide_stride=(32, 32)), paths, workers_per_gpu=0),
    }
    for name, preds in variants.items():
        for r, ref in zip(preds, plain):
            assert r.proba.dtype == torch.float32 and r.proba.shape == (3, 96, 128), name
            assert torch.isfinite(r.proba).all(), name
            torch.testing.assert_close(r.proba.sum(0), torch.ones(96, 128), atol=1e-4, rtol=0)
            assert (_labels(r) == ref).mean() > 0.9, name
    with pytest.raises(ValueError, match="scales"):
        next(iter_predictions(p, paths, scales=(0.0,)))


def test_keep_image_gives_the_working_resolution_image(trained_fastscnn, tmp_path):
    ckpt, _, val = trained_fastscnn
    src = cv2.imread(str(sorted(val.images.glob("*.png"))[0]))
    cv2.imwrite(str(tmp_path / "big.png"), cv2.resize(src, (256, 192)))
    p = load_predictor(ckpt, device="cpu")
    (r,) = iter_predictions(p, [str(tmp_path / "big.png")], workers_per_gpu=0, keep_image=True, keep_original=True)
    assert r.image.shape == (96, 128, 3) and r.image.dtype == np.uint8 and r.original.shape == (192, 256, 3)
    assert r.proba.shape == (3, 96, 128) and r.size == (192, 256)


def test_label_map_is_argmax_of_the_resized_probabilities():
    proba = torch.rand(7, 9, 11).softmax(0)
    full = F.interpolate(proba[None], size=(20, 30), mode="bilinear", align_corners=False)[0]
    out = np.zeros((7, 20, 30), np.float32)
    label, conf = label_map(proba, (20, 30), proba_out=out, chunk=3)
    assert torch.equal(label, full.argmax(0))
    torch.testing.assert_close(conf, full.max(0).values)
    np.testing.assert_allclose(out, full.numpy(), rtol=0, atol=1e-7)
    tie = torch.full((4, 2, 2), 0.25)
    for size in ((2, 2), (3, 5)):  # ties go to the first class, as argmax: at the same size and resized
        label, conf = label_map(tie, size, chunk=1)
        assert label.eq(0).all() and torch.allclose(conf, torch.full(size, 0.25))


def test_coco_writer_on_a_hand_built_label(tmp_path):
    label = np.zeros((6, 8), np.uint8)
    label[1:4, 2:7] = 1  # 15 pixels, bbox x=2 y=1 w=5 h=3
    label[5, 0] = 2
    conf = np.full((6, 8), 0.5, np.float32)
    conf[1:4, 2:7] = 0.8
    conf[5, 0] = 0.6
    with CocoResultWriter(tmp_path / "r.json", ["background", "cat", "dog", "cow"], background_index=0) as w:
        assert w.add("some/dir/photo.jpg", label, conf) == 1
        assert w.add_failed("other/broken.jpg") == 2
        assert w.add("/abs/empty.png", np.zeros((3, 3), np.uint8)) == 3
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["categories"] == [{"id": 1, "name": "cat", "supercategory": "none"},
                                  {"id": 2, "name": "dog", "supercategory": "none"},
                                  {"id": 3, "name": "cow", "supercategory": "none"}]
    assert data["images"] == [{"id": 1, "file_name": "photo.jpg", "width": 8, "height": 6},
                              {"id": 2, "file_name": "broken.jpg"},
                              {"id": 3, "file_name": "empty.png", "width": 3, "height": 3}]
    cat, dog = data["annotations"]
    assert (cat["id"], cat["image_id"], cat["category_id"], cat["area"], cat["bbox"]) == (1, 1, 1, 15, [2, 1, 5, 3])
    assert cat["score"] == pytest.approx(0.8) and cat["confidence"] == cat["score"]
    assert (dog["category_id"], dog["area"], dog["bbox"], dog["score"]) == (2, 1, [0, 5, 1, 1], pytest.approx(0.6))
    assert cat["segmentation"] == encode_mask(label == 1) and cat["segmentation"]["size"] == [6, 8]
    assert mask_bbox(np.zeros((2, 2), bool)) == [0, 0, 0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # fragments removed

    w = CocoResultWriter(tmp_path / "skip.json", ["a", "b"], background_index=None, list_failed=False)
    assert w.add_failed("x.jpg") is None
    w.add("y.jpg", np.ones((2, 2), np.uint8))
    data = json.loads(w.close().read_text())
    assert [i["file_name"] for i in data["images"]] == ["y.jpg"]
    assert [c["name"] for c in data["categories"]] == ["a", "b"]  # no background: class 0 is reported
    assert data["annotations"][0]["category_id"] == 1 and "score" not in data["annotations"][0]

    with pytest.raises(RuntimeError), CocoResultWriter(tmp_path / "aborted.json", ["a"]) as w:
        w.add("z.jpg", np.zeros((2, 2), np.uint8))
        raise RuntimeError("stop")
    assert not (tmp_path / "aborted.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "r.json", "skip.json"]


def test_one_pass_rles_are_pycocotools_encoding_of_each_class_mask():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    blobs = cv2.resize(rng.integers(0, 5, (6, 9)).astype(np.uint8), (37, 23), interpolation=cv2.INTER_NEAREST)
    edges = np.full((5, 4), 2, np.uint8)
    edges[0, 0], edges[-1, -1], edges[2, 1] = 0, 1, 3  # classes that start the map, end it, and one lone pixel
    for label in (blobs, rng.integers(0, 4, (17, 13)).astype(np.uint8), edges, np.full((3, 4), 1, np.uint8),
                  np.asfortranarray(blobs)):
        present = [int(c) for c in np.unique(label)]
        got = class_rles(label, present)
        assert sorted(got) == present
        for c in present:
            assert got[c] == mask_utils.encode(np.asfortranarray((label == c).astype(np.uint8))), c
    anns = class_annotations(edges, None, num_classes=4, skip=(2,))
    assert [a["category_id"] for a in anns] == [0, 1, 3] and [a["area"] for a in anns] == [1, 1, 1]
    with pytest.raises(ValueError, match="label value 3 is not a class index"):
        class_annotations(edges, None, num_classes=3)


def test_loader_workers_start_after_opencv_ran_its_thread_pool(trained_fastscnn):
    # A worker forked while this process's OpenCV pool exists inherits the pool's locks without its
    # threads: reconfiguring OpenCV inside the worker (a worker_init_fn) hung forever. In a subprocess,
    # so a regression fails on the timeout instead of hanging the suite.
    ckpt, _, val = trained_fastscnn
    script = f"""
import cv2, numpy as np
from mirseg.data.sources import list_images
from mirseg.infer import iter_predictions, load_predictor
a = np.random.default_rng(0).random((1024, 1024, 3), dtype=np.float32)
for _ in range(3):
    cv2.GaussianBlur(a, (0, 0), 3)  # multi-threaded: OpenCV's pool now runs in this process
p = load_predictor({str(ckpt)!r}, device="cpu")
print(sum(r.error is None for r in iter_predictions(p, list_images({str(val.images)!r}), workers_per_gpu=2)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "8"
