"""The executor: the one interpreter of a graph's passes (mobile.compiler.ir: Pass).

Each pass's nodes are built once into steps, in the order graph.json gives. Consecutive compute
nodes of one segment (the `seg` attr, set by the plan_segments pass) run as one generated function
(mobile.runtime.segments), which `--compile` hands to torch.compile and CUDA graphs capture. Sync
nodes (fetch, wait, prefetch, gates) run between segments in plain Python, because they talk to
the expert cache on the host. A run of adjacent sync nodes is one sync step, and the device values
its nodes need on the host are read in one copy (mobile.runtime.hostio): a MoE layer's fetch and
the prefetches that go with it cost one read. The segment before a sync step computes those
values (segments.Read), so that a CUDA graph holds that device work too. A forward (Executor.run)
runs its first pass; when a gate fires, it runs the big pass again from the region, or over a KV
refresh's positions. Then it picks the next token on the device (Forward.pick), through the graph
runner as a segment is. A model with linear-attention layers has a recurrent state
(mobile.runtime.state): the executor keeps it before a gated pass and restores it before the big
pass that follows a fallback.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mobile import policy as policies
from mobile.compiler.ir import GRAPH_INPUTS, REGION, SYNC_OPS, Graph, Node, Op, Pass
from mobile.compiler.verify import verify
from mobile.errors import GraphError
from mobile.runtime.context import Pick, StepContext, SyncKernel
from mobile.runtime.devclock import clock_for
from mobile.runtime.graphs import GraphRunner, Segment, refusal
from mobile.runtime.hostio import HostReader
from mobile.runtime.kernels import Kernels
from mobile.runtime.segments import Read, compiled, segment_fn
from mobile.runtime.state import RecurrentState


@dataclass(frozen=True)
class HostNode:
    """A sync node as a sync step runs it: everything read from the node once, when the step is built."""

    name: str
    op: str
    inputs: tuple[str, ...]
    gate: bool  # an importance gate: its value says whether the token falls back
    kernel: SyncKernel
    read_as: str  # where the segment before its step leaves what it reads (read_name)


@dataclass
class Step:
    """One unit the executor runs: a segment of compute nodes (fn), or a run of sync nodes (sync)."""

    nodes: list[Node]
    fn: Callable[[StepContext, dict[str, Any]], dict[str, Any]] | None
    sync: list[HostNode] | None
    live_in: list[str]
    drop_after: list[str]  # values no later step reads
    # with CUDA graphs: the segment without the executor's bookkeeping (the node list, the trace),
    # which a replay would skip; what the graph runner captures (fn itself when compiled), keyed by
    # (pass, step index)
    graph: Segment | None = None
    # derived, once: a sync step one of whose nodes reads floats (a host placement) reads any dtypes in
    # its one read; the nodes' names, for the record of what ran
    raw: bool = field(init=False)
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.raw = any(n.kernel.raw for n in self.sync or ())
        self.names = tuple(n.name for n in self.nodes)


@dataclass(frozen=True)
class Forward:
    """What one forward runs (Executor.run). first: the pass it starts with. gated: its gates may
    end that pass and send the token to the big pass (a decoded token under a policy with a
    fallback); else a gate's value is read and ignored. refresh: on a fallback, the input of a KV
    refresh, () -> (ctx, tokens, positions recomputed before the token), for a big pass over them
    from the first node; without it the big pass runs again from the region only, on this
    forward's values. start: the forward's first position (where a recurrent state is kept). pick:
    the next token's choice, made on the logits after the last pass (Outcome.picked)."""

    first: Pass
    gated: bool = False
    refresh: Callable[[], tuple[StepContext, torch.Tensor, int]] | None = None
    start: int = 0
    pick: Pick | None = None


@dataclass(frozen=True)
class Outcome:
    logits: torch.Tensor
    passes: tuple[Pass, ...]  # the passes that ran, in order: (little, big) after a fallback
    refreshed: int = 0  # positions before the token that a KV refresh recomputed
    picked: tuple[torch.Tensor, torch.Tensor] | None = None  # Forward.pick's (id, all finite), on the device

    @property
    def fell_back(self) -> bool:
        return len(self.passes) > 1


def plan_steps(nodes: list[Node]) -> list[list[Node]]:
    """Group a pass's nodes into steps: runs of one segment (the `seg` attrs), and runs of
    adjacent sync nodes."""
    steps: list[list[Node]] = []
    for n in nodes:
        if steps:
            last = steps[-1][-1]
            if n.op in SYNC_OPS:
                joins = last.op in SYNC_OPS
            else:
                joins = last.op not in SYNC_OPS and n.attr("seg") is not None and n.attr("seg") == last.attr("seg")
            if joins:
                steps[-1].append(n)
                continue
        steps.append([n])
    return steps


def read_name(node: str) -> str:
    """The value a segment computes for the sync node after it: what the node will read (Read)."""
    return f"{node}:read"


def folded_reads(step: list[Node], hosts: dict[str, HostNode]) -> tuple[Read, ...]:
    """The reads of sync step `step` that the segment before it computes: those of its nodes whose
    inputs are all compute values (a read of another sync node's value, a fetch's handle, waits for
    the step)."""
    reads = []
    for n in step:
        host = hosts[n.name]
        if host.kernel.read is not None and not any(i in hosts for i in n.inputs):
            reads.append(Read(host.read_as, host.kernel.read, n.inputs))
    return tuple(reads)


def _read(node: HostNode, ctx: StepContext, env: dict[str, Any]) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
    """What a sync node reads: as the segment before its step computed it, else computed now."""
    if node.kernel.read is None:
        return []
    done = env.pop(node.read_as, None)
    return done if done is not None else node.kernel.read(ctx, *map(env.get, node.inputs))


def passes_of(graph: Graph) -> tuple[Pass, ...]:
    """The passes a graph runs, as its policy says (mobile.policy)."""
    name = graph.spec.get("policy", {}).get("name", policies.REFERENCE)
    return tuple(Pass(p) for p in policies.get(name).passes)


class Executor:
    """The interpreter of a graph's passes: it runs a forward's first pass, reads the gates, and
    runs the big pass after a fallback (again over the region, or over a KV refresh's positions).
    Each pass's nodes (mobile.compiler.ir: Node.runs_in, Node.in_pass) are built into steps once."""

    def __init__(self, graph: Graph, kernels: Kernels, reader: HostReader, compile: bool = False,
                 trace: list | None = None, graphs: GraphRunner | None = None, state: RecurrentState | None = None):
        """graphs: run the compute segments of static contexts (StepContext.key) through this
        runner (mobile.runtime.graphs); other forwards run as without it. state: the recurrent
        state of the graph's linear-attention layers, kept and restored around a fallback."""
        errors = verify(graph)
        if errors:
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            raise GraphError(f"graph fails verification: {errors[0]}{more}", where=graph.name)
        self.graph, self.reader = graph, reader
        self.compile = compile
        self.graphs = graphs
        # measured timeline: (name, op, stream, start_s, end_s, bytes) per node; eager runs only,
        # since inside a compiled segment nodes have no boundaries to time
        self.trace = trace if not compile else None
        # the trace's clock: perf_counter on the CPU, CUDA events on a GPU (compute spans time
        # the kernels, not their launches)
        self.clock = clock_for(reader.device) if self.trace is not None else time.perf_counter
        self.executed: list[str] = []  # node names in the order the last eager forward ran them
        self.output = graph.outputs[0]
        self.passes = passes_of(graph)
        region = [n.name for n in graph.nodes if n.attr("region") == REGION]
        # values the region reads from the part that runs once: a fallback's big pass reads them
        # again, so no pass drops them
        once = {n.name for n in graph.nodes if n.attr("region") != REGION}
        self.keep = {i for n in graph.nodes if n.name in set(region) for i in n.inputs if i in once}
        self.state = state
        # the linear-attention layers a fallback's big pass runs again: their state is restored first
        # (those before the region ran once, for both passes)
        self.region_state = frozenset(n.attr("layer") for n in graph.nodes
                                      if n.op is Op.LINEAR_ATTENTION and n.attr("region") == REGION)
        self.steps: dict[Pass, list[Step]] = {}
        self.picks: dict[str, Segment] = {}  # with graphs: the segment of each captured pick (Pick.key)
        self.entry: dict[Pass, int] = {}  # where a pass starts again after a fallback: its first region step
        for p in self.passes:
            nodes = [n.in_pass(p) for n in graph.nodes if n.runs_in(p)]
            self.steps[p] = self._build(p, nodes, kernels)
            self.entry[p] = next((i for i, st in enumerate(self.steps[p]) if st.nodes[0].name in region), 0)

    def _build(self, p: Pass, nodes: list[Node], kernels: Kernels) -> list[Step]:
        groups = plan_steps(nodes)
        last_use: dict[str, int] = {}
        for si, group in enumerate(groups):
            for n in group:
                for i in n.inputs:
                    last_use[i] = si
        for out in self.graph.outputs:
            last_use[out] = len(groups)
        hosts = {n.name: HostNode(n.name, n.op.value, n.inputs, n.op is Op.IMPORTANCE_GATE, kernels.sync(n),
                                  read_name(n.name)) for n in nodes if n.op in SYNC_OPS}
        steps = []
        for si, group in enumerate(groups):
            defined = {n.name for n in group}
            live_in = {i for n in group for i in n.inputs if i not in defined}
            drop = [v for v, s in last_use.items() if s == si and v not in self.keep]
            if group[0].op in SYNC_OPS:
                steps.append(Step(group, None, [hosts[n.name] for n in group], sorted(live_in), drop))
                continue
            after = groups[si + 1] if si + 1 < len(groups) and groups[si + 1][0].op in SYNC_OPS else []
            reads = folded_reads(after, hosts)
            live_in |= {i for r in reads for i in r.inputs if i not in defined}
            live_out = [n.name for n in group if last_use.get(n.name, -1) > si or n.name in self.keep]
            built = [kernels.compute(n) for n in group]
            if self.compile:  # compiled code keeps no bookkeeping: it is what the runner captures too
                fn = compiled(segment_fn(group, built, live_out, None, None, self.clock, reads))
            else:
                fn = segment_fn(group, built, live_out, self.executed, self.trace, self.clock, reads)
            graph = None
            if self.graphs is not None:
                plain = fn if self.compile else segment_fn(group, built, live_out, None, None, self.clock, reads)
                graph = Segment((p.value, si), f"{group[0].name}..{group[-1].name}", plain, refusal(group))
            steps.append(Step(group, fn, None, sorted(live_in), drop, graph))
        return steps

    def run(self, ctx: StepContext, tokens: torch.Tensor, forward: Forward) -> Outcome:
        """One forward: its first pass; after a fallback (a gate fired in a gated little pass) the
        big pass, again over the region on this forward's values, or over a KV refresh's positions.
        Then the forward's pick of the next token, if it has one."""
        logits, passes, refreshed, ctx = self._passes(ctx, tokens, forward)
        picked = None if forward.pick is None else self._pick(forward.pick, ctx, logits)
        return Outcome(logits, passes, refreshed, picked)

    def _passes(self, ctx: StepContext, tokens: torch.Tensor, forward: Forward
                ) -> tuple[torch.Tensor, tuple[Pass, ...], int, StepContext]:
        """The passes of Executor.run: (logits, the passes that ran, positions refreshed, the
        context of the last pass)."""
        self.executed.clear()
        env: dict[str, Any] = {GRAPH_INPUTS[0]: tokens}
        state = self.state if forward.gated and self.state is not None and self.state.kept else None
        if state is not None:  # the little pass advances it; a fallback's big pass starts from it again
            state.keep(forward.start)
        if not self._pass(forward.first, ctx, env, 0, forward.gated):
            return env[self.output], (forward.first,), 0, ctx
        if forward.refresh is not None:
            ctx, tokens, refreshed = forward.refresh()
            if state is not None:  # the refresh runs every layer from its first position
                state.restore(forward.start - refreshed)
            env = {GRAPH_INPUTS[0]: tokens}
            self._pass(Pass.BIG, ctx, env, 0, False)
            return env[self.output], (forward.first, Pass.BIG), refreshed, ctx
        if state is not None:
            state.restore(forward.start, self.region_state)
        self._pass(Pass.BIG, ctx, env, self.entry[Pass.BIG], False)
        return env[self.output], (forward.first, Pass.BIG), 0, ctx

    def _pass(self, p: Pass, ctx: StepContext, env: dict[str, Any], start: int, gated: bool) -> bool:
        """Run pass p's steps from step `start`; True when a gate fired and `gated`: the pass ends there."""
        static = self.graphs is not None and ctx.key is not None
        first = start == 0  # the forward's first compute step gathers a static context's rope rows
        for step in self.steps[p][start:]:
            if step.sync is not None:
                if self._sync(step, ctx, env) and gated:
                    return True
            else:
                inputs = dict(zip(step.live_in, map(env.get, step.live_in), strict=True))
                if static:
                    env.update(self._graph_step(step, ctx, inputs, first))
                    first = False
                else:
                    assert step.fn is not None
                    env.update(step.fn(ctx, inputs))
            for v in step.drop_after:
                env.pop(v, None)
        return False

    def _sync(self, step: Step, ctx: StepContext, env: dict[str, Any]) -> bool:
        """Run one sync step: read what its nodes need from the device in one copy, then act on it
        node by node. True when a gate fired (the nodes after it are not run)."""
        assert step.sync is not None
        # reads take device values, which only compute makes, so all of them come from earlier
        # steps: most were computed by the segment before this step (Read), the others are now (a
        # step a pass starts at, after a fallback; a read of another sync node's value); acts run in
        # order and see what the step's earlier nodes made (a fetch's handle)
        wanted = [_read(n, ctx, env) for n in step.sync]
        everything = list(itertools.chain.from_iterable(wanted))
        raw = step.raw
        values: list[Any] = self.reader.read(everything) if raw else self.reader.ints(everything)
        start = 0
        for node, ts in zip(step.sync, wanted, strict=True):
            mine, start = values[start:start + len(ts)], start + len(ts)
            if raw and not node.kernel.raw:  # the others' values as lists of ints, as they always are
                mine = [v.to(torch.int32).tolist() for v in mine]
            t0 = time.perf_counter()
            env[node.name] = node.kernel.act(ctx, mine, *map(env.get, node.inputs))
            if self.trace is not None:
                self.trace.append((node.name, node.op, "compute", t0, time.perf_counter(), 0))
            self.executed.append(node.name)
            if node.gate and env[node.name]:
                return True
        return False

    def _graph_step(self, step: Step, ctx: StepContext, inputs: dict[str, Any], first: bool) -> dict[str, Any]:
        """One compute step through the graph runner, with the bookkeeping its function leaves out:
        the nodes it ran, and with a trace one span for the whole segment (a replay has no node
        boundaries to time)."""
        assert self.graphs is not None and step.graph is not None
        t0 = self.clock() if self.trace is not None else 0.0
        out = self.graphs.run(step.graph, ctx, inputs, first)
        if self.trace is not None:
            self.trace.append((step.graph.name, "graph", "compute", t0, self.clock(), 0))
        if not self.compile:
            self.executed.extend(step.names)
        return out

    def _pick(self, pick: Pick, ctx: StepContext, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next token's pick on the forward's logits: through the graph runner when the forward
        ran through it (captured once per bucket, as a segment is), else as its ops."""
        if self.graphs is None or ctx.key is None:
            return pick.fn(ctx, logits, pick.params)
        segment = self.picks.get(pick.key)
        if segment is None:
            fn = pick.fn  # the same key is the same fn (Pick)
            segment = self.picks[pick.key] = Segment(("pick", pick.key), f"the {pick.key} pick",
                                                     lambda ctx, env: {"picked": fn(ctx, env["logits"], env["params"])})
        return self.graphs.run(segment, ctx, {"logits": logits, "params": pick.params}, False)["picked"]
