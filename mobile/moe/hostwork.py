"""The host worker: runs a layer's host-placed expert pairs (mobile.moe.host) on a thread of its
own, so that the device computes its share meanwhile; the layer then waits for both.

On a machine with a GPU the host is the machine's CPU, and nothing is emulated. On a CPU-only
machine the "device" is this same CPU, so the host's speed is emulated the way the link's is
(mobile.moe.transfer): the kernel runs for real, so the numbers are real, and its time is padded
to `ratio` times what the device takes to compute the same pairs (HostModel). Ratio 16 is an
RTX 4090's HBM (about 1 TB/s) over dual-channel DDR5 (about 60 GB/s).

A failure in the worker reaches every job waiting and every later submit, as the copy worker's
does, so that no wait blocks forever.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mobile.errors import worker_failure
from mobile.moe.placement import Costs
from mobile.moe.rule import KeepRule, kept_weights
from mobile.moe.transfer import serial_end

DEFAULT_HOST_RATIO = 16.0  # device HBM over host DRAM read bandwidth: 1 TB/s / 60 GB/s


@dataclass(frozen=True)
class HostModel:
    """How host work is timed. kind 'real': as it runs. 'emulated': a job takes at least `ratio`
    times `pair_seconds` (the device's time for one (token, expert) pair) per pair."""

    kind: str = "real"
    ratio: float = DEFAULT_HOST_RATIO
    pair_seconds: float = 0.0

    def duration(self, pairs: int) -> float:
        return self.ratio * self.pair_seconds * pairs if self.kind == "emulated" else 0.0


class HostJob:
    """One layer's host pairs: out[tokens[p]] += weights[p] * expert_p(x[tokens[p]]). `wait()`
    blocks until it is done and returns out."""

    def __init__(self, x: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, tag: str = ""):
        self.x, self.tokens, self.rows, self.weights, self.tag = x, tokens, rows, weights, tag
        self.out = torch.zeros_like(x)
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.start_s = self.end_s = 0.0

    @property
    def pairs(self) -> int:
        return self.tokens.numel()

    def wait(self) -> tuple[torch.Tensor, float]:
        """(out, seconds the caller spent blocked). Raises what the worker failed with, if it did."""
        t0 = time.perf_counter()
        self.done.wait()
        if self.error is not None:
            raise worker_failure(self.error, "host worker") from self.error
        return self.out, time.perf_counter() - t0


def host_job(rows: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, rule: KeepRule,
             only: list[int] | None = None, tag: str = "") -> HostJob:
    """The job that computes, from a layer's host rows [E, row], the pairs of x [T, H] that the
    rule keeps (weights, ids [T, K], host tensors), only those of the experts `only` where given."""
    keep = rule.keep(weights).expand_as(weights)  # a "top" rule's is one row for every token
    kept = kept_weights(weights, keep, rule.rescale)  # rescaled over everything the rule keeps, as the op does
    if only is not None:
        keep = keep & torch.isin(ids, torch.tensor(only, dtype=ids.dtype))
    token, k = keep.nonzero(as_tuple=True)
    addresses = rows.data_ptr() + ids[token, k].to(torch.int64) * rows.stride(0) * rows.element_size()
    return HostJob(x.contiguous(), token.to(torch.int32), addresses, kept[token, k].contiguous(), tag)


@dataclass(frozen=True)
class Hosted:
    """What the host needs to compute a layer's misses, as the layer's one read brought it (host
    tensors): the hidden rows x [T, H] and the router's weights and ids [T, K], and the node's rule."""

    x: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor
    rule: KeepRule


Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class HostWorker:
    """Runs HostJobs one at a time, in order, on a thread (the kernel's own threads do the work
    inside; ctypes releases the GIL for the call, so Python on the main thread goes on).
    kernel(x, out, tokens, rows, weights): mobile.moe.host.HostExperts."""

    def __init__(self, kernel: Kernel, model: HostModel, trace: list | None = None):
        self.kernel, self.model, self.trace = kernel, model, trace
        self.busy_s = 0.0  # seconds the host spent on jobs (emulated: padded)
        self._queue: deque[HostJob] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._failed: BaseException | None = None
        self._free = 0.0  # when the host is next free (jobs are serial)
        self._thread = threading.Thread(target=self._run, name="mobile-host", daemon=True)
        self._thread.start()

    def submit(self, job: HostJob) -> HostJob:
        with self._cv:
            if self._failed is not None:
                raise worker_failure(self._failed, "host worker") from self._failed
            if self._closed:
                raise RuntimeError("the host worker is closed")
            self._queue.append(job)
            self._cv.notify()
        return job

    @property
    def failure(self) -> BaseException | None:
        return self._failed

    def stats(self) -> dict:
        """What a run's stats say of the host (mobile.runtime.stats; docs/stats.md)."""
        # us -> s -> us: rounded to a picosecond, so a unit given as 45.87 us reads 45.87 again
        emulated = {"host_ratio": self.model.ratio, "host_pair_us": round(self.model.pair_seconds * 1e6, 6)} \
            if self.model.kind == "emulated" else {}
        threads = getattr(self.kernel, "threads", None)  # mobile.moe.host.HostExperts's
        return {"host_busy_s": self.busy_s, "host": self.model.kind, **emulated,
                **({"host_threads": threads} if threads is not None else {})}

    def free_in(self, now: float) -> float:
        """Seconds from `now` until the host has finished what it was given (as far as it knows)."""
        return max(0.0, self._free - now)

    def _run(self) -> None:
        job = None
        try:
            while True:
                with self._cv:
                    while not self._queue and not self._closed:
                        self._cv.wait()
                    if not self._queue:
                        return
                    job = self._queue.popleft()
                self._compute(job)
                job = None
        except BaseException as e:  # whatever it is, the threads waiting for a job must hear of it
            self._fail(e, job)

    def _compute(self, job: HostJob) -> None:
        start = time.perf_counter()
        self.kernel(job.x, job.out, job.tokens, job.rows, job.weights)
        job.start_s, job.end_s = start, serial_end(start, self._free, self.model.duration(job.pairs))
        self._free = job.end_s
        self.busy_s += job.end_s - job.start_s
        if self.trace is not None:
            self.trace.append((job.tag, "host", "host", job.start_s, job.end_s, 0, {"pairs": job.pairs}))
        job.done.set()

    def _fail(self, error: BaseException, current: HostJob | None) -> None:
        with self._cv:
            self._failed = error
            jobs = list(self._queue) + ([current] if current is not None else [])
            self._queue.clear()
        for job in jobs:
            if not job.done.is_set():
                job.error = error
                job.done.set()

    def close(self) -> None:
        """Finish what is queued and stop the thread (so that no thread outlives the run)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)


@dataclass
class HostPlacement:
    """A cache's second place for its misses: the rule ("both": every miss on the host and copied
    in behind; "choose": mobile.moe.placement.choose; "static": every miss on the host, of every
    step, the cache a fixed hot set; "move": every miss moved, where adaptive found that the host
    cannot win: mobile.runtime.load.host_placement), the host worker, and the costs it weighs."""

    rule: str
    worker: HostWorker
    costs: Costs
