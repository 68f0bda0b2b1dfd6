"""Fuzzing the readers of user files: random input gets a documented error, never a crash or a hang.

The documented error types are the :class:`mirseg.errors.MirsegError` subclasses, each with a
message naming the file and the item:

- COCO JSON (``mirseg.data.coco.load_coco``, ``CocoSample.load_label``,
  ``mirseg.data.sources.coco_category_names``): ``DatasetError`` (malformed or inconsistent data),
  ``ImageError`` (a listed image is missing), ``ConfigError`` (a bad argument).
- Index and list files (``mirseg.ymir.protocol.read_index`` / ``index_rows``, the executor's
  annotation-file lookup, ``mirseg.data.sources.image_source``): ``YmirError`` (dataset code) and
  ``DatasetError``.
- YAML (``mirseg.coerce.read_yaml_mapping``, ``load_config`` of TrainConfig / InferConfig /
  MineConfig): ``ConfigError`` and ``MissingFileError``; YMIR's ``read_yaml`` / ``read_env``: ``YmirError``.

Anything else (TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError, a
plain ValueError or UnicodeDecodeError, ...) fails the test, and so does an example running longer
than the deadline. Hypothesis runs derandomized (the same examples on every run, no example
database), so CI cannot flake; the whole file takes a few seconds.
"""

from __future__ import annotations

import json
import re
import tempfile
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirseg.coerce import field_types, read_yaml_mapping
from mirseg.config import InferConfig, MineConfig, TrainConfig, load_config
from mirseg.data.coco import load_coco
from mirseg.data.dataset import DatasetError
from mirseg.data.images import ImageError
from mirseg.data.sources import coco_category_names, image_source
from mirseg.errors import ConfigError, MirsegError, MissingFileError
from mirseg.ymir.protocol import YmirError, index_rows, read_env, read_index, read_yaml
from mirseg.ymir.training import _annotation_file

FUZZ = settings(max_examples=120, deadline=timedelta(seconds=5), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# Raster labels only up to this size: a fuzzed 30000x30000 image is valid COCO but costs a gigabyte.
MAX_RASTER = 200_000

IMAGES = ("a.png", "b.png", "sub/c.png", "missing.png")
CLASSES = ("road", "car", "person")


@pytest.fixture(scope="module")
def work():
    with tempfile.TemporaryDirectory(prefix="mirseg-fuzz-") as tmp:
        root = Path(tmp)
        (root / "images" / "sub").mkdir(parents=True)
        for name in IMAGES[:3]:
            (root / "images" / name).write_bytes(b"not decoded: load_label reads no image")
        yield root


def _expect(errors: tuple[type[BaseException], ...], call, *args, **kwargs):
    """``call(*args, **kwargs)``, or None when it raises one of ``errors`` (all MirsegError subclasses)."""
    try:
        return call(*args, **kwargs)
    except errors as exc:
        assert isinstance(exc, MirsegError)
        assert str(exc), "an error must say what is wrong"
        return None


# ---------------------------------------------------------------------------------------------
# COCO JSON

_scalars = (st.none() | st.booleans() | st.integers(-3, 300) | st.integers() | st.floats(allow_nan=True)
            | st.text(max_size=6) | st.sampled_from(IMAGES + CLASSES))
_keys = st.sampled_from(["id", "image_id", "category_id", "file_name", "name", "height", "width", "segmentation",
                         "images", "annotations", "categories", "counts", "size", "iscrowd"]) | st.text(max_size=5)
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(_keys, inner, max_size=5), max_leaves=25)


def _polygon(draw) -> list:
    n = draw(st.integers(0, 6)) * 2 + draw(st.integers(0, 1))
    return [draw(st.floats(-5, 40) | st.integers(-5, 40)) for _ in range(n)]


@st.composite
def near_valid_coco(draw) -> dict:
    """A COCO dict that is valid or nearly so, then a few fields replaced by random JSON or deleted."""
    images = [{"id": i + 1, "file_name": name, "height": draw(st.integers(1, 12)), "width": draw(st.integers(1, 12))}
              for i, name in enumerate(draw(st.lists(st.sampled_from(IMAGES), min_size=1, max_size=4)))]
    categories = [{"id": i, "name": name} for i, name in
                  enumerate(draw(st.lists(st.sampled_from(CLASSES + ("Car ", "tree")), max_size=4)))]
    annotations = []
    for n in range(draw(st.integers(0, 5))):
        image = draw(st.sampled_from(images))
        h, w = image["height"], image["width"]
        kind = draw(st.sampled_from(["poly", "rle", "urle", "none", "empty"]))
        if kind == "poly":
            seg = [_polygon(draw) for _ in range(draw(st.integers(0, 2)))]
        elif kind == "rle":
            seg = {"size": [h, w], "counts": draw(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                                                          max_size=12))}
        elif kind == "urle":
            counts = draw(st.lists(st.integers(0, h * w), max_size=5))
            seg = {"size": [h, w], "counts": counts + ([h * w - sum(counts)] if sum(counts) <= h * w else [])}
        else:
            seg = None if kind == "none" else []
        annotations.append({"id": n + 10, "image_id": image["id"], "category_id": draw(st.integers(-1, 4)),
                            "segmentation": seg, "iscrowd": 0})
    coco = {"images": images, "annotations": annotations, "categories": categories}
    for _ in range(draw(st.integers(0, 3))):
        table = draw(st.sampled_from([coco, *images, *categories, *annotations]))
        key = draw(st.sampled_from(sorted(table) + ["extra"]))
        if draw(st.booleans()):
            table.pop(key, None)
        else:
            table[key] = draw(json_values)
    return coco


def _check_coco(work: Path, text: str | bytes, class_names, class_by, ignore_blank_area, on_unknown, listed):
    path = work / "ann.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    images = [str(work / "images" / n) for n in IMAGES[:3]] if listed else str(work / "images")
    samples = _expect((DatasetError, ImageError, ConfigError), load_coco, path, images, class_names,
                      class_by=class_by, ignore_blank_area=ignore_blank_area, on_unknown_class=on_unknown)
    for sample in samples or []:
        if sample.height * sample.width <= MAX_RASTER:
            label = _expect((DatasetError,), sample.load_label)
            assert label is None or label.shape == (sample.height, sample.width)
    names = _expect((DatasetError,), coco_category_names, str(path))
    assert names is None or all(isinstance(n, str) for n in names)


_coco_args = dict(class_names=st.lists(st.sampled_from(CLASSES + ("background",)), min_size=0, max_size=3),
                  class_by=st.sampled_from(["name", "id"]), ignore_blank_area=st.booleans(),
                  on_unknown=st.sampled_from(["error", "skip", "ignore"]), listed=st.booleans())


@FUZZ
@given(coco=near_valid_coco(), **_coco_args)
def test_near_valid_coco_gives_samples_or_a_dataset_error(work, coco, class_names, class_by, ignore_blank_area,
                                                          on_unknown, listed):
    _check_coco(work, json.dumps(coco), class_names, class_by, ignore_blank_area, on_unknown, listed)


@FUZZ
@given(data=json_values | st.binary(max_size=40) | st.text(max_size=40), **_coco_args)
def test_random_json_or_bytes_as_coco_give_a_dataset_error(work, data, class_names, class_by, ignore_blank_area,
                                                           on_unknown, listed):
    text = data if isinstance(data, bytes) else data if isinstance(data, str) else json.dumps(data)
    _check_coco(work, text, class_names, class_by, ignore_blank_area, on_unknown, listed)


def test_fuzz_findings_stay_fixed(work):
    """The bugs the fuzzer found, one example each (they were TypeErrors, a hang and garbage labels)."""
    path = work / "found.json"
    folder = str(work / "images")
    image = {"id": 1, "file_name": "a.png", "height": 3, "width": 4}
    cases = {
        "images[0] needs an integer 'id'": {"images": [{**image, "id": [1]}], "annotations": []},
        "has image_id": {"images": [image], "categories": [{"id": 0, "name": "road"}],
                         "annotations": [{"id": 5, "image_id": {"x": 1}, "category_id": 0}]},
        "categories[0] needs an integer 'id'": {"images": [image], "annotations": [],
                                                "categories": [{"id": [0], "name": "road"}]},
        "far outside": {"images": [image], "categories": [{"id": 0, "name": "road"}], "annotations": [
            {"id": 5, "image_id": 1, "category_id": 0, "segmentation": [[0, 0, 1e12, 0, 0, 1e12]]}]},
        "flat list of numbers": {"images": [image], "categories": [{"id": 0, "name": "road"}], "annotations": [
            {"id": 5, "image_id": 1, "category_id": 0, "segmentation": [[0, 0, float("nan"), 0, 0, 2]]}]},
        "segmentation must be": {"images": [image], "categories": [{"id": 0, "name": "road"}], "annotations": [
            {"id": 5, "image_id": 1, "category_id": 0, "segmentation": 0}]},
    }
    for message, coco in cases.items():
        path.write_text(json.dumps(coco))
        with pytest.raises(DatasetError, match=re.escape(message)) as info:
            load_coco(path, folder, ["road"])
        assert str(path) in str(info.value)
    # Compressed counts covering fewer pixels than the image: pycocotools leaves the rest of the
    # mask unwritten, and those bytes used to be painted as the class.
    path.write_text(json.dumps({"images": [image], "categories": [{"id": 0, "name": "road"}], "annotations": [
        {"id": 5, "image_id": 1, "category_id": 0, "segmentation": {"size": [3, 4], "counts": "0"}}]}))
    with pytest.raises(DatasetError, match="annotation 5 .*counts '0' are corrupt"):
        load_coco(path, folder, ["road"])
    path.write_text('{"images": [' * 100_000)
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_coco(path, folder, ["road"])


# ---------------------------------------------------------------------------------------------
# Index and list files

_line_chars = st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from(["\t", " ", "#", "\r", "\x00",
                                                                                        "/", ".", "a"])
index_text = (st.lists(st.text(_line_chars, max_size=20), max_size=8).map("\n".join).map(str.encode)
              | st.binary(max_size=60))


@FUZZ
@given(data=index_text)
def test_random_index_lines_give_paths_or_a_ymir_error(work, data):
    index = work / "index.tsv"
    index.write_bytes(data)
    paths = _expect((YmirError,), read_index, index, "training")
    if paths is not None:
        assert all(p and "\t" not in p and p == p.strip() for p in paths)
        rows = index_rows(index, "training")
        assert [r[0] for r in rows] == paths
        env = SimpleNamespace(config_file=work / "no-config" / "config.yaml")  # no fallback annotation file
        ann = _expect((YmirError,), _annotation_file, index, env)
        # a relative entry is relative to the index file's folder; an absolute one stays as it is
        assert ann is None or ann in {index.parent / r[1] for r in rows if len(r) > 1}
    listing = work / "list.txt"
    listing.write_bytes(data)
    entries = _expect((DatasetError,), image_source, str(listing))
    assert entries is None or all(isinstance(e, str) and e for e in entries)


def test_index_errors_name_the_file_and_line(work):
    index = work / "bad.tsv"
    index.write_bytes(b"a.png\tann.json\n\tann.json\n")
    with pytest.raises(YmirError, match=r"bad.tsv line 2: .*no image path"):
        read_index(index, "training")
    index.write_bytes(b"\xff\xfe\x00a")
    with pytest.raises(YmirError, match=r"bad.tsv is not UTF-8"):
        read_index(index, "training")
    listing = work / "bad.txt"
    listing.write_bytes(b"ok.png\n\xff\n")
    with pytest.raises(DatasetError, match=r"bad.txt is not UTF-8"):
        image_source(str(listing))


# ---------------------------------------------------------------------------------------------
# YAML

_yaml_bits = st.sampled_from(["key: value", "max_iters: 10", "lr: .inf", "crop_size: [1, 2]", "- a", "? [a]", ": x",
                              "&a [*a]", "*b", "!!python/object:os.system", "!!binary aGk=", "{", "]", "'", '"',
                              "\t", "%YAML 1.1", "---", "...", "1: 2", "null: 3", "2001-01-01: x", "a: !!set {b}",
                              "x: " + "[" * 200, "img_scale: 10" + "0" * 400, "\x07", "\ufeff"])
yaml_text = (st.lists(_yaml_bits | st.text(max_size=10), max_size=8).map("\n".join).map(str.encode)
             | st.binary(max_size=40))


def _config_values(cls: type) -> st.SearchStrategy:
    names = sorted(field_types(cls)) + ["ignore_black_area", "max_iter"]
    values = (json_values | st.sampled_from(["auto", "none", "[1, 2]", "1e999", "slide", "rsal", "-1", "0"])
              | st.integers(min_value=10**30) | st.lists(st.integers(-2, 2000), max_size=3))
    return st.dictionaries(st.sampled_from(names) | st.integers(0, 3), values, max_size=4)


@FUZZ
@given(data=yaml_text)
def test_random_yaml_text_gives_a_mapping_or_a_config_error(work, data):
    path = work / "random.yaml"
    path.write_bytes(data)
    loaded = _expect((ConfigError,), read_yaml_mapping, path)
    assert loaded is None or (isinstance(loaded, dict) and all(isinstance(k, str) for k in loaded))
    for cls in (TrainConfig, InferConfig, MineConfig):
        _expect((ConfigError,), load_config, cls, path)
    _expect((YmirError,), read_yaml, path)
    _expect((YmirError,), read_env, path)


@FUZZ
@given(cls=st.sampled_from([TrainConfig, InferConfig, MineConfig]), data=st.data())
def test_random_config_values_give_a_config_or_a_config_error(work, cls, data):
    path = work / "values.yaml"
    path.write_text(yaml.safe_dump(data.draw(_config_values(cls)), allow_unicode=True))
    cfg = _expect((ConfigError,), load_config, cls, path)
    assert cfg is None or isinstance(cfg, cls)


@st.composite
def near_valid_env(draw) -> dict:
    env = {"task_id": "t", "run_training": True, "run_mining": False, "run_infer": False, "protocol_version": "1.1.0",
           "input": {"config_file": "/in/config.yaml", "training_index_file": "/in/train-index.tsv",
                     "models_dir": "/in/models"},
           "output": {"root_dir": "/out", "monitor_file": "/out/monitor.txt"}}
    tables = [env, env["input"], env["output"]]
    for _ in range(draw(st.integers(0, 3))):
        table = draw(st.sampled_from(tables))
        key = draw(st.sampled_from(sorted(table) + ["extra"]))
        if draw(st.booleans()):
            table.pop(key, None)
        else:
            table[key] = draw(json_values)
    return env


@FUZZ
@given(env=near_valid_env())
def test_near_valid_env_gives_an_env_or_a_ymir_error(work, env):
    path = work / "env.yaml"
    path.write_text(yaml.safe_dump(env, allow_unicode=True))
    parsed = _expect((YmirError,), read_env, path)
    assert parsed is None or isinstance(parsed.out_dir, Path)


def test_yaml_errors_name_the_file(work):
    path = work / "bad.yaml"
    for text, message in ((b"1: 2\n", "1 is not a key name"), (b"- a\n", "must hold a mapping"),
                          (b"a: [\n", "is not valid YAML"), (b"\xff\xfe\xfa", "is not valid YAML")):
        path.write_bytes(text)
        with pytest.raises(ConfigError, match=message) as info:
            read_yaml_mapping(path)
        assert str(path) in str(info.value)
    with pytest.raises(MissingFileError, match="does not exist"):
        read_yaml_mapping(work / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        read_yaml_mapping(work)
    path.write_text("max_iters: 100000000000000000000000000000000000000\nlr: 1" + "0" * 400 + "\n")
    with pytest.raises(ConfigError, match="lr: expected a number"):
        load_config(TrainConfig, path)
