"""Pretrained starts: ImageNet layouts, model-zoo checkpoints, `auto`, `mirseg weights download`, YMIR's /weights.

Every file is synthetic, made from our own models' state dicts in the layouts mmcv, torchvision and
msra publish (no ``backbone.`` prefix, a classification head, sometimes a ``state_dict`` wrapper);
downloads come from a local HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import re
import socket
import threading
from pathlib import Path

import pytest
import torch
import yaml

from mirseg import pretrained
from mirseg.cli import main as cli_main
from mirseg.config import TrainConfig
from mirseg.data.synthetic import make_dataset
from mirseg.download import sha256_file
from mirseg.errors import ConfigError, MissingFileError
from mirseg.models import build_model
from mirseg.ymir.executor import main as ymir_main
from mirseg.ymir.protocol import CODE_CONFIG, YmirError, read_env
from mirseg.ymir.training import training_config
from mirseg.ymir.workspace import training_workspace, ymir_coco

HEADS = {  # what each publisher's ImageNet file carries beside the backbone: (key, shape)
    "resnet": [("fc.weight", (1000, 8)), ("fc.bias", (1000,))],
    "hrnet": [("incre_modules.0.0.conv1.weight", (32, 18, 1, 1)), ("incre_modules.0.0.bn1.weight", (32,)),
              ("downsamp_modules.0.0.weight", (256, 128, 3, 3)), ("final_layer.0.weight", (2048, 1024, 1, 1)),
              ("classifier.weight", (1000, 2048)), ("classifier.bias", (1000,))],
}


def _imagenet_file(folder: Path, arch: str, name: str, wrap: bool = False, bn_counters: bool = True,
                   seed: int = 1) -> tuple[Path, dict[str, torch.Tensor]]:
    """An ImageNet-style file of ``arch``'s backbone: keys without ``backbone.``, plus a head; returns its tensors."""
    torch.manual_seed(seed)
    own = build_model(arch, 2).state_dict()
    state = {k[len("backbone."):]: (torch.randn_like(v) if v.is_floating_point() else v + 7)
             for k, v in own.items() if k.startswith("backbone.")}
    if not bn_counters:  # torchvision's files predate BatchNorm's counter
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for key, shape in HEADS["hrnet" if arch.startswith(("hrnet", "ocrnet")) else "resnet"]:
        state[key] = torch.randn(shape)
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state} if wrap else state, path)
    return path, state


def _zoo_file(folder: Path, name: str, arch: str = "fastscnn", classes: int = 19, seed: int = 2) -> Path:
    """An mmseg model-zoo style checkpoint (``meta`` + ``state_dict``, Cityscapes' 19 classes)."""
    torch.manual_seed(seed)
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in
             build_model(arch, classes).state_dict().items()}
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"mmseg_version": "0.27.0"}, "state_dict": state}, path)
    return path


LAYOUTS = [  # (preset, ImageNet file, wrapped in {"state_dict": ...}, with BN counters)
    ("deeplabv3plus_r18", "resnet18_v1c-b5776b93.pth", True, True),
    ("deeplabv3plus_r50", "resnet50_v1c-2cccc1ad.pth", False, True),
    ("deeplabv3plus_r18b", "resnet18-f37072fd.pth", False, False),
    ("hrnet_w18s", "hrnetv2_w18_small-b5a04e21.pth", True, True),
    ("ocrnet_hr18", "hrnetv2_w18-00eb2006.pth", False, True),
]


def test_every_backbone_has_its_file_and_fastscnn_has_none():
    assert {f for _, f, _, _ in LAYOUTS} == {f.name for f in pretrained.KNOWN.values() if f.kind == "imagenet"}
    for preset, name, _, _ in LAYOUTS:
        assert pretrained.imagenet_file(pretrained.PRESETS[preset].model).name == name
    assert pretrained.imagenet_file("fastscnn") is None
    for preset in pretrained.PRESETS:  # every preset has its model-zoo file, named after its own mmseg config
        zoo = pretrained.zoo_file(preset)
        assert zoo is not None and zoo.name.startswith(Path(pretrained.PRESET_CONFIG[preset]).stem + "_")
        assert pretrained.PRESETS[preset].model in zoo.models and len(zoo.sha256_prefix) == 8
    assert pretrained.zoo_file("hrnet_w18s").name.startswith("fcn_hr18s_512x1024_40k_")


# The two largest backbones (the same layouts as the others) run in CI only (RUN_SLOW=1): ~4 s.
_LARGE = ("deeplabv3plus_r50", "ocrnet_hr18")


@pytest.mark.parametrize("preset, name, wrap, counters",
                         [pytest.param(*layout, marks=pytest.mark.slow) if layout[0] in _LARGE else layout
                          for layout in LAYOUTS], ids=[p for p, *_ in LAYOUTS])
def test_imagenet_file_fills_the_backbone_and_ignores_the_head(tmp_path, caplog, preset, name, wrap, counters):
    path, state = _imagenet_file(tmp_path / "w", pretrained.PRESETS[preset].model, name, wrap, counters)
    torch.manual_seed(0)
    model = build_model(pretrained.PRESETS[preset].model, 3)
    torch.manual_seed(0)
    fresh = build_model(pretrained.PRESETS[preset].model, 3).state_dict()
    cfg = TrainConfig(config_file=preset, weights_dir=str(tmp_path / "w"))
    with caplog.at_level(logging.INFO, logger="mirseg"):
        out = pretrained.initialise(model, cfg)
    got = model.state_dict()
    for key, tensor in state.items():
        if key.split(".")[0] in ("fc", "incre_modules", "downsamp_modules", "final_layer", "classifier"):
            assert "backbone." + key not in got
        else:
            assert torch.equal(got["backbone." + key], tensor), key
    for key in got:  # the heads keep their fresh initialisation, and so do BN counters a file lacks
        if not key.startswith("backbone.") or (not counters and key.endswith("num_batches_tracked")):
            assert torch.equal(got[key], fresh[key]), key
    assert out.pretrained == f"{path.resolve()}@sha256:{sha256_file(path)}"
    text = caplog.text
    assert "pretrained start: ImageNet backbone" in text and sha256_file(path) in text
    head = "fc.weight, fc.bias" if "resnet" in name else "incre_modules.0.0.conv1.weight"
    assert "ignored the classification head" in text and head in text
    assert "does not start with the" in text  # a synthetic file is not the published one: said, not refused


def test_a_large_head_is_summarised_by_prefix(tmp_path, caplog):
    path, state = _imagenet_file(tmp_path, "hrnet_w18s", "x.pth")
    state.update({f"classifier.extra{i}": torch.zeros(1) for i in range(10)})
    with caplog.at_level(logging.INFO, logger="mirseg"):
        report = pretrained.load_backbone(build_model("hrnet_w18s", 2), state, "x.pth", pretrained.head_prefixes(
            "hrnet_w18s"))
    assert len(report.ignored) == 16
    assert "classifier.* (12)" in caplog.text and "incre_modules.* (2)" in caplog.text


@pytest.mark.parametrize("file_arch, name, model_arch, words", [
    ("deeplabv3plus_r18b", "resnet18-f37072fd.pth", "deeplabv3plus_r18", ["stem.0.weight", "conv1.weight"]),
    ("hrnet_w18s", "hrnetv2_w18_small-b5a04e21.pth", "deeplabv3plus_r18b", ["keys the backbone does not have",
                                                                            "conv2.weight", "resnet18-f37072fd.pth"]),
    ("hrnet_w18s", "hrnetv2_w18_small-b5a04e21.pth", "hrnet_w18", ["backbone keys missing from the file",
                                                                   "layer1.2."]),
    ("deeplabv3plus_r18", "resnet18_v1c-b5776b93.pth", "deeplabv3plus_r18",
     ["layer1.0.conv1.weight: file (64, 64, 1, 1) vs model (64, 64, 3, 3)"]),
], ids=["torchvision-into-v1c", "hrnet-into-resnet", "w18-small-into-w18", "one-shape-differs"])
def test_a_file_of_another_backbone_is_refused_with_the_keys_named(tmp_path, file_arch, name, model_arch, words):
    path, state = _imagenet_file(tmp_path, file_arch, name)
    if file_arch == model_arch:  # the same backbone but one tensor of another shape
        state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
        torch.save(state, path)
    preset = next(p for p, v in pretrained.PRESETS.items() if v.model == model_arch)
    model = build_model(model_arch, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="does not fit the backbone") as info:
        pretrained.initialise(model, TrainConfig(config_file=preset, pretrained=str(path)))
    for word in words:
        assert word in str(info.value)
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_auto_takes_the_model_zoo_file_first_then_imagenet_else_warns(tmp_path, caplog):
    folder = tmp_path / "w"
    cfg = TrainConfig(config_file="hrnet_w18s", weights_dir=str(folder))
    with caplog.at_level(logging.WARNING, logger="mirseg"):
        out = pretrained.initialise(build_model("hrnet_w18s", 3), cfg)
    assert out.pretrained == "none"
    warning = caplog.text
    assert "random weights" in warning and "mirseg weights download hrnet_w18s" in warning
    assert "hrnetv2_w18_small-b5a04e21.pth" in warning and str(folder) in warning
    caplog.clear()

    backbone, _ = _imagenet_file(folder, "hrnet_w18s", "hrnetv2_w18_small-b5a04e21.pth")
    assert pretrained.find_start("hrnet_w18s", folder) == pretrained.Start(backbone, "imagenet")
    # A model-zoo file (in a sub-folder, as /weights/**/ allows) wins, and an 80k config prefers its own file.
    zoo40 = _zoo_file(folder / "zoo", "fcn_hr18s_512x1024_40k_cityscapes_20200601_014216-93db27d0.pth", "hrnet_w18s")
    assert pretrained.find_start("hrnet_w18s", folder) == pretrained.Start(zoo40, "zoo")
    config80 = "configs/hrnet/fcn_hr18s_512x1024_80k_cityscapes.py"
    assert pretrained.find_start(config80, folder).path == zoo40  # same network, other schedule: still fits
    zoo80 = _zoo_file(folder, "fcn_hr18s_512x1024_80k_cityscapes_mine.pth", "hrnet_w18s")  # the original's prefix rule
    assert pretrained.find_start(config80, folder).path == zoo80
    assert pretrained.find_start("hrnet_w18", folder) is None  # w18-small files never start a w18
    assert pretrained.find_start("ocrnet_hr18s", folder).path == backbone  # the same ImageNet backbone

    torch.manual_seed(0)
    model = build_model("hrnet_w18s", 3)
    torch.manual_seed(0)
    fresh = build_model("hrnet_w18s", 3).state_dict()
    with caplog.at_level(logging.INFO, logger="mirseg"):
        out = pretrained.initialise(model, cfg)
    zoo = torch.load(zoo40, weights_only=True)["state_dict"]
    got = model.state_dict()
    assert out.pretrained == f"{zoo40.resolve()}@sha256:{sha256_file(zoo40)}"
    assert torch.equal(got["backbone.conv1.weight"], zoo["backbone.conv1.weight"])
    assert torch.equal(got["decode_head.conv_seg.weight"], fresh["decode_head.conv_seg.weight"])  # 19 -> 3 classes
    assert "pretrained start: model-zoo checkpoint" in caplog.text and "kept fresh classifier" in caplog.text


def test_zoo_candidates_follow_the_config_and_never_cross_architectures():
    assert pretrained.zoo_candidates("configs/hrnet/fcn_hr18s_512x1024_160k_cityscapes.py")[:2] == [
        "fcn_hr18s_512x1024_160k_cityscapes", "fcn_hr18s_512x1024_40k_cityscapes"]
    r18 = pretrained.zoo_candidates("deeplabv3plus_r18")
    assert r18 == ["deeplabv3plus_r18-d8_512x1024_80k_cityscapes", "deeplabv3plus_r18-d8_769x769_80k_cityscapes"]
    assert not any(s.startswith("deeplabv3plus_r18b") for s in r18)


def test_explicit_file_pin_none_and_weights(tmp_path, caplog):
    path, state = _imagenet_file(tmp_path, "hrnet_w18s", "my-backbone.pth")
    digest = sha256_file(path)
    model = build_model("hrnet_w18s", 2)
    out = pretrained.initialise(model, TrainConfig(config_file="hrnet_w18s", pretrained=f"{path}@sha256:{digest}"))
    assert out.pretrained == f"{path.resolve()}@sha256:{digest}"
    assert torch.equal(model.state_dict()["backbone.conv1.weight"], state["conv1.weight"])
    with pytest.raises(ConfigError, match="the file changed since that run"):
        pretrained.initialise(model, TrainConfig(config_file="hrnet_w18s", pretrained=f"{path}@sha256:{'0' * 64}"))
    with pytest.raises(MissingFileError, match="pretrained: .*nothere.pth does not exist"):
        pretrained.initialise(model, TrainConfig(config_file="hrnet_w18s", pretrained=str(tmp_path / "nothere.pth")))
    for off in ("none", "None", "false", ""):
        assert pretrained.initialise(model, TrainConfig(config_file="hrnet_w18s", pretrained=off)).pretrained == "none"
    # weights= (a full checkpoint) wins over pretrained, whatever pretrained says.
    zoo = _zoo_file(tmp_path, "full.pth", "hrnet_w18s", classes=2)
    cfg = TrainConfig(config_file="hrnet_w18s", weights=str(zoo), pretrained=str(path))
    with caplog.at_level(logging.INFO, logger="mirseg"):
        assert pretrained.initialise(model, cfg) == cfg
    assert torch.equal(model.state_dict()["backbone.conv1.weight"],
                       torch.load(zoo, weights_only=True)["state_dict"]["backbone.conv1.weight"])
    assert f"initial weights: {zoo} (sha256 {sha256_file(zoo)})" in caplog.text
    # A whole segmentation checkpoint given as pretrained is fine-tuned like a model-zoo file.
    out = pretrained.initialise(build_model("hrnet_w18s", 2), TrainConfig(config_file="hrnet_w18s",
                                                                           pretrained=str(zoo)))
    assert out.pretrained.startswith(str(zoo.resolve()))


def test_resume_keeps_the_start_the_first_run_recorded(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"pretrained": "/w/x.pth@sha256:abc"}))
    cfg = TrainConfig(config_file="hrnet_w18s", resume=True, work_dir=str(tmp_path))
    assert pretrained.initialise(build_model("hrnet_w18s", 2), cfg).pretrained == "/w/x.pth@sha256:abc"


def test_weights_folder_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MIRSEG_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert pretrained.weights_dir() == tmp_path / "cache" / "mirseg" / "weights"
    assert pretrained.weights_dir("", default="/weights") == Path("/weights")
    monkeypatch.setenv("MIRSEG_WEIGHTS", str(tmp_path / "env"))
    assert pretrained.weights_dir("", default="/weights") == tmp_path / "env"
    assert pretrained.weights_dir(str(tmp_path / "key")) == tmp_path / "key"


# ---------------------------------------------------------------------------------------------
# mirseg weights download, from a local HTTP server


@pytest.fixture
def server(tmp_path):
    """A static HTTP server on 127.0.0.1 (random port) over ``tmp_path/served``; yields (url, folder, GET paths)."""
    served = tmp_path / "served"
    served.mkdir()
    gets: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            gets.append(self.path)
            if self.path.startswith("/cut-"):  # the connection drops after 10 of the 1000 bytes announced
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"0123456789")
                self.close_connection = True
                return
            super().do_GET()

        def log_message(self, *args):  # keep the test output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served, gets
    httpd.shutdown()
    httpd.server_close()


def _hashed(folder: Path, stem: str, size: int = 3 << 20) -> Path:
    data = torch.randint(0, 255, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)).numpy()
    blob = data.tobytes()
    path = folder / f"{stem}-{hashlib.sha256(blob).hexdigest()[:8]}.pth"
    path.write_bytes(blob)
    return path


def test_download_streams_verifies_and_does_not_fetch_twice(server, tmp_path, capsys, monkeypatch):
    url, served, gets = server
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy in the environment must not take the local server
    source = _hashed(served, "mystart")
    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / source.name).write_bytes(b"a truncated earlier copy")  # not verified: fetched again
    args = ["weights", "download", source.name, "--dir", str(dest), "--url-base", url + "/"]
    assert cli_main(args) == 0
    out = capsys.readouterr()
    assert "100%" in out.err and source.name in out.err  # the progress bar
    assert f"{source.name}: downloaded (sha256 {sha256_file(source)})" in out.out
    assert (dest / source.name).read_bytes() == source.read_bytes()
    assert [p.name for p in dest.iterdir()] == [source.name]
    assert cli_main(args) == 0
    assert "already there, verified" in capsys.readouterr().out
    assert gets == [f"/{source.name}"]  # one GET in all


def test_download_refuses_a_checksum_mismatch_and_leaves_nothing(server, tmp_path, caplog, monkeypatch):
    url, served, gets = server
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    (served / "resnet18-f37072fd.pth").write_bytes(b"not torchvision's resnet18" * 1000)
    dest = tmp_path / "weights"
    with caplog.at_level(logging.ERROR, logger="mirseg"):
        rc = cli_main(["weights", "download", "resnet18-f37072fd.pth", "deeplabv3plus_r18", "--dir", str(dest),
                       "--url-base", url])
    assert rc == 1
    assert "refused, nothing was kept" in caplog.text and "f37072fd" in caplog.text
    assert "HTTP 404" in caplog.text  # the preset's model-zoo file is not on this server: its own error, and go on
    assert list(dest.iterdir()) == []  # no file, no temp file
    assert len(gets) == 2


def test_download_cut_off_or_unreachable_is_an_error_and_leaves_nothing(server, tmp_path, caplog, monkeypatch):
    url, _, _ = server
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    dest = tmp_path / "weights"
    with caplog.at_level(logging.ERROR, logger="mirseg"):
        assert cli_main(["weights", "download", "cut-0123abcd.pth", "--dir", str(dest), "--url-base", url]) == 1
    assert "could not fetch" in caplog.text and "the connection closed after 10 of 1000 bytes" in caplog.text
    assert "copy the file by hand to" in caplog.text
    caplog.clear()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with caplog.at_level(logging.ERROR, logger="mirseg"):
        assert cli_main(["weights", "download", "hrnet_w18s", "--dir", str(dest), "--url-base", closed]) == 1
    assert "could not fetch" in caplog.text and "refused" in caplog.text.lower()
    assert list(dest.iterdir()) == []


def test_download_names_are_checked_before_fetching(tmp_path, caplog):
    assert cli_main(["weights", "download", "hrnet_w18x", "--dir", str(tmp_path)]) == 2
    assert "did you mean 'hrnet_w18'" in caplog.text
    assert cli_main(["weights", "download", "--dir", str(tmp_path)]) == 2
    assert [f.name for f in pretrained.select(["hrnet_w18s", "imagenet"])][:2] == [
        pretrained.zoo_file("hrnet_w18s").name, "resnet18_v1c-b5776b93.pth"]
    assert len(pretrained.select([], everything=True)) == len(pretrained.KNOWN)


def test_list_shows_presets_sizes_and_places(tmp_path, capsys):
    _zoo_file(tmp_path / "sub", pretrained.zoo_file("fastscnn").name)
    assert cli_main(["weights", "list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("fast_scnn"))
    assert " MB " in line and str(tmp_path / "sub") in line and "fastscnn" in line
    line = next(x for x in out.splitlines() if x.startswith("hrnetv2_w18_small"))
    assert "hrnet_w18s,ocrnet_hr18s" in line and str(tmp_path / "hrnetv2_w18_small-b5a04e21.pth") in line


# ---------------------------------------------------------------------------------------------
# YMIR: /weights (or $MIRSEG_WEIGHTS) without pretrained_model_params


def _task(root: Path, config: dict) -> Path:
    classes = ["disc", "box"]
    tr = make_dataset(root / "tr", 4, num_classes=2, seed=1)
    va = make_dataset(root / "va", 2, num_classes=2, seed=2, prefix="val")
    coco = ymir_coco([(tr.ann, tr.images), (va.ann, va.images)], classes, root / "all")
    val_names = [e["file_name"] for e in coco["images"] if e["file_name"].startswith("val")]
    return training_workspace(root / "task", coco, root / "all", val_names, classes, config)


def test_ymir_training_starts_from_the_model_zoo_file_in_its_weights_folder(tmp_path, capsys, monkeypatch):
    weights = tmp_path / "weights"
    zoo = _zoo_file(weights / "cityscapes", pretrained.zoo_file("fastscnn").name)
    monkeypatch.setenv("MIRSEG_WEIGHTS", str(weights))
    env = _task(tmp_path, {"config_file": "configs/fastscnn/fast_scnn_lr0.12_8x4_160k_cityscapes.py", "max_iters": 2,
                           "interval": 2, "samples_per_gpu": 2, "workers_per_gpu": 0,
                           "cfg_options": "crop_size=[64,64] img_scale=[128,96]"})
    assert ymir_main(["--env", str(env)]) == 0
    log = capsys.readouterr().out
    digest = sha256_file(zoo)
    assert f"pretrained start: model-zoo checkpoint {zoo} (sha256 {digest})" in log
    saved = yaml.safe_load((env.parent.parent / "out" / "models" / "config.yaml").read_text())
    assert saved["pretrained"] == f"{zoo.resolve()}@sha256:{digest}" and saved["weights_dir"] == str(weights)


def test_ymir_default_folder_is_slash_weights_and_none_turns_it_off(tmp_path, monkeypatch):
    monkeypatch.delenv("MIRSEG_WEIGHTS", raising=False)
    env = _task(tmp_path, {"max_iters": 2})
    cfg, _, _ = training_config(read_env(env), {**yaml.safe_load((env.parent / "config.yaml").read_text())})
    assert cfg.pretrained == "auto" and cfg.weights_dir == "/weights" and cfg.weights == ""
    cfg, _, _ = training_config(read_env(env), {**yaml.safe_load((env.parent / "config.yaml").read_text()),
                                                "pretrained": "none"})
    assert cfg.pretrained == "none"
    with pytest.raises(YmirError, match="pretrained: .*atuo does not exist") as info:  # a typo of auto
        training_config(read_env(env), {**yaml.safe_load((env.parent / "config.yaml").read_text()),
                                         "pretrained": "atuo"})
    assert info.value.code == CODE_CONFIG


def test_dockerfile_bakes_the_default_selection_into_slash_weights():
    text = (Path(__file__).resolve().parents[1] / "Dockerfile").read_text()
    default = re.search(r"^ARG WEIGHTS=(\S+)$", text, flags=re.M).group(1)
    assert default == "zoo" and pretrained.select(default.split()) == [
        f for f in pretrained.KNOWN.values() if f.kind == "zoo"]
    assert f"ENV MIRSEG_WEIGHTS={pretrained.YMIR_WEIGHTS_DIR}" in text
    assert "--dir /weights" in text and "chmod -R a+rX /weights" in text  # readable by the platform's user


def test_cli_train_with_a_missing_pretrained_file_exits_2(tmp_path, caplog):
    data = make_dataset(tmp_path / "d", 2, num_classes=2, seed=1)
    argv = ["train", f"train_ann={data.ann}", f"train_images={data.images}", "max_iters=1", "workers_per_gpu=0",
            f"work_dir={tmp_path / 'run'}", f"pretrained={tmp_path / 'typo.pth'}"]
    assert cli_main(argv) == 2
    assert "pretrained:" in caplog.text and "typo.pth does not exist" in caplog.text
    assert not (tmp_path / "run" / "last.pth").exists()
