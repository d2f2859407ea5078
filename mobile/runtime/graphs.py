"""CUDA graphs over the executor's compute segments (piecewise capture), and the static decode
state they read.

A decode step is cut by host reads (one per MoE layer, mobile.runtime.hostio) into compute segments
(Executor.steps). With graphs on, every segment is captured once per bucket and then replayed:

- a bucket is (token count T, attended KV length, lm_head on the last position only). T is exact,
  1 to GRAPH_MAX_TOKENS (a decoded token, a KV refresh's few tokens, a short prompt), never
  padded: padded tokens would be routed, and fetch experts of their own. Longer forwards (prompts)
  run eagerly. The attended KV length is a power of two from KV_BUCKET_MIN up to the cache's
  capacity, so attention reads rows near the sequence's length, not the whole preallocated cache;
- a segment reads its inputs from persistent tensors: the outputs of other captured segments, the
  decode state (token ids, positions, rope rows: `StaticState`), the KV cache, the expert arenas
  and slot maps, all allocated once, read in place. An input that is none of these is copied into
  a buffer of the entry's own first; the key of an entry names the persistent tensors it reads,
  so another tensor in their place gets an entry of its own instead of a stale read;
- its outputs are persistent buffers, overwritten by its next replay, which is what the executor
  holds in its environment between steps.

Under `resident` a decoded token is one graph: the whole forward is one segment (the token id and
position are written into the static state before it). The next token's pick after the forward's
last segment is an entry of its own (Segment key ("pick", ...)), captured and replayed with each
request's seed and knobs copied in (mobile.runtime.sampling).

What a captured segment must not do, and how each is kept out:
- host reads: only sync steps read (mobile.runtime.hostio), and they run between segments, in Python; on
  CUDA the first run of each entry runs under torch's sync debug mode set to "error", so a
  synchronizing op in a segment refuses the entry (it then runs eagerly, counted) before capture;
- Python-side state changes: the functions the runner captures are generated without the
  executor's bookkeeping (the executor records the nodes that ran, and times the segment, itself);
- inputs that are not tensors: a long prompt's expert rounds (mobile.moe.cache.Rounds, host work per
  round), refused at the call;
- state the capture would freeze: a router with random order draws from its own generator, whose
  replays would repeat one draw, refused at build;
- storage that moves between replays: the KV cache is preallocated (mobile.runtime.kv, `fixed`); the
  expert arenas and slot maps are allocated once (the slot map changes by copy into its tensor).
A refused segment runs eagerly and is counted (`graph_eager_segments`, with the reasons in
`graph_eager_reasons`), never replayed wrong.

Mechanism: torch.cuda.CUDAGraph over the generated segment functions (torch.compile'd ones with
--compile), not torch.compile's mode="reduce-overhead". Reduce-overhead would capture only with
--compile, and its cudagraph trees own the outputs (a tree's next run invalidates them), while the
executor keeps segment outputs across the sync steps between segments and into `mobile`'s second
pass; an explicit graph per (segment, bucket) serves eager and compiled segments alike, keys on
exactly what the engine knows changes, and runs without capture on the CPU, so that the CPU tests
exercise the same plumbing. Reduce-overhead has not been measured against it: no GPU was lent to
this change.

On a CPU (`runtime.cuda_graphs: on`) nothing is captured: an entry's set-up runs the segment once
and keeps its outputs as the persistent buffers; each later run copies copied inputs in, runs the
segment on the persistent inputs and copies the results into those buffers. That is a replay's
contract (same inputs read, same buffers written, overwritten by the next run), so the CPU tests
of `on` against `off` check what the GPU replays rely on. The stats call it `emulated`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from mobile.compiler.ir import Node
from mobile.runtime.context import StepContext

GRAPH_MAX_TOKENS = 8  # forwards of up to this many tokens run through graphs; longer ones eagerly
KV_BUCKET_MIN = 256  # the smallest attended KV length; buckets double from it up to the capacity


def kv_bucket(length: int, capacity: int) -> int:
    """The attended KV length of a forward that ends at position `length` (<= capacity)."""
    bucket = KV_BUCKET_MIN
    while bucket < length:
        bucket *= 2
    return min(bucket, capacity)


def refusal(nodes: list[Node]) -> str | None:
    """Why a segment can never be captured, or None. Known at build time from its nodes."""
    for n in nodes:
        if n.attr("order") == "random":
            return f"{n.name}: a random expert order draws from its own generator (a replay would repeat it)"
    return None


class StaticState:
    """The persistent device tensors a captured forward reads: per token count T, the token ids
    [T], their positions [T] and their rope rows (cos, sin [T, 1, R], gathered on the device from
    tables precomputed for every position of the KV cache); and one StepContext per bucket."""

    def __init__(self, device: torch.device, cos_table: torch.Tensor, sin_table: torch.Tensor,
                 register: Callable[[Iterable[torch.Tensor]], None]):
        """register: told of every buffer made (GraphRunner.register: segments read them in place)."""
        self.device, self.cos_table, self.sin_table, self.register = device, cos_table, sin_table, register
        self.tokens: dict[int, torch.Tensor] = {}
        self.positions: dict[int, torch.Tensor] = {}
        self.rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.contexts: dict[tuple[int, int, bool], StepContext] = {}

    def _buffers(self, T: int) -> None:
        if T in self.tokens:
            return
        with torch.inference_mode(False):  # ordinary tensors, as the KV cache's (mobile.runtime.kv)
            self.tokens[T] = torch.zeros(T, dtype=torch.long, device=self.device)
            self.positions[T] = torch.zeros(T, dtype=torch.long, device=self.device)
            rows = (T, *self.cos_table.shape[1:])
            self.rope[T] = (torch.zeros(rows, dtype=self.cos_table.dtype, device=self.device),
                            torch.zeros(rows, dtype=self.sin_table.dtype, device=self.device))
        self.register([self.tokens[T], self.positions[T], *self.rope[T]])

    def load(self, ids: torch.Tensor, start: int, kv_len: int, last_only: bool) -> tuple[StepContext, torch.Tensor]:
        """Write a forward's token ids and positions [start, start + T) into the state; returns
        its context and token buffer. Device work only: no host read (ids on the host are written
        as values a kernel takes, or one small copy)."""
        T = ids.shape[0]
        self._buffers(T)
        tokens, positions = self.tokens[T], self.positions[T]
        if T == 1 and not ids.is_cuda:
            tokens.fill_(int(ids[0]))
            positions.fill_(start)
        else:
            tokens.copy_(ids.pin_memory() if tokens.is_cuda and not ids.is_cuda else ids, non_blocking=True)
            torch.arange(start, start + T, out=positions)
        key = (T, kv_len, last_only)
        ctx = self.contexts.get(key)
        if ctx is None:
            cos, sin = self.rope[T]
            ctx = StepContext(positions=positions, cos=cos, sin=sin, kv_len=kv_len, last_only=last_only,
                              key=key, prologue=self._gather_rope(T))
            self.contexts[key] = ctx
        return ctx, tokens

    def gathered(self, ids: torch.Tensor, start: int, kv_len: int, last_only: bool
                 ) -> tuple[StepContext, torch.Tensor]:
        """A forward too long for graphs (a prompt): its own context and token ids, made the way
        the static ones are (rope rows gathered, not sliced; ordinary tensors, not inference ones),
        because compiled code guards on both: a short prompt, through the static buffers, must
        not recompile the segments a long one compiled."""
        T = ids.shape[0]
        with torch.inference_mode(False):
            positions = torch.arange(start, start + T, device=self.device)
            ctx = StepContext(positions=positions, cos=self.cos_table.index_select(0, positions),
                              sin=self.sin_table.index_select(0, positions), kv_len=kv_len, last_only=last_only)
            return ctx, ids.to(self.device, copy=True)

    def _gather_rope(self, T: int) -> Callable[[], None]:
        positions, (cos, sin) = self.positions[T], self.rope[T]

        def gather() -> None:  # inside the forward's first segment, so a captured graph does it
            torch.index_select(self.cos_table, 0, positions, out=cos)
            torch.index_select(self.sin_table, 0, positions, out=sin)

        return gather


@dataclass(frozen=True)
class Segment:
    """What the runner runs: a compute step's function, or a forward's pick of its next token."""

    key: Hashable  # the executor's: (pass, step index), or ("pick", the pick's key)
    name: str  # what a refusal's reason names: a step's first and last node
    fn: Callable[[StepContext, dict[str, Any]], dict[str, Any]]  # what a capture records: no bookkeeping
    refusal: str | None = None  # why it can never be captured, known when it is built (refusal())


class NotCapturable(Exception):
    pass


@contextlib.contextmanager
def syncs_as_errors():
    """CUDA: an op that synchronizes with the host raises instead (torch's sync debug mode)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


PLAIN = (bool, int, float, str)  # Python values a segment may take (a gate's outcome): keys, not buffers


def flatten(values: Iterable[Any], plain: bool = False) -> tuple[list[Any], list[Any]]:
    """Segment inputs or outputs (a tensor, a tuple of tensors, None; with plain, also a Python
    value) -> (leaves, structure)."""
    leaves: list[Any] = []
    structure: list[Any] = []
    for v in values:
        if v is None or isinstance(v, torch.Tensor) or (plain and isinstance(v, PLAIN)):
            leaves.append(v)
            structure.append(None)
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            leaves.extend(v)
            structure.append(len(v))
        else:
            raise NotCapturable(f"an {'input' if plain else 'output'} is a {type(v).__name__}, not a tensor")
    return leaves, structure


def unflatten(leaves: list[Any], structure: list[Any]) -> list[Any]:
    out, i = [], 0
    for s in structure:
        if s is None:
            out.append(leaves[i])
            i += 1
        else:
            out.append(tuple(leaves[i:i + s]))
            i += s
    return out


def copy_into(buffers: list[Any], values: list[Any]) -> None:
    """A run's results into an entry's persistent output buffers (a value already in its buffer stays)."""
    for buf, value in zip(buffers, values, strict=True):
        if buf is not None and value is not None and value.data_ptr() != buf.data_ptr():
            buf.copy_(value)


def identity(t: torch.Tensor) -> tuple:
    """What makes a tensor the same persistent tensor: its memory and its view of it."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


@dataclass
class Entry:
    """One (segment, bucket): what it reads, what it writes, and on CUDA its graph."""

    inputs: list[Any]  # the leaves the segment reads: persistent tensors, buffers of its own, Python values
    copied: list[int]  # leaves copied into their buffer before each run
    body: Callable[[], dict[str, Any]]  # the segment on `inputs` (the rope rows first): what a graph captures
    result: dict[str, Any]  # what every run returns: its persistent outputs, by name
    outputs: list[torch.Tensor | None]  # the same, as leaves
    graph: Any = None  # torch.cuda.CUDAGraph


def prologue(ctx: StepContext, first: bool) -> None:
    """The forward's first compute step does the context's device work first (the rope rows)."""
    if first and ctx.prologue is not None:
        ctx.prologue()


class GraphRunner:
    """Runs compute segments through persistent buffers: captured and replayed on CUDA, the same
    static-buffer contract without capture on the CPU (the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.capture = device.type == "cuda"
        self.entries: dict[tuple, Entry] = {}
        self.persistent: set[tuple] = set()  # identities of tensors read in place
        self.refused: dict[tuple, str] = {}  # entry keys that run eagerly, and why
        self.reasons: dict[str, int] = {}
        self.captures = self.replays = self.eager = 0
        self.side: Any = None  # CUDA: the stream captures run on
        # tensors a segment advances in place, not idempotently (a recurrent state): an entry's
        # set-up runs its segment more than once on CUDA, so it rewinds them between the runs
        self.advanced: list[torch.Tensor] = []

    @property
    def mode(self) -> str:
        return "on" if self.capture else "emulated"

    def register(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors that live as long as the engine and never move: read in place, not copied."""
        self.persistent.update(identity(t) for t in tensors)

    def register_advanced(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors segments advance in place (a recurrent state, mobile.runtime.state): a KV write
        done twice writes the same rows, but a state advanced twice has folded the token in twice."""
        self.advanced.extend(tensors)

    def reset_counters(self) -> None:
        self.captures = self.replays = self.eager = 0
        self.reasons.clear()

    def run(self, segment: Segment, ctx: StepContext, inputs: dict[str, Any], first: bool) -> dict[str, Any]:
        """Run `segment` on `inputs` through its entry for this bucket; `first`: the forward's first
        compute step, which gathers the rope rows."""
        fn, reason = segment.fn, segment.refusal
        try:
            leaves, structure = flatten(inputs.values(), plain=True)
        except NotCapturable as e:
            leaves, structure, reason = [], [], reason or f"{segment.name}: {e}"
        key: tuple = ()
        if reason is None:
            key = (segment.key, ctx.key, first, tuple(structure), tuple(map(self._leaf_key, leaves)))
            reason = self.refused.get(key)
        if reason is not None:
            return self._eager(reason, fn, ctx, inputs, first)
        entry = self.entries.get(key)
        if entry is None:
            try:
                entry = self._set_up(key, list(inputs), leaves, structure, fn, ctx, first)
            except NotCapturable as e:
                self.refused[key] = why = f"{segment.name}: {e}"
                return self._eager(why, fn, ctx, inputs, first)
        else:
            for i in entry.copied:
                entry.inputs[i].copy_(leaves[i])
            if entry.graph is not None:
                entry.graph.replay()
            else:
                self._run_static(entry)
        self.replays += 1
        return entry.result  # the same dict every run, as its tensors are: the caller reads it, never changes it

    # -- internals ------------------------------------------------------------------------------
    def _leaf_key(self, t: Any) -> tuple:
        if t is None:
            return ("none",)
        if not isinstance(t, torch.Tensor):  # a replay repeats what the capture did with this value
            return ("value", type(t).__name__, t)
        same = identity(t)
        if same in self.persistent:
            return ("in place", *same)
        return ("copied", same[1], t.dtype)

    def _eager(self, reason: str, fn: Callable, ctx: StepContext, inputs: dict[str, Any], first: bool) -> dict:
        self.eager += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        prologue(ctx, first)
        return fn(ctx, inputs)

    def _set_up(self, key: tuple, names: list[str], leaves: list[Any], structure: list[Any],
                fn: Callable, ctx: StepContext, first: bool) -> Entry:
        """The entry's first run: its input buffers, one run (its outputs become the persistent
        buffers) and on CUDA the capture."""
        inputs: list[Any] = []
        copied = []
        with torch.inference_mode(False):
            for i, t in enumerate(leaves):
                if not isinstance(t, torch.Tensor) or identity(t) in self.persistent:
                    inputs.append(t)
                else:
                    inputs.append(t.clone())
                    copied.append(i)
        env = dict(zip(names, unflatten(inputs, structure), strict=True))

        def body() -> dict[str, Any]:
            prologue(ctx, first)
            return fn(ctx, env)

        # on CUDA the segment runs three times: this run, the capture's warm-up and the first replay;
        # whatever it advances in place is rewound before each of the last two, so it advances once
        before = [t.clone() for t in self.advanced] if self.capture else []

        def rewind() -> None:
            for t, kept in zip(self.advanced, before, strict=True):
                t.copy_(kept)

        out = body()  # on CUDA also the one-time costs (kernel selection, Triton's compile), which may sync
        outputs, _ = flatten(out.values())
        graph = None
        if self.capture:
            rewind()
            try:
                graph, out = self._capture(body)
            except NotCapturable:
                rewind()  # the caller runs the segment once more, eagerly
                raise
            rewind()
            graph.replay()  # this call's run (a capture computes nothing)
            outputs, _ = flatten(out.values())
        entry = Entry(inputs, copied, body, out, outputs, graph)
        self.entries[key] = entry
        self.captures += 1
        # what later segments read in place: this entry's outputs and input buffers
        self.register(t for t in (*entry.outputs, *inputs) if isinstance(t, torch.Tensor))
        return entry

    def _run_static(self, entry: Entry) -> None:
        """The CPU's replay: the segment on the entry's inputs, its results into the entry's outputs."""
        fresh, _ = flatten(entry.body().values())
        copy_into(entry.outputs, fresh)

    def _capture(self, body: Callable[[], dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
        """CUDA: a run with syncs as errors, then the capture, both on the runner's side stream
        (torch's recipe: warm up where the capture runs). The caller replays it once for this call
        (a capture computes nothing)."""
        current = torch.cuda.current_stream(self.device)
        if self.side is None:
            self.side = torch.cuda.Stream(self.device)
        self.side.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        try:
            try:  # on the engine's device, which need not be the current one (cuda:1)
                with torch.cuda.device(self.device), torch.cuda.stream(self.side), syncs_as_errors():
                    body()
            except RuntimeError as e:
                raise NotCapturable(f"syncs with the host ({str(e).splitlines()[0]})") from None
            try:  # thread_local: another thread's CUDA calls (a server's) do not invalidate this capture
                with torch.cuda.device(self.device), torch.cuda.graph(graph, stream=self.side,
                                                                      capture_error_mode="thread_local"):
                    out = body()
            except RuntimeError as e:
                raise NotCapturable(f"cannot be captured ({str(e).splitlines()[0]})") from None
        finally:
            current.wait_stream(self.side)
        return graph, out
