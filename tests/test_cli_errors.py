"""What the ``mirseg`` command does with bad input: one line naming the key or file and the fix, exit 2.

An unexpected error keeps its traceback (exit 1), an interrupted job exits 128 + the signal, and
CUDA running out of memory names the keys to lower. None of these tests trains a model: each bad
input is refused before any work starts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mirseg.evaluate
import mirseg.infer
import mirseg.mine
import mirseg.train
from mirseg.checkpoint import atomic_save, make_checkpoint
from mirseg.cli import build_parser, main
from mirseg.coerce import FALSE_WORDS, TRUE_WORDS, parse_bool
from mirseg.config import (
    EVAL_KEYS,
    InferConfig,
    TrainConfig,
    build_config,
    check_output_dir,
    eval_config,
    load_config,
)
from mirseg.errors import EXIT_ERROR, EXIT_SIGTERM, ConfigError, Interrupted, MirsegError
from mirseg.fileio import write_atomic
from mirseg.models import build_model
from mirseg.ymir.protocol import YmirError, read_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def errors(caplog):
    """The ERROR records of the mirseg logger; checks that each is one line without a traceback."""
    caplog.set_level(logging.INFO, logger="mirseg")

    def get() -> list[str]:
        records = [r for r in caplog.records if r.name == "mirseg" and r.levelno >= logging.ERROR]
        for r in records:
            assert r.exc_info is None, "a user error must not print a traceback"
            assert "\n" not in r.getMessage()
        return [r.getMessage() for r in records]

    return get


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A file read_checkpoint accepts, with the saved config ``mirseg eval`` starts from."""
    path = tmp_path / "best.pth"
    saved = {"config_file": "fastscnn", "crop_size": [64, 64], "img_scale": [128, 96], "test_mode": "whole"}
    atomic_save(make_checkpoint(build_model("fastscnn", 2), "fastscnn", ["background", "disc"], config=saved), path)
    return path


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    return path


# ---------------------------------------------------------------------------------------------
# The cases of issue 10


def test_coco_class_by_hint_names_the_config_key(tmp_path, errors):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"x")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 2, "width": 2}],
                               "annotations": []}))
    rc = main(["train", f"train_ann={ann}", f"train_images={tmp_path / 'img'}", "class_names=[car]",
               f"work_dir={tmp_path / 'w'}", "device=cpu"])
    assert rc == EXIT_ERROR
    (message,) = errors()
    assert str(ann) in message and "no 'categories' list" in message
    assert "set coco_class_by=id" in message  # the key a user can set, not load_coco's parameter name


@pytest.mark.parametrize("argv", [
    ["train", "config_file=fastscnn", "--weights", "w.pth", "train_ann=a.json", "--resume", "max_iters=5"],
    ["train", "--resume", "config_file=fastscnn", "train_ann=a.json", "--weights", "w.pth", "max_iters=5"],
    ["train", "config_file=fastscnn", "train_ann=a.json", "max_iters=5", "--weights=w.pth", "--resume"],
])
def test_train_flags_anywhere_among_keys(argv):
    args = build_parser().parse_args(argv)
    assert (args.weights, args.resume) == ("w.pth", True)
    assert sorted([args.config, *args.overrides]) == ["config_file=fastscnn", "max_iters=5", "train_ann=a.json"]


@pytest.mark.parametrize("command", ["infer", "mine"])
def test_job_flags_anywhere_among_keys(command):
    args = build_parser().parse_args([command, "m.pth", "photos/", "out_dir=o", "--config", "c.yaml",
                                      "samples_per_gpu=1"])
    assert (args.checkpoint, args.images, args.config) == ("m.pth", "photos/", "c.yaml")
    assert args.overrides == ["out_dir=o", "samples_per_gpu=1"]


def test_eval_takes_a_yaml_file_and_keys_in_any_order():
    args = build_parser().parse_args(["eval", "best.pth", "e.yaml", "val_ann=v.json", "val_images=img/"])
    assert (args.checkpoint, args.config, args.overrides) == ("best.pth", "e.yaml", ["val_ann=v.json",
                                                                                       "val_images=img/"])


def test_the_reported_flag_after_keys_runs(tmp_path, errors):
    """`mirseg train config_file=x --weights F train_ann=...` used to stop at argparse's top-level usage."""
    missing = tmp_path / "train.json"
    rc = main(["train", "config_file=fastscnn", "--weights", str(tmp_path / "w.pth"), f"train_ann={missing}",
               f"train_images={tmp_path}", f"work_dir={tmp_path / 'w'}", "--resume", "device=cpu"])
    assert rc == EXIT_ERROR
    assert errors() == [f"COCO file {missing} does not exist"]  # parsed, and failed on the data, not the flags


def test_an_unknown_flag_gets_the_commands_usage_and_a_hint(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "max_iters=5", "--wieghts", "w.pth"])
    assert info.value.code == EXIT_ERROR
    err = capsys.readouterr().err
    assert "usage: mirseg train" in err and "unrecognized arguments: --wieghts" in err
    assert "did you mean --weights?" in err


@pytest.mark.parametrize(("argv", "key"), [
    (["train", "work_dir={file}"], "work_dir"),
    (["train", "work_dir={dir}", "tensorboard_dir={file}"], "tensorboard_dir"),
    (["infer", "{ckpt}", "photos/", "out_dir={file}"], "out_dir"),
    (["mine", "{ckpt}", "pool/", "out_dir={file}", "--config", "{yaml}"], "out_dir"),
    (["export", "{ckpt}", "--output", "{file}/model.onnx"], "--output"),
])
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path, a_file, ckpt, errors, argv, key):
    (tmp_path / "m.yaml").write_text("samples_per_gpu: 1\n")
    fill = dict(file=a_file, dir=tmp_path / "w", ckpt=ckpt, yaml=tmp_path / "m.yaml")
    assert main([a.format(**fill) for a in argv]) == EXIT_ERROR
    (message,) = errors()
    assert message.startswith(f"{key}: ") and str(a_file) in message and f"choose another {key}" in message
    assert a_file.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["precious.txt", "best.pth", "m.yaml"])


def test_an_output_folder_below_a_file_or_without_permission(tmp_path, a_file, monkeypatch):
    with pytest.raises(ConfigError, match=r"work_dir: .*precious.txt/run cannot be created because .*precious.txt "
                                          r"is a file"):
        check_output_dir("work_dir", a_file / "run")
    check_output_dir("out_dir", tmp_path / "new" / "deeper")  # not there yet: fine
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(ConfigError, match=rf"out_dir: no permission to write in {tmp_path}"):
        check_output_dir("out_dir", tmp_path / "new")


def test_export_output_that_is_a_folder(tmp_path, ckpt, errors):
    assert main(["export", str(ckpt), "--output", str(tmp_path)]) == EXIT_ERROR
    assert errors() == [f"--output {tmp_path} is a folder: give the file to write, e.g. {tmp_path / 'best'}.onnx"]


def test_eval_refuses_the_keys_it_does_not_use(ckpt, errors):
    assert main(["eval", str(ckpt), "config_file=hrnet_w18s", "lr=5"]) == EXIT_ERROR
    (message,) = errors()
    assert message.startswith("command line: mirseg eval does not use 'config_file', 'lr'")
    assert "come from the checkpoint" in message and "fix or remove them" in message
    assert message.endswith("Keys of mirseg eval: " + ", ".join(EVAL_KEYS))


def test_eval_refuses_training_keys_in_its_yaml_and_hints_typos(tmp_path, ckpt, errors):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("val_ann: v.json\nmax_iters: 100\n")
    assert main(["eval", str(ckpt), str(cfg)]) == EXIT_ERROR
    assert errors()[-1].startswith(f"{cfg}: mirseg eval does not use 'max_iters'")
    assert main(["eval", str(ckpt), "val_imgs=img/"]) == EXIT_ERROR
    assert "does not use 'val_imgs' (did you mean 'val_images'?); fix or remove it" in errors()[-1]


def test_eval_config_keeps_the_checkpoints_values_under_the_users_keys():
    saved = {"config_file": "hrnet_w18s", "crop_size": [64, 64], "lr": 0.5, "a_key_of_an_older_mirseg": 1}
    cfg = eval_config(saved, None, ["val_ann=v.json", "test_mode=slide", "slide_crop=[32,32]"])
    assert (cfg.config_file, cfg.crop_size, cfg.lr) == ("hrnet_w18s", (64, 64), 0.5)
    assert (cfg.val_ann, cfg.test_mode, cfg.slide_crop) == ("v.json", "slide", (32, 32))
    assert set(EVAL_KEYS) < set(TrainConfig.__dataclass_fields__)


def test_infer_and_mine_name_their_own_keys(ckpt, errors):
    assert main(["infer", str(ckpt), "photos/", "lr=5"]) == EXIT_ERROR
    message = errors()[-1]
    assert message.startswith("command line: mirseg infer does not use 'lr'; fix or remove it. Keys of mirseg infer:")
    assert "save_overlay" in message
    assert main(["mine", str(ckpt), "pool/", "minig_algorithm=rsal"]) == EXIT_ERROR
    assert "mirseg mine does not use 'minig_algorithm' (did you mean 'mining_algorithm'?)" in errors()[-1]


def test_bad_values_name_the_key(tmp_path, errors):
    assert main(["train", "samples_per_gpu=0"]) == EXIT_ERROR
    assert errors()[-1] == "config: samples_per_gpu must be >= 1, got 0"
    assert main(["train", "crop_size=[0,512]"]) == EXIT_ERROR
    assert errors()[-1] == "config: crop_size must be two positive integers, got [0, 512]"
    assert main(["infer", "m.pth", "photos/", "scales=[0.5,-1]"]) == EXIT_ERROR
    assert "scales must be positive ratios" in errors()[-1]
    assert main(["train", "max_iters"]) == EXIT_ERROR
    assert errors()[-1] == ("'max_iters' is neither a YAML file nor key=value: give max_iters=VALUE, or the path "
                            "of a YAML file")
    assert main(["train", "lr=0.1", "max_iters"]) == EXIT_ERROR
    assert errors()[-1] == "argument 'max_iters' is not key=value (e.g. max_iters=1000)"
    assert main(["train", str(tmp_path / "missing.yaml")]) == EXIT_ERROR
    assert errors()[-1] == f"config file {tmp_path / 'missing.yaml'} does not exist"


@pytest.mark.parametrize("value", [*TRUE_WORDS, *FALSE_WORDS, " ON ", "False", "NONE", True, False, 0, 1, 1.0, None])
def test_one_boolean_parser_for_config_keys_and_ymir_env_flags(tmp_path, value):
    """Every spelling means the same in a mirseg config and in YMIR's env.yaml (which used to accept other sets)."""
    want = value in (True, 1) or (isinstance(value, str) and value.strip().lower() in TRUE_WORDS)
    assert parse_bool(value, "k") is want
    assert build_config(InferConfig, {"save_coco": value}).save_coco is want
    env = tmp_path / "env.yaml"
    write_atomic(env, json.dumps({"run_training": value, "input": {"config_file": "/in/config.yaml"},
                                  "output": {"root_dir": "/out"}}))  # JSON is YAML, and keeps "on" a string
    assert read_env(env).run_training is want


@pytest.mark.parametrize("value", ["maybe", "y", "2", 2, -1, 0.5, [True], {}])
def test_a_value_that_is_no_boolean_names_the_key_and_the_spellings(tmp_path, value):
    with pytest.raises(ConfigError, match=r"config: save_coco: expected true or false, got .* \(true: true, t, yes, "
                                          r"on, 1; false: false, f, no, off, 0, none, ''\)"):
        build_config(InferConfig, {"save_coco": value})
    env = tmp_path / "env.yaml"
    write_atomic(env, json.dumps({"run_mining": value, "input": {"config_file": "/in/config.yaml"},
                                  "output": {"root_dir": "/out"}}))
    with pytest.raises(YmirError, match=rf"{env}: run_mining: expected true or false, got .*\(true: true, t,"):
        read_env(env)


# ---------------------------------------------------------------------------------------------
# What the CLI does with each kind of exception


def test_mirseg_errors_are_valueerrors_where_callers_expect_them():
    with pytest.raises(ValueError, match="did you mean 'max_iters'"):
        load_config(TrainConfig, None, ["max_iter=5"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(InferConfig, "/nonexistent/infer.yaml")


def test_an_unexpected_error_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(cfg, progress=None):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(mirseg.train, "train", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(["train", f"work_dir={tmp_path / 'w'}"])


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_exit_codes_and_output_of_a_real_process(tmp_path):
    """A user error: exit 2 and one line on stderr. A bug: exit 1 and the whole traceback."""
    user = _run("import sys; from mirseg.cli import main; sys.exit(main(['train', 'max_iter=3']))")
    assert user.returncode == EXIT_ERROR, user.stderr
    lines = user.stderr.strip().splitlines()
    assert len(lines) == 1 and "ERROR" in lines[0] and "did you mean 'max_iters'" in lines[0]
    bug = _run("import sys, mirseg.train\n"
               "def broken(cfg, progress=None): raise ZeroDivisionError('a bug')\n"
               "mirseg.train.train = broken\n"
               "from mirseg.cli import main\n"
               f"sys.exit(main(['train', 'work_dir={tmp_path / 'w'}']))\n")
    assert bug.returncode == 1
    assert "Traceback (most recent call last)" in bug.stderr and "ZeroDivisionError: a bug" in bug.stderr


def test_a_mirseg_error_from_deep_inside_is_one_line(tmp_path, monkeypatch, errors):
    def fails(cfg, progress=None):
        raise MirsegError(f"{cfg.work_dir}: something the user can fix")

    monkeypatch.setattr(mirseg.train, "train", fails)
    assert main(["train", f"work_dir={tmp_path / 'w'}"]) == EXIT_ERROR
    assert errors() == [f"{tmp_path / 'w'}: something the user can fix"]


def test_an_interrupted_job_exits_128_plus_the_signal(tmp_path, monkeypatch, errors):
    def stopped(cfg, progress=None):
        raise Interrupted("stopped by SIGTERM at iteration 7; last.pth saved: rerun with --resume", signal.SIGTERM)

    monkeypatch.setattr(mirseg.train, "train", stopped)
    assert main(["train", f"work_dir={tmp_path / 'w'}"]) == EXIT_SIGTERM == 143
    assert errors() == ["stopped by SIGTERM at iteration 7; last.pth saved: rerun with --resume"]


OOM = "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 79.19 GiB of which ..."


@pytest.mark.parametrize(("command", "target", "keys"), [
    ("train", (mirseg.train, "train"), ["samples_per_gpu", "crop_size"]),
    ("eval", (mirseg.evaluate, "evaluate_checkpoint"), ["img_scale", "test_mode=slide", "slide_crop"]),
    ("infer", (mirseg.infer, "run_inference"), ["samples_per_gpu", "img_scale", "test_mode=slide"]),
    ("mine", (mirseg.mine, "mine"), ["samples_per_gpu", "img_scale"]),
])
def test_cuda_out_of_memory_names_the_keys_to_lower(tmp_path, ckpt, monkeypatch, errors, command, target, keys):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(OOM)

    monkeypatch.setattr(*target, oom)
    argv = {"train": ["train", f"work_dir={tmp_path / 'w'}"], "eval": ["eval", str(ckpt)],
            "infer": ["infer", str(ckpt), "photos/", f"out_dir={tmp_path / 'o'}"],
            "mine": ["mine", str(ckpt), "pool/", f"out_dir={tmp_path / 'o'}"]}[command]
    assert main(argv) == EXIT_ERROR
    (message,) = errors()
    assert message.startswith(f"CUDA ran out of memory in mirseg {command} (tried to allocate 2.50 gib): ")
    assert all(k in message for k in keys) and message.endswith("or run on the CPU with device=cpu")
