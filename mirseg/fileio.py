"""Atomic file writes: a temp file in the target's folder, then ``os.replace``.

Readers (the YMIR platform, a user's script) never see half a file, and a crash never destroys a
result already written.
"""

from __future__ import annotations

import os
import secrets
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
