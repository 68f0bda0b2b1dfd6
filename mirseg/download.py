"""Fetching one published file: streamed with a progress bar, checked against the sha256 in its name.

Published weight files (mmcv's, torchvision's, mmseg's model zoo) end in ``-<first 8 hex digits of
their sha256>.pth``. ``fetch`` streams the file into a temp file beside the target, hashes it on
the way, and renames it into place only when the hash matches: a failed or refused download leaves
nothing behind, and a file already there and verified is not fetched again. Nothing calls this
unless the user asked for a download (``mirseg weights download``, the Dockerfile).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from mirseg.errors import MirsegError
from mirseg.fileio import AtomicFile

CHUNK = 1 << 20  # bytes read (and hashed) at a time
TIMEOUT_S = 60  # seconds without data before a download is given up
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


class DownloadError(MirsegError, RuntimeError):
    """A download failed or its checksum did not match; nothing was left at the target."""


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in chunks (model files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_in_name(name: str) -> str:
    """The sha256 prefix a published file carries in its name (``resnet18-f37072fd.pth`` -> ``f37072fd``), or ''."""
    m = _HASH_IN_NAME.search(name)
    return m.group(1) if m else ""


@dataclass(frozen=True)
class Fetched:
    """What ``fetch`` did: the file, its sha256 and whether it was downloaded (False: already there, verified)."""

    path: Path
    sha256: str
    downloaded: bool


def fetch(url: str, dest: str | os.PathLike, sha256_prefix: str, progress: bool = True) -> Fetched:
    """Download ``url`` to ``dest`` unless a file with the right hash is there; the hash must start with the prefix.

    The file is written through :class:`mirseg.fileio.AtomicFile` and moved onto ``dest`` once
    verified; any failure removes the temp file and raises
    ``DownloadError`` naming the URL and what to do.
    """
    dest = Path(dest)
    if not sha256_prefix:
        raise DownloadError(f"{dest.name}: no sha256 prefix to check the download against")
    if dest.is_file():
        have = sha256_file(dest)
        if have.startswith(sha256_prefix):
            return Fetched(dest, have, downloaded=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(dest, "wb") as out:  # replaces dest only when verified; any failure leaves nothing
        digest = _stream(url, out.file, progress, dest)
        if not digest.startswith(sha256_prefix):
            raise DownloadError(f"{url}: the downloaded file's sha256 is {digest}, but its name says it starts with "
                                f"{sha256_prefix}: refused, nothing was kept. The server sent another or a damaged "
                                "file; check the URL (--url-base) or fetch it again")
    return Fetched(dest, digest, downloaded=True)


def _stream(url: str, out: BinaryIO, progress: bool, dest: Path) -> str:
    """Copy ``url`` into the open file ``out`` (bound for ``dest``); returns the sha256 of what was received."""
    digest = hashlib.sha256()
    hint = ("; check the address and your network (a proxy: set https_proxy), use --url-base for a mirror, or "
            f"copy the file by hand to {dest}")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=not progress, mininterval=1.0) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"could not fetch {url}: HTTP {exc.code} {exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # refused, timed out, cut off
        reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
        raise DownloadError(f"could not fetch {url}: {reason}{hint}") from None
    if total is not None and received != total:
        raise DownloadError(f"could not fetch {url}: the connection closed after {received} of {total} bytes{hint}")
    return digest.hexdigest()
