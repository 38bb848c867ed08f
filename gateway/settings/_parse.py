"""Typed parsing of the YAML configuration into frozen dataclasses.

Why hand-rolled instead of pydantic: the settings are a handful of small dataclasses, the error
messages must name the exact key path and the file (``cache.max_size in /etc/gw.yaml: expected a
size like '20GiB', got 'lots'``), and one less heavy dependency keeps the image small.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Optional[...]``, ``list[...]``,
``dict[str, ...]``, nested dataclasses, and the marker types :class:`Duration` (seconds as float,
written ``90``, ``"90s"``, ``"15m"``, ``"6h"``, ``"7d"``) and :class:`ByteSize` (bytes as int,
written ``1048576``, ``"512MiB"``, ``"20GiB"``, ``"1.5GB"``).
"""
from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from typing import Any, Optional, Union


class ConfigError(ValueError):
    """A configuration problem, with the key path and the source it came from.

    ``source`` names where the offending value came from (a file, ``env NAME``, ``flag --x`` or
    ``<embedded default>``) and ``line`` its line in that file, so the operator edits the right
    place. A problem found in several places is a :class:`ConfigErrors`.
    """

    def __init__(self, path: str, message: str, source: str = "", line: Optional[int] = None) -> None:
        self.path = path
        self.message = message
        self.source = source
        self.line = line
        super().__init__(self.describe())

    @property
    def errors(self) -> list["ConfigError"]:
        return [self]

    def describe(self) -> str:
        where = f" in {self.source}" if self.source else ""
        if self.line is not None:
            where += f" line {self.line}"
        return f"{self.path or '<root>'}{where}: {self.message}"


class ConfigErrors(ConfigError):
    """Every problem of one configuration at once, so the operator fixes them in one pass."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self._errors = list(errors)
        first = self._errors[0]
        super().__init__(first.path, first.message, first.source, first.line)

    @property
    def errors(self) -> list[ConfigError]:
        return self._errors

    def describe(self) -> str:
        if len(self._errors) == 1:
            return self._errors[0].describe()
        lines = "\n".join(f"  {e.describe()}" for e in self._errors)
        return f"{len(self._errors)} problems:\n{lines}"


def collect(errors: list[ConfigError]) -> None:
    """Raise the collected problems (if any) as one :class:`ConfigErrors`."""
    if errors:
        raise ConfigErrors([leaf for e in errors for leaf in e.errors])


#: ``field(metadata=INTERNAL)``: set by the loader, never a YAML key (e.g. ``Settings.source``)
INTERNAL = {"internal": True}


def secret(hint: str) -> dict:
    """``field(metadata=secret("use password_env or password_file"))``: a value resolved at load
    time from env/files; the YAML may not set it (secrets never live in config files)."""
    return {"internal": True, "secret": hint}


def at_least(value: float, floor: float, path: str, what: str) -> None:
    """Floors for values that parse but make no sense (``cache.max_size: 10``)."""
    if value < floor:
        raise ConfigError(path, f"must be at least {what}, got {value:g}")


class Duration(float):
    """Seconds. Parsed from a number or a string with unit s/m/h/d (``"6h"``)."""


class ByteSize(int):
    """Bytes. Parsed from an int or a string with unit B/KB/KiB/MB/MiB/GB/GiB/TB/TiB."""


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, None: 1,
}


def parse_duration(value: Any, path: str) -> Duration:
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a duration like '90s' or '6h', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(path, "a duration cannot be negative")
        return Duration(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return Duration(float(m.group(1)) * _DURATION_UNITS[m.group(2)])
    raise ConfigError(path, f"expected a duration like '90s', '15m', '6h' or '7d', got {value!r}")


def parse_size(value: Any, path: str) -> ByteSize:
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a size like '20GiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(path, "a size cannot be negative")
        return ByteSize(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            return ByteSize(int(float(m.group(1)) * _SIZE_UNITS[unit]))
    raise ConfigError(path, f"expected a size like '512MiB' or '20GiB', got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, path: str) -> Any:
    """Convert one YAML value to ``tp``, raising :class:`ConfigError` naming ``path``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if len(args) != len(typing.get_args(tp)):
                return None
            raise ConfigError(path, "a value is required")
        return convert(value, args[0], path)
    if tp is Any:
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in tp)
            raise ConfigError(path, f"expected one of {allowed}, got {value!r}") from None
    if tp is Duration:
        return parse_duration(value, path)
    if tp is ByteSize:
        return parse_size(value, path)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, path)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {type(value).__name__}")
        items, errors = [], []
        for i, v in enumerate(value):
            try:
                items.append(convert(v, item_tp, f"{path}[{i}]"))
            except ConfigError as exc:
                errors.append(exc)
        collect(errors)
        return tuple(items)
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__}")
        out, errors = {}, []
        for k, v in value.items():
            try:
                if not isinstance(k, str):
                    raise ConfigError(path, f"keys must be strings, got {k!r}")
                out[k] = convert(v, val_tp, f"{path}.{k}")
            except ConfigError as exc:
                errors.append(exc)
        collect(errors)
        return types.MappingProxyType(out)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(path, f"expected a string, got {value!r}")
    raise ConfigError(path, f"unsupported setting type {_type_name(tp)}")  # pragma: no cover


def from_mapping(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are errors, missing keys use defaults."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    all_fields = {f.name: f for f in dataclasses.fields(cls)}
    fields = {n: f for n, f in all_fields.items() if not f.metadata.get("internal")}
    # YAML keys use the same snake_case as the fields; dashes are accepted as a convenience.
    # Every problem of the mapping is collected, so one run of check-config lists them all.
    errors: list[ConfigError] = []
    kwargs = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        key_path = f"{path}.{key}" if path else str(key)
        hint = all_fields[name].metadata.get("secret") if name in all_fields else None
        if hint:
            errors.append(ConfigError(key_path, f"is a secret and is never read from the YAML "
                                      f"file; {hint}"))
            continue
        if name not in fields:
            known = ", ".join(sorted(fields))
            errors.append(ConfigError(key_path, f"unknown key (known keys here: {known})"))
            continue
        try:
            kwargs[name] = convert(value, hints[name], f"{path}.{name}" if path else name)
        except ConfigError as exc:
            errors.append(exc)
    collect(errors)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field without default
        raise ConfigError(path, str(exc)) from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)
    return obj
