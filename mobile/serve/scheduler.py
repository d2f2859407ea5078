"""The engine worker: requests wait in a bounded queue, and one thread that owns the Engine runs
them one at a time, in arrival order.

What the HTTP layer sees is `Job` and the `Scheduler` protocol below: a job is token ids and
sampling settings in, and Token / Done / Failed events out, delivered on the event loop that
submitted it. A batching scheduler (decode steps shared across requests) would implement the same
protocol; nothing in the HTTP layer knows that requests run one at a time.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Protocol

from mobile.runtime.stats import SETUP_KEYS, Stats

if TYPE_CHECKING:  # the worker imports torch only once it runs
    from mobile.runtime.engine import Engine


@dataclass(frozen=True)
class Sampling:
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Token:
    id: int


@dataclass(frozen=True)
class Done:
    """The generation ended. stopped: the engine's reason (stop_token, max_new_tokens, context,
    callback when Job.stop ended it) or the job's stop reason when it never ran. stats: the
    engine's statistics for this request alone (empty when it never ran)."""
    stopped: str
    stats: dict


@dataclass(frozen=True)
class Failed:
    """The engine raised during this request; the worker goes on with the next one."""
    message: str


Event = Token | Done | Failed


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after_s: int):
        super().__init__(f"the request queue is full ({depth} waiting)")
        self.depth, self.retry_after_s = depth, retry_after_s


class Job:
    """One generation as a scheduler sees it. Made on the event loop that will read its events."""

    def __init__(self, prompt: list[int], max_tokens: int, sampling: Sampling, stop_ids: list[int]):
        self.prompt, self.max_tokens, self.sampling, self.stop_ids = prompt, max_tokens, sampling, stop_ids
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.stop_reason: str | None = None  # set from the loop, read by the worker at each token
        self.submitted = time.monotonic()
        self.started: float | None = None

    def post(self, event: Event) -> None:
        """From any thread: hand an event to the job's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed (the server is gone): nobody is listening
            pass


class Scheduler(Protocol):
    def submit(self, job: Job) -> None:
        """Queue the job, or raise QueueFull."""

    def stop(self, job: Job, reason: str) -> None:
        """End the job at its next token (before it starts, if it still waits); its Done follows."""

    def stats(self) -> dict:
        """Whole-server statistics."""

    def close(self, timeout_s: float) -> None:
        """Stop every job, wait up to timeout_s for the one running, release the engine."""


class EngineWorker:
    """The serial scheduler. `load` makes the Engine, inside the worker thread, which owns it from
    then on: no other thread calls into it."""

    def __init__(self, load: Callable[[], Engine], max_queue: int):
        self._load, self.max_queue = load, max_queue
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.engine: Engine | None = None
        self.totals = Totals()
        # a daemon: a forced exit (a second Ctrl-C) must not wait for a forward to finish
        self._thread = threading.Thread(target=self._main, name="mobile-engine", daemon=True)

    def start(self) -> Engine:
        """Load the engine in the worker thread; returns it once loaded, or raises what loading raised."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error
        assert self.engine is not None
        return self.engine

    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the Scheduler protocol (called on the event loop) -----------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed or len(self._waiting) >= self.max_queue:
                raise QueueFull(len(self._waiting), self.totals.retry_after_s())
            self._waiting.append(job)
            self._cond.notify()

    def stop(self, job: Job, reason: str) -> None:
        with self._cond:
            if job.stop_reason is None:
                job.stop_reason = reason
            if job in self._waiting:  # it never runs: its slot in the queue frees now
                self._waiting.remove(job)
                self.totals.count(reason)
                job.post(Done(reason, {}))

    def stats(self) -> dict:
        with self._cond:
            queue = {"waiting": len(self._waiting), "running": int(self._running is not None),
                     "max_queue": self.max_queue}
            return {"queue": queue, **self.totals.as_dict()}

    def close(self, timeout_s: float) -> None:
        with self._cond:
            self._closed = True
            if self._running is not None and self._running.stop_reason is None:
                self._running.stop_reason = "shutdown"
            while self._waiting:  # they never run
                self._waiting.popleft().post(Done("shutdown", {}))
            self._cond.notify()
        self._thread.join(timeout_s)

    # -- the worker thread --------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.engine = engine = self._load()
        except BaseException as e:  # noqa: B036 - handed to the thread that waits in start()
            self._load_error = e
            return
        finally:
            self._ready.set()
        self.totals.describe(engine.stats_)  # the link and the cache, before any request ran
        try:
            while (job := self._next()) is not None:
                self._run(engine, job)
                if engine.experts.failure is not None:
                    engine = self._reload(engine)
        finally:
            engine.close()

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if not self._waiting:
                return None
            self._running = self._waiting.popleft()
            return self._running

    def _run(self, engine: Engine, job: Job) -> None:
        job.started = time.monotonic()

        def on_token(token: int) -> bool:
            if job.stop_reason is not None:
                return True  # the engine ends the run here, its statistics complete
            job.post(Token(token))
            return False

        engine.reset_stats()  # the statistics that follow are this request's
        outcome = "failed"
        try:
            s = job.sampling
            engine.generate(job.prompt, job.max_tokens, greedy=s.greedy, temperature=s.temperature,
                            top_p=s.top_p, seed=s.seed, stop_ids=job.stop_ids, on_token=on_token)
            stats = engine.stats
            # "stop": the HTTP layer matched a stop string, a normal end; cancelled, shutdown: cut
            outcome = "completed" if job.stop_reason in (None, "stop") else job.stop_reason
            job.post(Done(stats["stopped"], stats))
        except Exception as e:
            # one request's fault: report it, answer it with an error, keep serving. The next
            # generate starts from position 0 and rewrites the KV cache it uses.
            print(f"mobile: serve: a request failed in the engine: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            job.post(Failed(f"{type(e).__name__}: {e}"))
            try:
                engine.experts.collect_stats()  # what it did before the fault (`engine.stats` does this)
            except Exception:  # noqa: S110 - the fault may have left them unreadable; the counts stay as they are
                pass
        with self._cond:
            self._running = None
            # a failed or cut request counts too: the bytes it moved were moved
            self.totals.add(engine.stats_, time.monotonic() - job.started)
            self.totals.count(outcome)

    def _reload(self, engine: Engine) -> Engine:
        """A worker thread of the engine (the copy worker) failed, so no later request could run on
        it: load a fresh one in its place. Requests that arrive meanwhile wait in the queue."""
        print("mobile: serve: an engine worker thread failed; reloading the engine", file=sys.stderr, flush=True)
        engine.close()
        self.engine = engine = self._load()
        return engine


# keys of Stats.extra that describe the setup rather than count work: those Stats.reset keeps, and the
# eviction rule, which the expert sets write anew at each collect_stats
SETUP = SETUP_KEYS | {"eviction"}


class Totals:
    """The engine's statistics summed over every request the server ran (finished, cut or failed),
    with the rates taken over the sums, plus request counts by outcome."""

    def __init__(self) -> None:
        self.stats = Stats()
        self.requests: dict[str, int] = {}
        self.mean_request_s: float | None = None  # a running mean, for Retry-After

    def describe(self, setup: Stats) -> None:
        self.stats.link = setup.link
        self.stats.extra.update({k: v for k, v in setup.extra.items() if k in SETUP})

    def count(self, outcome: str) -> None:
        self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def add(self, one: Stats, seconds: float) -> None:
        t = self.stats
        for f in fields(Stats):
            if isinstance(value := getattr(one, f.name), int | float):  # the counters, not link or extra
                setattr(t, f.name, getattr(t, f.name) + value)
        for key, value in one.extra.items():
            if key in SETUP:
                t.extra[key] = value
            elif isinstance(value, int | float) and not isinstance(value, bool) and key != "host_syncs_per_token":
                t.extra[key] = t.extra.get(key, 0) + value
        decoded = t.decode_tokens
        t.extra["host_syncs_per_token"] = t.extra.get("decode_host_syncs", 0) / decoded if decoded else None
        self.mean_request_s = seconds if self.mean_request_s is None else 0.8 * self.mean_request_s + 0.2 * seconds

    def retry_after_s(self) -> int:
        """Whole seconds until a queue slot is likely free: the running request's end, at the recent
        mean time per request."""
        return max(1, math.ceil(self.mean_request_s or 1.0))

    def as_dict(self) -> dict:
        return {"requests": dict(self.requests), "engine": with_hit_rate(self.stats.as_dict())}


def with_hit_rate(stats: dict) -> dict:
    """Engine stats plus expert_hit_rate (None when nothing was looked up: every expert resident)."""
    lookups = stats.get("expert_hits", 0) + stats.get("expert_misses", 0)
    return {**stats, "expert_hit_rate": stats["expert_hits"] / lookups if lookups else None}
