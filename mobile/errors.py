"""One error type for everything a user can get wrong: bad specs, checkpoints, graphs, flags.

The CLI prints it as one line (`mobile: error: FILE: KEY: what was expected`) and exits 2.
Anything else that escapes is a bug in mobile and keeps its traceback.
"""

from __future__ import annotations


class MobileError(Exception):
    """A user-facing error. `where` is the file, `key` the YAML key path or tensor name."""

    def __init__(self, message: str, where: object | None = None, key: str | None = None):
        self.message = message
        self.where = None if where is None else str(where)
        self.key = key
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = [p for p in (self.where, self.key) if p]
        text = ": ".join([*parts, self.message])
        return " ".join(text.split())  # one line, always


class SpecError(MobileError):
    pass


class CheckpointError(MobileError):
    pass


class GraphError(MobileError):
    pass
