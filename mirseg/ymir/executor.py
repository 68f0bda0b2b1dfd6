"""``mirseg ymir``: run the task env.yaml asks for (training, or mining and/or inference) and report it.

Flow: read env.yaml and config.yaml (merged over the task template's defaults) -> check and
coerce every key -> run the task with mirseg's own functions -> write the platform's result
files. Progress goes to monitor.txt throughout; any failure writes the monitor's error state
with an error code, logs the reason and exits non-zero, so a task never stays "running".

This module is the dispatch: :func:`run` / :func:`main`. The tasks are :mod:`mirseg.ymir.training` and
:mod:`mirseg.ymir.prediction` (mining and inference); what both read from config.yaml is
:mod:`mirseg.ymir.taskconfig`; a task on several GPUs runs its job in a torchrun group of its own
(:mod:`mirseg.ymir.worker`); the error codes are :mod:`mirseg.ymir.codes`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from mirseg import interrupt
from mirseg.errors import EXIT_SIGINT, Interrupted, MirsegError
from mirseg.ymir.codes import error_code
from mirseg.ymir.prediction import run_mining_and_infer
from mirseg.ymir.protocol import (
    CODE_CONFIG,
    CODE_MODEL,
    POSTPROCESS,
    PREPROCESS,
    Monitor,
    YmirError,
    read_env,
)
from mirseg.ymir.training import run_training

log = logging.getLogger("mirseg")

DEFAULT_ENV = "/in/env.yaml"


def _quiet_caches(tmp: str) -> None:
    """Point library caches at a temp dir: /in is read-only and $HOME may not be writable."""
    for var, sub in (("TORCH_HOME", "torch"), ("XDG_CACHE_HOME", "cache"), ("MPLCONFIGDIR", "mpl")):
        os.environ.setdefault(var, str(Path(tmp) / sub))
    os.environ.setdefault("TQDM_MININTERVAL", "30")  # the platform's log is a file: a bar line every 30 s


def run(env_path: str | os.PathLike) -> int:
    """Run the task of ``env_path``; 0 on success, else non-zero after writing the monitor's error state.

    SIGINT / SIGTERM (``docker stop``): training saves last.pth at the current iteration, mining and
    inference finish the images in flight, anything else stops at once; then the monitor's error
    state is written with the reason, and the exit code is 130 / 143 (1 for a failure).
    """
    monitor = None
    try:
        env = read_env(env_path)
        monitor = Monitor(env.monitor_file, env.task_id)
        monitor.update(PREPROCESS, 0.0, force=True)
        log.info("mirseg ymir: task %s (training=%s mining=%s infer=%s, protocol %s)", env.task_id,
                 env.run_training, env.run_mining, env.run_infer, env.protocol_version or "?")
        started = time.time()
        if env.run_training:
            run_training(env, monitor)
        elif env.run_mining or env.run_infer:
            run_mining_and_infer(env, monitor)
        else:
            raise YmirError(f"{env_path}: none of run_training, run_mining, run_infer is true: nothing to do")
        monitor.set_span(0.0, 1.0)
        monitor.update(POSTPROCESS, 1.0, force=True)
        log.info("done in %.0f s", time.time() - started)
        return 0
    except (Interrupted, KeyboardInterrupt) as exc:  # stopped from outside, not a failure: one line, no traceback
        signum = exc.signum if isinstance(exc, Interrupted) else EXIT_SIGINT - 128
        message = str(exc) if isinstance(exc, Interrupted) else "interrupted by SIGINT"
        code = CODE_CONFIG if monitor is None else CODE_MODEL
        log.error("task stopped (error code %d): %s", code, message)
        monitor = monitor or _fallback_monitor()
        if monitor is not None:
            monitor.error(code, message)
        return 128 + signum
    except Exception as exc:  # any failure: error state + message + non-zero exit, never a stuck "running"
        code = error_code(exc, CODE_CONFIG if monitor is None else CODE_MODEL)
        # The user's to fix: the message says what and how. Anything else is a bug: keep the traceback.
        (log.error if isinstance(exc, MirsegError) else log.exception)("task failed (error code %d): %s", code, exc)
        monitor = monitor or _fallback_monitor()
        if monitor is not None:
            monitor.error(code, f"{type(exc).__name__}: {exc}")
        return 1


def _fallback_monitor() -> Monitor | None:
    """env.yaml unusable: the platform's fixed /out/monitor.txt if it can be written, else None."""
    fallback = Path("/out/monitor.txt")
    if fallback.parent.is_dir() and os.access(fallback.parent, os.W_OK):
        return Monitor(fallback, "mirseg")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mirseg ymir", description="Run as the YMIR platform's executor.")
    parser.add_argument("--env", help=f"env.yaml (default: $MIRSEG_YMIR_ENV or {DEFAULT_ENV})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    # SIGINT/SIGTERM outside training's and mining's safe points raise at once, so run() reports them.
    with tempfile.TemporaryDirectory(prefix="mirseg-cache-") as tmp, interrupt.raise_on_signals():
        _quiet_caches(tmp)
        return run(args.env or os.environ.get("MIRSEG_YMIR_ENV") or DEFAULT_ENV)
