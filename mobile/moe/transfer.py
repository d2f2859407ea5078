"""The transfer engine: host -> device expert copies that overlap compute.

On the CPU a worker thread does the copies, demand copies before prefetches (a queued prefetch
that compute now needs is promoted; one whose slot is reused before it starts is cancelled). The
"link" is emulated there: a copy of n bytes occupies it for latency + n / bandwidth seconds (the
worker sleeps out the rest, releasing the GIL), so a CPU-only machine behaves like a PCIe-bound
system.

On CUDA the copies run on two copy streams: demand copies on a high-priority stream, prefetches on
a low-priority one in chunks, so that a demand copy issued after a prefetch does not queue behind
it but gets the link between two of its chunks. A copy into a slot waits only for the last compute
that read that slot and for a copy into the same slot still in flight (events the caller passes),
never for all compute already queued. The compute stream waits on exactly the events of the copies
it is about to use. Every copy, and every wait of the compute stream, is timed with CUDA events
(mobile.runtime.devclock) and read back off the decode path (`collect`), so the link's busy time, the
stall and the trace mean on a GPU what they mean on the CPU. The link is real there: emulating one
on CUDA is refused by the engine. An emulated link's bandwidth is given, or calibrated against the
time this machine takes to compute one expert (`calibrated_gbps`).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field

import torch

from mobile.compiler.costs import native_expert_bytes
from mobile.errors import worker_failure
from mobile.moe.layout import ExpertMLP
from mobile.moe.op import ExpertKind
from mobile.moe.rule import KeepRule
from mobile.runtime.devclock import clock_for, union_seconds
from mobile.spec.schema import Spec

DEMAND, PREFETCH = 0, 1  # job priorities: lower runs first
PREFETCH_CHUNK_BYTES = 4 << 20  # CUDA: a prefetch is copied in pieces of this size (a demand copy gets in between)


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
    """One host -> device copy. On the CPU `wait()` blocks the caller until it has landed; on CUDA
    `event` marks its end on its copy stream (CopyEngine.wait makes the compute stream wait on it)."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, priority: int, tag: str, detail: dict | None = None):
        """tag: what asked for the copy (the graph node, so measured spans meet planned ones);
        detail: what the trace shows of it besides (the expert and the slot)."""
        self.src, self.dst, self.priority, self.tag, self.detail = src, dst, priority, tag, detail or {}
        self.nbytes = src.numel() * src.element_size()
        self.done = threading.Event()
        self.event: torch.cuda.Event | None = None
        self.start_mark: torch.cuda.Event | None = None  # CUDA: its start on the copy stream
        self.start_s = self.end_s = 0.0
        self.started = False  # set by the worker, under the engine's lock
        self.cancelled = False
        self.error: BaseException | None = None  # the worker failed: the copy never landed

    def wait(self) -> float:
        """CPU: block until the copy has landed; returns seconds the host spent blocked. Raises
        what the worker failed with, if it did."""
        t0 = time.perf_counter()
        self.done.wait()
        if self.error is not None:
            raise worker_failure(self.error, "copy worker") from self.error
        return time.perf_counter() - t0


class CopyEngine:
    """Runs CopyJobs in priority order on two copy streams (CUDA) or a worker thread (CPU)."""

    def __init__(self, device: torch.device, link: LinkModel, trace: list | None = None):
        self.device, self.link, self.trace = device, link, trace
        self.cuda = device.type == "cuda"
        self.busy_s = 0.0  # link time spent copying
        if self.cuda:
            self.clock = clock_for(device)
            # a lower number is a higher priority; torch maps values past the range to its ends
            self.streams = {DEMAND: torch.cuda.Stream(device, priority=-1),
                            PREFETCH: torch.cuda.Stream(device, priority=0)}
            self.timed: list[CopyJob] = []  # copies whose spans are not read yet (see collect)
            self.stalls: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # the compute stream's waits, likewise
            return
        self._queue: list[_Queued] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._failed: BaseException | None = None  # what ended the worker; every copy then fails with it
        self._link_free = 0.0
        self._worker = threading.Thread(target=self._run, name="mobile-copy", daemon=True)
        self._worker.start()

    def submit(self, src: torch.Tensor, dst: torch.Tensor, priority: int = DEMAND, tag: str = "",
               after: list[torch.cuda.Event] | tuple = (), detail: dict | None = None) -> CopyJob:
        """Queue a copy. after (CUDA): events it must follow, such as the last compute that read the
        slot and a copy into the same slot still in flight (the CPU worker orders those itself)."""
        job = CopyJob(src, dst, priority, tag, detail)
        if self.cuda:
            stream = self.streams[priority]
            for event in after:
                stream.wait_event(event)
            job.start_mark = self.clock.event(stream)
            with torch.cuda.stream(stream):
                if priority == PREFETCH and job.nbytes > PREFETCH_CHUNK_BYTES:
                    step = max(1, PREFETCH_CHUNK_BYTES // src.element_size())
                    s, d = src.reshape(-1), dst.reshape(-1)
                    for i in range(0, s.numel(), step):
                        d[i:i + step].copy_(s[i:i + step], non_blocking=True)
                else:
                    dst.copy_(src, non_blocking=True)
            job.event = self.clock.event(stream)
            job.done.set()  # issued: from here on the stream orders it
            self.timed.append(job)
            return job
        with self._cv:
            if self._failed is not None:
                raise worker_failure(self._failed, "copy worker") from self._failed
            heapq.heappush(self._queue, _Queued(priority, next(self._seq), job))
            self._cv.notify()
        return job

    def wait(self, jobs: list[CopyJob]) -> float:
        """Make compute wait for these copies. CPU: the host blocks, and the seconds it spent are
        returned. CUDA: the compute stream waits on their events, the host does not; the stall is
        timed with events and counted by collect()."""
        if not self.cuda:
            return sum(job.wait() for job in jobs)
        if jobs:
            stream = torch.cuda.current_stream(self.device)
            before = self.clock.event(stream)
            for job in jobs:
                assert job.event is not None  # issued on CUDA: recorded at submit
                stream.wait_event(job.event)
            self.stalls.append((before, self.clock.event(stream)))
        return 0.0

    def collect(self) -> float:
        """CUDA: read the timing events of the copies and waits since the last call (this waits for
        them to have happened: call it off the decode path). Adds the copies' union to busy_s and
        their spans to the trace; returns the compute stream's stall seconds. CPU: 0 (the worker
        and wait() count as they go)."""
        if not self.cuda:
            return 0.0
        seconds = self.clock.seconds
        spans = []
        for job in self.timed:
            assert job.start_mark is not None and job.event is not None
            job.start_s, job.end_s = seconds(job.start_mark), seconds(job.event)
            spans.append((job.start_s, job.end_s))
            self._traced(job)
        self.busy_s += union_seconds(spans)
        stall = sum(max(0.0, seconds(b) - seconds(a)) for a, b in self.stalls)
        self.timed.clear()
        self.stalls.clear()
        return stall

    def _run(self) -> None:
        job = None
        try:
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
                self._copy(job)
        except BaseException as e:  # whatever it is, the threads waiting for a copy must hear of it
            self._fail(e, job)

    @property
    def link_free(self) -> float:
        """When the emulated link is next free (perf_counter seconds; CUDA: not tracked, 0)."""
        return 0.0 if self.cuda else self._link_free

    @property
    def failure(self) -> BaseException | None:
        """What the worker failed with (CPU), or None."""
        return None if self.cuda else self._failed

    def _fail(self, error: BaseException, current: CopyJob | None) -> None:
        """The worker is ending with `error`: the copy in hand and every queued one fail with it,
        and so does every later submit, so that no wait() blocks forever."""
        with self._cv:
            self._failed = error
            jobs = [q.job for q in self._queue] + ([current] if current is not None else [])
            self._queue.clear()
        for job in jobs:
            if not job.done.is_set():
                job.error = error
                job.done.set()

    def _copy(self, job: CopyJob) -> None:
        start = time.perf_counter()
        job.dst.copy_(job.src)
        job.start_s, job.end_s = start, serial_end(start, self._link_free, self.link.duration(job.nbytes))
        self._link_free = job.end_s
        self.busy_s += job.end_s - job.start_s
        self._traced(job)
        job.done.set()

    def _traced(self, job: CopyJob) -> None:
        """A timed copy's span in the measured trace (the executor's format: Engine.write_trace)."""
        if self.trace is not None:
            self.trace.append((job.tag, "prefetch" if job.priority == PREFETCH else "fetch", "copy",
                               job.start_s, job.end_s, job.nbytes, job.detail))

    def promote(self, job: CopyJob) -> None:
        """A queued prefetch is now needed by compute: give it demand priority (CPU; on CUDA it is
        issued already, and its chunks share the link with the demand stream)."""
        if self.cuda or job.priority == DEMAND:
            return
        with self._cv:
            if not job.started:
                job.priority = DEMAND
                heapq.heappush(self._queue, _Queued(DEMAND, next(self._seq), job))

    def retire(self, job: CopyJob) -> None:
        """Its slot is being reused: cancel the copy if it has not started, else let it finish (CPU;
        on CUDA the new copy follows its event instead: `after`)."""
        if self.cuda:
            return
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


def serial_end(start: float, free: float, duration: float) -> float:
    """An emulated serial resource (the link; the host: mobile.moe.hostwork): work that started at
    `start` ends `duration` after the resource was free (perf_counter seconds). Sleeps out what the
    real work left of it, releasing the GIL; returns the end."""
    end = max(start, free) + duration
    now = time.perf_counter()
    if end > now:
        time.sleep(end - now)
    return max(end, time.perf_counter())


def calibrated_gbps(spec: Spec, device: torch.device, dtype: torch.dtype, gbps: float | None,
              ratio: float | None) -> tuple[float, dict]:
    """The emulated link's bandwidth in GB/s: --link-gbps; else calibrated from --link-ratio R
    (moving one native expert takes R times as long as computing it for one token on this machine);
    else the spec's runtime.link (gbps, then ratio); else the plan device's link. Returns it with
    what the stats record of the calibration."""
    cfg = spec.runtime.link
    gbps = gbps if gbps is not None else (None if ratio is not None else cfg.gbps)
    ratio = ratio if ratio is not None else cfg.ratio
    if gbps is not None:
        return gbps, {}
    if ratio is None:
        return spec.runtime.plan.link_gbps, {}
    # R is in units of one native expert: a packed format moves fewer bytes over the same link
    seconds = expert_compute_seconds(spec, device, dtype)
    return native_expert_bytes(spec) / (ratio * seconds) / 1e9, {"link_ratio": ratio,
                                                                "expert_compute_us": round(seconds * 1e6, 2)}


def expert_compute_seconds(spec: Spec, device: torch.device, dtype: torch.dtype, repeats: int = 30,
                           packed: bool = False) -> float:
    """Median time to run one native expert (the spec's dtype, whatever the expert format) for one
    token on this machine: the unit --link-ratio calibrates against, so that every format shares
    one link. packed: one expert in the spec's own format instead (int8 / int4 rows: the unit the
    emulated host's --host-ratio scales, the device's time for the same expert)."""
    h, inter = spec.model.hidden_size, spec.model.moe.intermediate_size
    x = torch.randn(1, h, dtype=dtype, device=device)
    expert = ExpertKind(spec.runtime.expert_format if packed else "native", spec.expert_group if packed else 0,
                        ExpertMLP(h, inter))
    if expert.layout is not None:
        arena = torch.zeros(1, expert.layout.row_bytes, dtype=torch.uint8, device=device)
    else:
        arena = torch.randn(1, 3 * h * inter, dtype=dtype, device=device) * 0.02
    weights, ids = torch.ones(1, 1, device=device), torch.zeros(1, 1, dtype=torch.long, device=device)
    rule, kind = KeepRule.big(1).text, expert.text
    slot_map = torch.zeros(1, dtype=torch.long, device=device)
    times = []
    for n in range(repeats + 5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.ops.mobile.moe_experts(x, weights, ids, slot_map, arena, rule, kind)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if n >= 5:  # warm-up excluded
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
