"""One clock for the measured timeline, on the device's own time.

On the CPU a span's ends are `time.perf_counter()` readings. On CUDA the host only queues work, so
host readings would time kernel launches, not kernels: a mark is a CUDA event recorded on the
current stream, and it becomes seconds only when asked, after the work has run. Every event is
placed on the same timeline as perf_counter, through one base event recorded at a known host
time, so copy spans (the copy streams) and compute spans (the compute stream) line up in a trace.
"""

from __future__ import annotations

import time

import torch

Mark = float | torch.cuda.Event


class DeviceClock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            torch.cuda.synchronize(device)
            self.base = torch.cuda.Event(enable_timing=True)
            self.base.record(torch.cuda.current_stream(device))
            self.base.synchronize()
            self.base_s = time.perf_counter()

    def __call__(self, stream: torch.cuda.Stream | None = None) -> Mark:
        """Now: on CUDA, when the device reaches this point of `stream` (default: the current one)."""
        return self.event(stream) if self.cuda else time.perf_counter()

    def event(self, stream: torch.cuda.Stream | None = None) -> torch.cuda.Event:
        """CUDA: a timing event recorded on `stream` (default: the current one)."""
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    def seconds(self, mark: Mark) -> float:
        """A mark on the perf_counter timeline (CUDA: waits for its event to have happened)."""
        if isinstance(mark, float):
            return mark
        mark.synchronize()
        return self.base_s + self.base.elapsed_time(mark) / 1e3


_CLOCKS: dict[torch.device, DeviceClock] = {}


def clock_for(device: torch.device) -> DeviceClock:
    """The device's one clock: every span measured on it shares its base."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _CLOCKS:
        _CLOCKS[device] = DeviceClock(device)
    return _CLOCKS[device]


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """Total time covered by possibly overlapping spans (two copy streams can both be busy)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total
