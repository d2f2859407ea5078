"""One error type for everything a user can get wrong: bad specs, checkpoints, graphs, flags.

The CLI prints it as one line (`mobile: error: FILE: KEY: what was expected`) and exits with its
exit_code: 2 for bad input, 1 for a run that could not go on (RunError). Anything else that
escapes the main thread is a bug in mobile and keeps its traceback.
"""

from __future__ import annotations


class MobileError(Exception):
    """A user-facing error. `where` is the file, `key` the YAML key path or tensor name."""

    exit_code = 2

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


class RunError(MobileError):
    """A run that cannot go on though its input was accepted: non-finite logits, or a worker
    thread that failed (the original exception is its __cause__; --debug shows it)."""

    exit_code = 1


def worker_failure(error: BaseException, worker: str) -> MobileError:
    """What a worker thread's exception becomes in the thread that waits for it: the same
    MobileError, or a RunError naming the worker and the exception."""
    if isinstance(error, MobileError):
        return error
    return RunError(f"internal error in the {worker}: {type(error).__name__}: {error}")
