"""Jobs split across processes (torch.distributed over gloo, on CPU) give one process's results, byte for byte.

Default suite: the processes are forked from this one (:func:`run_ranks`: no interpreter or torch start-up,
about a second per job), joined by gloo as torchrun joins them: the shard and merge mechanism of
:mod:`mirseg.dist`, ``mirseg eval``'s metrics, ``mirseg infer`` and ``mirseg mine`` (RSAL, RIPU, random),
and a stop under two processes resumed by one. Slow: the CLI under ``torchrun --nproc_per_node 2``.
Every pool has an odd number of candidates, so the processes get unequal shares.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
import torch

from mirseg import dist
from mirseg.checkpoint import read_checkpoint
from mirseg.config import InferConfig, MineConfig, build_config, eval_config
from mirseg.data.synthetic import make_dataset
from mirseg.errors import ConfigError, Interrupted, MissingFileError
from mirseg.evaluate import evaluate_checkpoint
from mirseg.infer import JOURNAL, run_inference
from mirseg.mine import mine

REPO = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Bit-exact comparisons between this process and the others need the same thread count (one)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable[[dist.Runtime], Any], rank: int, world: int, port: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        rt = dist.setup("cpu")
        queue.put((rank, True, fn(rt)))
        dist.teardown(rt)
    except BaseException as exc:  # reported to the test, which fails with it
        queue.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_ranks(fn: Callable[[dist.Runtime], Any], world: int = 2, timeout: float = 120) -> list[Any]:
    """``fn(rt)`` in ``world`` processes forked from this one and joined by gloo; each rank's return value."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple[bool, Any]] = {}
    try:
        for _ in procs:
            rank, ok, value = queue.get(timeout=timeout)
            results[rank] = (ok, value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}: {v}" for r, (ok, v) in sorted(results.items()) if not ok]
    assert not errors, "\n".join(errors)
    return [results[r][1] for r in range(world)]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# The mechanism


@pytest.mark.parametrize(("count", "group", "world"), [(7, 1, 2), (7, 2, 2), (5, 4, 2), (10, 3, 3), (1, 2, 3),
                                                       (0, 2, 2)])
def test_shards_hand_out_whole_groups_and_every_item_once(count, group, world):
    shards = [dist.Shards(count, group, dist.Runtime(torch.device("cpu"), r, world)) for r in range(world)]
    taken = [s.indices() for s in shards]
    assert sorted(i for t in taken for i in t) == list(range(count))  # every item once: no padding repeats
    for rank, indices in enumerate(taken):
        assert indices == sorted(indices) and all((i // group) % world == rank for i in indices)
    groups = -(-count // group)
    assert {s.rounds for s in shards} == {-(-groups // world)}


def test_merge_gives_rank_0_every_item_in_order_and_stops_every_process_after_the_same_round():
    def job(rt: dist.Runtime) -> dict[str, Any]:
        out = {}
        # 7 items in groups of 2: rank 0 computes 0, 1, 4, 5 and rank 1 computes 2, 3, 6
        s = dist.Shards(7, 2, rt)
        out["whole"] = list(s.merge(f"item {i} by {rt.rank}" for i in s.indices())), s.done, s.signum
        # 11 items, 3 rounds: in round 1 rank 1 votes SIGTERM and rank 0 SIGINT; the round is merged, then all stop
        s = dist.Shards(11, 2, rt)
        votes = iter([None, signal.SIGTERM if rt.rank else signal.SIGINT, None])
        out["vote"] = list(s.merge(s.indices(), lambda: next(votes))), s.done, s.signum
        # rank 1's job ends after its first group (it stopped at a group's end) and says why
        s = dist.Shards(11, 2, rt)
        mine = s.indices()[:2] if rt.rank else s.indices()
        out["early"] = list(s.merge(mine, lambda: signal.SIGINT if rt.rank and s.done else None)), s.done, s.signum
        out["broadcast"] = dist.broadcast(f"from rank {rt.rank}", rt)
        try:
            dist.on_main(lambda: int("x") if rt.is_main else None, rt)
        except Exception as exc:
            out["error"] = type(exc).__name__, str(exc)
        try:
            dist.on_main(bad_key, rt)
        except ConfigError as exc:
            out["config_error"] = str(exc)
        return out

    def bad_key() -> None:
        raise ConfigError("bad key 'x': give 1 or 2")

    rank0, rank1 = run_ranks(job)
    assert rank0["whole"] == ([f"item {i} by {0 if i in (0, 1, 4, 5) else 1}" for i in range(7)], 7, None)
    assert rank1["whole"] == ([], 7, None)  # the others merge nothing, but agree on the count
    assert rank0["vote"] == (list(range(8)), 8, signal.SIGTERM) and rank1["vote"] == ([], 8, signal.SIGTERM)
    # round 1: rank 0's group (4, 5) is merged, rank 1's (6, 7) is missing
    assert rank0["early"] == (list(range(6)), 6, signal.SIGINT) and rank1["early"] == ([], 6, signal.SIGINT)
    assert rank0["broadcast"] == rank1["broadcast"] == "from rank 0"
    assert rank0["error"] == ("ValueError", "invalid literal for int() with base 10: 'x'")
    assert rank1["error"] == ("MirsegError", "rank 0 failed: ValueError: invalid literal for int() with base 10: 'x'")
    assert rank0["config_error"] == rank1["config_error"] == "bad key 'x': give 1 or 2"


def test_merge_in_one_process_is_the_plain_loop():
    s = dist.Shards(5, 2, dist.Runtime(torch.device("cpu")))
    assert s.indices() == list(range(5)) and list(s.merge(iter("abcde"))) == list("abcde") and s.done == 5
    with pytest.raises(RuntimeError, match="ended before its items"):  # a job that ends early without a signal
        list(dist.Shards(5, 2, dist.Runtime(torch.device("cpu"))).merge(iter("abc")))


# ---------------------------------------------------------------------------------------------
# Evaluation


def test_eval_in_two_processes_gives_the_metrics_of_one(trained_fastscnn, tmp_path):
    """7 labelled images (rank 0 scores 4, rank 1 scores 3), at a size the network sees resized: the one
    all-reduce of the local confusion matrices counts every pixel once, as one process does."""
    ckpt = trained_fastscnn[0]
    data = make_dataset(tmp_path / "val", 7, size=(72, 100), num_classes=2, seed=11, labels=True)
    cfg = eval_config(read_checkpoint(ckpt)["config"], None,
                      [f"val_images={data.images}", f"val_labels={data.labels}", "device=cpu"])
    one = evaluate_checkpoint(ckpt, cfg)
    assert sum(map(sum, one["confusion"])) == 7 * 72 * 100
    two = run_ranks(lambda rt: evaluate_checkpoint(ckpt, cfg))
    assert two[0] == two[1] == one  # confusion matrix, mIoU, mAcc, aAcc, per-class IoU and Acc, exactly


# ---------------------------------------------------------------------------------------------
# Inference and mining


@pytest.fixture(scope="module")
def pool(trained_fastscnn, tmp_path_factory):
    """7 candidates: 4 of 96x128 and 2 of 72x96 interleaved (so batches are mixed), and an unreadable file."""
    root = tmp_path_factory.mktemp("pool")
    big = make_dataset(root / "big", 4, seed=7)
    small = make_dataset(root / "small", 2, size=(72, 96), seed=8)
    sources = sorted(big.images.iterdir()) + sorted(small.images.iterdir())
    out = root / "images"
    out.mkdir()
    for i, j in enumerate([0, 4, 1, 2, 5, 3]):
        shutil.copy(sources[j], out / f"{i:02d}.png")
    (out / "02b.png").write_bytes(b"not a png")
    return out


INFER = {"workers_per_gpu": 0, "samples_per_gpu": 1, "save_color": True, "save_overlay": True, "save_proba": True,
         "device": "cpu"}
MINE = {"workers_per_gpu": 0, "samples_per_gpu": 1, "report": True, "max_superpixel_per_image": 32, "device": "cpu"}


def _infer_cfg(trained_fastscnn, pool: Path, out: Path, **keys: Any) -> InferConfig:
    return build_config(InferConfig, {**INFER, "checkpoint": str(trained_fastscnn[0]), "images": str(pool),
                                      "out_dir": str(out), **keys})


def _mine_cfg(trained_fastscnn, pool: Path, out: Path, **keys: Any) -> MineConfig:
    return build_config(MineConfig, {**MINE, "checkpoint": str(trained_fastscnn[0]), "images": str(pool),
                                     "out_dir": str(out), **keys})


@pytest.fixture(scope="module")
def infer_reference(trained_fastscnn, pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("infer_one")
    run_inference(_infer_cfg(trained_fastscnn, pool, out))
    tree = _tree(out)
    assert len([k for k in tree if k.startswith("labels/")]) == 6 and "predictions.json" in tree
    return tree


@pytest.mark.parametrize("batch", [1, 2])
def test_infer_in_two_processes_writes_the_files_of_one(batch, trained_fastscnn, pool, tmp_path):
    """Batch 1 (groups of 2 images): rank 0 predicts 00, 01, 03, 04 and rank 1 02, 02b (unreadable), 05.
    Batch 2 (groups of 4): rank 0 predicts 00-02b in batches [00, 02] (96x128) and [01] (72x96), rank 1
    03-05 in [03, 05] and [04], as one process does."""
    reference = run_inference(_infer_cfg(trained_fastscnn, pool, tmp_path / "one", samples_per_gpu=batch))
    results = run_ranks(lambda rt: run_inference(_infer_cfg(trained_fastscnn, pool, tmp_path / "two",
                                                             samples_per_gpu=batch)))
    tree = _tree(tmp_path / "one")
    assert len([k for k in tree if k.startswith("proba/")]) == 6 and "predictions.json" in tree
    assert _tree(tmp_path / "two") == tree  # predictions.json, images.tsv, labels, color, overlay, proba
    assert results[0].failed == results[1].failed == reference.failed == [(str(pool / "02b.png"), ANY)]


@pytest.mark.parametrize("algorithm", ["rsal", "ripu", "random"])
def test_mine_in_two_processes_writes_the_files_of_one(algorithm, trained_fastscnn, pool, tmp_path):
    """RSAL's pool-wide class weights and threshold come from both processes' summaries; masks, overlays,
    thumbnails, masks.tsv and the report are one process's."""
    keys = {"mining_algorithm": algorithm, "samples_per_gpu": 2}
    one = mine(_mine_cfg(trained_fastscnn, pool, tmp_path / "one", **keys))
    results = run_ranks(lambda rt: mine(_mine_cfg(trained_fastscnn, pool, tmp_path / "two", **keys)))
    tree = _tree(tmp_path / "one")
    assert len([k for k in tree if k.startswith("masks/")]) == 6 and "report.html" in tree
    assert _tree(tmp_path / "two") == tree
    for result in results:
        assert result.ranking == one.ranking and result.failed == one.failed
        assert [m.name for m in result.masks] == [m.name for m in one.masks]


def _stop_rank_0_at(n: int) -> Callable[[float], None]:
    """A progress callback for rank 0: SIGTERM to its own process on the ``n``-th image merged."""
    calls = []

    def progress(fraction: float) -> None:
        calls.append(fraction)
        if len(calls) == n and fraction < 1:
            os.kill(os.getpid(), signal.SIGTERM)

    return progress


def test_a_stop_under_two_processes_resumes_in_one(trained_fastscnn, pool, infer_reference, tmp_path):
    """Rank 0 is signalled after its 2nd image: both processes finish the round (4 images), stop with the same
    error, and the journal (rank 0's, in input order) lets one process finish the run as if never stopped."""
    cfg = _infer_cfg(trained_fastscnn, pool, tmp_path)

    def stopped(rt: dist.Runtime) -> tuple[str, int]:
        try:
            run_inference(cfg, progress=_stop_rank_0_at(2) if rt.is_main else None)
        except Interrupted as exc:
            return str(exc), exc.signum
        return "not stopped", 0

    a, b = run_ranks(stopped)
    assert a == b == (f"interrupted by SIGTERM after 4 of 7 images; run the same command with resume=true to do the "
                      f"other 3 (out_dir={tmp_path})", signal.SIGTERM)
    assert (tmp_path / JOURNAL).read_text().count("\n") == 1 + 4 and not (tmp_path / "predictions.json").exists()
    run_inference(_infer_cfg(trained_fastscnn, pool, tmp_path, resume=True))
    assert _tree(tmp_path) == infer_reference


def test_a_resume_problem_of_rank_0_stops_every_process(trained_fastscnn, pool, tmp_path):
    """Rank 0 alone reads the journal; the others get its error instead of waiting for it forever."""
    def resume(rt: dist.Runtime) -> str:
        with pytest.raises(MissingFileError) as info:
            mine(_mine_cfg(trained_fastscnn, pool, tmp_path, resume=True))
        return str(info.value)

    a, b = run_ranks(resume)
    assert a == b and a.startswith(f"nothing to resume in out_dir {tmp_path}: there is no resume.jsonl")


def test_a_mining_run_stopped_in_one_process_resumes_in_two(trained_fastscnn, pool, tmp_path):
    reference = mine(_mine_cfg(trained_fastscnn, pool, tmp_path / "ref")).ranking
    with pytest.raises(Interrupted, match="after 4 of 7 candidates"):  # the end of the 2nd group of 2
        mine(_mine_cfg(trained_fastscnn, pool, tmp_path / "cut"), progress=_stop_rank_0_at(3))
    results = run_ranks(lambda rt: mine(_mine_cfg(trained_fastscnn, pool, tmp_path / "cut", resume=True)))
    assert results[0].ranking == results[1].ranking == reference
    assert _tree(tmp_path / "cut") == _tree(tmp_path / "ref")


# ---------------------------------------------------------------------------------------------
# The CLI under torchrun


def _torchrun(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "mirseg", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=CHILD_ENV)


def _keys(values: dict[str, Any]) -> list[str]:
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


@pytest.mark.slow  # three torchrun launches (~25 s)
def test_torchrun_infer_and_mine_write_the_files_of_one_process(trained_fastscnn, pool, tmp_path):
    """As users run it: `torchrun --nproc_per_node 2 -m mirseg infer|mine ...`, batches of 2 (groups of 4)."""
    ckpt = str(trained_fastscnn[0])
    jobs = {"infer": ("infer", run_inference, _infer_cfg, {**INFER, "samples_per_gpu": 2}),
            "rsal": ("mine", mine, _mine_cfg, {**MINE, "samples_per_gpu": 2}),
            "ripu": ("mine", mine, _mine_cfg, {**MINE, "samples_per_gpu": 2, "mining_algorithm": "ripu"})}
    for name, (command, run, make_cfg, keys) in jobs.items():
        run(make_cfg(trained_fastscnn, pool, tmp_path / name / "one", **keys))
        proc = _torchrun(command, ckpt, str(pool), f"out_dir={tmp_path / name / 'two'}", *_keys(keys))
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert len(out.strip().splitlines()) == 1, out  # one summary line, from rank 0
        assert _tree(tmp_path / name / "two") == _tree(tmp_path / name / "one"), name


@pytest.mark.slow  # two launches of a torchrun group (~20 s)
def test_gpus_2_infer_writes_the_files_of_one_process_and_exits_as_they_do(trained_fastscnn, pool, infer_reference,
                                                                          tmp_path):
    """`mirseg infer --gpus 2` on a machine without CUDA: two CPU processes (gloo) started by the command itself;
    a failure of theirs is the command's exit code (2 for a missing checkpoint), not torchrun's 1."""
    base = [sys.executable, "-m", "mirseg", "infer", str(trained_fastscnn[0]), str(pool), *_keys(INFER)]
    proc = subprocess.run([*base, f"out_dir={tmp_path / 'two'}", "--gpus", "2"], capture_output=True, text=True,
                          env=CHILD_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cpu x 2 processes" in proc.stderr and len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    assert _tree(tmp_path / "two") == infer_reference
    missing = [*base, f"out_dir={tmp_path / 'none'}", "--gpus=2"]
    missing[4] = str(tmp_path / "no.pth")
    proc = subprocess.run(missing, capture_output=True, text=True, env=CHILD_ENV, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(r"infer --gpus 2: process [01] of 2: checkpoint \S+no.pth does not exist", proc.stderr), \
        proc.stderr[-3000:]  # the first of the two to fail


@pytest.mark.slow  # a torchrun launch and a resume (~10 s)
def test_torchrun_infer_sigterm_then_resume_in_one_process(trained_fastscnn, pool, tmp_path):
    """SIGTERM to the launcher reaches the two workers at different moments; both stop after the same round."""
    big = tmp_path / "pool"  # 21 candidates: 11 groups of 2, 6 rounds, so the signal lands in the middle
    big.mkdir()
    for prefix in "abc":
        for src in pool.iterdir():
            shutil.copy(src, big / f"{prefix}{src.name}")
    run_inference(_infer_cfg(trained_fastscnn, big, tmp_path / "one"))
    out = tmp_path / "two"
    proc = _torchrun("infer", str(trained_fastscnn[0]), str(big), f"out_dir={out}", *_keys(INFER))
    end = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < end:
        if (out / JOURNAL).exists() and (out / JOURNAL).read_text().count("\n") >= 3:
            proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
            break
        time.sleep(0.001)
    _, err = proc.communicate(timeout=120)
    stops = [line.split("ERROR ")[1] for line in err.splitlines() if "ERROR interrupted by SIGTERM after" in line]
    if not stops:  # the signal reached the workers after their last image: the run is complete
        assert _tree(out) == _tree(tmp_path / "one"), err[-3000:]
        pytest.skip("the run finished before the signal reached the workers")
    assert len(stops) == 2 and len(set(stops)) == 1, err[-3000:]  # one line per worker, the same stop
    done = int(stops[0].split(" after ")[1].split()[0])
    assert (out / JOURNAL).read_text().count("\n") == 1 + done and done < 21
    run_inference(_infer_cfg(trained_fastscnn, big, out, resume=True))
    assert _tree(out) == _tree(tmp_path / "one")
