"""The thread budget (mirseg.threads): the split, the cgroup quota, and the jobs applying and logging it."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import toy
from torch import nn

from mirseg import threads
from mirseg import train as train_module
from mirseg.config import InferConfig, MineConfig, TrainConfig, build_config
from mirseg.errors import ConfigError
from mirseg.infer import run_inference
from mirseg.mine import mine
from mirseg.predict import Predictor
from mirseg.threads import CpuInfo, cgroup_quota, plan, usable_cores
from mirseg.train import train

AFFINITY = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# -- the split


@pytest.mark.parametrize("cpu, workers, key, env, torch_threads, source", [
    (CpuInfo(2, None), 2, 0, {}, 2, "auto"),  # 2 workers on 2 cores reserve none (a quarter of 2 cores is 0)
    (CpuInfo(8, None), 2, 0, {}, 6, "auto"),
    (CpuInfo(8, None), 0, 0, {}, 8, "auto"),
    (CpuInfo(8, 2.5), 1, 0, {}, 3, "auto"),  # a quota of 2.5 CPUs counts as 3 cores
    (CpuInfo(4, None), 2, 0, {}, 3, "auto"),  # at most a quarter of the cores are kept for the workers
    (CpuInfo(16, None), 8, 0, {}, 12, "auto"),
    (CpuInfo(64, 4.0), 0, 0, {}, 4, "auto"),  # the quota, not the machine's cores
    (CpuInfo(16, None, local_processes=4), 2, 0, {}, 3, "auto"),  # torchrun: 4 processes share 16 cores
    (CpuInfo(1, None), 4, 0, {}, 1, "auto"),
    (CpuInfo(4, None), 0, 0, {"OMP_NUM_THREADS": "1"}, 1, "auto, OMP_NUM_THREADS=1"),  # an explicit limit holds
    (CpuInfo(4, None), 0, 0, {"OMP_NUM_THREADS": "8"}, 4, "auto, OMP_NUM_THREADS=8"),  # ... and is never raised to
    (CpuInfo(4, None), 0, 0, {"OMP_NUM_THREADS": "junk"}, 4, "auto"),  # torch ignores it too
    (CpuInfo(2, None), 2, 3, {"MIRSEG_THREADS": "1", "OMP_NUM_THREADS": "1"}, 3, "threads=3"),  # the key wins
    (CpuInfo(2, None), 2, 0, {"MIRSEG_THREADS": "4", "OMP_NUM_THREADS": "1"}, 4, "MIRSEG_THREADS=4"),
    (CpuInfo(8, None), 2, 0, {"MIRSEG_THREADS": " 0 "}, 6, "auto"),  # 0: auto
])
def test_the_split(cpu, workers, key, env, torch_threads, source):
    p = plan(key, workers, env=env, cpu=cpu)
    assert (p.torch_threads, p.workers, p.source) == (torch_threads, workers, source)


def test_the_description_says_the_split_the_cores_and_the_fix():
    p = plan(0, 1, env={}, cpu=CpuInfo(2, None))
    assert p.description == ("threads: torch 2 + 1 data worker (1 thread each, nice +10) on 2 usable cores (affinity "
                             "2, cgroup quota none); auto: usable cores - min(data workers, cores // 4); set "
                             "threads=N or MIRSEG_THREADS")
    p = plan(0, 0, env={"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, cpu=CpuInfo(16, 1.5, local_processes=2))
    assert p.description.startswith("threads: torch 1, no data workers, on 1 usable cores (affinity 16, cgroup "
                                    "quota 1.5 CPUs, shared by 2 torchrun processes); auto: usable cores - min(data "
                                    "workers, cores // 4), at most OMP_NUM_THREADS=1;")
    assert "from threads=3;" in plan(3, 2, env={}, cpu=CpuInfo(2, None)).description


class _Niceness(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return os.nice(0)  # this process's niceness


@pytest.mark.skipif(not hasattr(os, "nice"), reason="no process priorities on this OS")
def test_data_workers_run_at_a_lower_priority_than_the_job():
    own = os.nice(0)
    loader = torch.utils.data.DataLoader(_Niceness(), batch_size=None, num_workers=1,
                                         worker_init_fn=threads.worker_init)
    assert list(loader) == [min(own + threads.WORKER_NICE, 19)] * 2
    assert os.nice(0) == own  # the job itself is unchanged
    # the training loader is one of them (the inference loader passes the same worker_init_fn)
    cfg = build_config(TrainConfig, {"workers_per_gpu": 1})
    rt = train_module.dist.Runtime(torch.device("cpu"))
    assert train_module._loader(_Niceness(), cfg, rt, 0).worker_init_fn is threads.worker_init


def test_torchrun_processes_share_the_cores():
    assert threads.cpu_info(env={"LOCAL_WORLD_SIZE": "2"}).local_processes == 2
    assert threads.cpu_info(env={}).local_processes == 1
    assert usable_cores(env={"LOCAL_WORLD_SIZE": str(4 * AFFINITY)}) == 1


@pytest.mark.parametrize("key, env, words", [
    (-1, {}, "threads must be >= 0"),
    (0, {"MIRSEG_THREADS": "abc"}, "MIRSEG_THREADS='abc' is not a thread count: set it to a whole number >= 1"),
    (0, {"MIRSEG_THREADS": "-2"}, "MIRSEG_THREADS='-2' is not a thread count"),
])
def test_bad_thread_counts_name_the_key_or_variable_and_the_fix(key, env, words):
    with pytest.raises(ConfigError, match=words):
        plan(key, 0, env=env)


def test_a_bad_threads_key_or_variable_stops_the_job_before_any_work(tmp_path, monkeypatch):
    for cls in (TrainConfig, InferConfig, MineConfig):  # the key is refused when the config is built
        with pytest.raises(ConfigError, match="threads must be >= 0, got -1"):
            build_config(cls, {"threads": -1})
    monkeypatch.setenv("MIRSEG_THREADS", "abc")  # the variable when the job starts: no data read, nothing written
    with pytest.raises(ConfigError, match="MIRSEG_THREADS='abc'"):
        train(build_config(TrainConfig, {"work_dir": str(tmp_path / "run"), "train_images": str(tmp_path / "no")}))
    assert not (tmp_path / "run").exists()


# -- the cgroup quota, on fake cgroup trees


def _tree(root: Path, files: dict[str, str], proc: str) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    (root / "proc_self_cgroup").write_text(proc + "\n")
    return root / "proc_self_cgroup"


@pytest.mark.parametrize("files, proc, quota", [
    ({"cpu.max": "150000 100000"}, "0::/", 1.5),  # cgroup v2, in a container (its own cgroup is the root)
    ({"cpu.max": "max 100000"}, "0::/", None),
    ({"a/b/cpu.max": "max 100000", "a/cpu.max": "100000 100000"}, "0::/a/b", 1.0),  # a parent's quota limits too
    ({"a/b/cpu.max": "300000 100000", "a/cpu.max": "500000 100000"}, "0::/a/b", 3.0),  # the tightest one
    ({"cpu.max": "200000 100000"}, "0::/docker/abc", 2.0),  # no cgroup namespace: the mount is the container's
    ({"cpu/cpu.cfs_quota_us": "250000", "cpu/cpu.cfs_period_us": "100000"}, "2:cpuacct:/\n1:cpu:/", 2.5),  # v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "50000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, "4:cpu,cpuacct:/", 0.5),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, "1:cpu:/", None),  # v1, no quota
    ({"cpu.max": "garbage"}, "0::/", None),  # unreadable: no limit rather than a failed job
    ({}, "", None),  # no cgroup file system at all
])
def test_cgroup_quota(tmp_path, files, proc, quota):
    proc_file = _tree(tmp_path, files, proc)
    assert cgroup_quota(tmp_path, proc_file) == quota
    expected = AFFINITY if quota is None else max(1, min(AFFINITY, math.ceil(quota)))
    assert usable_cores(tmp_path, proc_file, env={}) == expected


def test_the_real_machine_has_usable_cores():
    info = threads.cpu_info()
    assert info.affinity == AFFINITY and 1 <= info.usable <= AFFINITY
    assert info.quota is None or info.quota > 0


# -- the jobs


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return toy.shapes(tmp_path_factory.mktemp("shapes"))


def test_training_runs_and_logs_its_thread_split(shapes, tmp_path, caplog, monkeypatch):
    """threads=1: the step runs on one torch thread, the split is logged, the caller's count is back after."""
    seen = []

    def loss(*args, **kwargs):  # the loop's loss, recording the threads the step runs with
        seen.append(torch.get_num_threads())
        return train_module_loss(*args, **kwargs)

    train_module_loss = train_module.segmentation_loss
    monkeypatch.setattr(train_module, "segmentation_loss", loss)
    before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        torch.set_num_threads(2)
        with caplog.at_level(logging.INFO, logger="mirseg"):
            train(toy.shapes_config(*shapes, tmp_path / "run", max_iters=1, interval=1, samples_per_gpu=2, threads=1))
        assert torch.get_num_threads() == 2  # restored for the caller
    finally:
        torch.set_num_threads(before[0])
    assert seen == [1]
    assert cv2.getNumThreads() == before[1]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("threads: "))
    assert line.startswith("threads: torch 1, no data workers, on ") and "from threads=1;" in line


class _Probe(nn.Module):
    """A 1x1 convolution as the network (2 classes) that records the torch threads of each forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen.append(torch.get_num_threads())
        return {"out": self.conv(x)}


@pytest.mark.parametrize("job", ["infer", "mine"])
def test_infer_and_mine_honour_mirseg_threads(job, tmp_path, caplog, monkeypatch):
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), np.random.default_rng(i).integers(0, 255, (24, 32, 3), np.uint8))
    probe = _Probe().eval()
    predictor = Predictor(model=probe, arch="fastscnn", class_names=["background", "thing"], ignore_blank_area=False,
                          img_scale=(32, 24), test_mode="whole", slide_crop=(24, 32), slide_stride=(16, 16),
                          device=torch.device("cpu"))
    values = {"images": str(tmp_path), "out_dir": str(tmp_path / "out"), "workers_per_gpu": 0}
    monkeypatch.setenv("MIRSEG_THREADS", "2")  # above the 1 of the test process (OMP_NUM_THREADS=1): it wins
    before = torch.get_num_threads()
    with caplog.at_level(logging.INFO, logger="mirseg"):
        if job == "infer":
            run_inference(build_config(InferConfig, values), predictor=predictor)
        else:
            mine(build_config(MineConfig, {**values, "mining_algorithm": "entropy"}), predictor=predictor)
    assert probe.seen and set(probe.seen) == {2}
    assert torch.get_num_threads() == before
    assert "threads: torch 2, no data workers, on " in caplog.text and "from MIRSEG_THREADS=2;" in caplog.text


# -- the background thread


def test_in_background_keeps_the_order_runs_ahead_by_at_most_depth_and_raises_where_read():
    started: list[int] = []

    def slow_square(x: int) -> int:
        started.append(x)
        time.sleep(0.01 * (3 - x % 3))  # later items finish first: the order is the items', not the finishing
        if x == 7:
            raise ValueError("seven")
        return x * x

    out = threads.in_background(slow_square, range(10), depth=2)
    assert [next(out) for _ in range(3)] == [0, 1, 4]
    time.sleep(0.1)
    assert len(started) <= 3 + 2 + 1  # read 3, at most 2 waiting unread, and one being submitted
    assert [next(out) for _ in range(4)] == [9, 16, 25, 36]
    with pytest.raises(ValueError, match="seven"):
        next(out)


def test_in_background_at_depth_0_runs_each_call_when_its_result_is_read():
    started: list[int] = []
    out = threads.in_background(lambda x: started.append(x) or x, range(5), depth=0)
    assert next(out) == 0 and started == [0]
    assert list(out) == [1, 2, 3, 4] and started == [0, 1, 2, 3, 4]


def test_in_background_finishes_the_calls_started_when_the_reader_stops():
    done: list[int] = []

    def write(x: int) -> int:
        time.sleep(0.05)
        done.append(x)
        return x

    out = threads.in_background(write, range(100), depth=2)
    assert next(out) == 0
    out.close()  # what contextlib.closing does on the way out of mirseg infer
    assert 1 <= len(done) <= 4 and done == list(range(len(done)))  # started ones finished, in order; no others
    time.sleep(0.1)
    assert len(done) <= 4
