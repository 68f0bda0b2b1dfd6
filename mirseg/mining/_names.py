"""Case-insensitive name lookup with a "did you mean" hint, shared by every name-valued mining key."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from mirseg.errors import ConfigError


def lookup(key: str, name: str, choices: Iterable[str]) -> str:
    """``name`` lower-cased and stripped if it is one of ``choices``; else a ConfigError naming config ``key``."""
    choices = list(choices)
    value = str(name).strip().lower()
    if value in choices:
        return value
    hint = difflib.get_close_matches(value, choices, n=1)
    raise ConfigError(f"{key}: unknown value {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                      + f" Choose one of: {', '.join(choices)}")
