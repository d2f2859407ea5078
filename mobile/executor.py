"""The executor: runs a scheduled graph, node by node, in the order graph.json gives.

Each compute node becomes a kernel, a closure over its weights: kernel(ctx, *input values) -> value.
Consecutive nodes of one segment (the `seg` attr, set by the plan_segments pass) run as one
function, which `--compile` hands to torch.compile. Sync nodes (fetch, wait, prefetch, gates) run
between segments in plain Python, because they talk to the expert cache on the host. A run of
adjacent sync nodes is one sync step, and the device values its nodes need on the host are read
in one copy (mobile.hostio): a MoE layer's fetch and the prefetches that go with it cost one read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mobile import moe, ops
from mobile.devclock import clock_for
from mobile.errors import GraphError
from mobile.hostio import HostReader
from mobile.ir import GRAPH_INPUTS, SYNC_OPS, Graph, Node, Op
from mobile.kv import KVCache
from mobile.spec import Spec
from mobile.verify import verify

if TYPE_CHECKING:
    from mobile.graphs import GraphRunner

Kernel = Callable[..., Any]
MLA_LATENT_NORM_EPS = 1e-6


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
class SyncKernel:
    """A node the host runs between compute segments.
    read(ctx, *inputs) -> the device tensors it needs on the host (one copy for its whole step);
    act(ctx, values, *inputs) -> its value, given those tensors' values as lists of ints."""

    act: Callable[..., Any]
    read: Callable[..., list[torch.Tensor]] | None = None


def expert_rule(node: Node) -> tuple[str, int, float, bool, bool]:
    """A routed expert or fetch node's keep rule, as the expert op takes it: (rule, n, tau, rescale,
    cached). Big: the top k. Little: the top little_k, or the per-layer rule at layer_tau; cached:
    the dropped experts already on the device run too (mobile.moe)."""
    if node.attr("variant") != "little":
        return "top", int(node.attr("k")), 0.0, False, False
    rescale, cached = node.attr("little_weights") == "rescale", bool(node.attr("cached"))
    tau = node.attr("layer_tau")
    if tau is None:
        return "top", int(node.attr("little_k")), 0.0, rescale, cached
    return node.attr("layer_rule", "switch"), int(node.attr("little_k")), float(tau), rescale, cached


@dataclass
class StepContext:
    """Per-forward values every kernel may read. positions [T]; cos, sin [T, 1, rope_dim] (ops.rope_tables)."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    kv_len: int  # attend over cache rows [0, kv_len)
    last_only: bool = False  # the caller needs only the last position's logits: lm_head skips the rest
    all_visible: bool = False  # one token attending over exactly the rows before it: no mask needed
    # a static context (mobile.graphs.StaticState): its tensors are persistent buffers, and the
    # forward's compute segments run through the graph runner under this bucket
    key: tuple | None = None
    prologue: Callable[[], None] | None = None  # device work the forward's first segment does first (rope rows)


class Kernels:
    """Builds the kernel of each node from the model's weights, KV cache and expert cache."""

    def __init__(self, spec: Spec, weights: dict[tuple[str, int | None], torch.Tensor], kv: KVCache, experts):
        self.spec, self.w, self.kv, self.experts = spec, fuse_qkv(weights), kv, experts
        a = spec.model.attention
        if a.kind == "mla":
            scale = (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5
            r = spec.model.rope
            if r.type != "default" and r.mscale_all_dim:
                scale *= ops._yarn_mscale(r.factor, r.mscale_all_dim) ** 2
        else:
            scale = a.head_dim ** -0.5
        self.attn_scale = scale

    def build(self, node: Node) -> Any:
        """The node's kernel: a function for a compute node, a SyncKernel for a sync node."""
        builder = getattr(self, f"_{node.op.value}", None)
        if builder is None:
            raise GraphError(f"op {node.op.value!r} is not executable by this runtime yet", key=node.name)
        return builder(node)

    def _embed(self, node: Node) -> Kernel:
        table = self.w[("embed", None)]
        return lambda ctx, tokens: F.embedding(tokens, table)

    def _norm(self, node: Node) -> Kernel:
        weight, eps = self.w[(node.attr("weight"), node.attr("layer"))], self.spec.model.norm_eps
        return lambda ctx, x: ops.rms_norm(x, weight, eps)

    def _add(self, node: Node) -> Kernel:
        return lambda ctx, a, b: a + b

    _combine = _add

    def _mlp(self, node: Node) -> Kernel:
        layer = node.attr("layer")
        gate, up, down = (self.w[(k, layer)] for k in ("mlp_gate", "mlp_up", "mlp_down"))
        return lambda ctx, x: ops.swiglu(x, gate, up, down)

    def _lm_head(self, node: Node) -> Kernel:
        key = "embed" if self.spec.model.tie_word_embeddings else "lm_head"
        head = self.w[(key, None)]
        return lambda ctx, x: F.linear(x[-1:] if ctx.last_only else x, head).float()

    def _route(self, node: Node, top_k: int, norm: bool = False, scaling: float = 1.0) -> Callable[..., Any]:
        """x -> ops.route's (weights, ids) for the node's layer, scored as the node's attrs say."""
        layer = node.attr("layer")
        w = self.w[("router", layer)]
        correction = self.w[("router_correction", layer)] if node.attr("correction_bias") else None
        scoring = (node.attr("scoring", "softmax"), correction, node.attr("n_group", 1), node.attr("topk_group", 1))
        bias = self.w.get(("router_bias", layer))  # gpt-oss's router is a linear layer with a bias
        return lambda x: ops.route(x, w, top_k, norm, scaling, *scoring, bias=bias)

    def _router(self, node: Node) -> Kernel:
        route = self._route(node, node.attr("top_k"), bool(node.attr("norm_topk_prob")),
                            float(node.attr("scaling", 1.0)))
        if node.attr("order") == "random":  # the random-halving baseline: shuffle the big set per token
            device = self.w[("router", node.attr("layer"))].device
            gen = torch.Generator(device=device).manual_seed(node.attr("layer") or 0)

            def shuffled(ctx, x):
                weights, ids = route(x)
                perm = torch.argsort(torch.rand(weights.shape, generator=gen, device=device), dim=-1)
                return weights.gather(1, perm), ids.gather(1, perm)

            return shuffled
        return lambda ctx, x: route(x)

    # -- sync nodes -------------------------------------------------------------------------------
    def _fetch(self, node: Node) -> SyncKernel:
        layer = node.attr("layer")
        rule, n, tau, _, cached = expert_rule(node)
        experts = self.experts

        def read(ctx, routed):
            weights, ids = routed
            status = moe.fetch_status(weights, ids, experts.slot_map(layer), rule, n, tau, cached)
            return [status, ids] if experts.tracks_routes else [status]

        def act(ctx, values, routed):
            if experts.tracks_routes:
                experts.note_route(layer, values[1], routed[1].shape[1])
            return experts.fetch(layer, values[0])

        return SyncKernel(act, read)

    def _prefetch(self, node: Node) -> SyncKernel:
        layer, lo, hi, kind = node.attr("layer"), node.attr("lo"), node.attr("hi"), node.attr("set")
        if kind == "complement":  # reads the router: the big set minus the little set
            return SyncKernel(lambda ctx, values, routed, fetched: self.experts.prefetch(layer, values[0], kind),
                              lambda ctx, routed, fetched: [routed[1][:, lo:hi]])
        return SyncKernel(lambda ctx, values, ids: self.experts.prefetch(layer, values[0], kind),
                          lambda ctx, ids: [ids])

    def _wait(self, node: Node) -> SyncKernel:
        return SyncKernel(lambda ctx, values, handle: self.experts.wait(handle))

    def _importance_gate(self, node: Node) -> SyncKernel:
        """True: the token is important and falls back to the big pass."""
        signal, tau = node.attr("signal"), float(node.attr("tau"))
        if signal == "router_mass":
            little_k = node.attr("little_k")

            def read(ctx, routed):  # at this layer the little set drops too much of the big set's mass
                weights = routed[0]  # [T, K], in selection order (ops.route)
                share = weights[:, :little_k].sum(-1) / weights.sum(-1).clamp_min(1e-30)
                return [(share < tau).any()]
        else:
            def read(ctx, logits):  # the little pass is not confident about the next token
                # tau 1 sends every token back, even one whose distribution is exactly one-hot
                return [ops.confidence(logits[-1], signal) < tau if tau < 1 else logits.new_ones((), dtype=torch.bool)]

        return SyncKernel(lambda ctx, values, _: bool(values[0][0]), read)

    # -- compute nodes ----------------------------------------------------------------------------
    def _fallback(self, node: Node) -> Kernel:
        return lambda ctx, gate, router: router  # the big pass starts at the shared router

    def _select(self, node: Node) -> Kernel:
        return lambda ctx, little, big: big if big is not None else little

    def _predict(self, node: Node) -> Kernel:
        # the layer's own choice (its bias, correction bias and groups too), from the previous layer's state
        route = self._route(node, node.attr("top_k"))
        return lambda ctx, x: route(x)[1]

    def _expert(self, node: Node) -> Kernel:
        layer = node.attr("layer")
        if node.attr("variant") == "shared":
            gate, up, down = (self.w[(k, layer)] for k in ("shared_gate", "shared_up", "shared_down"))
            if node.attr("gate") == "sigmoid":
                g = self.w[("shared_expert_gate", layer)]
                return lambda ctx, x: torch.sigmoid(F.linear(x, g)) * ops.swiglu(x, gate, up, down)
            return lambda ctx, x: ops.swiglu(x, gate, up, down)
        rule, n, tau, rescale, cached = expert_rule(node)
        arena = self.experts.arena(layer)
        # the arena's format (mobile.quant: packed rows are dequantized inside the op) and what an expert computes
        fmt = moe.spec_args(self.spec)
        op = torch.ops.mobile.moe_experts
        resident_map = self.experts.slot_map(layer)  # used when the graph has no wait (nothing moves)
        track = self.experts.track_use

        def routed(ctx, x, routed, slot_map=None):
            weights, ids = routed  # [T, K], in selection order (ops.route)
            if slot_map is None:
                slot_map = resident_map
                if track:  # eval only: which experts this node ran
                    self.experts.note_use(layer, moe.pairs(weights, ids, slot_map, rule, n, tau, rescale, cached)[1])
            if isinstance(slot_map, torch.Tensor):
                return op(x, weights, ids, slot_map, arena, rule, n, tau, rescale, cached, *fmt)
            # more experts than the cache holds (a long prompt): one round at a time, each on a map
            # of its own experts only, so no pair runs twice; the rule alone decides, as in a big pass
            out = torch.zeros_like(x)
            for round_map in slot_map:
                out += op(x, weights, ids, round_map, arena, rule, n, tau, rescale, False, *fmt)
            return out

        return routed

    def _attention(self, node: Node) -> Kernel:
        layer = node.attr("layer")
        if node.attr("kind") == "mla":
            return self._mla(layer)
        a, eps = self.spec.model.attention, self.spec.model.norm_eps
        keys = ("qkv_proj", "qkv_bias", "o_proj", "o_bias", "q_norm", "k_norm", "sinks")
        w: dict[str, Any] = {k: self.w.get((k, layer)) for k in keys}
        cache = self.kv.layers[layer]
        n, n_kv, d = a.num_heads, a.num_kv_heads, a.head_dim
        interleaved, scale, clip = self.spec.model.rope.interleaved, self.attn_scale, a.clip_qkv
        window = self.spec.sliding_window(layer)

        def attention(ctx: StepContext, x: torch.Tensor) -> torch.Tensor:
            T = x.shape[0]
            q, k, v = F.linear(x, w["qkv_proj"], w["qkv_bias"]).split([n * d, n_kv * d, n_kv * d], dim=-1)
            if a.qk_norm == "full":  # OLMoE: over all heads at once
                q, k = ops.rms_norm(q, w["q_norm"], eps), ops.rms_norm(k, w["k_norm"], eps)
            if clip is not None:
                q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
            q, k, v = q.reshape(T, n, d), k.reshape(T, n_kv, d), v.reshape(T, n_kv, d)
            if a.qk_norm == "per_head":  # Qwen3: over head_dim
                q, k = ops.rms_norm(q, w["q_norm"], eps), ops.rms_norm(k, w["k_norm"], eps)
            q, k = ops.apply_rope(torch.cat((q, k), dim=1), ctx.cos, ctx.sin, interleaved).split([n, n_kv], dim=1)
            cache.k.index_copy_(0, ctx.positions, k)
            cache.v.index_copy_(0, ctx.positions, v)
            out = ops.causal_attention(q, cache.k[: ctx.kv_len], cache.v[: ctx.kv_len], ctx.positions, scale,
                                       ctx.all_visible, window, w["sinks"])
            return F.linear(out, w["o_proj"], w["o_bias"])

        return attention

    def _mla(self, layer: int) -> Kernel:
        # DeepSeek's q_a and kv_a norms (V2 and V3, and transformers' ports) keep RMSNorm's default
        # eps whatever rms_norm_eps says (Kimi-K2.5 sets 1e-5)
        a, eps = self.spec.model.attention, MLA_LATENT_NORM_EPS
        keys = ("q_proj", "q_a_proj", "q_a_norm", "q_b_proj", "kv_a_proj", "kv_a_norm", "kv_b_proj", "o_proj")
        w: dict[str, Any] = {k: self.w.get((k, layer)) for k in keys}
        cache = self.kv.layers[layer]
        n, nope, rd, dv, r = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
        scale = self.attn_scale

        def mla(ctx: StepContext, x: torch.Tensor) -> torch.Tensor:
            T = x.shape[0]
            if w["q_proj"] is not None:
                q = F.linear(x, w["q_proj"])
            else:
                q = F.linear(ops.rms_norm(F.linear(x, w["q_a_proj"]), w["q_a_norm"], eps), w["q_b_proj"])
            q_nope, q_pe = q.view(T, n, nope + rd).split([nope, rd], dim=-1)
            latent, k_pe = F.linear(x, w["kv_a_proj"]).split([r, rd], dim=-1)
            latent = ops.rms_norm(latent, w["kv_a_norm"], eps)  # [T, r]: what the cache keeps
            q_pe = ops.apply_rope(q_pe, ctx.cos, ctx.sin, interleaved=True)
            k_pe = ops.apply_rope(k_pe.view(T, 1, rd), ctx.cos, ctx.sin, interleaved=True)
            cache.k.index_copy_(0, ctx.positions, latent.view(T, 1, r))
            cache.v.index_copy_(0, ctx.positions, k_pe)
            L = ctx.kv_len
            kv = F.linear(cache.k[:L, 0], w["kv_b_proj"]).view(L, n, nope + dv)  # expand the latents
            k_nope, v = kv.split([nope, dv], dim=-1)
            k = torch.cat((k_nope, cache.v[:L].expand(L, n, rd)), dim=-1)
            out = ops.causal_attention(torch.cat((q_nope, q_pe), dim=-1), k, v, ctx.positions, scale)
            return F.linear(out, w["o_proj"])

        return mla


@dataclass
class Step:
    """One unit the executor runs: a segment of compute nodes (fn), or a run of sync nodes (sync)."""

    nodes: list[Node]
    fn: Callable[[StepContext, dict[str, Any]], dict[str, Any]] | None
    sync: list[SyncKernel] | None
    live_in: list[str]
    drop_after: list[str]  # values no later step reads
    little: bool  # runs little-variant experts: a token through it used the little set
    # with CUDA graphs: the segment without the executor's bookkeeping (the node list, the trace),
    # which a replay would skip; what the graph runner captures (fn itself when compiled)
    graph_fn: Callable[[StepContext, dict[str, Any]], dict[str, Any]] | None = None

    @property
    def region(self) -> str | None:
        return self.nodes[0].attr("region")


def compiled(fn: Callable) -> Callable:
    """torch.compile as mobile uses it: every setting in one place.

    dynamic: the token count and the KV-cache length vary. No duck shapes: a dimension that merely
    happens to equal another today (the KV capacity and a weight's storage, both 256) must not be
    tied to it, or the next growth of the cache recompiles."""
    from torch.fx.experimental import _config as fx_config

    fx_config.use_duck_shape = False
    return torch.compile(fn, dynamic=True)


def plan_steps(graph: Graph) -> list[list[Node]]:
    """Group the node list into steps: runs of one segment (the `seg` attrs), and runs of adjacent
    sync nodes of one region."""
    steps: list[list[Node]] = []
    for n in graph.nodes:
        if steps:
            last = steps[-1][-1]
            if n.op in SYNC_OPS:
                joins = last.op in SYNC_OPS and last.attr("region") == n.attr("region")
            else:
                joins = last.op not in SYNC_OPS and n.attr("seg") is not None and n.attr("seg") == last.attr("seg")
            if joins:
                steps[-1].append(n)
                continue
        steps.append([n])
    return steps


class Executor:
    def __init__(self, graph: Graph, kernels: Kernels, reader: HostReader, compile: bool = False,
                 trace: list | None = None, graphs: GraphRunner | None = None):
        """graphs: run the compute segments of static contexts (StepContext.key) through this
        runner (mobile.graphs); other forwards run as without it."""
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
        self.fell_back: bool | None = None  # decode and gate modes: whether a gate sent the token to the big pass
        self.ran_little = False  # the last forward ran little-variant experts
        groups = plan_steps(graph)
        last_use: dict[str, int] = {}
        for si, group in enumerate(groups):
            for n in group:
                for i in n.inputs:
                    last_use[i] = si
        for out in graph.outputs:
            last_use[out] = len(groups)
        self.steps: list[Step] = []
        for si, group in enumerate(groups):
            defined = {n.name for n in group}
            live_in = sorted({i for n in group for i in n.inputs if i not in defined})
            drop = [v for v, s in last_use.items() if s == si]
            little = any(n.op is Op.EXPERT and n.attr("variant") == "little" for n in group)
            if group[0].op in SYNC_OPS:
                self.steps.append(Step(group, None, [kernels.build(n) for n in group], live_in, drop, little))
                continue
            live_out = [n.name for n in group if last_use.get(n.name, -1) > si]
            built = [kernels.build(n) for n in group]
            fn = self._segment_fn(group, built, live_out)
            if compile:
                fn = compiled(fn)  # compiled code keeps no bookkeeping: it is what the runner captures too
            plain = None
            if graphs is not None:
                plain = fn if compile else self._segment_fn(group, built, live_out, bookkeeping=False)
            self.steps.append(Step(group, fn, None, live_in, drop, little, plain))

    def _segment_fn(self, nodes: list[Node], kernels: list[Kernel], live_out: list[str], bookkeeping: bool = True):
        """Generate one straight-line Python function per compute segment. bookkeeping: it records
        the nodes it ran (eager) and their spans (with a trace); off for the graph runner's.

        Straight-line code (no loop over nodes, no dict shuffling) is what dynamo traces best, and a
        separate code object per segment gives each its own compile cache instead of piling
        recompiles onto one shared function.
        """
        var = {n.name: f"v{i}" for i, n in enumerate(nodes)}
        args: list[str] = []
        body: list[str] = []
        for i, node in enumerate(nodes):
            ins = []
            for name in node.inputs:
                if name not in var:
                    var[name] = f"a{len(args)}"
                    args.append(name)
                ins.append(var[name])
            call = f"{var[node.name]} = k{i}(ctx, {', '.join(ins)})  # {node.name}"
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
        scope: dict[str, Any] = {f"k{i}": k for i, k in enumerate(kernels)}
        scope.update(executed=self.executed, trace=self.trace, clock=self.clock)
        exec(compile(src, f"<mobile segment {nodes[0].name}..{nodes[-1].name}>", "exec"), scope)
        fn = scope["segment"]
        fn.source = src
        return fn

    def _sync(self, step: Step, ctx: StepContext, env: dict[str, Any], run: dict[str, bool], mode: str) -> bool:
        """Run one sync step: read what its nodes need from the device in one copy, then act on it
        node by node. Returns True when a gate fired and mode is "gate" (the caller stops)."""
        assert step.sync is not None
        # reads take device values, which only compute makes, so all of them come from earlier
        # steps; acts run in order and see what the step's earlier nodes made (a fetch's handle)
        wanted = [k.read(ctx, *(env.get(i) for i in n.inputs)) if k.read is not None else []
                  for n, k in zip(step.nodes, step.sync, strict=True)]
        values = self.reader.ints([t for ts in wanted for t in ts])
        start = 0
        for node, kernel, ts in zip(step.nodes, step.sync, wanted, strict=True):
            mine, start = values[start:start + len(ts)], start + len(ts)
            region = node.attr("region")
            if region is not None and not run[region]:
                continue  # a gate earlier in this step ended the little pass
            t0 = time.perf_counter()
            env[node.name] = kernel.act(ctx, mine, *(env.get(i) for i in node.inputs))
            if self.trace is not None:
                self.trace.append((node.name, node.op.value, "compute", t0, time.perf_counter(), 0))
            self.executed.append(node.name)
            if node.op is Op.IMPORTANCE_GATE and mode in ("decode", "gate") and env[node.name]:
                self.fell_back = True  # the rest of the little pass cannot change the outcome
                if mode == "gate":
                    return True
                run["little"], run["big"] = False, True
        return False

    def forward(self, ctx: StepContext, tokens: torch.Tensor, mode: str = "decode") -> torch.Tensor | None:
        """Run the graph once. Regions (the `mobile` policy's two passes) follow `mode`:
        decode: the little pass runs and the importance gates decide whether the big pass runs (a
        per-layer mass gate that fires ends the little pass there);
        big: the little pass is skipped and the big pass always runs;
        little: the little pass runs and never falls back;
        gate: as decode, but a token that falls back stops there and None is returned: the caller
        runs the big pass itself (the engine's KV refresh, which recomputes more positions)."""
        env: dict[str, Any] = {GRAPH_INPUTS[0]: tokens}
        self.executed.clear()
        run = {"little": mode != "big", "big": mode == "big"}
        self.fell_back = False if mode in ("decode", "gate") else None
        self.ran_little = False
        static = self.graphs is not None and ctx.key is not None
        first = True  # the first compute step of this forward (a static context's rope rows)
        for si, step in enumerate(self.steps):
            region = step.region
            if region is not None and not run[region]:
                continue
            self.ran_little |= step.little
            if step.sync is not None:
                if self._sync(step, ctx, env, run, mode):
                    return None
            elif static:
                env.update(self._graph_step(si, step, ctx, {k: env.get(k) for k in step.live_in}, first))
                first = False
            else:
                assert step.fn is not None
                env.update(step.fn(ctx, {k: env.get(k) for k in step.live_in}))
            for v in step.drop_after:
                env.pop(v, None)
        return env[self.graph.outputs[0]]

    def _graph_step(self, si: int, step: Step, ctx: StepContext, inputs: dict[str, Any], first: bool
                    ) -> dict[str, Any]:
        """One compute step through the graph runner, with the bookkeeping its function leaves out:
        the nodes it ran, and with a trace one span for the whole segment (a replay has no node
        boundaries to time)."""
        assert self.graphs is not None and step.graph_fn is not None
        t0 = self.clock() if self.trace is not None else 0.0
        out = self.graphs.run(si, step.nodes, step.graph_fn, ctx, inputs, first)
        if self.trace is not None:
            name = f"{step.nodes[0].name}..{step.nodes[-1].name}"
            self.trace.append((name, "graph", "compute", t0, self.clock(), 0))
        if not self.compile:
            self.executed.extend(n.name for n in step.nodes)
        return out
