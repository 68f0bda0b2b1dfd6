"""mirseg's own error types and the exit codes of every command, defined once.

An error that the user can fix (a bad key, a missing file, an unreadable image) is a
``MirsegError``: the CLI prints its message as one line and exits with ``EXIT_ERROR``. Anything
else is a bug or an environment failure and keeps its traceback. The subclasses also derive from
the built-in type callers have always caught (``ValueError``, ``FileNotFoundError``), so code that
catches those keeps working.
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_FAILED = 1
"""The job ran but produced nothing usable (every image failed), or an unexpected error (traceback)."""
EXIT_ERROR = 2
"""Bad input or configuration: the one-line message says which file or key, and the fix."""
EXIT_SIGINT = 128 + signal.SIGINT  # 130, the shell's convention for a job ended by Ctrl-C
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143, what `docker stop` and schedulers expect


class MirsegError(Exception):
    """An error in the user's input or environment, explained by its message (one line, no traceback)."""


class ConfigError(MirsegError, ValueError):
    """A configuration key, value or file that cannot be used."""


class MissingFileError(MirsegError, FileNotFoundError):
    """A file or folder the job needs is not there."""


class FileFormatError(MirsegError, ValueError):
    """A file is there but is not what the job needs (not a checkpoint, not a mirseg export, unreadable text)."""


class DependencyError(MirsegError, RuntimeError):
    """An optional package the job needs is not installed; the message says what to install."""


class Interrupted(MirsegError):
    """The job stopped on SIGINT or SIGTERM after saving what it had; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
