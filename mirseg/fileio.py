"""Atomic file writes, the one mechanism every output of mirseg goes through.

Each output is written to a hidden temp file in the target's folder (same file system, so the
final ``os.replace`` is atomic) and moved into place only once it is complete: readers (the YMIR
platform, a user's script) never see half a file, and a crash never destroys a result already
written. On any failure the temp file is removed and the target is left as it was.

Temp files are created like any other file, so the result has the usual mode the umask gives
(0644 under umask 022), never ``mkstemp``'s 0600: a platform process of another uid must be able to
read a model or a result.

* :func:`write_atomic`: bytes or text already in memory (YAML, TSV, encoded PNG/JPEG, monitor).
* :class:`AtomicFile`: a file object to stream into (a large JSON, a TSV written row by row);
  :meth:`~AtomicFile.commit` moves it into place, :meth:`~AtomicFile.abort` drops it. As a
  context manager it commits when the block succeeds.
* :func:`atomic_path`: a temp path for writers that insist on a file name (``torch.save``, ONNX
  export, ``np.lib.format.open_memmap``, ``shutil.copyfile``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _temp_sibling(path: Path) -> Path:
    """A fresh hidden name in ``path``'s folder; nothing is created."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _publish(tmp: Path, path: Path) -> None:
    """Move the complete temp file onto ``path`` (atomic within one file system); on failure drop the temp file."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block ends without error that file replaces ``path``.

    The caller creates the file at the yielded path (it does not exist yet); parent folders are
    created. If the block raises, the temp file is removed and ``path`` is untouched (a block that
    creates no file raises FileNotFoundError).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _publish(tmp, path)


class AtomicFile:
    """A new file that replaces ``path`` on :meth:`commit`; until then ``path`` is untouched.

    ``mode`` is ``"w"`` (text, ``encoding``) or ``"wb"``. Parent folders are created. ``write``
    goes to the temp file; :meth:`abort` (or an exception inside ``with``) removes it.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> None:
        if mode not in ("w", "wb"):
            raise ValueError(f"AtomicFile writes a new file: mode must be 'w' or 'wb', got {mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _temp_sibling(self.path)
        # "x": the name is fresh, so a file already there would be someone else's; never reuse it.
        self.file: IO[Any] = open(self._tmp, mode.replace("w", "x"), encoding=None if "b" in mode else encoding)
        self._done = False

    def write(self, data: Any) -> int:
        return self.file.write(data)

    def commit(self) -> Path:
        """Close the temp file and move it onto ``path``; returns ``path``."""
        if self._done:
            raise ValueError(f"{self.path}: already committed or aborted")
        self._done = True
        try:
            self.file.close()
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        _publish(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop what was written; ``path`` keeps its old content (or stays absent). Safe to call twice."""
        self._done = True
        self.file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` through a temp file; parent folders are created."""
    with AtomicFile(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
class AppendLog:
    """A text file that only ever grows by whole lines (a job's journal of finished work).

    :meth:`append` writes a line and flushes it, so it survives the process dying in any way; it is
    fsync'd at most every ``fsync_every`` seconds and on :meth:`close`, which bounds what a machine
    crash can lose. A process killed in the middle of a write leaves a last line without its newline:
    :func:`read_lines` drops it (and cuts it off the file) before the log is continued.
    """

    def __init__(self, path: str | os.PathLike, fsync_every: float = 1.0) -> None:
        self.path = Path(path)
        self.fsync_every = fsync_every
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  closed by close()
        self._synced = time.monotonic()

    def append(self, line: str) -> None:
        """Add ``line`` (no newline in it) and flush."""
        if "\n" in line:
            raise ValueError("an AppendLog line cannot contain a newline")
        self._file.write(line + "\n")
        self._file.flush()
        if time.monotonic() - self._synced >= self.fsync_every:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        """Flush, fsync and close (again: nothing)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    @staticmethod
    def read_lines(path: str | os.PathLike) -> tuple[list[str], bool]:
        """The complete lines of ``path`` and whether a torn last line (no newline) was cut off the file."""
        path = Path(path)
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1  # whatever follows the last newline is a write the process died in
        if keep < len(data):
            with open(path, "r+b") as f:
                f.truncate(keep)
        return data[:keep].decode("utf-8").splitlines(), keep < len(data)
