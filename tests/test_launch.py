"""The shared launcher of ``--gpus N`` and YMIR tasks on N GPUs (mirseg/launch.py), cheaply: the torchrun command,
which failure ends a group, and the watchdog and signal passing on small Python processes standing in for torchrun.
The real torchrun groups are the slow tests of tests/test_dist.py and tests/test_ymir.py."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mirseg import dist, launch
from mirseg.cli import _without_gpus, main
from mirseg.errors import ConfigError, Interrupted
from mirseg.launch import GroupResult, Report

REPO = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0"}


def test_the_torchrun_command_for_n_processes():
    cmd = launch.torchrun_command(3, "mirseg", ["infer", "best.pth", "photos/", "out_dir=x"], python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "--max-restarts=0",
                   "--monitor-interval=0.5", "-m", "mirseg", "infer", "best.pth", "photos/", "out_dir=x"]
    with pytest.raises(ValueError):
        launch.torchrun_command(0, "mirseg", [])


def test_the_group_runs_the_same_command_without_gpus():
    assert _without_gpus(["infer", "a.pth", "--gpus", "2", "out_dir=x"]) == ["infer", "a.pth", "out_dir=x"]
    assert _without_gpus(["train", "--gpus=4", "--resume", "x.yaml"]) == ["train", "--resume", "x.yaml"]
    assert _without_gpus(["mine", "a.pth", "pool/", "--gpu", "2"]) == ["mine", "a.pth", "pool/"]  # argparse's prefix


def _report(rank: int, kind: str, exit_code: int, t: float, code: int = 0) -> Report:
    return Report(rank, kind, exit_code, f"{kind} of {rank}", code, t)


def test_the_failure_that_ended_the_group():
    """Its own error first (even when later), then a process gone without a report, then a peer's collective
    failure, then a signal; the exit code is the failure's, or 128 + the signal the launcher passed on."""
    ok = _report(0, "ok", 0, 1.0)
    assert GroupResult(2, 0, {0: ok, 1: _report(1, "ok", 0, 1.0)}).failure() is None
    assert GroupResult(2, 1, {0: ok, 1: _report(1, "ok", 0, 1.0)}, signum=signal.SIGINT).exit_code == 0  # work done
    peer, error = _report(0, "peer", 1, 1.0), _report(1, "error", 2, 2.0, code=300002)
    group = GroupResult(2, 1, {0: peer, 1: error}, {0, 1})
    assert group.failure() == error and group.exit_code == 2
    assert group.describe() == "process 1 of 2: error of 1"
    lost = GroupResult(2, 1, {0: peer}, {0, 1})  # rank 1 was killed: rank 0's gloo error is only a consequence
    assert lost.failure().rank == 1 and lost.failure().kind == "lost" and lost.exit_code == 1
    assert "killed by a signal or crashed" in lost.describe()
    assert "never started" in GroupResult(2, 1, {}, set()).describe()
    stopped = GroupResult(2, 1, {0: _report(0, "interrupted", 143, 1.0), 1: _report(1, "interrupted", 143, 1.1)},
                          {0, 1}, signum=signal.SIGTERM)
    assert stopped.failure().rank == 0 and stopped.exit_code == 143
    both = GroupResult(2, 1, {0: _report(0, "interrupted", 143, 1.0), 1: error}, {0, 1}, signum=signal.SIGTERM)
    assert both.failure() == error and both.exit_code == 2  # a real error is not hidden by the stop


def test_what_a_process_reports(tmp_path, monkeypatch):
    launch.report("ok", 0)  # outside a group: nothing, anywhere
    monkeypatch.setenv(launch.REPORTS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    launch.announce()
    launch.report("error", 2, "bad key", 300001)
    pid, started = (tmp_path / "rank3.pid").read_text().split()
    assert int(pid) == os.getpid() and launch._alive(os.getpid(), started)
    assert not launch._alive(os.getpid(), str(int(started) + 1))  # another process that got our pid later
    (only,) = launch._reports(tmp_path)
    assert (only.rank, only.kind, only.exit_code, only.message, only.code) == (3, "error", 2, "bad key", 300001)
    with pytest.raises(ValueError, match="unknown report kind"):
        launch.report("fine", 0)


def test_a_collective_failure_is_told_from_a_processs_own_error():
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:56014: "
                        "Connection reset by peer.")
    assert launch.failure_kind(gloo) == "peer"
    assert launch.failure_kind(torch.distributed.DistBackendError("NCCL error")) == "peer"
    assert launch.failure_kind(Interrupted("stopped", signal.SIGTERM)) == "interrupted"
    assert launch.failure_kind(ConfigError("bad key")) == "error"
    assert launch.failure_kind(RuntimeError("shapes do not match")) == "error"


def _stand_in(body: str) -> list[str]:
    """A Python process standing in for torchrun and its rank 0: it announces itself, then runs ``body``."""
    return [sys.executable, "-c", f"import os, signal, sys, time\nfrom mirseg import launch\nlaunch.announce()\n{body}"]


def test_the_watchdog_kills_a_group_that_does_not_stop_after_a_failure():
    start = time.monotonic()
    group = launch.run_group(_stand_in("launch.report('error', 2, 'boom')\nsignal.signal(signal.SIGTERM, "
                                       "signal.SIG_IGN)\ntime.sleep(60)"), 1, CHILD_ENV, grace=1.0)
    assert time.monotonic() - start < 10
    assert group.killed and group.returncode == -signal.SIGKILL
    assert group.exit_code == 2 and group.describe().startswith("process 0 of 1: boom")


def test_a_process_gone_without_a_report_fails_the_group():
    group = launch.run_group(_stand_in("os.kill(os.getpid(), signal.SIGKILL)"), 1, CHILD_ENV, grace=5.0)
    assert group.started == {0} and group.failure().kind == "lost" and group.exit_code == 1


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signal handlers: main thread")
def test_a_signal_to_the_launcher_is_passed_on_and_ends_in_128_plus_it():
    body = ("def stop(signum, frame):\n    launch.report('interrupted', 128 + signum, 'stopped')\n    sys.exit(143)\n"
            "signal.signal(signal.SIGTERM, stop)\ntime.sleep(60)")
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        group = launch.run_group(_stand_in(body), 1, CHILD_ENV, grace=20.0)
    finally:
        timer.cancel()
    assert group.signum == signal.SIGTERM and not group.killed
    assert group.failure().kind == "interrupted" and group.exit_code == 143


def test_process_group_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(dist.TIMEOUT_ENV, raising=False)
    assert dist.timeout().total_seconds() == dist.DEFAULT_TIMEOUT
    monkeypatch.setenv(dist.TIMEOUT_ENV, "45")
    assert dist.timeout().total_seconds() == 45
    for bad in ("soon", "0", "-3", "inf", "nan"):
        monkeypatch.setenv(dist.TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match="MIRSEG_DIST_TIMEOUT=.* is not a number of seconds: set it to a number"):
            dist.timeout()


def test_bad_gpus_are_refused_before_any_process_starts(monkeypatch, caplog):
    job = ["infer", "best.pth", "photos/"]
    assert main([*job, "--gpus", "0"]) == 2
    assert "--gpus must be 1 or more, got 0" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main([*job, "--gpus", "4"]) == 2
    assert "--gpus 4 asks for 4 GPUs, but this machine shows 2" in caplog.text
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*job, "--gpus", "2"]) == 2
    assert "--gpus starts a torchrun group of its own: under torchrun leave it out" in caplog.text
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv(dist.TIMEOUT_ENV, "soon")
    assert main([*job, "--gpus", "2"]) == 2
    assert "MIRSEG_DIST_TIMEOUT='soon' is not a number of seconds" in caplog.text
