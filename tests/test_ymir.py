"""The YMIR executor end to end on a realistic /in tree, its failure modes, and the image packaging."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mirseg.data.synthetic import make_dataset
from mirseg.ymir import templates
from mirseg.ymir.executor import main as ymir_main
from mirseg.ymir.protocol import POSTPROCESS, PREPROCESS, TASK, Monitor, YmirError, read_env, write_training_result
from mirseg.ymir.taskconfig import CPU_FALLBACK_ENV, read_task_config, task_device, visible_devices
from mirseg.ymir.training import training_config
from mirseg.ymir.workspace import inference_workspace, training_workspace, ymir_coco

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["disc", "box", "tri"]


def _coco_source(root: Path) -> tuple[dict, Path, list[str]]:
    """Train images with disc/box only (polygons and RLE mixed) plus one without objects; val has tri too.

    Returns the COCO dict (category_id = index into CLASSES), the image folder and the val file names.
    """
    tr = make_dataset(root / "tr", 12, num_classes=2, seed=1)
    va = make_dataset(root / "va", 4, num_classes=3, seed=11, prefix="val")
    images = root / "all"
    coco = ymir_coco([(tr.ann, tr.images), (va.ann, va.images)], CLASSES, images)
    # Every other object as compressed RLE, as YMIR exports imported masks.
    for a in coco["annotations"][::2]:
        e = next(i for i in coco["images"] if i["id"] == a["image_id"])
        rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], e["height"], e["width"]))
        a["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        a["iscrowd"] = 1
    empty = np.full((96, 128, 3), 120, np.uint8)
    cv2.imwrite(str(images / "empty.png"), empty)
    coco["images"].append({"id": len(coco["images"]) + 1, "file_name": "empty.png", "height": 96, "width": 128})
    val_names = [e["file_name"] for e in coco["images"] if e["file_name"].startswith("val")]
    assert any(a["category_id"] == 2 for a in coco["annotations"]), "val must carry the class train lacks"
    return coco, images, val_names


TRAIN_CONFIG = {"max_iters": 120, "interval": 60, "samples_per_gpu": 4, "workers_per_gpu": "0",
                "save_least_file": "False", "max_keep_ckpts": 1, "config_file": "fastscnn",
                "cfg_options": "crop_size=[64,64] img_scale=[128,96] lr=0.12 lr_scaling=none",
                "args_options": "--seed 3"}


def _run(env: Path, **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mirseg.ymir", "--env", str(env)], capture_output=True, text=True,
                          cwd=env.parent, timeout=600, env={**os.environ, **variables})


def _monitor(root: Path) -> list[str]:
    lines = (root / "out" / "monitor.txt").read_text().splitlines()
    return lines[0].split("\t")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One YMIR training task, run as the platform runs it (a subprocess), with its /in tree."""
    root = tmp_path_factory.mktemp("ymir_train")
    coco, images, val_names = _coco_source(root / "src")
    env = training_workspace(root / "task", coco, images, val_names, CLASSES, TRAIN_CONFIG)
    proc = _run(env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "task", proc, images, val_names


def test_training_writes_what_the_platform_reads(trained):
    task, proc, _, _ = trained
    _check_training(task, proc, min_miou=0.3)  # it learned something in 120 iterations


def _check_training(task: Path, proc: subprocess.CompletedProcess, min_miou: float) -> None:
    """What the platform reads of a training task with TRAIN_CONFIG's keys (any max_iters, max_keep_ckpts 1)."""
    out = task / "out"
    result = yaml.safe_load((out / "models" / "result.yaml").read_text())
    assert result["object_type"] == 3
    assert result["best_stage_name"] in result["model_stages"]
    assert set(result["model_stages"]) == {"best", "last"}
    for name, stage in result["model_stages"].items():
        assert stage["stage_name"] == name and isinstance(stage["timestamp"], int)
        for key in ("mIoU", "mAcc", "aAcc"):
            assert type(stage[key]) is float and 0.0 <= stage[key] <= 1.0
        for f in stage["files"]:
            assert "/" not in f and (out / "models" / f).is_file()
    assert result["model_stages"]["best"]["mIoU"] > min_miou
    # Rotation kept one iteration checkpoint but never a file a stage names.
    assert len(list((out / "models").glob("iter_*.pth"))) == 1
    saved = yaml.safe_load((out / "models" / "config.yaml").read_text())
    assert saved["class_names"] == CLASSES and saved["seed"] == 3 and saved["crop_size"] == [64, 64]
    assert saved["device"] == "cpu" and saved["coco_class_by"] == "id"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    fields = _monitor(task)
    assert len(fields) == 5 and float(fields[2]) == 1.0 and fields[3] == "2" and fields[4] == "0"
    assert fields[0] == "t0000001000001mirsegtrain00000"
    # Nothing printed before the executor's own log lines.
    assert proc.stdout.splitlines()[0].split()[1] == "INFO"


def test_training_model_has_every_class_even_one_only_val_has(trained):
    from mirseg.checkpoint import read_checkpoint

    task = trained[0]
    ckpt = read_checkpoint(task / "out" / "models" / "best.pth")
    assert ckpt["class_names"] == ["background", *CLASSES]
    assert len(ckpt["metrics"]["IoU"]) == 4


def test_mining_and_infer_on_the_trained_model(trained, tmp_path):
    env = _prediction_task(trained, tmp_path)
    proc = _run(env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_prediction(tmp_path)


def _prediction_task(trained, root: Path, **config) -> Path:
    """The mining and inference task of the trained model on 4 val images, a train image and the empty one."""
    task, _, images, val_names = trained
    models = task / "out" / "models"
    candidates = [images / n for n in val_names] + [images / "img_0000.png", images / "empty.png"]
    return inference_workspace(root, [models / "best.pth", models / "config.yaml"], candidates, CLASSES,
                               config={"samples_per_gpu": "2", "workers_per_gpu": 0, "mining_algorithm": "RSAL",
                                       "max_superpixel_per_image": 64, "fp16": "True", **config})


def _check_prediction(tmp_path: Path) -> None:
    """What the platform reads of the mining and inference task under ``tmp_path``."""
    index = (tmp_path / "in" / "candidate-index.tsv").read_text().split()
    # result.tsv: every candidate once, as the index wrote it, best first.
    rows = [line.split("\t") for line in (tmp_path / "out" / "result.tsv").read_text().splitlines()]
    assert sorted(r[0] for r in rows) == sorted(index)
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))
    # infer-result.json: every candidate listed by basename; RLE at original size; background never a class.
    result = json.loads((tmp_path / "out" / "infer-result.json").read_text())
    assert sorted(i["file_name"] for i in result["images"]) == sorted(Path(p).name for p in index)
    assert {c["name"] for c in result["categories"]} <= set(CLASSES)
    names = {c["id"]: c["name"] for c in result["categories"]}
    # Category ids are the model's label values (background is 0 and never listed); names are what YMIR joins on.
    assert all(names[c] == ["background", *CLASSES][c] for c in names) and 0 not in names
    assert result["annotations"], "the model should predict some objects"
    for a in result["annotations"]:
        assert isinstance(a["area"], int) and a["area"] > 0
        assert len(a["bbox"]) == 4 and a["bbox"][2] >= 1 and a["bbox"][3] >= 1
        assert isinstance(a["segmentation"]["counts"], str)
    coco = COCO(str(tmp_path / "out" / "infer-result.json"))
    for a in result["annotations"]:
        m = coco.annToMask(a)
        img = coco.imgs[a["image_id"]]
        assert m.shape == (img["height"], img["width"]) and int(m.sum()) == a["area"]
    fields = _monitor(tmp_path)
    assert float(fields[2]) == 1.0 and fields[3] == "2"


def _failing(tmp_path: Path, edit) -> tuple[int, list[str], str]:
    """A fresh training tree, broken by ``edit(in_dir)``; returns exit code, monitor fields, monitor text."""
    coco, images, val_names = _coco_source(tmp_path / "src")
    env = training_workspace(tmp_path / "task", coco, images, val_names, CLASSES, {**TRAIN_CONFIG, "max_iters": 4})
    edit(tmp_path / "task" / "in")
    code = ymir_main(["--env", str(env)])
    fields = _monitor(tmp_path / "task")
    return code, fields, (tmp_path / "task" / "out" / "monitor.txt").read_text()


def _set_config(key, value):
    def edit(inp: Path) -> None:
        cfg = yaml.safe_load((inp / "config.yaml").read_text())
        cfg[key] = value
        (inp / "config.yaml").write_text(yaml.safe_dump(cfg))
    return edit


@pytest.mark.parametrize("edit, code, words", [
    (lambda inp: (inp / "train-index.tsv").unlink(), 300002, "train-index.tsv does not exist"),
    (_set_config("max_iters", "many"), 300001, "max_iters: expected an integer"),
    (_set_config("config_file", "configs/fastscnn/fast_scnn_lr0.12_8x4_80k_cityscapes.py"), 300001,
     "did you mean"),
    (_set_config("max_iter", 10), 300001, "did you mean 'max_iters'"),
    (_set_config("args_options", "--deterministic"), 300001, "--deterministic"),
], ids=["missing-index", "wrong-type", "unknown-config-file", "typo-key", "bad-args"])
def test_failures_write_the_error_state(tmp_path, edit, code, words):
    rc, fields, text = _failing(tmp_path, edit)
    assert rc == 1
    assert fields[3] == "4" and int(fields[4]) == code
    assert words in text  # the reason is on the monitor's detail lines (and in the log)


def test_corrupt_training_image_fails_with_the_image_code(tmp_path):
    def corrupt(inp: Path) -> None:
        first = (inp / "train-index.tsv").read_text().splitlines()[0].split("\t")[0]
        Path(first).write_bytes(b"not an image at all")

    rc, fields, text = _failing(tmp_path, corrupt)
    assert rc == 1 and fields[3] == "4" and int(fields[4]) == 300003
    assert "cannot decode" in text


def test_monitor_follows_the_sdk_weights_and_never_goes_back(tmp_path):
    m = Monitor(tmp_path / "monitor.txt", "t1", min_interval=0.0)
    m.update(PREPROCESS, 1.0)
    assert float(_fields(m)[2]) == pytest.approx(1e-5, abs=1e-4)
    m.update(TASK, 0.5)
    assert float(_fields(m)[2]) == pytest.approx(0.5, abs=1e-3)
    m.update(TASK, 0.2)  # progress never goes backwards
    assert float(_fields(m)[2]) == pytest.approx(0.5, abs=1e-3)
    m.set_span(0.5, 1.0)  # the second of two tasks in one container
    m.update(TASK, 0.5)
    assert float(_fields(m)[2]) == pytest.approx(0.75, abs=1e-3)
    m.update(POSTPROCESS, 1.0)
    assert _fields(m)[2:] == ["1.0000", "2", "0"]
    m.error(300004, "boom")
    lines = (tmp_path / "monitor.txt").read_text().splitlines()
    assert lines[0].split("\t")[3:] == ["4", "300004"] and lines[1] == "boom"


def test_monitor_takes_over_the_percent_rank_0_wrote(tmp_path):
    ours = Monitor(tmp_path / "monitor.txt", "t1", min_interval=0.0)
    ours.update(PREPROCESS, 1.0)
    rank0 = Monitor(tmp_path / "monitor.txt", "t1", min_interval=0.0)  # the group's rank 0, same file
    rank0.update(TASK, 0.4)
    ours.adopt()
    ours.error(300004, "process 1 of 2: ended without a report")
    assert float(_fields(ours)[2]) == pytest.approx(0.4, abs=1e-3) and _fields(ours)[3] == "4"


def test_monitor_is_rate_limited(tmp_path):
    m = Monitor(tmp_path / "monitor.txt", "t1", min_interval=3600)
    m.update(TASK, 0.1, force=True)
    m.update(TASK, 0.9)
    assert float(_fields(m)[2]) == pytest.approx(0.1, abs=1e-3)


def _fields(m: Monitor) -> list[str]:
    return m.path.read_text().splitlines()[0].split("\t")


def test_result_yaml_is_plain_and_checked(tmp_path):
    (tmp_path / "best.pth").write_bytes(b"x")
    write_training_result(tmp_path / "result.yaml", {"best": {"files": ["best.pth"], "mIoU": np.float32(0.5),
                                                              "mAcc": float("nan")}}, "best")
    text = (tmp_path / "result.yaml").read_text()
    assert "numpy" not in text
    data = yaml.safe_load(text)
    assert data["model_stages"]["best"]["mIoU"] == 0.5 and data["model_stages"]["best"]["mAcc"] == 0.0
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        write_training_result(tmp_path / "result.yaml", {"best": {"files": ["missing.pth"]}}, "best")
    with pytest.raises(ValueError, match="best stage"):
        write_training_result(tmp_path / "result.yaml", {"best": {"files": ["best.pth"]}}, "last")


def test_templates_in_the_image_are_current_and_carry_the_seed_defaults():
    for task in templates.TEMPLATES:
        path = REPO / "img-man" / f"{task}-template.yaml"
        assert path.read_text() == templates.render(task), f"run python -m mirseg.ymir.templates img-man ({path})"
        assert yaml.safe_load(path.read_text()) == templates.defaults(task)
    mining = templates.defaults("mining")
    assert mining["mining_algorithm"] == "RSAL" and mining["max_superpixel_per_image"] == 1024
    assert mining["max_kept_mining_image"] == 5000 and mining["topk_superpixel_score"] == 3
    training = templates.defaults("training")
    assert training["export_format"] == "seg-coco:raw" and training["max_iters"] == 20000
    assert yaml.safe_load((REPO / "img-man" / "manifest.yaml").read_text()) == {"object_type": 3}


def test_dockerfile_cmd_and_copied_paths_exist():
    text = (REPO / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    cmds = [rest for op, *rest in instructions if op == "CMD"]
    assert len(cmds) == 1 and not any(op == "ENTRYPOINT" for op, *_ in instructions)
    cmd = json.loads(cmds[0][0])
    assert cmd[:1] == ["bash"]
    script = cmd[1]
    copies = {}
    for op, *rest in instructions:
        if op == "COPY":
            *sources, dest = shlex.split(rest[0])
            for s in sources:
                assert (REPO / s).exists(), f"Dockerfile copies {s}, which is not in the repository"
                copies[dest if not dest.endswith("/") else dest + Path(s).name] = s
    assert script in copies, f"CMD runs {script}, which no COPY puts in the image"
    start = (REPO / copies[script]).read_text()
    assert "-m mirseg.ymir" in start and "echo" not in start  # silent: nothing before the executor
    assert (REPO / "img-man").is_dir() and "/img-man" in copies


def test_cpu_when_no_gpu_is_given():
    assert task_device({"gpu_id": "", "gpu_count": 1}, Path("c.yaml")) == ("cpu", 0)  # the original's bug: 1 GPU
    assert task_device({"gpu_id": "0", "gpu_count": "0"}, Path("c.yaml")) == ("cpu", 0)
    assert task_device({}, Path("c.yaml")) == ("cpu", 0)


def test_a_task_sets_the_threads_as_a_key_or_in_cfg_options(tmp_path):
    """threads (mirseg.threads) reaches the TrainConfig from the task's config.yaml and from cfg_options."""
    coco, images, val_names = _coco_source(tmp_path / "src")
    for i, config in enumerate([{"threads": "3"}, {"cfg_options": "threads=2 lr=0.01"}]):
        env = read_env(training_workspace(tmp_path / f"task{i}", coco, images, val_names, CLASSES, config))
        cfg, _, _ = training_config(env, read_task_config(env, "training"))
        assert cfg.threads == (3 if i == 0 else 2)


# ---------------------------------------------------------------------------------------------
# Tasks on several GPUs: here two CPU processes (gloo), as MIRSEG_YMIR_CPU_FALLBACK allows without CUDA

TWO = {"gpu_count": 2, "gpu_id": "0,1"}
FALLBACK = {CPU_FALLBACK_ENV: "1", "OMP_NUM_THREADS": "1"}


def test_gpus_without_cuda_are_cpu_processes_only_when_allowed(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv(CPU_FALLBACK_ENV, raising=False)
    with pytest.raises(YmirError, match="CUDA is not available") as caught:
        task_device({"gpu_id": "0,1", "gpu_count": 2}, Path("c.yaml"))
    assert caught.value.code == 300102
    monkeypatch.setenv(CPU_FALLBACK_ENV, "1")
    assert task_device({"gpu_id": "0,1", "gpu_count": 2}, Path("c.yaml")) == ("cpu", 2)
    assert task_device({"gpu_id": "0,1,2", "gpu_count": "2"}, Path("c.yaml")) == ("cpu", 2)
    assert task_device({"gpu_id": "0", "gpu_count": 4}, Path("c.yaml")) == ("cpu", 1)


def test_the_processes_see_the_gpus_of_gpu_id(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_devices({"gpu_id": "0, 1,2"}, 2) == "0,1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")  # gpu_id indexes the container's own devices
    assert visible_devices({"gpu_id": "1,2"}, 2) == "6,7"


@pytest.mark.slow  # one executor, two torchrun groups of two processes (mining, then inference: ~40 s)
def test_mining_and_infer_on_two_processes_give_one_process_results(trained, tmp_path):
    one = _run(_prediction_task(trained, tmp_path / "one"))
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    proc = _run(_prediction_task(trained, tmp_path / "two", **TWO), **FALLBACK)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mine on 2 processes" in proc.stdout and "infer on 2 processes" in proc.stdout
    _check_prediction(tmp_path / "two")

    def rows(root: Path) -> list[tuple[str, str]]:  # the asset paths differ by the task's root only
        lines = (root / "out" / "result.tsv").read_text().splitlines()
        return [(str(Path(p).relative_to(root)), s) for p, s in (line.split("\t") for line in lines)]

    assert rows(tmp_path / "two") == rows(tmp_path / "one")  # same order, same scores
    assert (tmp_path / "two" / "out" / "infer-result.json").read_bytes() == \
        (tmp_path / "one" / "out" / "infer-result.json").read_bytes()


@pytest.mark.slow  # an executor with a torchrun group of two processes (~40 s)
def test_training_on_two_processes_writes_what_the_platform_reads(tmp_path):
    coco, images, val_names = _coco_source(tmp_path / "src")
    env = training_workspace(tmp_path / "task", coco, images, val_names, CLASSES,
                             {**TRAIN_CONFIG, "max_iters": 40, "interval": 20, **TWO})
    proc = _run(env, **FALLBACK)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train on 2 processes" in proc.stdout
    _check_training(tmp_path / "task", proc, min_miou=0.0)


def _descendant(root: int, rank: int) -> int | None:
    """The pid of the group's process of ``rank`` among the descendants of ``root`` (from /proc), or None."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, found = [root], []
    while todo:
        todo.extend(kids := children.get(todo.pop(), []))
        found.extend(kids)
    for pid in found:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"mirseg.ymir.worker" in cmdline:
            return pid
    return None


@pytest.mark.slow  # a two-process training killed in the middle (~30 s)
def test_a_killed_process_ends_the_task_with_the_error_state(tmp_path):
    """SIGKILL to rank 1 of a YMIR training on two processes: the executor exits 1 within 60 s, the monitor in
    the error state with code 300004 and which process ended how (rank 0's failed collective is not the cause)."""
    tr = make_dataset(tmp_path / "src", 6, size=(48, 64), num_classes=2, seed=1)
    coco = ymir_coco([(tr.ann, tr.images)], ["disc", "box"], tmp_path / "all")
    config = {"max_iters": 100000, "interval": 100000, "samples_per_gpu": 2, "workers_per_gpu": 0, **TWO,
              "cfg_options": "crop_size=[32,32] img_scale=[64,48] lr_scaling=none"}
    env = training_workspace(tmp_path / "task", coco, tmp_path / "all", ["img_0000.png"], ["disc", "box"], config)
    monitor = tmp_path / "task" / "out" / "monitor.txt"
    proc = subprocess.Popen([sys.executable, "-m", "mirseg.ymir", "--env", str(env)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=env.parent,
                            env={**os.environ, **FALLBACK, "MIRSEG_DIST_TIMEOUT": "120"})
    try:
        end, victim = time.monotonic() + 120, None
        while time.monotonic() < end and proc.poll() is None:  # rank 1 running, rank 0 reporting iterations
            victim = victim or _descendant(proc.pid, 1)
            if victim and monitor.is_file() and float(monitor.read_text().split("\t")[2]) > 2e-5:
                break
            time.sleep(0.2)
        assert victim and proc.poll() is None, proc.communicate()[0][-3000:]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        out, _ = proc.communicate(timeout=90)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and took < 60, (took, out[-3000:])
    lines = monitor.read_text().splitlines()
    fields = lines[0].split("\t")
    assert fields[3] == "4" and fields[4] == "300004"
    assert "train on 2 processes failed: process 1 of 2: ended without a report" in lines[1], lines
