"""Progress on long work: tqdm's bar on a terminal; elsewhere (a log file, a pipe, CI), where a bar's
carriage returns would pile up into one line, a plain line on stderr every few seconds."""

from __future__ import annotations

import sys
import time

PERIOD_S = 5.0


def progress(total: int, desc: str, unit: str):
    """A context manager with update(n): tqdm when stderr is a terminal, else Lines."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False)
    return Lines(total, desc, unit)


class Lines:
    """`desc: done/total unit (pct%, rate/s, about N s left)` on stderr, at most every PERIOD_S seconds."""

    def __init__(self, total: int, desc: str, unit: str, period_s: float = PERIOD_S):
        self.total, self.desc, self.unit, self.period_s = total, desc, unit, period_s
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.period_s:
            self.last = now
            rate = self.done / (now - self.start)
            left = (self.total - self.done) / rate if rate else float("inf")
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%, "
                  f"{rate:.1f} {self.unit}/s, about {left:.0f} s left)", file=sys.stderr, flush=True)

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc) -> None:
        return None
