"""SIGINT / SIGTERM during training, inference and mining: a clean stop, exit 130 / 143, an exact resume.

Real signals throughout: to a ``python -m mirseg`` subprocess (the CLI's exit code and its one line),
and to this process from a progress callback (to stop at a chosen iteration or image). Every
resumed result is compared with an uninterrupted run: weights ``torch.equal``, files byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mirseg import infer as infer_module
from mirseg import threads
from mirseg.checkpoint import read_checkpoint
from mirseg.cli import main
from mirseg.config import InferConfig, MineConfig, TrainConfig, build_config
from mirseg.data.sources import list_images
from mirseg.data.synthetic import make_dataset
from mirseg.errors import EXIT_ERROR, EXIT_SIGINT, EXIT_SIGTERM, ConfigError, Interrupted, MirsegError, MissingFileError
from mirseg.infer import JOURNAL, iter_predictions, load_predictor, run_inference
from mirseg.interrupt import Journal, graceful_stop, raise_on_signals
from mirseg.mine import decode_summary, encode_summary, mine
from mirseg.mining import ALGORITHMS, MiningParams

REPO = Path(__file__).resolve().parents[1]
# The subprocesses import this checkout and compute with one thread, as this process does below.
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Bit-exact comparisons between this process and the subprocesses need the same thread count."""


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mirseg", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=CHILD_ENV)


def _signal_when(proc: subprocess.Popen, ready, sig: int, timeout: float = 120) -> tuple[str, str]:
    """Send ``sig`` once ``ready()`` is true (polled every millisecond); returns the process's stdout, stderr."""
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        if ready():
            proc.send_signal(sig)
            break
        time.sleep(0.001)
    out, err = proc.communicate(timeout=timeout)
    return out, err


def _kill_self_at(n: int, sig: int = signal.SIGTERM):
    """A progress callback that sends ``sig`` to this process on its ``n``-th call."""
    calls = []

    def progress(fraction: float) -> None:
        calls.append(fraction)
        if len(calls) == n:
            os.kill(os.getpid(), sig)

    return progress


# ---------------------------------------------------------------------------------------------
# The mechanism


def test_graceful_stop_records_the_signal_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with graceful_stop() as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop and stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # another kind: noted nowhere, the first one stands
        assert stop.signum == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_second_signal_of_the_same_kind_stops_at_once():
    with pytest.raises(Interrupted, match="second SIGINT") as info, graceful_stop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # not reached: the handler raises
    assert info.value.exit_code == EXIT_SIGINT


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def body():
        with graceful_stop() as stop:
            seen.append((bool(stop), signal.getsignal(signal.SIGTERM)))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [(False, signal.getsignal(signal.SIGTERM))]


def test_raise_on_signals_raises_interrupted_with_the_exit_code():
    with pytest.raises(Interrupted, match="stopped by SIGTERM") as info, raise_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert info.value.exit_code == EXIT_SIGTERM


def test_journal_resume_checks_and_torn_last_line(tmp_path):
    path = tmp_path / JOURNAL
    with pytest.raises(MissingFileError, match="nothing to resume in out_dir x"):
        Journal.open(path, "infer", {"a": 1}, True, "out_dir x")
    j = Journal.open(path, "infer", {"a": (1, 2)}, False, "out_dir x")
    j.append({"n": 1})
    j.append({"n": 2})
    j.close()
    with open(path, "a") as f:
        f.write('{"n": 3')  # the process died in the middle of this write
    j = Journal.open(path, "infer", {"a": [1, 2]}, True, "out_dir x")
    assert j.records == [{"n": 1}, {"n": 2}]
    j.append({"n": 3})
    j.close()
    assert Journal.open(path, "infer", {"a": [1, 2]}, True, "x").records == [{"n": 1}, {"n": 2}, {"n": 3}]
    with pytest.raises(ConfigError, match=r"other settings \(a\)"):
        Journal.open(path, "infer", {"a": [1, 3]}, True, "x")
    with pytest.raises(ConfigError, match="not a mine journal"):
        Journal.open(path, "mine", {"a": [1, 2]}, True, "x")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], '{"n": 1', *lines[2:]]) + "\n")  # damaged inside: not a torn write
    with pytest.raises(MirsegError, match="line 2 is damaged; run again without resume=true"):
        Journal.open(path, "infer", {"a": [1, 2]}, True, "x")
    fresh = Journal.open(path, "infer", {"a": [1, 3]}, False, "x")  # no resume: the old journal is discarded
    assert fresh.records == []
    fresh.finish()
    assert not path.exists()


# ---------------------------------------------------------------------------------------------
# Training

ITERS, INTERVAL = 40, 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tr = make_dataset(root / "tr", 8, size=(48, 64), num_classes=2, seed=1)
    va = make_dataset(root / "va", 2, size=(48, 64), num_classes=2, seed=2)
    return [f"train_ann={tr.ann}", f"train_images={tr.images}", f"val_ann={va.ann}", f"val_images={va.images}",
            "crop_size=[32,32]", "img_scale=[64,48]", "samples_per_gpu=2", "workers_per_gpu=0", "device=cpu",
            f"max_iters={ITERS}", f"interval={INTERVAL}", "log_interval=1"]


def _train_cfg(tiny, work_dir, **kw) -> TrainConfig:
    values = dict(a.split("=", 1) for a in tiny)
    return build_config(TrainConfig, {**values, "work_dir": str(work_dir), **kw})


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted run: its last.pth."""
    from mirseg.train import train

    return read_checkpoint(train(_train_cfg(tiny, tmp_path_factory.mktemp("reference"))).last)


def _same_run(ckpt, reference):
    assert ckpt["iteration"] == reference["iteration"] == ITERS
    for k, v in reference["model"].items():
        assert torch.equal(ckpt["model"][k], v), k
    assert ckpt["best"] == reference["best"] and ckpt["metrics"] == reference["metrics"]
    assert torch.equal(ckpt["rng"]["torch"], reference["rng"]["torch"])


def test_train_stops_at_the_signalled_iteration_and_resumes_bit_exact(tiny, reference, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mirseg.train import train

    with pytest.raises(Interrupted) as info:  # SIGTERM during iteration 13: mid-interval
        train(_train_cfg(tiny, tmp_path), progress=_kill_self_at(13))
    assert info.value.exit_code == EXIT_SIGTERM
    assert str(info.value) == (f"interrupted by SIGTERM at iteration 13/{ITERS}; saved {tmp_path / 'last.pth'}; "
                               f"resume with: mirseg train {tmp_path / 'config.yaml'} --resume")
    cut = read_checkpoint(tmp_path / "last.pth")
    assert cut["iteration"] == 13 and cut["metrics"] == {} and cut["best"]["iteration"] == 0
    with pytest.raises(Interrupted, match="at iteration 20/"):  # SIGINT right on an evaluation iteration
        train(_train_cfg(tiny, tmp_path, resume=True), progress=_kill_self_at(7, signal.SIGINT))
    assert read_checkpoint(tmp_path / "last.pth")["best"]["iteration"] == 20
    train(_train_cfg(tiny, tmp_path, resume=True))
    _same_run(read_checkpoint(tmp_path / "last.pth"), reference)
    # TensorBoard: every step once, evaluations at each interval, nothing repeated by the resumes.
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == list(range(1, ITERS + 1))
    assert [e.step for e in events.Scalars("val/mIoU")] == [20, 40]


@pytest.mark.parametrize("sig, workers", [pytest.param(signal.SIGTERM, 0, marks=pytest.mark.slow),
                                          pytest.param(signal.SIGINT, 1, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT-workers"])
def test_train_subprocess_signal_then_cli_resume(tiny, reference, tmp_path, sig, workers):
    """``mirseg train`` gets a real signal mid-run: exit 143 / 130, one line on how to resume, then that command."""
    proc = _spawn(["train", *tiny, f"workers_per_gpu={workers}", f"work_dir={tmp_path}"])
    seen = []

    def ready() -> bool:  # read stderr until the log line of iteration 10
        line = proc.stderr.readline()
        seen.append(line)
        return f"iteration 10/{ITERS}: loss" in line

    _, err = _signal_when(proc, ready, sig)
    err = "".join(seen) + err
    assert proc.returncode == 128 + sig, err[-3000:]
    stopped = read_checkpoint(tmp_path / "last.pth")["iteration"]
    assert 10 <= stopped < ITERS
    resume_line = [ln for ln in err.splitlines() if "resume with:" in ln]
    assert len(resume_line) == 1 and "Traceback" not in err
    name = signal.Signals(sig).name
    assert f"ERROR interrupted by {name} at iteration {stopped}/{ITERS}; saved {tmp_path / 'last.pth'}" in err
    command = resume_line[0].split("resume with: ")[1].split()
    assert command == ["mirseg", "train", str(tmp_path / "config.yaml"), "--resume"]
    assert main(command[1:]) == 0
    _same_run(read_checkpoint(tmp_path / "last.pth"), reference)


@pytest.mark.slow  # three torchrun launches (~30 s)
def test_torchrun_processes_stop_after_the_same_iteration_and_resume(tiny, tmp_path):
    """SIGTERM to the launcher reaches the two workers at different moments; both stop after one iteration."""
    def launch(work: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "mirseg", "train", *tiny, f"work_dir={work}", *extra], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=CHILD_ENV)

    proc = launch(tmp_path / "cut")
    seen = []

    def ready() -> bool:
        seen.append(proc.stderr.readline())
        return f"iteration 10/{ITERS}: loss" in seen[-1]

    _, err = _signal_when(proc, ready, signal.SIGTERM)
    err = "".join(seen) + err
    stops = re.findall(rf"ERROR interrupted by SIGTERM at iteration (\d+)/{ITERS}; saved .*torchrun command\)", err)
    assert len(stops) == 2 and len(set(stops)) == 1, err[-3000:]  # one line per worker, the same iteration
    assert read_checkpoint(tmp_path / "cut" / "last.pth")["iteration"] == int(stops[0])
    resumed, full = launch(tmp_path / "cut", "--resume"), launch(tmp_path / "full")
    for p in (resumed, full):
        assert p.wait(timeout=300) == 0, p.communicate()[1][-3000:]
        p.communicate()
    a, b = read_checkpoint(tmp_path / "cut" / "last.pth"), read_checkpoint(tmp_path / "full" / "last.pth")
    assert a["iteration"] == b["iteration"] == ITERS
    assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())


def test_a_signal_during_the_set_up_stops_before_the_first_iteration(tiny, tmp_path, monkeypatch):
    import mirseg.train

    real = mirseg.train.label_histogram

    def histogram_then_signal(*args, **kwargs):  # class_weight=auto counts the labels during the set-up
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(mirseg.train, "label_histogram", histogram_then_signal)
    with pytest.raises(Interrupted, match="before the first iteration: nothing saved, nothing to resume"):
        mirseg.train.train(_train_cfg(tiny, tmp_path, class_weight="auto"))
    assert not (tmp_path / "last.pth").exists()


def test_resume_with_no_last_pth_says_there_is_nothing_to_resume(tiny, tmp_path, caplog):
    assert main(["train", *tiny, f"work_dir={tmp_path / 'empty'}", "--resume"]) == EXIT_ERROR
    assert f"nothing to resume in {tmp_path / 'empty'}: it has no last.pth" in caplog.text


# ---------------------------------------------------------------------------------------------
# Inference and mining


@pytest.fixture(scope="module")
def pool(trained_fastscnn, tmp_path_factory):
    """18 images of two sizes, interleaved (so batches are mixed), and one unreadable file."""
    root = tmp_path_factory.mktemp("pool")
    big = make_dataset(root / "big", 12, seed=7)
    small = make_dataset(root / "small", 6, size=(72, 96), seed=8)
    out = root / "images"
    out.mkdir()
    sources = sorted(big.images.iterdir()) + sorted(small.images.iterdir())
    order = np.random.default_rng(0).permutation(len(sources))
    for i, j in enumerate(order):
        shutil.copy(sources[j], out / f"{i:02d}.png")
    (out / "05b.png").write_bytes(b"not a png")
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


INFER_KEYS = ["workers_per_gpu=0", "samples_per_gpu=3", "save_color=true", "save_overlay=true"]


@pytest.fixture(scope="module")
def infer_reference(trained_fastscnn, pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("infer_ref")
    values = dict(k.split("=") for k in INFER_KEYS)
    run_inference(build_config(InferConfig, {**values, "checkpoint": str(trained_fastscnn[0]), "images": str(pool),
                                             "out_dir": str(out)}))
    return _tree(out)


def _journal_lines(out: Path) -> int:
    try:
        return (out / JOURNAL).read_text().count("\n")
    except FileNotFoundError:
        return 0


def test_infer_subprocess_sigterm_then_resume_gives_identical_outputs(trained_fastscnn, pool, infer_reference,
                                                                      tmp_path):
    out = tmp_path / "out"
    args = ["infer", str(trained_fastscnn[0]), str(pool), f"out_dir={out}", *INFER_KEYS]
    proc = _spawn(args)
    _, err = _signal_when(proc, lambda: _journal_lines(out) >= 4, signal.SIGTERM)  # header + 3 images
    assert proc.returncode == EXIT_SIGTERM, err[-3000:]
    done = _journal_lines(out) - 1
    assert 3 <= done < 19 and "Traceback" not in err
    assert (f"interrupted by SIGTERM after {done} of 19 images; run the same command with resume=true to do the "
            f"other {19 - done} (out_dir={out})") in err
    assert not (out / "predictions.json").exists() and not (out / "images.tsv").exists()
    assert main([*args, "resume=true"]) == 0
    assert _tree(out) == infer_reference  # predictions.json, images.tsv, every PNG and JPEG; the journal is gone


def test_infer_resume_in_process_at_a_chosen_image_and_bad_resumes(trained_fastscnn, pool, infer_reference, tmp_path,
                                                                  caplog):
    values = {**dict(k.split("=") for k in INFER_KEYS), "checkpoint": str(trained_fastscnn[0]), "images": str(pool),
              "out_dir": str(tmp_path)}
    cfg = build_config(InferConfig, values)
    with pytest.raises(Interrupted, match="after 6 of 19 images"):  # SIGINT after image 5: batch [3, 4, 5] ends
        run_inference(cfg, progress=_kill_self_at(5, signal.SIGINT))
    with pytest.raises(ConfigError, match=r"other settings \(flip\)"):
        run_inference(build_config(InferConfig, {**values, "flip": True, "resume": True}))
    result = run_inference(build_config(InferConfig, {**values, "resume": True, "workers_per_gpu": 2}))
    assert result.num_images == 19 and [p for p, _ in result.failed] == [str(pool / "05b.png")]
    assert _tree(tmp_path) == infer_reference
    with pytest.raises(MissingFileError, match=f"nothing to resume in out_dir {tmp_path}"):
        run_inference(build_config(InferConfig, {**values, "resume": True}))
    # Without resume an interrupted run's journal is discarded: the run starts over.
    with pytest.raises(Interrupted):
        run_inference(cfg, progress=_kill_self_at(2))
    with caplog.at_level(logging.INFO, logger="mirseg"):
        run_inference(cfg)
    assert f"discarding {tmp_path / JOURNAL}, left by an interrupted run" in caplog.text
    assert _tree(tmp_path) == infer_reference


def test_infer_writing_on_the_helper_thread_writes_the_same_files_and_resumes(trained_fastscnn, pool, infer_reference,
                                                                               tmp_path, monkeypatch):
    """The GPU path of run_inference (an image's files encoded and written on a helper thread, two images behind the
    network), forced on the CPU: the same files as inline writing, and a stop (later: the thread's images finish
    first) that resumes to them."""
    monkeypatch.setattr(infer_module, "in_background",
                        lambda fn, items, depth=0: threads.in_background(fn, items, depth=2))
    values = {**dict(k.split("=") for k in INFER_KEYS), "checkpoint": str(trained_fastscnn[0]), "images": str(pool),
              "out_dir": str(tmp_path)}
    run_inference(build_config(InferConfig, values))
    assert _tree(tmp_path) == infer_reference
    shutil.rmtree(tmp_path)
    with pytest.raises(Interrupted, match=r"after (6|12) of 19 images"):  # a whole group: at a clean point
        run_inference(build_config(InferConfig, values), progress=_kill_self_at(5, signal.SIGINT))
    run_inference(build_config(InferConfig, {**values, "resume": True}))
    assert _tree(tmp_path) == infer_reference


def test_predictions_stopped_at_a_clean_point_continue_bit_identically(trained_fastscnn, pool):
    predictor = load_predictor(trained_fastscnn[0], device="cpu")
    paths = list_images(pool)
    full = list(iter_predictions(predictor, paths, samples_per_gpu=4, workers_per_gpu=0))
    calls = []
    first = list(iter_predictions(predictor, paths, samples_per_gpu=4, workers_per_gpu=0,
                                  stop=lambda: calls.append(1) or len(calls) >= 2))
    assert 0 < len(first) < len(paths)
    rest = list(iter_predictions(predictor, paths[len(first):], samples_per_gpu=4, workers_per_gpu=0))
    for a, b in zip(full, first + rest, strict=True):
        assert a.path == b.path and (a.proba is None) == (b.proba is None)
        if a.proba is not None:
            assert torch.equal(a.proba, b.proba), a.path


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_mining_summary_survives_the_journal_exactly(name, trained_fastscnn):
    miner = ALGORITHMS[name]
    if miner.summarize is None:
        assert decode_summary(json.loads(json.dumps(encode_summary(None)))) is None
        return
    proba = torch.rand(3, 24, 32, generator=torch.Generator().manual_seed(0)).softmax(0)
    image = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    summary = miner.summarize(proba, image, MiningParams(max_superpixel_per_image=16))
    back = decode_summary(json.loads(json.dumps(encode_summary(summary))))
    assert type(back) is type(summary)
    a, b = (miner.score_pool([s] * 3, ["a", "b", "c"], 3, MiningParams()) for s in (summary, back))
    assert np.array_equal(a[0], b[0])
    assert repr(back) == repr(summary)


MINE_KEYS = ["workers_per_gpu=0", "samples_per_gpu=3", "report=true", "max_superpixel_per_image=64",
             "max_kept_mining_image=10"]


@pytest.fixture(scope="module")
def mine_reference(trained_fastscnn, pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("mine_ref")
    mine(build_config(MineConfig, {**dict(k.split("=") for k in MINE_KEYS), "checkpoint": str(trained_fastscnn[0]),
                                   "images": str(pool), "out_dir": str(out)}))
    tree = _tree(out)
    assert len([k for k in tree if k.startswith("masks/")]) == 10
    assert "report.html" in tree and len([k for k in tree if k.startswith("thumbs/")]) == 10  # report=true
    return tree


@pytest.mark.slow  # a subprocess and both mining passes (~6 s); the in-process tests below cover mining's resume
def test_mine_subprocess_sigint_then_resume_gives_identical_outputs(trained_fastscnn, pool, mine_reference,
                                                                    tmp_path):
    args = ["mine", str(trained_fastscnn[0]), str(pool), f"out_dir={tmp_path}", *MINE_KEYS]
    proc = _spawn(args)
    _, err = _signal_when(proc, lambda: _journal_lines(tmp_path) >= 4, signal.SIGINT)
    assert proc.returncode == EXIT_SIGINT, err[-3000:]
    assert "interrupted by SIGINT after" in err and "resume=true" in err and "Traceback" not in err
    assert not (tmp_path / "result.tsv").exists()
    assert main([*args, "resume=true"]) == 0
    assert _tree(tmp_path) == mine_reference


def test_mine_interrupted_while_saving_masks_resumes_them(trained_fastscnn, pool, mine_reference, tmp_path):
    values = {**dict(k.split("=") for k in MINE_KEYS), "checkpoint": str(trained_fastscnn[0]), "images": str(pool),
              "out_dir": str(tmp_path)}
    # 19 progress calls in the scoring pass, then one per mask: SIGTERM after the 4th mask.
    with pytest.raises(Interrupted, match=r"after the masks of 6 of 10 images \(result.tsv is complete\)"):
        mine(build_config(MineConfig, values), progress=_kill_self_at(19 + 4))
    assert (tmp_path / "result.tsv").read_bytes() == mine_reference["result.tsv"]
    assert len(list((tmp_path / "masks").iterdir())) == 6
    result = mine(build_config(MineConfig, {**values, "resume": True}))
    assert len(result.masks) == 10
    assert _tree(tmp_path) == mine_reference


def test_random_mining_stops_between_images(pool, tmp_path):
    values = {"images": str(pool), "out_dir": str(tmp_path), "mining_algorithm": "random"}
    with pytest.raises(Interrupted, match="after 3 of 19 candidates"):
        mine(build_config(MineConfig, values), progress=_kill_self_at(3))
    resumed = mine(build_config(MineConfig, {**values, "resume": True})).ranking
    assert resumed == mine(build_config(MineConfig, values)).ranking


# ---------------------------------------------------------------------------------------------
# YMIR executor


@pytest.mark.slow  # the executor as a subprocess (~6 s)
def test_ymir_training_sigterm_writes_the_monitor_error_state(tmp_path):
    from mirseg.ymir.workspace import training_workspace, ymir_coco

    tr = make_dataset(tmp_path / "src", 6, size=(48, 64), num_classes=2, seed=1)
    coco = ymir_coco([(tr.ann, tr.images)], ["disc", "box"], tmp_path / "all")
    config = {"max_iters": 400, "interval": 200, "samples_per_gpu": 2, "workers_per_gpu": 0, "log_interval": 1,
              "cfg_options": "crop_size=[32,32] img_scale=[64,48] lr_scaling=none"}
    env = training_workspace(tmp_path / "task", coco, tmp_path / "all", ["img_0000.png"], ["disc", "box"], config)
    proc = subprocess.Popen([sys.executable, "-m", "mirseg.ymir", "--env", str(env)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=CHILD_ENV, cwd=env.parent)
    _, _ = _signal_when(proc, lambda: "iteration 3/400: loss" in proc.stdout.readline(), signal.SIGTERM)
    assert proc.returncode == EXIT_SIGTERM
    lines = (tmp_path / "task" / "out" / "monitor.txt").read_text().splitlines()
    fields = lines[0].split("\t")
    assert fields[3] == "4" and fields[4] == "300004"  # error state, with a code
    assert lines[1].startswith("interrupted by SIGTERM at iteration ")
    assert read_checkpoint(tmp_path / "task" / "out" / "models" / "last.pth")["iteration"] >= 3
