"""Stopping cleanly on SIGINT / SIGTERM, and the journals that let an interrupted job resume.

``with graceful_stop() as stop:`` replaces the SIGINT and SIGTERM handlers by one that only
records the signal; the job checks ``stop`` at points where it can stop without losing work
(after an optimizer step, after an image's outputs are written), saves what it has and raises
:class:`mirseg.errors.Interrupted`, which the CLI turns into one line and exit code 128 + signal
(130 for SIGINT, 143 for SIGTERM). The previous handlers come back when the block ends.

* A second signal of the same kind stops at once (it raises ``Interrupted`` wherever the job is;
  nothing more is saved, files are still never left half written). Under ``torchrun`` a repeat is
  ignored instead: the launcher forwards the signal it gets to every worker, often on top of the
  terminal's own Ctrl-C, and it escalates to SIGKILL by itself after its shutdown timeout.
* Processes forked inside the block (DataLoader workers) inherit the handler and ignore both
  signals: a Ctrl-C reaches the whole process group, and a worker that died of it would make the
  loader raise in the main process instead of letting it stop cleanly; the main process ends them.
* Signal handlers can only be set in the main thread; elsewhere the block does nothing and
  ``stop`` never fires (the job then runs to its end or dies of the signal as before).

:func:`raise_on_signals` is the blunt variant for code with no safe point to wait for (the YMIR
executor around its whole run): the signal raises ``Interrupted`` at once, so the caller's error
handling runs instead of the process vanishing with SIGTERM.

:class:`Journal` is the append-only record of work finished (one JSON object per line, each
flushed and fsync'd), which ``mirseg infer`` and ``mirseg mine`` replay with ``resume=true``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from mirseg.errors import ConfigError, Interrupted, MirsegError, MissingFileError
from mirseg.fileio import AppendLog, write_atomic

log = logging.getLogger("mirseg")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    """``SIGINT`` / ``SIGTERM`` (any signal's name)."""
    return signal.Signals(signum).name


def stopped_after(signum: int, done: int, total: int, out_dir: str | os.PathLike, items: str = "images",
                  verb: str = "do", before: str = "") -> Interrupted:
    """What a job stopped by ``signum`` after ``done`` of ``total`` ``items`` raises: how to finish the rest."""
    return Interrupted(f"interrupted by {signal_name(signum)} after {before}{done} of {total} {items}; run the same "
                       f"command with resume=true to {verb} the other {total - done} (out_dir={out_dir})", signum)


def under_torchrun() -> bool:
    """True in a worker process started by ``torchrun`` (torch.distributed.run sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class StopRequest:
    """What :func:`graceful_stop` yields: falsy until SIGINT or SIGTERM arrives, then ``signum`` is set."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal_name(self.signum) if self.signum is not None else ""


@contextlib.contextmanager
def signal_handlers(handler: Any) -> Iterator[bool]:
    """Install ``handler`` for SIGINT and SIGTERM inside the block; yields whether it could (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        for s in SIGNALS:
            signal.signal(s, handler)
        yield True
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def graceful_stop(doing: str = "the current step") -> Iterator[StopRequest]:
    """SIGINT/SIGTERM set the yielded :class:`StopRequest` instead of killing the process (see the module doc).

    ``doing`` completes the line logged when the signal arrives ("finishing <doing>, then saving").
    """
    stop = StopRequest()
    owner = os.getpid()
    abort_on_repeat = not under_torchrun()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a forked loader worker: the main process decides
            return
        name = signal_name(signum)
        if stop.signum == signum:
            if abort_on_repeat:
                raise Interrupted(f"stopped at once by a second {name}; files already written are kept", signum)
            return
        if stop.signum is None:
            stop.signum = signum
            log.warning("%s received: finishing %s, then stopping; %s", name, doing,
                        "send it again to stop at once" if abort_on_repeat else "torchrun stops the workers")

    with signal_handlers(handler):
        yield stop


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """SIGINT/SIGTERM raise :class:`Interrupted` at once inside the block (a :func:`graceful_stop` inside wins)."""
    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() == owner:
            raise Interrupted(f"stopped by {signal_name(signum)}", signum)

    with signal_handlers(handler):
        yield


# ---------------------------------------------------------------------------------------------
# Journals of finished work


def job_settings(cfg: Any, paths: list[str], checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """What decides a job's outputs, for :meth:`Journal.open`: every key of the config dataclass ``cfg`` but
    ``resume``, ``workers_per_gpu`` and ``threads``, the input paths (count and SHA-256) and the checkpoint file's size
    and modification time (retrained weights under the same name are other settings)."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if f.name not in ("resume", "workers_per_gpu", "threads")}
    digest = hashlib.sha256("\n".join(paths).encode("utf-8", errors="surrogateescape")).hexdigest()
    out = {**values, "num_images": len(paths), "images_sha256": digest}
    if checkpoint and os.path.isfile(checkpoint):
        st = os.stat(checkpoint)
        out["checkpoint_file"] = [st.st_size, st.st_mtime_ns]
    return out


class Journal:
    """``path``: the first line is a header ``{"journal": kind, "settings": {...}}``, then one record per line.

    Each :meth:`append` is one line of a :class:`mirseg.fileio.AppendLog`, written after the work it
    describes is finished (its files written, atomically): flushed at once, so it survives the
    process dying in any way (a signal, SIGKILL, the OOM killer), and fsync'd once a second and on
    close, so a machine crash loses at most the last second of records (that work is done again).
    A torn last line is dropped when the journal is read back. :meth:`finish` removes the file once
    the job's final outputs are in place, so a journal on disk always means "unfinished".
    """

    def __init__(self, path: Path, records: list[dict[str, Any]]) -> None:
        self.path = path
        self.records = records  # what an earlier run finished (resume), in order
        self._log = AppendLog(path)

    @classmethod
    def open(cls, path: str | os.PathLike, kind: str, settings: dict[str, Any], resume: bool,
             what: str) -> Journal:
        """Start a journal, or with ``resume`` continue the one at ``path``; ``what`` names the job's folder.

        ``settings``: whatever decides the outputs (the configuration, the input list); resuming with
        other settings is a :class:`ConfigError`, because the outputs would mix two runs. Without
        ``resume`` an earlier journal is discarded (its outputs get overwritten, as any rerun does).
        """
        path = Path(path)
        settings = json.loads(json.dumps(settings))  # as it reads back: tuples are lists
        header = {"journal": kind, "version": 1, "settings": settings}
        if not resume:
            if path.exists():
                log.info("discarding %s, left by an interrupted run (resume=true continues such a run)", path)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(header, separators=(",", ":")) + "\n")
            return cls(path, [])
        if not path.is_file():
            raise MissingFileError(f"nothing to resume in {what}: there is no {path.name}, which an interrupted run "
                                   f"leaves (a finished one removes it); run again without resume=true")
        entries = _read(path)
        found = entries[0] if entries else None
        if not isinstance(found, dict) or found.get("journal") != kind:
            raise ConfigError(f"{path} is not a {kind} journal; run again without resume=true to start over")
        if found.get("settings") != settings:
            old = found.get("settings") or {}
            keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ConfigError(f"cannot resume in {what}: the interrupted run had other settings ({', '.join(keys)}); "
                              f"resume with the same ones, or run again without resume=true to start over")
        records = entries[1:]
        return cls(path, records)

    def append(self, record: dict[str, Any]) -> None:
        """Add one record (written and flushed; fsync'd once a second)."""
        self._log.append(json.dumps(record, separators=(",", ":")))
        self.records.append(record)

    def close(self) -> None:
        """Close the file (fsync'd) and keep it: the job was interrupted, resume=true continues it."""
        self._log.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # kept unless finish() ran: an interrupted or failed job resumes from it

    def finish(self) -> None:
        """Close and remove the journal: the job's outputs are complete."""
        self._log.close()
        self.path.unlink(missing_ok=True)


def _read(path: Path) -> list[Any]:
    """The journal's entries; a torn last line (the process died writing it) is dropped."""
    lines, torn = AppendLog.read_lines(path)
    if torn:
        log.warning("%s: dropped a torn last record (the process died while writing it)", path)
    entries = []
    for i, line in enumerate(lines, start=1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            raise MirsegError(f"{path} line {i} is damaged; run again without resume=true to start over") from None
    return entries
