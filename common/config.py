"""TOML loading and the dataclass plumbing every config in the project shares.

TOML keys are kebab-case (Flower's convention), attributes snake_case; the conversion and
the rejection of unknown keys happen here, once, so every process fails at start with a
message naming the bad key instead of misbehaving later. Paths in a config file are
resolved here too (`resolve_path`), against the file's folder, with one meaning of "".
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from common.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

T = TypeVar("T")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file into a dict with snake_case keys at every level."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from err
    return snake_keys(data)


def kebab(name: str) -> str:
    """The TOML spelling of an attribute name: `max_k` -> `max-k` (for messages)."""
    return name.replace("_", "-")


def resolve_path(value: Any, base: Path | str, where: str) -> str | None:
    """A config path made absolute: `~` expanded, a relative one joined to `base` (the
    config file's folder), `..` collapsed, symlinks left alone (a watched `latest` link
    must keep being followed).

    "" means *not set* and gives None, never `Path("")`, which would be the working
    directory. Anything but a string is a ConfigError naming `where`.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a path string, got {value!r}")
    if not value:
        return None
    return os.path.abspath(Path(base) / Path(value).expanduser())


def resolve_paths(
    table: dict[str, Any], names: Iterable[str], base: Path | str, section: str
) -> None:
    """`resolve_path` on the keys `names` of `table`, in place. A key set to "" is removed:
    not set, so the field keeps its default (None or ""). `section` prefixes the key in
    messages ("auth" -> "auth.tls-cert"); "" for top-level keys."""
    for name in names:
        if name in table:
            where = f"{section}.{kebab(name)}" if section else kebab(name)
            resolved = resolve_path(table[name], base, where)
            if resolved is None:
                del table[name]
            else:
                table[name] = resolved


def snake_keys(data: Any) -> Any:
    if isinstance(data, dict):
        return {str(k).replace("-", "_"): snake_keys(v) for k, v in data.items()}
    if isinstance(data, list):
        return [snake_keys(v) for v in data]
    return data


def from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and coercing simple types.

    Nested dataclass fields are built recursively; lists become tuples for frozen classes.
    `where` names the file or section for the error message.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        allowed = ", ".join(kebab(k) for k in fields)
        names = ", ".join(kebab(k) for k in unknown)
        raise ConfigError(f"{where}: unknown key(s) {names}; allowed: {allowed}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{kebab(name)}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from err


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {hint}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)  # type: ignore[arg-type]
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, where) for v in value)
    if origin is dict or hint is Any or origin is typing.Literal:
        if origin is typing.Literal and value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Path and isinstance(value, str):
        return Path(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
