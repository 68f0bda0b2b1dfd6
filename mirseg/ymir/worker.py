"""A YMIR task's job on several GPUs: the executor's side (:func:`run_job`) and each process's
(``python -m mirseg.ymir.worker JOB FOLDER``, :func:`main`).

:func:`run_job` runs a training, inference or mining job the executor has configured and checked: in the
executor's own process when the task has one device, else in a torchrun group of its own
(:mod:`mirseg.launch`, the launcher ``mirseg ... --gpus N`` uses too; ``CUDA_VISIBLE_DEVICES`` from gpu_id),
which it waits for. Each process of the group reads the job's config from ``FOLDER/job.yaml`` and runs it;
rank 0 alone reports progress to monitor.txt and leaves the job's result for the executor
(``FOLDER/result.pickle``). A failing process reports its YMIR error code and message; the executor raises
the failure that ended the group (:meth:`mirseg.launch.GroupResult.failure`) as a :class:`YmirError` with
that code, or :class:`Interrupted` when the executor itself was stopped, and writes the monitor's error state
as for one process. The watchdog of :func:`mirseg.launch.run_group` bounds how long a failing group takes.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mirseg import dist, interrupt, launch
from mirseg.config import InferConfig, MineConfig, TrainConfig, load_config, save_config
from mirseg.errors import EXIT_FAILED, EXIT_SIGINT, Interrupted, MirsegError
from mirseg.fileio import write_atomic
from mirseg.infer import run_inference
from mirseg.mine import mine
from mirseg.train import train
from mirseg.ymir.codes import error_code
from mirseg.ymir.protocol import CODE_CONFIG, CODE_MODEL, TASK, Monitor, YmirError

log = logging.getLogger("mirseg")

JOBS: dict[str, tuple[type, Callable[..., Any]]] = {
    "train": (TrainConfig, train), "infer": (InferConfig, run_inference), "mine": (MineConfig, mine)}

# What the executor tells rank 0 of its group: where the monitor is, the task id, the task's share of the run.
MONITOR_ENV, TASK_ID_ENV, SPAN_ENV = "MIRSEG_YMIR_MONITOR", "MIRSEG_YMIR_TASK_ID", "MIRSEG_YMIR_SPAN"


def run_job(kind: str, cfg: Any, processes: int, monitor: Monitor, visible: str = "") -> Any:
    """``train`` / ``infer`` / ``mine`` of ``cfg`` on ``processes`` devices; the job function's result.

    One process (or already under torchrun): here, reporting to ``monitor``. More: a torchrun group with
    ``CUDA_VISIBLE_DEVICES=visible`` (unless empty); the result is rank 0's.
    """
    _, run = JOBS[kind]
    if processes <= 1 or "WORLD_SIZE" in os.environ:
        return run(cfg, progress=lambda p: monitor.update(TASK, p))
    try:
        dist.timeout()  # a bad MIRSEG_DIST_TIMEOUT: one config error here, not one per process
    except MirsegError as exc:
        raise YmirError(str(exc), CODE_CONFIG) from None
    with tempfile.TemporaryDirectory(prefix="mirseg-ymir-") as tmp:
        folder = Path(tmp)
        save_config(cfg, folder / "job.yaml")
        env = {**os.environ, MONITOR_ENV: str(monitor.path), TASK_ID_ENV: monitor.task_id,
               SPAN_ENV: ",".join(map(str, monitor.span))}
        if visible:
            env["CUDA_VISIBLE_DEVICES"] = visible
        cmd = launch.torchrun_command(processes, "mirseg.ymir.worker", [kind, tmp])
        log.info("%s on %d processes%s: %s", kind, processes, f" (GPUs {visible})" if visible else "", " ".join(cmd))
        group = launch.run_group(cmd, processes, env)
        monitor.adopt()  # rank 0's percent: the error state, if any, keeps it
        failure = group.failure()
        if failure is None:
            return pickle.loads((folder / "result.pickle").read_bytes())  # our own process's file, in our temp dir
        if group.signum is not None and failure.kind != "error":
            stopped = group.reports.get(0)  # rank 0's line says where it stopped and what it saved
            message = (stopped.message if stopped is not None and stopped.kind == "interrupted" and stopped.message
                       else f"interrupted by {interrupt.signal_name(group.signum)}: the {processes} processes stopped")
            raise Interrupted(message, group.signum)
        raise YmirError(f"{kind} on {processes} processes failed: {group.describe()}", failure.code or CODE_MODEL)


def main(argv: list[str]) -> int:
    """One process of the group: run the job of ``argv`` = [JOB, FOLDER]; its exit code, reported to the executor."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    launch.announce()
    kind, folder = argv[0], Path(argv[1])
    is_main = os.environ.get("RANK", "0") == "0"
    try:
        with interrupt.raise_on_signals():  # a signal outside the job's safe points still ends in a report
            cls, run = JOBS[kind]
            cfg = load_config(cls, folder / "job.yaml")
            result = run(cfg, progress=_progress() if is_main else None)
            if is_main:
                write_atomic(folder / "result.pickle", pickle.dumps(result))
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else EXIT_SIGINT - 128
        log.error("%s", exc)
        launch.report("interrupted", 128 + signum, str(exc) or "interrupted by SIGINT")
        return 128 + signum
    except Exception as exc:
        (log.error if isinstance(exc, MirsegError) else log.exception)("%s failed: %s", kind, exc)
        launch.report(launch.failure_kind(exc), EXIT_FAILED, f"{type(exc).__name__}: {exc}",
                      error_code(exc, CODE_MODEL))
        return EXIT_FAILED
    launch.report("ok", 0)
    return 0


def _progress() -> Callable[[float], None] | None:
    """Rank 0's progress callback: the executor's monitor file, within the task's share of the run."""
    if not os.environ.get(MONITOR_ENV):
        return None
    monitor = Monitor(Path(os.environ[MONITOR_ENV]), os.environ.get(TASK_ID_ENV, "mirseg"))
    start, end = (float(x) for x in os.environ.get(SPAN_ENV, "0,1").split(","))
    monitor.set_span(start, end)
    return lambda p: monitor.update(TASK, p)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
