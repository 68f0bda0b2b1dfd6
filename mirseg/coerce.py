"""From text to typed values: YAML files, ``key=value`` arguments, coercion to a field's annotation.

The config classes (:mod:`mirseg.config`) use these to load a command's keys: :func:`read_yaml_mapping`
and :func:`parse_overrides` read them, :func:`coerce` turns each value into its field's type (the
YMIR web form sends numbers and booleans as strings) or raises a ``ConfigError`` naming the key, and
:func:`field_help` reads a field's documentation, the comment after it in the class source.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from mirseg.errors import ConfigError, MissingFileError

TRUE_WORDS = ("true", "t", "yes", "on", "1")
FALSE_WORDS = ("false", "f", "no", "off", "0", "none", "")


def parse_bool(value: Any, key: str) -> bool:
    """``value`` as a boolean, for every true/false key of mirseg and of YMIR's env.yaml.

    Accepts a bool, the numbers 0 and 1, None (false) and, in any case and with surrounding
    spaces, :data:`TRUE_WORDS` / :data:`FALSE_WORDS` (the empty string is false); anything else
    is a ConfigError naming ``key`` and the spellings.
    """
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = value.strip().lower() if isinstance(value, str) else None
    if text in TRUE_WORDS or text in FALSE_WORDS:
        return text in TRUE_WORDS
    raise ConfigError(f"{key}: expected true or false, got {value!r} (true: {', '.join(TRUE_WORDS)}; false: "
                      f"{', '.join(w or repr(w) for w in FALSE_WORDS)})")



def coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` converted to annotation ``tp``, or a ConfigError that names ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"{key}: cannot use {value!r}")
    if origin is Literal:
        text = str(value).strip().lower() if isinstance(value, str) else value
        if text in args:
            return text
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip()
            try:
                parsed = yaml.safe_load(text) if text else []
            except (yaml.YAMLError, RecursionError):
                parsed = None
            value = parsed if isinstance(parsed, list) else [p for p in text.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
        return tuple(coerce(key, v, a) for v, a in zip(value, args))
    if tp is bool:
        return parse_bool(value, key)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value  # exact, however large (float() would overflow)
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list, tuple, set)):
            raise ConfigError(f"{key}: expected text, got {value!r}")
        return "" if value is None else str(value)
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def field_help(cls: type) -> dict[str, str]:
    """The comment after each field in the class source: one place documents a key, for --help and docs."""
    helps: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]*#\s*(.+)$", line)
        if m:
            helps[m.group(1)] = m.group(2).strip()
    return helps


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=0.01", "crop_size=[256,256]"]`` -> dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"argument {item!r} is not key=value (e.g. max_iters=1000)")
        text = text.strip()
        try:
            value = yaml.safe_load(text) if text else ""
        except (yaml.YAMLError, RecursionError):
            value = text
        out[key.strip()] = value
    return out


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The ``key: value`` mapping of a YAML file, with clear errors for a missing or malformed file.

    Raises:
        MissingFileError: there is no such file.
        ConfigError: a folder, unreadable, not YAML, or not a mapping with text keys.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder, not a YAML file")
    if not p.is_file():
        raise MissingFileError(f"config file {p} does not exist")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    try:
        loaded = yaml.safe_load(data)  # bytes: PyYAML detects UTF-8/UTF-16 and rejects bad encodings itself
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{p} is nested too deeply to be a config file") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p} must hold a mapping of key: value, not a {type(loaded).__name__}")
    bad = [k for k in loaded if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{p}: {bad[0]!r} is not a key name; write key: value lines such as 'max_iters: 1000'")
    return loaded
