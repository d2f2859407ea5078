"""Tracing one decode token through mobile's own code: the Python calls it makes inside mobile/
(and kernels/), the files it enters, and how often it switches between them. Used by the tests
and by benchmarks/call_trace.py, whose docstring says how it counts."""

from __future__ import annotations

import collections
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from opcount import ops_in_sync_steps

ROOT = Path(__file__).resolve().parent.parent
SEGMENTS = "<segments>"
OURS = (str(ROOT / "mobile") + "/", str(ROOT / "kernels") + "/")


def file_of(code, segments: str = SEGMENTS) -> str | None:
    """The repository file a code object belongs to, or None for code that is not mobile's;
    segments: what the generated segment code counts as."""
    name = code.co_filename
    if name.startswith("<mobile segment"):
        return segments
    if name.startswith(OURS):
        return str(Path(name).relative_to(ROOT))
    return None


def trace(fn, segments: str = SEGMENTS) -> dict:
    """Run fn() under a profiler; the calls, files and switches of mobile's code it made (the
    generated segment code counted as the file `segments`)."""
    calls: collections.Counter[str] = collections.Counter()
    visits: list[str] = []

    def profile(frame, event, arg):
        if event == "call":
            f = file_of(frame.f_code, segments)
            if f is not None:
                calls[f"{f}:{frame.f_code.co_name}"] += 1
                visits.append(f)
        elif event == "return":
            caller = frame.f_back
            while caller is not None and file_of(caller.f_code, segments) is None:
                caller = caller.f_back
            if caller is not None and file_of(frame.f_code, segments) != file_of(caller.f_code, segments):
                visits.append(file_of(caller.f_code, segments))  # type: ignore[arg-type]

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    switches = sum(1 for a, b in zip(visits, visits[1:], strict=False) if a != b)
    pairs = collections.Counter(tuple(sorted((a, b))) for a, b in zip(visits, visits[1:], strict=False) if a != b)
    return {"calls": sum(calls.values()), "files": sorted(set(visits)), "switches": switches, "by_function": calls,
            "pairs": pairs}


@dataclass
class Measured:
    traces: list[dict]  # one per traced token; "copies": it moved an expert (bytes went over the link),
    # "graphs": how its segments ran (under CUDA graphs)
    sync_ops: collections.Counter[str]  # the torch ops one more token's sync steps ran themselves
    sync_ops_moved: bool  # whether that token moved an expert
    policy: str


def measure(graph: str | Path, cuda_graphs: str, tokens: int = 8, traced: int = 16, segments: str = SEGMENTS,
            sampling: dict | None = None, **load) -> Measured:
    """One engine (mobile.Engine.load(graph, cuda_graphs=..., **load)), a prompt and `tokens`
    decoded tokens (the cache fills), then `traced` more decoded tokens, each traced on its own, and
    one more whose sync steps' torch ops are counted. The traced tokens are greedy, or drawn by
    Sampler(**sampling). Under CUDA graphs on a CPU the emulated replay is left out: a GPU's
    replay runs no Python."""
    import mobile
    from mobile.runtime.sampling import Sampler

    engine = mobile.Engine.load(graph, cuda_graphs=cuda_graphs, **load)
    if engine.graphs is not None:  # a GPU replays a graph here, running no Python: the emulation is not counted
        emulated_replay = engine.graphs._run_static

        def replay(entry) -> None:
            profiler = sys.getprofile()
            sys.setprofile(None)
            try:
                emulated_replay(entry)
            finally:
                sys.setprofile(profiler)

        engine.graphs._run_static = replay  # type: ignore[method-assign]
    prompt = torch.tensor([5, 6, 7, 8])
    out = engine.generate(prompt, tokens, stop_ids=[], **(sampling or {}))  # the picks set up too
    sampler, last = Sampler(**(sampling or {})), [out[-1] if out else 9]

    @torch.inference_mode()
    def one_token() -> None:  # what Engine.generate does for one decoded token
        last[0] = engine._next_token(torch.tensor([last[0]]), engine.length, sampler)

    traces = []
    for _ in range(traced):
        copies_before = engine.stats_.bytes_h2d
        if engine.graphs is not None:
            engine.graphs.reset_counters()
        t = trace(one_token, segments)
        t["copies"] = engine.stats_.bytes_h2d > copies_before
        if engine.graphs is not None:  # a segment refused capture would run its Python on a GPU too, and counts
            t["graphs"] = f"{engine.graphs.replays} segments replayed, {engine.graphs.eager} run eagerly"
        traces.append(t)
    copies_before = engine.stats_.bytes_h2d
    sync_ops = ops_in_sync_steps(one_token)
    engine.close()
    return Measured(traces, sync_ops, engine.stats_.bytes_h2d > copies_before, engine.spec.policy.name)
