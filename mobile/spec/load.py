"""Loading a spec: a YAML file (duplicate keys refused) or a plain dict, validated into the schema
(mobile.spec.validate) and checked for consistency (mobile.spec.checks); and deriving a spec with
other policy or runtime fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from mobile.errors import SpecError
from mobile.files import read_text
from mobile.spec.checks import check_consistency
from mobile.spec.schema import Spec
from mobile.spec.validate import build, kind_of


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    text = read_text(path, SpecError)
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKey as e:
        raise SpecError(str(e), where=path, key=e.key) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"malformed YAML: {at}{problem}", where=path) from None
    return spec_from_dict(data, source=str(path))


class DuplicateKey(Exception):
    def __init__(self, key: str, first: int, second: int):
        self.key = key
        super().__init__(f"duplicate key: first on line {first}, again on line {second} (YAML would keep the last)")


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error, not the last one winning."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKey(str(key), seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def spec_from_dict(data: Any, source: str | None = None) -> Spec:
    where = source or "<spec>"
    if not isinstance(data, dict):
        raise SpecError(f"expected a mapping at the top level, got {kind_of(data)}", where=where)
    spec = build(Spec, {k: v for k, v in data.items()}, "", where)
    spec = dataclasses.replace(spec, source=source)
    check_consistency(spec)
    return spec


def with_policy(spec: Spec, **changes: Any) -> Spec:
    """The spec with policy fields replaced (e.g. from --policy), validated again."""
    return _with(spec, "policy", changes)


def with_runtime(spec: Spec, **changes: Any) -> Spec:
    """The spec with runtime fields replaced (e.g. from --expert-format), validated again. A native
    format takes no group size, so switching to it drops the spec's."""
    if changes.get("expert_format") == "native":
        changes.setdefault("expert_group_size", None)
    return _with(spec, "runtime", changes)


def _with(spec: Spec, section: str, changes: dict[str, Any]) -> Spec:
    changed = dataclasses.replace(spec, **{section: dataclasses.replace(getattr(spec, section), **changes)})
    return spec_from_dict(changed.to_dict(), source=spec.source)


def format_changes(expert_format: str | None, expert_group_size: int | None) -> dict[str, Any]:
    """The runtime fields --expert-format / --expert-group-size override, for with_runtime."""
    return {k: v for k, v in (("expert_format", expert_format), ("expert_group_size", expert_group_size))
            if v is not None}


def dump_spec(spec: Spec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=None, width=100)


