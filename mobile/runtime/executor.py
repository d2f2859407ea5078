"""The executor: runs a scheduled graph, node by node, in the order graph.json gives.

Each compute node becomes a kernel, a closure over its weights: kernel(ctx, *input values) -> value.
Consecutive nodes of one segment (the `seg` attr, set by the plan_segments pass) run as one
function, which `--compile` hands to torch.compile. Sync nodes (fetch, wait, prefetch, gates) run
between segments in plain Python, because they talk to the expert cache on the host. A run of
adjacent sync nodes is one sync step, and the device values its nodes need on the host are read
in one copy (mobile.runtime.hostio): a MoE layer's fetch and the prefetches that go with it cost one read.
"""

from __future__ import annotations

import functools
import linecache
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mobile import policy as policies
from mobile.compiler.ir import GRAPH_INPUTS, REGION, SYNC_OPS, Graph, Node, Op, Pass
from mobile.compiler.verify import verify
from mobile.errors import GraphError
from mobile.models import ops
from mobile.moe.cache import ExpertCache
from mobile.moe.layer import MoELayer
from mobile.moe.op import ExpertKind
from mobile.moe.router import Router
from mobile.runtime.context import Kernel, StepContext, SyncKernel
from mobile.runtime.devclock import clock_for
from mobile.runtime.hostio import HostReader
from mobile.runtime.kv import KVCache
from mobile.spec.schema import Spec

if TYPE_CHECKING:
    from mobile.runtime.graphs import GraphRunner


def fuse_qkv(weights: dict[tuple[str, int | None], torch.Tensor]) -> dict[tuple[str, int | None], torch.Tensor]:
    """q, k and v projections of each GQA layer as one matrix (and one bias): one matmul instead of
    three. Replaces them in `weights`, so nothing is held twice."""
    for (_, layer) in [k for k in weights if k[0] == "k_proj"]:  # MLA layers have none
        parts = [weights.pop((p, layer)) for p in ("q_proj", "k_proj", "v_proj")]
        weights[("qkv_proj", layer)] = torch.cat(parts)
        biases = [weights.pop((p, layer), None) for p in ("q_bias", "k_bias", "v_bias")]
        if all(b is not None for b in biases):
            weights[("qkv_bias", layer)] = torch.cat(biases)  # type: ignore[arg-type]
    return weights


@dataclass(frozen=True)
class Compute:
    """A compute node's kernel as the segment calls it: fn(*inputs), or fn(ctx, *inputs) with
    needs_ctx; an `inline` expression (a residual add) is written into the segment instead."""

    fn: Kernel | None
    needs_ctx: bool = False
    inline: str | None = None  # "a + b": the node's inputs as a and b


ADD = Compute(None, inline="{0} + {1}")
# an attention layer's weights by name (absent ones None): GQA/MHA (q, k, v fused) and MLA
GQA_WEIGHTS = ("qkv_proj", "qkv_bias", "o_proj", "o_bias", "q_norm", "k_norm", "sinks")
MLA_WEIGHTS = ("q_proj", "q_a_proj", "q_a_norm", "q_b_proj", "kv_a_proj", "kv_a_norm", "kv_b_proj", "o_proj")


class Kernels:
    """Builds the kernel of each node from the model's weights, KV cache and expert cache: dense
    ones from mobile.models.ops, the routed-expert layer's from its MoELayer (mobile.moe.layer)."""

    def __init__(self, spec: Spec, weights: dict[tuple[str, int | None], torch.Tensor], kv: KVCache,
                 experts: ExpertCache):
        self.spec, self.w, self.kv, self.experts = spec, fuse_qkv(weights), kv, experts
        self.attn_scale = ops.attention_scale(spec)
        self.kind = ExpertKind.of_spec(spec)
        self.layers: dict[int, MoELayer] = {}

    def moe(self, layer: int) -> MoELayer:
        """Layer `layer`'s MoELayer, made once."""
        if layer not in self.layers:
            router = Router.of_layer(self.spec, self.w, layer)
            self.layers[layer] = MoELayer(layer, router, self.experts, self.kind)
        return self.layers[layer]

    def build(self, node: Node) -> Compute | SyncKernel:
        """The node's kernel: a Compute for a compute node, a SyncKernel for a sync node."""
        builder = getattr(self, f"_{node.op.value}", None)
        if builder is None:
            raise GraphError(f"op {node.op.value!r} is not executable by this runtime yet", key=node.name)
        return builder(node)

    def compute(self, node: Node) -> Compute:
        kernel = self.build(node)
        assert isinstance(kernel, Compute), node.name
        return kernel

    def sync(self, node: Node) -> SyncKernel:
        kernel = self.build(node)
        assert isinstance(kernel, SyncKernel), node.name
        return kernel

    # -- dense --------------------------------------------------------------------------------------
    def _embed(self, node: Node) -> Compute:
        return Compute(functools.partial(F.embedding, weight=self.w[("embed", None)]))

    def _norm(self, node: Node) -> Compute:
        weight = self.w[(node.attr("weight"), node.attr("layer"))]
        return Compute(functools.partial(ops.rms_norm, weight=weight, eps=self.spec.model.norm_eps))

    def _add(self, node: Node) -> Compute:
        return ADD

    _combine = _add

    def _mlp(self, node: Node) -> Compute:
        gate, up, down = (self.w[(k, node.attr("layer"))] for k in ("mlp_gate", "mlp_up", "mlp_down"))
        return Compute(functools.partial(ops.swiglu, gate=gate, up=up, down=down))

    def _lm_head(self, node: Node) -> Compute:
        head = self.w[("embed" if self.spec.model.tie_word_embeddings else "lm_head", None)]
        return Compute(ops.LMHead(head), needs_ctx=True)

    def _attention(self, node: Node) -> Compute:
        layer = node.attr("layer")
        cache = self.kv.layers[layer]
        if node.attr("kind") == "mla":
            w = {k: self.w.get((k, layer)) for k in MLA_WEIGHTS}
            return Compute(ops.LatentAttention(self.spec, w, cache, self.attn_scale), needs_ctx=True)
        w = {k: self.w.get((k, layer)) for k in GQA_WEIGHTS}
        attention = ops.Attention(self.spec, w, cache, self.attn_scale, self.spec.sliding_window(layer))
        return Compute(attention, needs_ctx=True)

    # -- the routed-expert layer (mobile.moe.layer) -------------------------------------------------
    def _router(self, node: Node) -> Compute:
        return Compute(self.moe(node.attr("layer")).route(shuffled=node.attr("order") == "random"))

    def _predict(self, node: Node) -> Compute:
        return Compute(self.moe(node.attr("layer")).predict(node.attr("top_k")))

    def _fetch(self, node: Node) -> SyncKernel:
        return self.moe(node.attr("layer")).fetch_kernel(node)

    def _wait(self, node: Node) -> SyncKernel:
        return self.moe(node.attr("layer")).wait_kernel()

    def _prefetch(self, node: Node) -> SyncKernel:
        return self.moe(node.attr("layer")).prefetch_kernel(node.attr("set"), node.attr("lo", 0), node.attr("hi"))

    def _expert(self, node: Node) -> Compute:
        layer = node.attr("layer")
        if node.attr("variant") == "shared":
            gate, up, down = (self.w[(k, layer)] for k in ("shared_gate", "shared_up", "shared_down"))
            sigmoid = self.w[("shared_expert_gate", layer)] if node.attr("gate") == "sigmoid" else None
            return Compute(functools.partial(ops.shared_expert, gate=gate, up=up, down=down, sigmoid_gate=sigmoid))
        return Compute(self.moe(layer).experts_kernel(node))

    # -- control ------------------------------------------------------------------------------------
    def _importance_gate(self, node: Node) -> SyncKernel:
        """True: the token is important and falls back to the big pass."""
        signal, tau = node.attr("signal"), float(node.attr("tau"))
        if signal == "router_mass":
            little_k = node.attr("little_k")

            def read(ctx, routed):  # at this layer the little set drops too much of the big set's mass
                weights = routed[0]  # [T, K], in selection order
                share = weights[:, :little_k].sum(-1) / weights.sum(-1).clamp_min(1e-30)
                return [(share < tau).any()]
        else:
            def read(ctx, logits):  # the little pass is not confident about the next token
                # tau 1 sends every token back, even one whose distribution is exactly one-hot
                return [ops.confidence(logits[-1], signal) < tau if tau < 1 else logits.new_ones((), dtype=torch.bool)]

        return SyncKernel(lambda ctx, values, _: bool(values[0][0]), read)

    def _fallback(self, node: Node) -> Compute:
        return Compute(lambda gate, router: router)  # the big pass starts at the shared router

    def _select(self, node: Node) -> Compute:
        return Compute(lambda little, big: big if big is not None else little)


@dataclass(frozen=True)
class HostNode:
    """A sync node as a sync step runs it: everything read from the node once, when the step is built."""

    name: str
    op: str
    inputs: tuple[str, ...]
    gate: bool  # an importance gate: its value says whether the token falls back
    kernel: SyncKernel


@dataclass
class Step:
    """One unit the executor runs: a segment of compute nodes (fn), or a run of sync nodes (sync)."""

    key: tuple[str, int]  # (pass, index): what the graph runner keys the segment's entries by
    nodes: list[Node]
    fn: Callable[[StepContext, dict[str, Any]], dict[str, Any]] | None
    sync: list[HostNode] | None
    live_in: list[str]
    drop_after: list[str]  # values no later step reads
    # with CUDA graphs: the segment without the executor's bookkeeping (the node list, the trace),
    # which a replay would skip; what the graph runner captures (fn itself when compiled)
    graph_fn: Callable[[StepContext, dict[str, Any]], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Forward:
    """What one forward runs (Executor.run). first: the pass it starts with. gated: its gates may
    end that pass and send the token to the big pass (a decoded token under a policy with a
    fallback); else a gate's value is read and ignored. refresh: on a fallback, the input of a KV
    refresh, () -> (ctx, tokens, positions recomputed before the token), for a big pass over them
    from the first node; without it the big pass runs again from the region only, on this
    forward's values."""

    first: Pass
    gated: bool = False
    refresh: Callable[[], tuple[StepContext, torch.Tensor, int]] | None = None


@dataclass(frozen=True)
class Outcome:
    logits: torch.Tensor
    passes: tuple[Pass, ...]  # the passes that ran, in order: (little, big) after a fallback
    refreshed: int = 0  # positions before the token that a KV refresh recomputed

    @property
    def fell_back(self) -> bool:
        return len(self.passes) > 1


def compiled(fn: Callable) -> Callable:
    """torch.compile as mobile uses it: every setting in one place.

    dynamic: the token count and the KV-cache length vary. No duck shapes: a dimension that merely
    happens to equal another today (the KV capacity and a weight's storage, both 256) must not be
    tied to it, or the next growth of the cache recompiles."""
    from torch.fx.experimental import _config as fx_config

    fx_config.use_duck_shape = False
    return torch.compile(fn, dynamic=True)


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


def passes_of(graph: Graph) -> tuple[Pass, ...]:
    """The passes a graph runs, as its policy says (mobile.policy)."""
    name = graph.spec.get("policy", {}).get("name", policies.REFERENCE)
    return tuple(Pass(p) for p in policies.get(name).passes)


class Executor:
    """The interpreter of a graph's passes: it runs a forward's first pass, reads the gates, and
    runs the big pass after a fallback (again over the region, or over a KV refresh's positions).
    Each pass's nodes (mobile.compiler.ir: Node.runs_in, Node.in_pass) are built into steps once."""

    def __init__(self, graph: Graph, kernels: Kernels, reader: HostReader, compile: bool = False,
                 trace: list | None = None, graphs: GraphRunner | None = None):
        """graphs: run the compute segments of static contexts (StepContext.key) through this
        runner (mobile.runtime.graphs); other forwards run as without it."""
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
        self.steps: dict[Pass, list[Step]] = {}
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
        steps = []
        for si, group in enumerate(groups):
            defined = {n.name for n in group}
            live_in = sorted({i for n in group for i in n.inputs if i not in defined})
            drop = [v for v, s in last_use.items() if s == si and v not in self.keep]
            if group[0].op in SYNC_OPS:
                host = [HostNode(n.name, n.op.value, n.inputs, n.op is Op.IMPORTANCE_GATE, kernels.sync(n))
                        for n in group]
                steps.append(Step((p.value, si), group, None, host, live_in, drop))
                continue
            live_out = [n.name for n in group if last_use.get(n.name, -1) > si or n.name in self.keep]
            built = [kernels.compute(n) for n in group]
            fn = self._segment_fn(group, built, live_out)
            if self.compile:
                fn = compiled(fn)  # compiled code keeps no bookkeeping: it is what the runner captures too
            plain = None
            if self.graphs is not None:
                plain = fn if self.compile else self._segment_fn(group, built, live_out, bookkeeping=False)
            steps.append(Step((p.value, si), group, fn, None, live_in, drop, plain))
        return steps

    def _segment_fn(self, nodes: list[Node], kernels: list[Compute], live_out: list[str], bookkeeping: bool = True):
        """Generate one straight-line Python function per compute segment. bookkeeping: it records
        the nodes it ran (eager) and their spans (with a trace); off for the graph runner's.

        Straight-line code (no loop over nodes, no dict shuffling) is what dynamo traces best, and a
        separate code object per segment gives each its own compile cache instead of piling
        recompiles onto one shared function. Each kernel is called as it is (a function of mobile.models.ops
        or mobile.moe, weights bound), a residual add written inline. The source is registered with
        linecache under the segment's file name, so a traceback inside a segment shows its line.
        """
        var = {n.name: f"v{i}" for i, n in enumerate(nodes)}
        args: list[str] = []
        body: list[str] = []
        for i, (node, kernel) in enumerate(zip(nodes, kernels, strict=True)):
            ins = []
            for name in node.inputs:
                if name not in var:
                    var[name] = f"a{len(args)}"
                    args.append(name)
                ins.append(var[name])
            if kernel.inline is not None:
                value = kernel.inline.format(*ins)
            else:
                value = f"k{i}({', '.join((['ctx'] if kernel.needs_ctx else []) + ins)})"
            call = f"{var[node.name]} = {value}  # {node.name}"
            if self.trace is not None and bookkeeping:
                body += ["    t0 = clock()", f"    {call}",
                         f"    trace.append(({node.name!r}, {node.op.value!r}, 'compute', t0, clock(), 0))"]
            else:
                body.append(f"    {call}")
        if not self.compile and bookkeeping:
            body.append(f"    executed.extend({[n.name for n in nodes]!r})")
        outs = ", ".join(f"{n!r}: {var[n]}" for n in live_out)
        unpack = "".join(f"    {var[a]} = env[{a!r}]\n" for a in args)
        src = f"def segment(ctx, env):\n{unpack}" + "\n".join(body) + f"\n    return {{{outs}}}\n"
        scope: dict[str, Any] = {f"k{i}": k.fn for i, k in enumerate(kernels) if k.fn is not None}
        scope.update(executed=self.executed, trace=self.trace, clock=self.clock)
        filename = f"<mobile segment {nodes[0].name}..{nodes[-1].name}{'' if bookkeeping else ' (graphs)'}>"
        linecache.cache[filename] = (len(src), None, src.splitlines(keepends=True), filename)
        exec(compile(src, filename, "exec"), scope)
        fn = scope["segment"]
        fn.source = src
        return fn

    def run(self, ctx: StepContext, tokens: torch.Tensor, forward: Forward) -> Outcome:
        """One forward: its first pass; after a fallback (a gate fired in a gated little pass) the
        big pass, again over the region on this forward's values, or over a KV refresh's positions."""
        self.executed.clear()
        env: dict[str, Any] = {GRAPH_INPUTS[0]: tokens}
        if not self._pass(forward.first, ctx, env, 0, forward.gated):
            return Outcome(env[self.output], (forward.first,))
        if forward.refresh is not None:
            ctx, tokens, refreshed = forward.refresh()
            env = {GRAPH_INPUTS[0]: tokens}
            self._pass(Pass.BIG, ctx, env, 0, False)
            return Outcome(env[self.output], (forward.first, Pass.BIG), refreshed)
        self._pass(Pass.BIG, ctx, env, self.entry[Pass.BIG], False)
        return Outcome(env[self.output], (forward.first, Pass.BIG))

    def _pass(self, p: Pass, ctx: StepContext, env: dict[str, Any], start: int, gated: bool) -> bool:
        """Run pass p's steps from step `start`; True when a gate fired and `gated`: the pass ends there."""
        static = self.graphs is not None and ctx.key is not None
        first = start == 0  # the forward's first compute step gathers a static context's rope rows
        for step in self.steps[p][start:]:
            if step.sync is not None:
                if self._sync(step, ctx, env) and gated:
                    return True
            elif static:
                env.update(self._graph_step(step, ctx, {k: env.get(k) for k in step.live_in}, first))
                first = False
            else:
                assert step.fn is not None
                env.update(step.fn(ctx, {k: env.get(k) for k in step.live_in}))
            for v in step.drop_after:
                env.pop(v, None)
        return False

    def _sync(self, step: Step, ctx: StepContext, env: dict[str, Any]) -> bool:
        """Run one sync step: read what its nodes need from the device in one copy, then act on it
        node by node. True when a gate fired (the nodes after it are not run)."""
        assert step.sync is not None
        # reads take device values, which only compute makes, so all of them come from earlier
        # steps; acts run in order and see what the step's earlier nodes made (a fetch's handle)
        wanted = [n.kernel.read(ctx, *[env.get(i) for i in n.inputs]) if n.kernel.read is not None else []
                  for n in step.sync]
        values = self.reader.ints([t for ts in wanted for t in ts])
        start = 0
        for node, ts in zip(step.sync, wanted, strict=True):
            mine, start = values[start:start + len(ts)], start + len(ts)
            t0 = time.perf_counter()
            env[node.name] = node.kernel.act(ctx, mine, *[env.get(i) for i in node.inputs])
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
        assert self.graphs is not None and step.graph_fn is not None
        t0 = self.clock() if self.trace is not None else 0.0
        out = self.graphs.run(step.key, step.nodes, step.graph_fn, ctx, inputs, first)
        if self.trace is not None:
            name = f"{step.nodes[0].name}..{step.nodes[-1].name}"
            self.trace.append((name, "graph", "compute", t0, self.clock(), 0))
        if not self.compile:
            self.executed.extend(n.name for n in step.nodes)
        return out
