"""The transfer engine: host -> device expert copies that overlap compute.

On CUDA a copy stream runs the copies; each job records an event, and the compute stream waits
on exactly the events of the experts it is about to use. On the CPU a worker thread does the
copies. There the "link" can be emulated: a copy of n bytes occupies the link for
latency + n / bandwidth seconds (the worker sleeps out the rest, releasing the GIL), so a CPU-only
machine behaves like a PCIe-bound system. Demand copies always go before prefetches.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field

import torch

DEMAND, PREFETCH = 0, 1  # job priorities: lower runs first


@dataclass
class LinkModel:
    """How transfers are timed. kind: 'real' (just copy) or 'emulated' (throttled to gbps)."""

    kind: str = "real"
    gbps: float | None = None
    latency_s: float = 10e-6

    def duration(self, nbytes: int) -> float:
        if self.kind != "emulated" or not self.gbps:
            return 0.0
        return self.latency_s + nbytes / (self.gbps * 1e9)


@dataclass(order=True)
class _Queued:
    priority: int
    seq: int
    job: CopyJob = field(compare=False)


class CopyJob:
    """One host -> device copy. `wait()` blocks the caller (CPU) or the compute stream (CUDA)."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, priority: int, tag: str):
        self.src, self.dst, self.priority, self.tag = src, dst, priority, tag
        self.nbytes = src.numel() * src.element_size()
        self.done = threading.Event()
        self.event: torch.cuda.Event | None = None
        self.start_s = self.end_s = 0.0
        self.started = False  # set by the worker, under the engine's lock
        self.cancelled = False

    def wait(self) -> float:
        """Block until the copy is usable; returns seconds the host spent blocked."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)  # the GPU waits, not the host
            return 0.0
        if self.done.is_set():
            return 0.0
        t0 = time.perf_counter()
        self.done.wait()
        return time.perf_counter() - t0


class CopyEngine:
    """Runs CopyJobs in priority order on a copy stream (CUDA) or a worker thread (CPU)."""

    def __init__(self, device: torch.device, link: LinkModel, trace: list | None = None):
        self.device, self.link, self.trace = device, link, trace
        self.cuda = device.type == "cuda"
        self.busy_s = 0.0  # link time spent copying
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            return
        self._queue: list[_Queued] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._link_free = 0.0
        self._worker = threading.Thread(target=self._run, name="mobile-copy", daemon=True)
        self._worker.start()

    def submit(self, src: torch.Tensor, dst: torch.Tensor, priority: int = DEMAND, tag: str = "") -> CopyJob:
        job = CopyJob(src, dst, priority, tag)
        if self.cuda:
            # the slot may still be read by compute already queued (the previous token's experts):
            # the copy starts after it. Fetches follow a host sync, so this rarely delays anything.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                job.dst.copy_(job.src, non_blocking=True)
                job.event = torch.cuda.Event()
                job.event.record(self.stream)
            job.done.set()
            return job
        with self._cv:
            heapq.heappush(self._queue, _Queued(priority, next(self._seq), job))
            self._cv.notify()
        return job

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed and not self._queue:
                    return
                job = heapq.heappop(self._queue).job
                if job.started or job.done.is_set():
                    continue  # a duplicate entry left by promote()
                if job.cancelled:
                    job.done.set()
                    continue
                job.started = True
            start = time.perf_counter()
            job.dst.copy_(job.src)
            # The emulated link is serial: this copy ends `duration` after it could start.
            end = max(start, self._link_free) + self.link.duration(job.nbytes)
            now = time.perf_counter()
            if end > now:
                time.sleep(end - now)
            job.start_s, job.end_s = start, max(end, time.perf_counter())
            self._link_free = job.end_s
            self.busy_s += job.end_s - job.start_s
            if self.trace is not None:
                self.trace.append((job.tag, "prefetch" if job.priority == PREFETCH else "fetch", "copy",
                                   job.start_s, job.end_s, job.nbytes))
            job.done.set()

    def promote(self, job: CopyJob) -> None:
        """A queued prefetch is now needed by compute: give it demand priority."""
        if self.cuda or job.priority == DEMAND:
            return
        with self._cv:
            if not job.started:
                job.priority = DEMAND
                heapq.heappush(self._queue, _Queued(DEMAND, next(self._seq), job))

    def retire(self, job: CopyJob) -> None:
        """Its slot is being reused: cancel the copy if it has not started, else let it finish."""
        if self.cuda:
            return  # the copy stream runs copies in issue order
        with self._cv:
            if not job.started:
                job.cancelled = True
                job.done.set()
                return
        job.done.wait()

    def close(self) -> None:
        if self.cuda:
            return
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._worker.join(timeout=5)
