"""The data check before training: headers, labels and sizes of every sample, all problems in one error."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from mirseg.cli import main
from mirseg.config import TrainConfig, build_config
from mirseg.data.check import FIX, check_data, crop_padding_warning
from mirseg.data.coco import load_coco
from mirseg.data.dataset import DatasetError
from mirseg.data.images import ImageError, read_image, read_image_size
from mirseg.data.labelfolder import load_label_folder
from mirseg.data.synthetic import make_dataset
from mirseg.train import train


@pytest.fixture
def mirseg_log(caplog):
    caplog.set_level(logging.INFO, logger="mirseg")
    return caplog


def jpeg_set(root: Path, n: int, size: tuple[int, int] = (48, 64), seed: int = 0):
    """make_dataset with JPEG images (COCO file names and label stems follow)."""
    s = make_dataset(root, n, size=size, num_classes=2, seed=seed, labels=True)
    coco = json.loads(s.ann.read_text())
    for entry in coco["images"]:
        png = s.images / entry["file_name"]
        cv2.imwrite(str(png.with_suffix(".jpg")), cv2.imread(str(png)))
        png.unlink()
        entry["file_name"] = png.with_suffix(".jpg").name
    s.ann.write_text(json.dumps(coco))
    return s


def jpeg_bytes(h: int = 36, w: int = 48) -> bytes:
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def png_bytes(h: int = 36, w: int = 48) -> bytes:
    return cv2.imencode(".png", np.full((h, w, 3), 90, np.uint8))[1].tobytes()


# ----------------------------------------------------------------------------------------------
# read_image_size: the header-level read
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".tif", ".webp"])
@pytest.mark.parametrize("orientation", [1, 6])
def test_read_image_size_agrees_with_read_image(tmp_path, ext, orientation):
    path = tmp_path / f"a{ext}"
    im = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif)
    assert read_image_size(path) == read_image(path).shape[:2]


def test_read_image_size_reads_the_header_only_when_the_file_is_complete(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "b.png").write_bytes(png_bytes())
    (tmp_path / "padded.jpg").write_bytes(jpeg_bytes() + b"\0" * 64)  # some cameras pad after the end marker
    assert read_image_size(tmp_path / "padded.jpg") == (36, 48)  # decoded in full: complete, so it passes
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("a complete file must not be decoded"))
    assert read_image_size(tmp_path / "a.jpg") == (36, 48)
    assert read_image_size(tmp_path / "b.png") == (36, 48)


@pytest.mark.parametrize("name, content, message", [
    ("cut.jpg", jpeg_bytes()[:-200], "truncated or corrupt: .*cut.jpg"),
    ("cut.png", png_bytes()[:-30], "truncated or corrupt: .*cut.png"),
    ("header.jpg", jpeg_bytes()[:100], "cannot decode image file .*header.jpg"),
    ("empty.jpg", b"", r"empty \(0 bytes\): .*empty.jpg"),
    ("text.jpg", b"this is not a picture\n", "cannot decode image file .*text.jpg"),
])
def test_read_image_size_rejects_bad_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError, match=message):
        read_image_size(tmp_path / name)


def test_read_image_size_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found: .*gone.jpg"):
        read_image_size(tmp_path / "gone.jpg")


# ----------------------------------------------------------------------------------------------
# check_data
# ----------------------------------------------------------------------------------------------


def test_every_problem_is_listed_in_one_error(tmp_path):
    s = jpeg_set(tmp_path / "coco", 8)
    names = sorted(p.name for p in s.images.iterdir())
    (s.images / names[0]).write_bytes((s.images / names[0]).read_bytes()[:-300])  # truncated JPEG
    (s.images / names[1]).write_bytes(b"")  # zero bytes
    (s.images / names[2]).write_text("GIF? no: a text file renamed .jpg")
    cv2.imwrite(str(s.images / names[3]), np.zeros((64, 48, 3), np.uint8))  # 48x64, the JSON says 64x48
    coco = load_coco(s.ann, s.images, s.class_names)

    with pytest.raises(DatasetError) as err:  # a size mismatch is a dataset problem, so not an ImageError
        check_data({"train": coco}, num_classes=3)
    msg = str(err.value)
    assert "4 problems in 4 of 8 train samples" in msg and msg.endswith(FIX)
    assert f"truncated or corrupt: {s.images / names[0]}" in msg
    assert f"empty (0 bytes): {s.images / names[1]}" in msg
    assert f"cannot decode image file {s.images / names[2]}" in msg
    assert f"image {s.images / names[3]} is 48x64 (WxH) but its label ({s.ann} image '{names[3]}') is 64x48" in msg


def test_label_values_out_of_range_and_train_and_val_together(tmp_path):
    tr, va = jpeg_set(tmp_path / "tr", 4), jpeg_set(tmp_path / "va", 3, seed=1)
    label = tr.labels / "img_0001.png"
    bad = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    bad[0, :3] = (3, 7, 255)  # 3 and 7 are not classes of ["background", "disc", "box"]; 255 is ignore
    cv2.imwrite(str(label), bad)
    (va.images / "img_0002.jpg").write_bytes(b"")
    splits = {"train": load_label_folder(tr.images, tr.labels, 3), "val": load_label_folder(va.images, va.labels, 3)}
    with pytest.raises(DatasetError) as err:
        check_data(splits, num_classes=3)
    msg = str(err.value)
    assert "2 problems in 1 of 4 train samples, 1 of 3 val samples" in msg
    assert f"label {label} has values [3, 7], but there are 3 classes" in msg
    assert "class_names" in msg and "num_classes" not in msg  # names a key the user can set
    assert f"empty (0 bytes): {va.images / 'img_0002.jpg'}" in msg


def test_more_than_20_problems_show_20_and_the_count(tmp_path):
    s = jpeg_set(tmp_path, 26)
    for p in sorted(s.images.iterdir())[:25]:
        p.write_bytes(b"")
    with pytest.raises(ImageError) as err:  # only unreadable images: ImageError (the YMIR image error code)
        check_data({"train": load_coco(s.ann, s.images, s.class_names)}, num_classes=3)
    lines = str(err.value).splitlines()
    assert "25 problems in 25 of 26 train samples" in lines[0]
    assert sum(line.startswith("  - ") for line in lines) == 20
    assert "  ... and 5 more" in lines


def test_skip_bad_drops_them_with_one_warning(tmp_path, mirseg_log):
    s = jpeg_set(tmp_path, 5)
    (s.images / "img_0003.jpg").write_bytes(b"")
    samples = load_coco(s.ann, s.images, s.class_names)
    result = check_data({"train": samples, "val": []}, num_classes=3, skip_bad=True)["train"]
    assert [Path(x.image_path).name for x in result.samples] == ["img_0000.jpg", "img_0001.jpg", "img_0002.jpg",
                                                                  "img_0004.jpg"]
    assert result.sizes == [(48, 64)] * 4 and result.bad == 1
    warning, = [r for r in mirseg_log.records if r.levelno == logging.WARNING]
    assert "training without 1 of 5 train samples" in warning.getMessage()
    assert "img_0003.jpg" in warning.getMessage()
    for p in s.images.iterdir():
        p.write_bytes(b"")
    with pytest.raises(DatasetError, match="none of the 5 train samples can be used"):
        check_data({"train": samples}, num_classes=3, skip_bad=True)


def test_large_sets_show_a_progress_bar(tmp_path, capsys):
    s = make_dataset(tmp_path, 201, size=(24, 24), num_classes=1, labels=True)
    samples = load_label_folder(s.images, s.labels, 2)
    check_data({"train": samples[:200]}, num_classes=2)
    assert "checking data" not in capsys.readouterr().err  # small sets: no bar
    result = check_data({"train": samples[:150], "val": samples[150:]}, num_classes=2)
    err = capsys.readouterr().err
    assert "checking data" in err and "201/201" in err
    assert len(result["train"].samples) == 150 and len(result["val"].samples) == 51
    check_data({"train": samples}, num_classes=2, report=False)  # the other ranks of a process group
    assert "checking data" not in capsys.readouterr().err


def test_coco_corrupt_rle_is_found_when_the_json_is_read(tmp_path):
    # pycocotools decodes such strings without an error (pixels past the runs are left unwritten):
    # the runs are checked against height*width when the JSON is read, before any training.
    s = jpeg_set(tmp_path, 2)
    coco = json.loads(s.ann.read_text())
    ann_id = coco["annotations"][0]["id"]
    for counts in ("\x7f\x7f\x7f", "0", "??"):  # not RLE; runs covering 0 pixels; covering too few
        coco["annotations"][0]["segmentation"] = {"size": [48, 64], "counts": counts}
        s.ann.write_text(json.dumps(coco))
        with pytest.raises(DatasetError, match=f"annotation {ann_id}.*compressed RLE counts .* are corrupt"):
            load_coco(s.ann, s.images, s.class_names)


def test_check_with_workers_after_the_parent_used_opencv(tmp_path):
    # EXIF-rotated JPEGs make the workers decode with OpenCV, and this process's OpenCV pool has run
    # before the fork: setting OpenCV's threads inside the workers instead hangs here (a watchdog fails it).
    s = make_dataset(tmp_path, 6, size=(40, 40), labels=True)
    for p in sorted(s.images.iterdir()):
        im = Image.open(p).convert("RGB")
        exif = im.getexif()
        exif[0x0112] = 6
        im.save(p.with_suffix(".jpg"), exif=exif)
        p.unlink()
    samples = load_label_folder(s.images, s.labels, 4)
    before = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        big = np.random.default_rng(0).random((1500, 1500), dtype=np.float32)
        for _ in range(3):
            cv2.GaussianBlur(big, (0, 0), 5)  # the pool's threads are running now
        results = []
        thread = threading.Thread(target=lambda: results.append(check_data({"train": samples}, 4, workers=2)),
                                  daemon=True)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the data check hung in its workers"
        assert cv2.getNumThreads() == 2  # restored after the fork
    finally:
        cv2.setNumThreads(before)
    result = results[0]["train"]
    assert len(result.samples) == 6 and not result.problems and result.sizes == [(40, 40)] * 6


# ----------------------------------------------------------------------------------------------
# The crop warning
# ----------------------------------------------------------------------------------------------


def test_crop_padding_warning():
    # 96x128 images fit img_scale (128, 96) x 2.0 at 192x256 (h, w) at most.
    text = crop_padding_warning([(96, 128)] * 3, (512, 1024), (128, 96), (0.5, 2.0))
    assert text.startswith("crop_size [512, 1024] (h, w) is larger in height and width than any training image")
    assert "images (128x96, WxH)" in text and "at most 256x192 (WxH)" in text
    assert "padded to the crop size with ignored pixels (label 255" in text
    assert "Set crop_size to at most [192, 256]" in text
    one_side = crop_padding_warning([(96, 128), (90, 120)], (200, 100), (128, 96), (0.5, 2.0))
    assert "larger in height than" in one_side and "[192, 100]" in one_side and "120..128 x 90..96" in one_side
    assert crop_padding_warning([(96, 128)], (192, 256), (128, 96), (0.5, 2.0)) is None  # fits at the top jitter
    assert crop_padding_warning([], (512, 1024), (128, 96), (0.5, 2.0)) is None


# ----------------------------------------------------------------------------------------------
# In training
# ----------------------------------------------------------------------------------------------


def _cfg(tr, va, work_dir, **kw):
    values = dict(train_ann=str(tr.ann), train_images=str(tr.images), val_ann=str(va.ann), val_images=str(va.images),
                  crop_size=[48, 48], img_scale=[64, 48], samples_per_gpu=2, workers_per_gpu=0, max_iters=2,
                  interval=2, work_dir=str(work_dir))
    values.update(kw)
    return build_config(TrainConfig, values)


def test_training_fails_before_the_first_iteration(tmp_path, mirseg_log):
    tr, va = jpeg_set(tmp_path / "tr", 4), jpeg_set(tmp_path / "va", 2, seed=1)
    (tr.images / "img_0002.jpg").write_bytes(b"")
    work = tmp_path / "run"
    args = ["train", f"train_ann={tr.ann}", f"train_images={tr.images}", f"val_ann={va.ann}",
            f"val_images={va.images}", "crop_size=[48,48]", "img_scale=[64,48]", "max_iters=2", "interval=1",
            "workers_per_gpu=0", f"work_dir={work}"]
    assert main(args) == 2
    assert f"empty (0 bytes): {tr.images / 'img_0002.jpg'}" in mirseg_log.text and FIX in mirseg_log.text
    assert not work.exists()  # no checkpoint, no config, no TensorBoard log: nothing ran


def test_training_skips_bad_images_and_warns_about_the_crop(tmp_path, mirseg_log):
    tr, va = jpeg_set(tmp_path / "tr", 5), jpeg_set(tmp_path / "va", 3, seed=1)
    (tr.images / "img_0001.jpg").write_text("not an image")
    (va.images / "img_0000.jpg").write_bytes((va.images / "img_0000.jpg").read_bytes()[:-100])
    result = train(_cfg(tr, va, tmp_path / "run", skip_bad_images=True, crop_size=[160, 48], ratio_range=[0.5, 1.5]))
    assert result.last.exists() and result.last_metrics
    text = mirseg_log.text
    assert "training without 1 of 5 train samples, 1 of 3 val samples" in text
    assert "img_0001.jpg" in text and "truncated or corrupt" in text
    assert "on 4 images" in text and "validating on 2" in text
    # 48x64 images fit img_scale [64, 48] x 1.5 at 72x96 (h, w): a 160-row crop is always padded.
    assert "crop_size [160, 48] (h, w) is larger in height than any training image gets" in text
    assert "Set crop_size to at most [72, 48]" in text


def test_rle_total_agrees_with_pycocotools():
    from pycocotools import mask as mask_utils

    from mirseg.data.coco_checks import rle_total

    rng = np.random.default_rng(0)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 200, 2))
        mask = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(0, 8))):
            cv2.circle(mask, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(1, 80)), 1, -1)
        if trial % 5 == 0:  # many short runs: long delta chains and negative deltas
            mask = (rng.random((h, w)) < 0.5).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(mask))
        assert rle_total(rle["counts"]) == h * w
        assert rle_total(rle["counts"].decode()) == h * w
    for bad in ("\x7f\x7f", "PPPP", "o"):
        with pytest.raises(ValueError):
            rle_total(bad)
