"""Reading a user's file: one error ladder for every reader (a spec, a compiled graph, a
checkpoint's config.json), so that each failure is the same one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mobile.errors import MobileError


def read_text(path: Path, error: type[MobileError] = MobileError, missing: str = "no such file") -> str:
    """The file's UTF-8 text, or `error` naming it: missing (the message `missing`), not UTF-8,
    or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(missing, where=path) from None
    except UnicodeDecodeError as e:
        raise error(f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start}", where=path) from None
    except OSError as e:
        raise error(f"cannot read: {e.strerror}", where=path) from None


def read_json(path: Path, error: type[MobileError] = MobileError, missing: str = "no such file") -> Any:
    """read_text, then JSON: malformed JSON is one more line naming where."""
    text = read_text(path, error, missing)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"malformed JSON: line {e.lineno}, column {e.colno}: {e.msg}", where=path) from None
