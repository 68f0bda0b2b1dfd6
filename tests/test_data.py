"""Data layer: image decoding, COCO and label-folder layouts, the Dataset, and the training/eval transforms.

Every image, JSON and label file is generated in ``tmp_path``; nothing is read from shared/.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from mirseg.constants import BACKGROUND, IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from mirseg.data import (
    DatasetError,
    EvalTransform,
    ImageError,
    SegDataset,
    TrainTransform,
    dataset_classes,
    label_histogram,
    load_coco,
    load_label_folder,
    read_image,
    rescale_size,
)
from mirseg.data.transforms import _cat_ratio_ok, normalize, normalize_pixels, photometric_distortion

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation inside the library; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

MEAN = np.asarray(IMAGENET_MEAN, np.float32)
STD = np.asarray(IMAGENET_STD, np.float32)


@pytest.fixture
def mirseg_log(caplog):
    caplog.set_level(logging.INFO, logger="mirseg")
    return caplog


def quadrants(h: int = 32, w: int = 64) -> np.ndarray:
    """(h, w, 3) RGB image with four flat, distinct quadrant colours (robust to JPEG)."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[: h // 2, : w // 2] = (255, 0, 0)
    rgb[: h // 2, w // 2 :] = (0, 255, 0)
    rgb[h // 2 :, : w // 2] = (0, 0, 255)
    rgb[h // 2 :, w // 2 :] = (255, 255, 255)
    return rgb


def write_rgb(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def denormalize(image: torch.Tensor) -> np.ndarray:
    """(3, h, w) normalised tensor -> (h, w, 3) float RGB 0..255."""
    return image.numpy().transpose(1, 2, 0) * STD + MEAN


# ----------------------------------------------------------------------------------------------
# read_image
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".jpg"])
def test_read_image_formats_give_rgb_uint8(tmp_path, ext):
    rgb = quadrants()
    image = read_image(write_rgb(tmp_path / f"a{ext}", rgb))
    assert image.dtype == np.uint8 and image.shape == (32, 64, 3)
    if ext == ".jpg":  # lossy: colours close, channel order right
        assert np.abs(image.astype(int) - rgb).mean() < 6
        assert image[8, 8].argmax() == 0  # red quadrant reads as red, not blue
    else:
        np.testing.assert_array_equal(image, rgb)


def test_read_image_grayscale_is_replicated(tmp_path):
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    image = read_image(tmp_path / "g.png")
    assert image.shape == (12, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], gray)


def test_read_image_rgba_drops_alpha(tmp_path):
    bgra = np.zeros((5, 6, 4), np.uint8)
    bgra[..., :3] = (10, 20, 30)  # BGR
    bgra[:, :3, 3] = 0  # fully transparent half keeps its colour: alpha is dropped, not composited
    bgra[:, 3:, 3] = 255
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    image = read_image(tmp_path / "a.png")
    assert image.shape == (5, 6, 3)
    assert (image == (30, 20, 10)).all()


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_read_image_16bit_keeps_high_byte(tmp_path, ext):
    values = np.arange(256, dtype=np.uint16).reshape(16, 16)
    expanded = values * 257  # an 8-bit image stored as 16-bit
    cv2.imwrite(str(tmp_path / f"e{ext}"), expanded)
    np.testing.assert_array_equal(read_image(tmp_path / f"e{ext}")[..., 0], values)
    raw = np.array([[0, 255, 256, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / f"r{ext}"), raw)
    np.testing.assert_array_equal(read_image(tmp_path / f"r{ext}")[0, :, 1], [0, 0, 1, 255])


@pytest.mark.parametrize(("orientation", "k"), [(3, 2), (6, -1), (8, 1)])
def test_read_image_applies_exif_orientation(tmp_path, orientation, k):
    rgb = quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=100, exif=exif.tobytes())
    (tmp_path / "r.jpg").write_bytes(buf.getvalue())
    image = read_image(tmp_path / "r.jpg")
    expected = np.rot90(rgb, k)  # 3: 180 degrees, 6: 90 clockwise, 8: 90 counter-clockwise
    assert image.shape == expected.shape
    assert np.abs(image.astype(int) - expected).mean() < 6


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "not found"),
        (lambda p: p.mkdir(), "directory"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"this is not an image at all"), "cannot decode"),
        (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 8), "cannot decode"),  # truncated JPEG header
    ],
)
def test_read_image_errors_name_the_file(tmp_path, make, message):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(ImageError, match=message) as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_read_image_rejects_float_samples(tmp_path):
    cv2.imwrite(str(tmp_path / "f.tif"), np.full((4, 4, 3), 0.5, np.float32))
    with pytest.raises(ImageError, match="float32"):
        read_image(tmp_path / "f.tif")


# ----------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------


def make_coco(tmp_path: Path, images, annotations, categories=None, name="ann.json", write_images=True) -> Path:
    """Write a COCO file; ``images`` = [(id, file_name, h, w)]; image files are created unless told not to."""
    (tmp_path / "img").mkdir(exist_ok=True)
    entries = []
    for image_id, file_name, h, w in images:
        entries.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        if write_images:
            (tmp_path / "img" / file_name).parent.mkdir(parents=True, exist_ok=True)
            write_rgb(tmp_path / "img" / file_name, np.full((h, w, 3), 100, np.uint8))
    coco = {"images": entries, "annotations": annotations}
    if categories is not None:
        coco["categories"] = categories
    (tmp_path / name).write_text(json.dumps(coco))
    return tmp_path / name


def ann(ann_id, category_id, segmentation, image_id=1, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "iscrowd": iscrowd, "bbox": [0, 0, 1, 1]}


CATS = [{"id": 1, "name": "car"}, {"id": 2, "name": "road"}]


def label_of(tmp_path, annotations, h=6, w=8, categories=CATS, **kwargs) -> np.ndarray:
    path = make_coco(tmp_path, [(1, "a.png", h, w)], annotations, categories)
    (sample,) = load_coco(path, tmp_path / "img", ["car", "road"], **kwargs)
    return sample.load_label()


def test_coco_polygon_decodes_to_pixels(tmp_path):
    label = label_of(tmp_path, [ann(1, 1, [[2, 1, 6, 1, 6, 4, 2, 4]])])
    expected = np.zeros((6, 8), np.uint8)
    expected[1:4, 2:6] = 1  # corners on pixel edges: rows 1..3, columns 2..5; car = 0 + 1 (background shift)
    np.testing.assert_array_equal(label, expected)


def test_coco_multi_ring_polygon_merges(tmp_path):
    label = label_of(tmp_path, [ann(1, 2, [[0, 0, 3, 0, 3, 3, 0, 3], [5, 3, 8, 3, 8, 6, 5, 6]])])
    expected = np.zeros((6, 8), np.uint8)
    expected[0:3, 0:3] = 2
    expected[3:6, 5:8] = 2
    np.testing.assert_array_equal(label, expected)


@pytest.mark.parametrize("iscrowd", [0, 1])
def test_coco_compressed_rle(tmp_path, iscrowd):
    # ymir-protocol.md section 4's example: "044" on a 2x4 image = the left two columns.
    label = label_of(tmp_path, [ann(1, 1, {"counts": "044", "size": [2, 4]}, iscrowd=iscrowd)], h=2, w=4)
    np.testing.assert_array_equal(label, [[1, 1, 0, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize("iscrowd", [0, 1])
def test_coco_uncompressed_rle(tmp_path, iscrowd):
    # Column-major runs: 2 off, 2 on, 2 off, 2 on -> columns 1 and 3.
    label = label_of(tmp_path, [ann(1, 2, {"counts": [2, 2, 2, 2], "size": [2, 4]}, iscrowd=iscrowd)], h=2, w=4)
    np.testing.assert_array_equal(label, [[0, 2, 0, 2], [0, 2, 0, 2]])


def test_coco_crowd_polygon_is_painted(tmp_path):
    label = label_of(tmp_path, [ann(1, 1, [[0, 0, 8, 0, 8, 6, 0, 6]], iscrowd=1)])
    assert (label == 1).all()


def test_coco_matches_classes_by_name_not_id(tmp_path):
    cats = [{"id": 7, "name": "road"}, {"id": 3, "name": "car"}, {"id": 0, "name": "tree"}]
    annotations = [ann(1, 7, [[0, 0, 4, 0, 4, 6, 0, 6]]), ann(2, 3, [[4, 0, 8, 0, 8, 6, 4, 6]])]
    label = label_of(tmp_path, annotations, categories=cats)  # tree is listed but unused: fine
    assert (label[:, :4] == 2).all() and (label[:, 4:] == 1).all()  # road = index 1 + 1, car = 0 + 1


def test_coco_later_annotations_paint_over_earlier(tmp_path):
    whole = [[0, 0, 8, 0, 8, 6, 0, 6]]
    part = [[0, 0, 2, 0, 2, 2, 0, 2]]
    label = label_of(tmp_path, [ann(1, 2, whole), ann(2, 1, part)])
    assert (label[:2, :2] == 1).all() and (label == 2).sum() == 48 - 4
    label = label_of(tmp_path, [ann(2, 1, part), ann(1, 2, whole)])
    assert (label == 2).all()  # order in the file decides, not the annotation id


def test_coco_background_modes(tmp_path):
    annotations = [ann(1, 1, [[0, 0, 2, 0, 2, 2, 0, 2]]), ann(2, 2, [[2, 0, 4, 0, 4, 2, 2, 2]])]
    blank = label_of(tmp_path, annotations, ignore_blank_area=False)
    ignore = label_of(tmp_path, annotations, ignore_blank_area=True)
    assert blank[0, 0] == 1 and blank[0, 2] == 2 and blank[5, 7] == 0
    assert ignore[0, 0] == 0 and ignore[0, 2] == 1 and ignore[5, 7] == IGNORE_INDEX
    assert dataset_classes(["car", "road"], False) == [BACKGROUND, "car", "road"]
    assert dataset_classes(["car", "road"], True) == ["car", "road"]


def test_dataset_classes_errors():
    with pytest.raises(DatasetError, match="duplicates"):
        dataset_classes(["car", "car"], True)
    with pytest.raises(DatasetError, match="ignore_blank_area=True"):
        dataset_classes([BACKGROUND, "car"], False)
    assert dataset_classes([BACKGROUND, "car"], True) == [BACKGROUND, "car"]
    with pytest.raises(DatasetError, match="empty"):
        dataset_classes([], True)
    with pytest.raises(DatasetError, match="uint8"):
        dataset_classes([str(i) for i in range(255)], False)


def test_coco_image_without_annotations_is_all_background(tmp_path):
    path = make_coco(tmp_path, [(1, "a.png", 3, 4), (2, "b.png", 3, 4)], [ann(1, 1, [[0, 0, 1, 0, 1, 1]])], CATS)
    samples = load_coco(path, tmp_path / "img", ["car", "road"])
    assert (samples[1].load_label() == 0).all()
    samples = load_coco(path, tmp_path / "img", ["car", "road"], ignore_blank_area=True)
    assert (samples[1].load_label() == IGNORE_INDEX).all()


def test_coco_ymir_id_mode_keeps_unlisted_ids(tmp_path):
    # YMIR: ids index class_names; 'categories' lists only train classes, val annotations may use others.
    cats = [{"id": 1, "name": "road"}]
    annotations = [ann(1, 1, [[0, 0, 4, 0, 4, 6, 0, 6]]), ann(2, 0, [[4, 0, 8, 0, 8, 6, 4, 6]])]
    path = make_coco(tmp_path, [(1, "a.png", 6, 8)], annotations, cats)
    (sample,) = load_coco(path, tmp_path / "img", ["car", "road"], class_by="id", ignore_blank_area=True)
    label = sample.load_label()
    assert (label[:, :4] == 1).all() and (label[:, 4:] == 0).all()  # id 0 is a real class, not dropped
    with pytest.raises(DatasetError, match="category_id 0, which 'categories' does not list.*class_by='id'"):
        load_coco(path, tmp_path / "img", ["car", "road"])  # name mode: id 0 has no category


def test_coco_id_mode_errors(tmp_path):
    path = make_coco(tmp_path, [(1, "a.png", 6, 8)], [ann(1, 1, [[0, 0, 4, 0, 4, 6]])], [{"id": 1, "name": "car"}])
    with pytest.raises(DatasetError, match=r"category id 1 is named 'car' but class_names\[1\] is 'road'"):
        load_coco(path, tmp_path / "img", ["car", "road"], class_by="id")
    path = make_coco(tmp_path, [(1, "a.png", 6, 8)], [ann(9, 5, [[0, 0, 4, 0, 4, 6]])])  # no categories at all
    with pytest.raises(DatasetError, match="id 5.*first id 9"):
        load_coco(path, tmp_path / "img", ["car", "road"], class_by="id")


def test_coco_unknown_class_error_skip_ignore(tmp_path, mirseg_log):
    cats = [*CATS, {"id": 5, "name": "Car "}]
    annotations = [ann(1, 2, [[0, 0, 8, 0, 8, 6, 0, 6]]), ann(42, 5, [[0, 0, 2, 0, 2, 2, 0, 2]])]
    path = make_coco(tmp_path, [(1, "a.png", 6, 8)], annotations, cats)
    with pytest.raises(DatasetError) as info:
        load_coco(path, tmp_path / "img", ["car", "road"])
    message = str(info.value)
    for part in (str(path), "'Car '", "first id 42", "did you mean 'car'", "on_unknown_class='skip'"):
        assert part in message

    (sample,) = load_coco(path, tmp_path / "img", ["car", "road"], on_unknown_class="skip")
    assert (sample.load_label() == 2).all()
    assert "left unannotated" in mirseg_log.text

    (sample,) = load_coco(path, tmp_path / "img", ["car", "road"], on_unknown_class="ignore")
    label = sample.load_label()
    assert (label[:2, :2] == IGNORE_INDEX).all() and (label == 2).sum() == 48 - 4


def test_coco_name_mode_needs_categories(tmp_path):
    path = make_coco(tmp_path, [(1, "a.png", 6, 8)], [])
    with pytest.raises(DatasetError, match="no 'categories'"):
        load_coco(path, tmp_path / "img", ["car"])


def test_coco_degenerate_and_empty_shapes_are_dropped_with_one_warning(tmp_path, mirseg_log):
    annotations = [
        ann(1, 1, [[0, 0, 4, 0]]),  # 2 points (pycocotools would read it as a box)
        ann(2, 1, [[0, 0, 2, 2, 4, 4]]),  # collinear: zero area
        ann(3, 1, []),  # empty
        ann(4, 1, {}),  # box-only object
        ann(5, 2, [[0, 0, 1], [4, 3, 8, 3, 8, 6, 4, 6]]),  # odd ring dropped, good ring kept
    ]
    label = label_of(tmp_path, annotations)
    expected = np.zeros((6, 8), np.uint8)
    expected[3:, 4:] = 2
    np.testing.assert_array_equal(label, expected)
    warnings = [r for r in mirseg_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "2 empty segmentations" in text and "3 degenerate polygon rings" in text and "ids 1, 2, 5" in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON list"),
        ('{"annotations": []}', "no 'images'"),
        ('{"images": []}', "no 'annotations'"),
        ('{"images": {}, "annotations": []}', "not a list"),
        ('{"images": [{"id": 1}], "annotations": []}', "file_name"),
        ('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": []}', "height"),
    ],
)
def test_coco_not_coco_is_an_error(tmp_path, content, message):
    (tmp_path / "img").mkdir()
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message) as info:
        load_coco(path, tmp_path / "img", ["car"], class_by="id")
    assert str(path) in str(info.value)


def test_coco_malformed_annotations_are_errors(tmp_path):
    def load(annotations):
        path = make_coco(tmp_path, [(1, "a.png", 2, 4)], annotations, CATS)
        return load_coco(path, tmp_path / "img", ["car", "road"])

    with pytest.raises(DatasetError, match="annotation 3 refers to image_id 99"):
        load([ann(3, 1, [[0, 0, 1, 0, 1, 1]], image_id=99)])
    with pytest.raises(DatasetError, match=r"annotation 4 .*RLE size \[3, 4\]"):
        load([ann(4, 1, {"counts": "044", "size": [3, 4]})])
    with pytest.raises(DatasetError, match="annotation 5 .*summing to height\\*width = 8"):
        load([ann(5, 1, {"counts": [2, 2, 2], "size": [2, 4]})])
    with pytest.raises(DatasetError, match="annotation 6 .*flat list of numbers"):
        load([ann(6, 1, [[[0, 0], [1, 0], [1, 1]]])])
    with pytest.raises(DatasetError, match="annotation 7 .*compressed RLE counts 'garbage!!' are corrupt"):
        load([ann(7, 1, {"counts": "garbage!!", "size": [2, 4]})])
    with pytest.raises(DatasetError, match=r"annotation 8 .*cover 0 pixels, not height\*width = 8"):
        load([ann(8, 1, {"counts": "0", "size": [2, 4]})])  # too few pixels: pycocotools would not notice
    (sample,) = load([ann(9, 1, {"counts": "35", "size": [2, 4]})])  # column-major: 3 background, 5 car
    assert sample.load_label().flatten(order="F").tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


def test_coco_images_missing_from_folder_are_skipped_with_a_count(tmp_path, mirseg_log):
    path = make_coco(tmp_path, [(1, "a.png", 2, 4), (2, "b.png", 2, 4), (3, "c.png", 2, 4)], [], CATS)
    (tmp_path / "img" / "b.png").unlink()
    (tmp_path / "img" / "c.png").unlink()
    samples = load_coco(path, tmp_path / "img", ["car"])
    assert [Path(s.image_path).name for s in samples] == ["a.png"]
    assert "2 of 3 images are not in" in mirseg_log.text
    (tmp_path / "img" / "a.png").unlink()
    with pytest.raises(DatasetError, match="none of the 3 images"):
        load_coco(path, tmp_path / "img", ["car"])


def test_coco_folder_file_name_with_subfolder(tmp_path):
    path = make_coco(tmp_path, [(1, "task_1/a.png", 2, 4), (2, "elsewhere/b.png", 2, 4)], [], CATS)
    (tmp_path / "img" / "elsewhere" / "b.png").rename(tmp_path / "img" / "b.png")  # found by basename
    samples = load_coco(path, tmp_path / "img", ["car"])
    assert [Path(s.image_path).relative_to(tmp_path / "img").as_posix() for s in samples] == ["task_1/a.png", "b.png"]


def test_coco_explicit_image_list(tmp_path, mirseg_log):
    path = make_coco(tmp_path, [(1, "a.png", 2, 4), (2, "b.png", 2, 4)], [ann(1, 1, {"counts": "044", "size": [2, 4]})],
                     CATS)
    elsewhere = tmp_path / "assets" / "x"
    write_rgb(elsewhere / "a.png", np.zeros((2, 4, 3), np.uint8))
    write_rgb(elsewhere / "z.png", np.zeros((2, 4, 3), np.uint8))  # not in the JSON
    samples = load_coco(path, [elsewhere / "a.png", str(elsewhere / "z.png")], ["car"])
    assert [s.image_path for s in samples] == [str(elsewhere / "a.png")]  # matched by basename
    assert samples[0].load_label()[0, 0] == 1
    assert "1 of 2 images are not in the image list" in mirseg_log.text  # b.png: the other split (INFO)
    assert "1 listed images have no entry" in mirseg_log.text and "z.png" in mirseg_log.text
    with pytest.raises(ImageError, match="gone.png"):
        load_coco(path, [elsewhere / "gone.png"], ["car"])


def test_coco_image_size_must_match_json(tmp_path):
    path = make_coco(tmp_path, [(1, "a.png", 2, 4)], [], CATS)
    write_rgb(tmp_path / "img" / "a.png", np.zeros((4, 2, 3), np.uint8))  # swapped, e.g. an EXIF rotation
    dataset = SegDataset(load_coco(path, tmp_path / "img", ["car"]))
    with pytest.raises(DatasetError, match="a.png.*2x4.*4x2.*EXIF"):
        dataset[0]


def test_coco_unreadable_image_fails_when_read(tmp_path):
    path = make_coco(tmp_path, [(1, "a.png", 2, 4)], [], CATS)
    (tmp_path / "img" / "a.png").write_bytes(b"corrupt")
    dataset = SegDataset(load_coco(path, tmp_path / "img", ["car"]))
    with pytest.raises(ImageError, match="a.png"):
        dataset[0]


# ----------------------------------------------------------------------------------------------
# Label folder
# ----------------------------------------------------------------------------------------------


def write_label(path: Path, label: np.ndarray, palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label, mode="L")
    if palette:  # VOC style: indices with a colour palette, which OpenCV would expand to colours
        im = im.convert("P")
        im.putpalette([(i * 37) % 256 for i in range(768)])
    im.save(path)
    return path


def test_label_folder_pairs_by_stem(tmp_path, mirseg_log):
    for stem in ("a", "b", "c"):
        write_rgb(tmp_path / "images" / f"{stem}.jpg", np.zeros((3, 5, 3), np.uint8))
    label = np.array([[0, 1, 2, 255, 0]] * 3, np.uint8)
    write_label(tmp_path / "labels" / "a.png", label)
    write_label(tmp_path / "labels" / "b.png", label, palette=True)
    samples = load_label_folder(tmp_path / "images", tmp_path / "labels", num_classes=3)
    assert [Path(s.image_path).name for s in samples] == ["a.jpg", "b.jpg"]
    np.testing.assert_array_equal(samples[1].load_label(), label)  # palette indices, not colours
    assert "1 of 3 images have no label" in mirseg_log.text and "c.jpg" in mirseg_log.text
    image, got = SegDataset(samples)[0]
    assert image.shape == (3, 5, 3) and got.dtype == np.uint8


def test_label_folder_cityscapes_suffixes_and_subfolders(tmp_path):
    write_rgb(tmp_path / "left" / "aachen" / "x_000001_leftImg8bit.png", np.zeros((2, 3, 3), np.uint8))
    write_label(tmp_path / "gt" / "aachen" / "x_000001_gtFine_labelTrainIds.png", np.ones((2, 3), np.uint8))
    write_label(tmp_path / "gt" / "aachen" / "x_000001_gtFine_color.png", np.ones((2, 3), np.uint8))  # distractor
    samples = load_label_folder(tmp_path / "left", tmp_path / "gt", 19, image_suffix="_leftImg8bit.png",
                                label_suffix="_gtFine_labelTrainIds.png")
    assert len(samples) == 1 and samples[0].label_path.endswith("aachen/x_000001_gtFine_labelTrainIds.png")
    # An explicit image list has no sub-folder to keep, so its labels are looked up directly in label_dir.
    suffixes = dict(image_suffix="_leftImg8bit.png", label_suffix="_gtFine_labelTrainIds.png")
    with pytest.raises(DatasetError, match="no image has a label"):
        load_label_folder([samples[0].image_path], tmp_path / "gt", 19, **suffixes)
    write_label(tmp_path / "gt" / "x_000001_gtFine_labelTrainIds.png", np.ones((2, 3), np.uint8))
    (sample,) = load_label_folder([samples[0].image_path], tmp_path / "gt", 19, **suffixes)
    assert sample.label_path == str(tmp_path / "gt" / "x_000001_gtFine_labelTrainIds.png")


def test_label_folder_inside_image_folder_is_not_scanned(tmp_path):
    # VOC: images=VOC2012/ would otherwise pick up VOC2012/SegmentationClass/*.png as images.
    write_rgb(tmp_path / "voc" / "JPEGImages" / "a.jpg", np.zeros((2, 3, 3), np.uint8))
    write_label(tmp_path / "voc" / "SegmentationClass" / "a.png", np.ones((2, 3), np.uint8))
    (sample,) = load_label_folder(tmp_path / "voc", tmp_path / "voc" / "SegmentationClass", 2)
    assert sample.image_path.endswith("a.jpg")


def test_label_folder_bad_values_are_named(tmp_path):
    write_rgb(tmp_path / "images" / "a.png", np.zeros((2, 3, 3), np.uint8))
    write_label(tmp_path / "labels" / "a.png", np.array([[0, 1, 7], [9, 255, 2]], np.uint8))
    (sample,) = load_label_folder(tmp_path / "images", tmp_path / "labels", num_classes=3)
    with pytest.raises(DatasetError, match=r"a.png has values \[7, 9\].*3 classes"):
        sample.load_label()
    with pytest.raises(DatasetError, match=r"values \[7, 9\]"):
        label_histogram([sample], 3)


def test_label_folder_size_mismatch(tmp_path):
    write_rgb(tmp_path / "images" / "a.png", np.zeros((4, 6, 3), np.uint8))
    write_label(tmp_path / "labels" / "a.png", np.zeros((4, 5), np.uint8))
    dataset = SegDataset(load_label_folder(tmp_path / "images", tmp_path / "labels", 2))
    with pytest.raises(DatasetError, match=r"images/a.png is 6x4.*labels/a.png\) is 5x4"):
        dataset[0]


def test_label_folder_colour_label_and_missing_folder(tmp_path):
    write_rgb(tmp_path / "images" / "a.png", np.zeros((2, 2, 3), np.uint8))
    write_rgb(tmp_path / "labels" / "a.png", quadrants(2, 2))
    (sample,) = load_label_folder(tmp_path / "images", tmp_path / "labels", 2)
    with pytest.raises(DatasetError, match="colour"):
        sample.load_label()
    write_rgb(tmp_path / "labels" / "a.png", np.ones((2, 2, 3), np.uint8))  # grey saved as RGB is fine
    assert (sample.load_label() == 1).all()
    with pytest.raises(DatasetError, match="label folder"):
        load_label_folder(tmp_path / "images", tmp_path / "nope", 2)
    with pytest.raises(ImageError, match="gone.png"):
        load_label_folder([tmp_path / "gone.png"], tmp_path / "labels", 2)


# ----------------------------------------------------------------------------------------------
# Dataset and histogram
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def coco_dataset_samples(tmp_path):
    images = [(i, f"{i}.png", 40, 60) for i in range(1, 5)]
    annotations = [ann(i, 1 + i % 2, [[0, 0, 30, 0, 30, 40, 0, 40]], image_id=i) for i in range(1, 5)]
    path = make_coco(tmp_path, images, annotations, CATS)
    for i in range(1, 5):  # textured images so augmentation differences show
        write_rgb(tmp_path / "img" / f"{i}.png", np.random.default_rng(i).integers(0, 256, (40, 60, 3), np.uint8))
    return load_coco(path, tmp_path / "img", ["car", "road"])


def test_label_histogram(coco_dataset_samples):
    counts = label_histogram(coco_dataset_samples, 3)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, [4 * 1200, 2 * 1200, 2 * 1200])  # half of each 40x60 image painted
    dataset = SegDataset(coco_dataset_samples)
    np.testing.assert_array_equal(label_histogram(dataset, 3), counts)
    ignore_sample = [dataclasses.replace(s, fill=IGNORE_INDEX) for s in coco_dataset_samples]
    np.testing.assert_array_equal(label_histogram(ignore_sample, 3), [0, 2 * 1200, 2 * 1200])  # 255 not counted


def small_train_transform(**kwargs) -> TrainTransform:
    return TrainTransform(**{"crop_size": (32, 48), "scale": (60, 40), "ratio_range": (0.5, 2.0), **kwargs})


def test_dataset_is_picklable_and_reproducible(coco_dataset_samples):
    dataset = SegDataset(coco_dataset_samples, small_train_transform(), seed=3)
    clone = pickle.loads(pickle.dumps(dataset))
    for i in range(len(dataset)):
        a, b = dataset[i], clone[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other = SegDataset(coco_dataset_samples, small_train_transform(), seed=4)
    assert not torch.equal(dataset[0][0], other[0][0])


def test_dataset_epoch_and_virtual_index(coco_dataset_samples):
    dataset = SegDataset(coco_dataset_samples, small_train_transform(), seed=0)
    first = dataset[1][0]
    later = dataset[len(dataset) + 1][0]  # item 1 at epoch 1
    assert not torch.equal(first, later)
    dataset.set_epoch(1)
    assert torch.equal(dataset[1][0], later)
    with pytest.raises(IndexError):
        SegDataset([])[0]


def test_dataloader_workers_give_the_same_batches(coco_dataset_samples):
    dataset = SegDataset(coco_dataset_samples, small_train_transform(), seed=11)

    def batches(workers):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers)
        return [torch.cat([x.flatten(), y.flatten().float()]) for x, y in loader]

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------


def test_rescale_size_fits_long_and_short_side():
    assert rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert rescale_size(2048, 1024, (2048, 1024)) == (2048, 1024)  # portrait fits the same preset
    assert rescale_size(100, 100, (2048, 1024)) == (1024, 1024)  # small images are up-scaled
    assert rescale_size(375, 500, (2048, 1024)) == (1024, 1365)  # min(2048/500, 1024/375)
    assert rescale_size(3000, 3000, (2048, 1024)) == (1024, 1024)


@pytest.mark.parametrize("size", [(20, 30), (90, 130)])
def test_train_transform_shapes_and_types(size):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*size, 3), np.uint8)
    label = rng.integers(0, 3, size, np.uint8)
    out_image, out_label = TrainTransform(crop_size=(32, 48), scale=(120, 80))(image, label, rng)
    assert out_image.shape == (3, 32, 48) and out_image.dtype == torch.float32
    assert out_label.shape == (32, 48) and out_label.dtype == torch.int64


def test_train_transform_pads_image_with_0_and_label_with_255():
    image = np.full((20, 30, 3), 200, np.uint8)
    label = np.ones((20, 30), np.uint8)
    transform = TrainTransform(crop_size=(32, 40), scale=(30, 20), ratio_range=(1, 1), photometric=False)
    out_image, out_label = transform(image, label, np.random.default_rng(0))
    assert (out_image[:, 20:, :] == 0).all() and (out_image[:, :, 30:] == 0).all()
    assert (out_label[20:, :] == IGNORE_INDEX).all() and (out_label[:, 30:] == IGNORE_INDEX).all()
    assert (out_label[:20, :30] == 1).all()
    np.testing.assert_allclose(denormalize(out_image)[:20, :30], 200, atol=1e-3)


def test_train_transform_keeps_label_values():
    rng = np.random.default_rng(1)
    label = rng.choice(np.array([0, 3, 7, IGNORE_INDEX], np.uint8), size=(37, 53))
    image = rng.integers(0, 256, (37, 53, 3), np.uint8)
    transform = TrainTransform(crop_size=(40, 40), scale=(53, 37), ratio_range=(0.6, 1.7))
    for seed in range(10):  # down- and up-scaling, nearest: no interpolated values
        _, out = transform(image, label, np.random.default_rng(seed))
        assert set(np.unique(out.numpy())) <= {0, 3, 7, IGNORE_INDEX}


def test_cat_ratio_test_excludes_ignore():
    crop = np.array([0] * 16 + [1] * 4 + [IGNORE_INDEX] * 20, np.uint8)
    assert not _cat_ratio_ok(crop, 0.75)  # 16 / 20 = 0.8 once 255 is left out (0.4 if it were counted)
    assert _cat_ratio_ok(np.array([0] * 14 + [1] * 6 + [IGNORE_INDEX] * 20, np.uint8), 0.75)  # 0.7
    assert not _cat_ratio_ok(np.array([2] * 5 + [IGNORE_INDEX] * 50, np.uint8), 0.75)  # one class only


def test_cat_max_ratio_redraws_crops():
    # 10x100 label, class 1 in columns 40..59, crop 10x20: only 18 of 81 offsets hold 6..14 pixels of each class.
    label = np.zeros((10, 100), np.uint8)
    label[:, 40:60] = 1
    image = np.zeros((10, 100, 3), np.uint8)

    def balanced_share(cat_max_ratio):
        t = TrainTransform(crop_size=(10, 20), scale=(100, 10), ratio_range=(1, 1), cat_max_ratio=cat_max_ratio,
                           flip_prob=0, photometric=False)
        crops = [t(image, label, np.random.default_rng(seed))[1].numpy() for seed in range(200)]
        return np.mean([_cat_ratio_ok(c, 0.75) for c in crops])

    assert balanced_share(1.0) < 0.35  # ~18/81 without re-draws
    assert balanced_share(0.75) > 0.85  # 1 - (63/81)^11 ~ 0.94 with up to 10 re-draws


def test_flip_moves_image_and_label_together():
    rng = np.random.default_rng(5)
    label = rng.integers(0, 10, (24, 36), np.uint8)
    image = np.repeat(label[..., None] * 20, 3, axis=2)  # the image spells out its label
    keep = dict(crop_size=(24, 36), scale=(36, 24), ratio_range=(1, 1), photometric=False)
    out_image, out_label = TrainTransform(flip_prob=1.0, **keep)(image, label, rng)
    np.testing.assert_array_equal(out_label.numpy(), label[:, ::-1])
    np.testing.assert_allclose(denormalize(out_image), image[:, ::-1], atol=1e-3)
    _, out_label = TrainTransform(flip_prob=0.0, **keep)(image, label, rng)
    np.testing.assert_array_equal(out_label.numpy(), label)
    # Random crops and flips: the image still spells out the label wherever it is not padding.
    crop = TrainTransform(crop_size=(16, 16), scale=(36, 24), ratio_range=(1, 1), photometric=False, cat_max_ratio=1)
    flipped = 0
    for seed in range(20):
        out_image, out_label = crop(image, label, np.random.default_rng(seed))
        np.testing.assert_allclose(denormalize(out_image)[..., 0], out_label.numpy() * 20, atol=1e-3)
        flipped += not any(np.array_equal(out_label.numpy(), label[y:y + 16, x:x + 16])
                           for y in range(9) for x in range(21))
    assert 3 < flipped < 17


def test_same_seed_same_output():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), np.uint8)
    label = rng.integers(0, 4, (50, 70), np.uint8)
    transform = TrainTransform(crop_size=(32, 32), scale=(70, 50))
    a = transform(image, label, np.random.default_rng(123))
    b = transform(image, label, np.random.default_rng(123))
    c = transform(image, label, np.random.default_rng(124))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_photometric_distortion_keeps_grey_grey_and_changes_colour():
    grey = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8).reshape(8, 8, 1), 3, axis=2)
    colour = np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)
    changed = 0
    for seed in range(20):
        out = photometric_distortion(grey, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == grey.shape
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()  # S = 0: hue, sat no-op
        changed += not np.array_equal(photometric_distortion(colour, np.random.default_rng(seed)), colour)
    assert changed >= 15  # all four steps off has probability 1/16


def test_eval_transform_resizes_image_only():
    image = np.zeros((30, 40, 3), np.uint8)
    label = np.arange(1200, dtype=np.uint8).reshape(30, 40) % 5
    out_image, out_label = EvalTransform(scale=(80, 60))(image, label)
    assert out_image.shape == (3, 60, 80)  # up-scaled by min(80/40, 60/30) = 2
    assert out_label.dtype == torch.int64 and out_label.shape == (30, 40)
    np.testing.assert_array_equal(out_label.numpy(), label)
    out_image, out_label = EvalTransform(scale=(20, 10))(image, None)
    assert out_image.shape == (3, 10, 13) and out_label is None  # down-scaled by min(20/40, 10/30)


def test_label_png_training_without_validation_data(tmp_path):
    """The layout is the training set's: no val_labels must not send the val split down the COCO path."""
    from mirseg.config import TrainConfig
    from mirseg.data.sources import load_split
    from mirseg.data.synthetic import make_dataset

    s = make_dataset(tmp_path, 3, size=(32, 32), labels=True)
    cfg = TrainConfig(train_images=str(s.images), train_labels=str(s.labels), class_names=("bg", "disc", "box"))
    assert len(load_split(cfg, "train").samples) == 3
    val = load_split(cfg, "val")
    assert val.samples == [] and val.class_names == ["bg", "disc", "box"]


@pytest.mark.parametrize("pad_to", [None, (9, 13)])
def test_normalize_is_the_fp32_formula_bit_for_bit_and_pads_with_zeros(pad_to):
    image = np.random.default_rng(3).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    expected = ((image.astype(np.float32) - np.asarray(IMAGENET_MEAN, np.float32))
                / np.asarray(IMAGENET_STD, np.float32)).transpose(2, 0, 1)  # (3, 7, 11)
    out = normalize(image, pad_to=pad_to)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert tuple(out.shape) == (3, *(pad_to or (7, 11)))
    assert np.array_equal(out[:, :7, :11].numpy(), expected)
    assert not out[:, 7:].any() and not out[:, :, 11:].any()


def test_normalize_pixels_of_a_batch_is_a_channels_last_input_equal_to_normalize():
    images = np.random.default_rng(4).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    x = normalize_pixels(torch.from_numpy(images)).permute(0, 3, 1, 2)  # (2, 3, 5, 6)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    for i in range(2):
        assert torch.equal(x[i], normalize(images[i]))
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W, 3\) RGB"):
        normalize_pixels(torch.zeros(3, 5, 6, dtype=torch.uint8))
