"""Atomic file writes: a temp file in the target's folder, then ``os.replace``.

Readers (the YMIR platform, a user's script) never see half a file, and a crash never destroys a
result already written.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path


def temp_sibling(path: str | os.PathLike) -> Path:
    """A fresh hidden temp name in ``path``'s folder (same file system, so ``os.replace`` is atomic).

    Open it with mode ``"x"``: unlike ``mkstemp`` (always 0600) the file gets the usual umask permissions.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` through a temp file; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
