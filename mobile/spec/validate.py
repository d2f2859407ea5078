"""The generic validator: a plain dict -> the schema's dataclasses, by their field types. Unknown
keys, wrong types and moved keys are errors naming the YAML key path and what was expected."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal

from mobile.errors import SpecError


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


# keys of older specs (and of graphs compiled from them) that now live elsewhere
MOVED_KEYS = {"runtime.expert_cache.eviction": "policy.eviction (auto, lru or lfu; auto picks by policy)"}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def build(cls: type, data: dict, path: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = [k for k in data if k not in fields]
    for key in (_join(path, str(k)) for k in unknown):
        if key in MOVED_KEYS:
            raise SpecError(f"this key moved to {MOVED_KEYS[key]}", where=where, key=key)
    if unknown:
        raise SpecError(f"unknown key (expected one of: {', '.join(fields)})",
                        where=where, key=_join(path, str(unknown[0])))
    values = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name in data:
            values[name] = _convert(hints[name], data[name], key, where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError("required key is missing", where=where, key=key)
    return cls(**values)


def _convert(tp: Any, value: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key, where)
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 reads an unquoted on / off as true / false
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise SpecError(f"expected one of {choices}, got {value!r}", where=where, key=key)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"expected a list, got {kind_of(value)}", where=where, key=key)
        return [_convert(args[0], v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"expected a mapping, got {kind_of(value)}", where=where, key=key)
        return {str(k): _convert(args[1], v, _join(key, str(k)), where) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(f"expected a mapping, got {kind_of(value)}", where=where, key=key)
        return build(tp, value, key, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"expected true or false, got {kind_of(value)}", where=where, key=key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"expected an integer, got {kind_of(value)} {value!r}", where=where, key=key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"expected a number, got {kind_of(value)} {value!r}", where=where, key=key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"expected a string, got {kind_of(value)} {value!r}", where=where, key=key)
        return value
    raise TypeError(f"spec schema has an unsupported type {tp!r} at {key}")  # a bug in this file



_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """'6GiB' -> 6442450944. Accepts B, kB/MB/GB/TB (powers of 10) and KiB/MiB/GiB/TiB."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a byte count such as '6GiB' or '512MB', got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
