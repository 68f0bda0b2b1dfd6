"""Start a job's own ``torchrun`` group and wait for it, bounded: ``mirseg train|infer|mine --gpus N`` and a YMIR
task on N GPUs share this launcher.

torchrun (``python -m torch.distributed.run``) starts the processes, passes SIGINT / SIGTERM on to them, and
stops the group when one of them fails (SIGTERM, then SIGKILL after its shutdown timeout). But it exits 1
whatever went wrong, and a process blocked in a collective waits for the others up to the process-group
timeout (:func:`mirseg.dist.timeout`). The launcher adds:

* **reports**: each process of the group writes ``rank<R>.pid`` when it starts (:func:`announce`) and
  ``rank<R>.json`` when it ends (:func:`report`) in the folder ``$MIRSEG_LAUNCH_REPORTS`` names.
  :meth:`GroupResult.failure` picks the failure that ended the group: a process's own error before a
  process that vanished without a report (killed, crashed), before one that failed only because a peer
  was gone (:func:`failure_kind`), before a stop on a signal. So ``--gpus 2`` exits 2 for a bad key as one
  process does, and a YMIR task's monitor gets that error's code and message;
* **a watchdog**: once a process has failed or vanished, or the launcher got a signal, the group has
  ``grace`` seconds to end; then every process of it is killed, so a failure never hangs the job;
* **signals**: torchrun runs in a session of its own (a terminal's Ctrl-C reaches the launcher alone, which
  passes it on once: torchrun forwards it to every process); a second signal kills the group at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from mirseg.errors import EXIT_FAILED, Interrupted
from mirseg.fileio import write_atomic
from mirseg.interrupt import signal_handlers, signal_name

log = logging.getLogger("mirseg")

REPORTS_ENV = "MIRSEG_LAUNCH_REPORTS"
"""The folder a launched group's processes write their reports to (set by :func:`run_group`)."""

POLL = 0.2  # seconds between two looks at the group
SHUTDOWN = 30  # torchrun's shutdown timeout (SIGTERM, then SIGKILL), unless TORCH_ELASTIC_SHUTDOWN_TIMEOUT says

PRECEDENCE = ("error", "lost", "peer", "interrupted")
"""The kinds of failure, the one that ended a group first: its own error, vanished, a peer gone, a signal."""

PEER_WORDS = ("/gloo/", "Connection reset by peer", "Connection closed by peer", "NCCL communicator was aborted")


def torchrun_command(nproc: int, module: str, args: Sequence[str], python: str = sys.executable) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N ... -m module args``.

    One machine (``--standalone``: rendezvous on a free local port); a failed process is never restarted
    (the job would start again from nothing: ``--max-restarts 0``); torchrun looks at its processes every
    half second, so it stops the group soon after one fails.
    """
    if nproc < 1:
        raise ValueError(f"a group has at least one process, got {nproc}")
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--max-restarts=0",
            "--monitor-interval=0.5", "-m", module, *args]


# ---------------------------------------------------------------------------------------------
# In each process of a group


def _folder() -> Path | None:
    value = os.environ.get(REPORTS_ENV)
    return Path(value) if value and "RANK" in os.environ else None


def announce() -> None:
    """In a process of a launched group: write ``rank<R>.pid`` (its pid and start time) for the watchdog.

    Elsewhere (no ``$MIRSEG_LAUNCH_REPORTS``, or not started by torchrun) it does nothing.
    """
    folder = _folder()
    if folder is not None:
        pid = os.getpid()
        write_atomic(folder / f"rank{os.environ['RANK']}.pid", f"{pid} {_started(pid) or ''}\n")


def report(kind: str, exit_code: int, message: str = "", code: int = 0) -> None:
    """In a process of a launched group: how it ends, as ``rank<R>.json``; elsewhere nothing.

    ``kind``: ``ok``, ``error`` (its own), ``peer`` (a collective failed: another process was gone),
    ``interrupted`` (SIGINT / SIGTERM); ``code``: a YMIR error code (0: none).
    """
    folder = _folder()
    if folder is None:
        return
    if kind not in ("ok", *PRECEDENCE):
        raise ValueError(f"unknown report kind {kind!r}")
    rank = int(os.environ["RANK"])
    data = {"rank": rank, "kind": kind, "exit_code": int(exit_code), "message": message, "code": int(code),
            "time": time.time()}
    write_atomic(folder / f"rank{rank}.json", json.dumps(data))


def failure_kind(exc: BaseException) -> str:
    """``interrupted`` (a signal), ``peer`` (a collective that failed because another process is gone or
    silent past the timeout: torch.distributed's errors, gloo's connection errors) or ``error``."""
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        return "interrupted"
    torch_dist = sys.modules.get("torch.distributed")  # never imported here: a group's processes have it loaded
    dist_error = getattr(torch_dist, "DistError", None)
    if isinstance(dist_error, type) and isinstance(exc, dist_error):
        return "peer"
    if isinstance(exc, RuntimeError) and any(word in str(exc) for word in PEER_WORDS):
        return "peer"
    return "error"


# ---------------------------------------------------------------------------------------------
# In the launcher


@dataclass(frozen=True)
class Report:
    """How one process of a group ended (``lost``: it said nothing, see :meth:`GroupResult.failure`)."""

    rank: int
    kind: str
    exit_code: int
    message: str = ""
    code: int = 0
    time: float = 0.0


@dataclass
class GroupResult:
    """What :func:`run_group` saw: torchrun's exit code, each process's report, a signal passed on."""

    nproc: int
    returncode: int
    reports: dict[int, Report] = field(default_factory=dict)
    started: set[int] = field(default_factory=set)  # the ranks that announced themselves
    signum: int | None = None  # the signal the launcher got and passed on
    killed: bool = False  # the watchdog killed the group

    def failure(self) -> Report | None:
        """The failure that ended the group (see :data:`PRECEDENCE`; the earliest of a kind), None if none did.

        Every process reporting ``ok`` is success whatever torchrun's exit code: the job is done, and a signal
        that reached torchrun after it (torchrun then exits 1) stopped nothing.
        """
        found = [self.reports.get(rank) or self._lost(rank) for rank in range(self.nproc)]
        bad = [r for r in found if r.kind != "ok"]
        return min(bad, key=lambda r: (PRECEDENCE.index(r.kind), r.time, r.rank)) if bad else None

    def _lost(self, rank: int) -> Report:
        what = ("ended without a report: killed by a signal or crashed (out of memory?)" if rank in self.started
                else "never started")
        return Report(rank, "lost", EXIT_FAILED, f"{what}; see the log above")

    @property
    def exit_code(self) -> int:
        """0, else the failure's exit code; 128 + the signal when the launcher was stopped and nothing else failed."""
        failure = self.failure()
        if failure is None:
            return 0
        if self.signum is not None and failure.kind != "error":
            return 128 + self.signum
        return failure.exit_code or EXIT_FAILED

    def describe(self) -> str:
        """One line: which process failed and why (for the log and the YMIR monitor)."""
        failure = self.failure()
        if failure is None:
            return f"all {self.nproc} processes ended well"
        text = f"process {failure.rank} of {self.nproc}: {failure.message or f'exit code {failure.exit_code}'}"
        if self.killed:
            text += " (the group did not stop by itself and was killed)"
        return text


def run_group(cmd: Sequence[str], nproc: int, env: Mapping[str, str] | None = None,
              grace: float | None = None) -> GroupResult:
    """Run torchrun's ``cmd`` (:func:`torchrun_command`) for ``nproc`` processes and wait until the group has ended.

    ``env``: the processes' environment (default this one's). ``grace``: seconds the group has to end once a
    process failed or a signal came (default torchrun's shutdown timeout + 15 s); then it is killed.
    SIGINT / SIGTERM are passed on to torchrun (handlers here only in the main thread).
    """
    if grace is None:
        grace = float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or SHUTDOWN) + 15
    with tempfile.TemporaryDirectory(prefix="mirseg-launch-") as tmp:
        folder = Path(tmp)
        child_env = {**(os.environ if env is None else env), REPORTS_ENV: tmp}
        proc = subprocess.Popen(list(cmd), env=child_env, start_new_session=True)
        watch = _Watch(proc, folder, grace)
        try:
            with signal_handlers(watch.on_signal):
                watch.wait()
        finally:
            watch.kill()  # nothing of the group outlives the launcher (torchrun itself killed, an error here)
        reports = {r.rank: r for r in _reports(folder)}
        return GroupResult(nproc, proc.returncode, reports, set(watch.pids()), watch.signum, watch.killed)


class _Watch:
    """The watchdog of one group: torchrun's process ``proc`` and the processes announced in ``folder``."""

    def __init__(self, proc: subprocess.Popen, folder: Path, grace: float):
        self.proc, self.folder, self.grace = proc, folder, grace
        self.deadline: float | None = None
        self.signum: int | None = None
        self.killed = False

    def pids(self) -> dict[int, tuple[int, str]]:
        """rank -> (pid, start time) of the processes that announced themselves."""
        out = {}
        for path in self.folder.glob("rank*.pid"):
            try:
                pid, _, started = path.read_text().strip().partition(" ")
                out[int(path.stem[4:])] = (int(pid), started)
            except (OSError, ValueError):  # written atomically: only a foreign file gets here
                continue
        return out

    def wait(self) -> None:
        while self.proc.poll() is None:
            time.sleep(POLL)
            if self.deadline is None:
                failed = self._failed()
                if failed:
                    self.deadline = time.monotonic() + self.grace
                    log.warning("%s; the group has %.0f s to stop", failed, self.grace)
            if self.deadline is not None and time.monotonic() >= self.deadline and self.proc.poll() is None:
                log.error("the group did not stop within %.0f s: killing it", self.grace)
                self.kill()

    def _failed(self) -> str:
        """Why the group is failing (a report other than ok, an announced process gone without one), else ''."""
        pids = self.pids()
        gone = [rank for rank, (pid, started) in pids.items() if not _alive(pid, started)]
        reports = {r.rank: r for r in _reports(self.folder)}  # read after the liveness: a report precedes an exit
        for r in reports.values():
            if r.kind != "ok":
                return f"process {r.rank} failed ({r.kind}): {r.message or f'exit code {r.exit_code}'}"
        lost = [rank for rank in gone if rank not in reports]
        return f"process {lost[0]} ended without a report (killed or crashed)" if lost else ""

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # a second signal: at once
            log.error("%s again: killing the group", signal_name(signum))
            self.kill()
            return
        self.signum = signum
        log.warning("%s received: passed on to the group, which has %.0f s to stop", signal_name(signum), self.grace)
        if self.deadline is None:
            self.deadline = time.monotonic() + self.grace
        _signal(self.proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL every announced process still running (each leads a session: its loader workers go too) and
        torchrun's session; then reap torchrun."""
        if self.proc.poll() is not None and not any(_alive(p, s) for p, s in self.pids().values()):
            return
        self.killed = True
        for pid, started in self.pids().values():
            if _alive(pid, started):
                _signal(pid, signal.SIGKILL, group=True)
        _signal(self.proc.pid, signal.SIGKILL, group=True)
        self.proc.wait()


def _reports(folder: Path) -> list[Report]:
    out = []
    for path in sorted(folder.glob("rank*.json")):
        try:
            out.append(Report(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return out


def _signal(pid: int, signum: int, group: bool = False) -> None:
    try:
        if group:
            try:
                os.killpg(pid, signum)  # pid leads its own session (start_new_session)
                return
            except ProcessLookupError:  # not a group leader: the process alone
                pass
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first); None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _started(pid: int) -> str | None:
    """The process's start time (clock ticks after boot), which tells it from a later process with its pid."""
    fields = _stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _alive(pid: int, started: str = "") -> bool:
    """Whether the process runs (not a zombie) and is the one announced (same start time)."""
    if not Path("/proc").is_dir():  # no procfs: all the OS tells
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = _stat(pid)
    if not fields or fields[0] in ("Z", "X"):
        return False
    return not started or fields[19] == started
