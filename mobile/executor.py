"""The executor: runs a scheduled graph, node by node, in the order graph.json gives.

Each node becomes a kernel, a closure over its weights: kernel(ctx, *input values) -> value.
Consecutive nodes of one segment (the `seg` attr, set by the plan_segments pass) run as one
function, which `--compile` hands to torch.compile. Sync nodes (fetch, wait, ...) run between
segments in plain Python, because they talk to the expert cache on the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mobile import ops
from mobile.errors import GraphError
from mobile.ir import GRAPH_INPUTS, SYNC_OPS, Graph, Node, Op
from mobile.kv import KVCache
from mobile.spec import Spec
from mobile.verify import verify

Kernel = Callable[..., Any]


@dataclass
class StepContext:
    """Per-forward values every kernel may read. positions [T]; cos/sin [T, rope_dim/2]."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    kv_len: int  # attend over cache rows [0, kv_len)
    last_only: bool = False  # the caller needs only the last position's logits: lm_head skips the rest


class Kernels:
    """Builds the kernel of each node from the model's weights, KV cache and expert cache."""

    def __init__(self, spec: Spec, weights: dict[tuple[str, int | None], torch.Tensor], kv: KVCache, experts):
        self.spec, self.w, self.kv, self.experts = spec, weights, kv, experts
        a = spec.model.attention
        if a.kind == "mla":
            scale = (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5
            r = spec.model.rope
            if r.type != "default" and r.mscale_all_dim:
                scale *= ops._yarn_mscale(r.factor, r.mscale_all_dim) ** 2
        else:
            scale = a.head_dim ** -0.5
        self.attn_scale = scale

    def build(self, node: Node) -> Kernel:
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

    def _router(self, node: Node) -> Kernel:
        w = self.w[("router", node.attr("layer"))]
        k, norm, scaling = node.attr("top_k"), bool(node.attr("norm_topk_prob")), float(node.attr("scaling", 1.0))
        if node.attr("order") == "random":  # the random-halving baseline: shuffle the big set per token
            gen = torch.Generator(device=w.device).manual_seed(node.attr("layer") or 0)

            def shuffled(ctx, x):
                weights, ids = ops.route(x, w, k, norm, scaling)
                perm = torch.argsort(torch.rand(weights.shape, generator=gen, device=w.device), dim=-1)
                return weights.gather(1, perm), ids.gather(1, perm)

            return shuffled
        return lambda ctx, x: ops.route(x, w, k, norm, scaling)

    def _fetch(self, node: Node) -> Kernel:
        layer, k, choose = node.attr("layer"), node.attr("k"), self._chooser(node)
        cached = bool(node.attr("cached"))

        def fetch(ctx, routed):
            weights, ids = routed
            self.experts.note_route(layer, weights, ids)
            if choose is None:
                return self.experts.fetch(layer, ids[:, :k])
            _, keep = choose(weights)
            if cached:
                # dropped experts already on the device come along for free; the fetch pins them,
                # and the expert node finds exactly these in the fetch's slot map. One host copy
                # of the (small) route, then plain Python: this runs for every token and layer.
                pairs = list(zip(ids.flatten().tolist(), keep.flatten().tolist(), strict=True))
                free = self.experts.ready(layer, {e for e, kept in pairs if not kept})
                self.experts.note_free(sum(1 for e, kept in pairs if not kept and e in free))
                return self.experts.fetch(layer, [e for e, kept in pairs if kept or e in free])
            return self.experts.fetch(layer, ids[:, :k] if keep is None else ids[keep])

        return fetch

    def _chooser(self, node: Node):
        """For little-pass nodes: weights [T, K] -> (weights, keep), as ops.expert_choice."""
        if node.attr("variant") != "little":
            return None
        little_k, tau, rule = node.attr("little_k"), node.attr("layer_tau"), node.attr("layer_rule", "switch")
        rescale = node.attr("little_weights") == "rescale"
        if node.attr("cached") and tau is None:  # always a keep mask over all K: the free experts join it
            tau = 0.0
        return lambda weights: ops.expert_choice(weights, little_k, tau, rescale, rule)

    def _importance_gate(self, node: Node) -> Kernel:
        signal, tau = node.attr("signal"), float(node.attr("tau"))
        if signal == "router_mass":
            little_k = node.attr("little_k")

            def mass_gate(ctx, routed) -> bool:
                """True: at this layer the little set drops too much of the big set's router mass."""
                weights = routed[0]  # [T, K], sorted by weight
                share = weights[:, :little_k].sum(-1) / weights.sum(-1).clamp_min(1e-30)
                return bool((share < tau).any())

            return mass_gate

        def gate(ctx, logits) -> bool:
            """True: the token is important and falls back to the big pass."""
            p = torch.softmax(logits[-1].float(), dim=-1)
            if signal == "entropy":
                confident = float(-(p * torch.log(p.clamp_min(1e-30))).sum()) <= tau
            elif signal == "margin":
                top = torch.topk(p, 2).values
                confident = float(top[0] - top[1]) >= tau
            else:
                confident = float(p.max()) >= tau
            return not confident

        return gate

    def _fallback(self, node: Node) -> Kernel:
        return lambda ctx, gate, x: x  # the big pass starts again from the embeddings

    def _select(self, node: Node) -> Kernel:
        return lambda ctx, little, big: big if big is not None else little

    def _prefetch(self, node: Node) -> Kernel:
        layer, lo, hi = node.attr("layer"), node.attr("lo"), node.attr("hi")
        if node.attr("set") == "complement":  # reads the router: the big set minus the little set
            return lambda ctx, routed, fetched: self.experts.prefetch(layer, routed[1][:, lo:hi], "complement")
        return lambda ctx, ids: self.experts.prefetch(layer, ids)

    def _predict(self, node: Node) -> Kernel:
        w, k = self.w[("router", node.attr("layer"))], node.attr("top_k")
        return lambda ctx, x: torch.topk(F.linear(x.float(), w), k, dim=-1).indices

    def _wait(self, node: Node) -> Kernel:
        return lambda ctx, handle: self.experts.wait(handle)

    def _expert(self, node: Node) -> Kernel:
        layer = node.attr("layer")
        if node.attr("variant") == "shared":
            gate, up, down = (self.w[(k, layer)] for k in ("shared_gate", "shared_up", "shared_down"))
            if node.attr("gate") == "sigmoid":
                g = self.w[("shared_expert_gate", layer)]
                return lambda ctx, x: torch.sigmoid(F.linear(x, g)) * ops.swiglu(x, gate, up, down)
            return lambda ctx, x: ops.swiglu(x, gate, up, down)
        k, choose, cached = node.attr("k"), self._chooser(node), bool(node.attr("cached"))
        rescale = node.attr("little_weights") == "rescale"
        w13, w2 = self.experts.arena(layer)

        def routed(ctx, x, routed, slot_map):
            weights, ids = routed  # [T, K], sorted by weight
            if cached and isinstance(slot_map, torch.Tensor):
                # the slot map holds exactly what the fetch asked for, the chosen experts and the
                # free ones: it is the keep mask, and the free experts take the router's weights
                keep = slot_map[ids] >= 0
                w = ops.kept_weights(weights, keep, rescale)
            elif choose is None:
                w, keep = weights[:, :k], None
            else:
                w, keep = choose(weights)
            used = ids[:, :w.shape[1]]
            if isinstance(slot_map, torch.Tensor):
                return ops.routed_experts(x, w, slot_map[used], w13, w2, keep)
            out = torch.zeros_like(x)  # more experts than the cache holds: one round at a time
            for members, round_map in slot_map:
                in_round = torch.isin(used, members)
                if keep is not None:
                    in_round &= keep
                out += ops.routed_experts(x, w, round_map[used], w13, w2, in_round)
            return out

        return routed

    def _attention(self, node: Node) -> Kernel:
        layer = node.attr("layer")
        if node.attr("kind") == "mla":
            return self._mla(layer)
        a, eps = self.spec.model.attention, self.spec.model.norm_eps
        keys = ("q_proj", "k_proj", "v_proj", "o_proj", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm")
        w: dict[str, Any] = {k: self.w.get((k, layer)) for k in keys}
        cache = self.kv.layers[layer]
        n, n_kv, d = a.num_heads, a.num_kv_heads, a.head_dim
        interleaved, scale, clip = self.spec.model.rope.interleaved, self.attn_scale, a.clip_qkv

        def attention(ctx: StepContext, x: torch.Tensor) -> torch.Tensor:
            T = x.shape[0]
            q, k, v = (F.linear(x, w[p + "_proj"], w[p + "_bias"]) for p in "qkv")
            if a.qk_norm == "full":  # OLMoE: over all heads at once
                q, k = ops.rms_norm(q, w["q_norm"], eps), ops.rms_norm(k, w["k_norm"], eps)
            if clip is not None:
                q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
            q, k, v = q.view(T, n, d), k.view(T, n_kv, d), v.view(T, n_kv, d)
            if a.qk_norm == "per_head":  # Qwen3: over head_dim
                q, k = ops.rms_norm(q, w["q_norm"], eps), ops.rms_norm(k, w["k_norm"], eps)
            q = ops.apply_rope(q, ctx.cos, ctx.sin, interleaved)
            k = ops.apply_rope(k, ctx.cos, ctx.sin, interleaved)
            cache.k.index_copy_(0, ctx.positions, k)
            cache.v.index_copy_(0, ctx.positions, v)
            out = ops.causal_attention(q, cache.k[: ctx.kv_len], cache.v[: ctx.kv_len], ctx.positions, scale)
            return F.linear(out, w["o_proj"])

        return attention

    def _mla(self, layer: int) -> Kernel:
        a, eps = self.spec.model.attention, self.spec.model.norm_eps
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
    """One unit the executor runs: a segment of compute nodes, or a single sync node."""

    nodes: list[Node]
    fn: Callable[[StepContext, dict[str, Any]], dict[str, Any]]
    live_in: list[str]
    live_out: list[str]
    drop_after: list[str]  # values no later step reads
    little: bool  # runs little-variant experts: a token through it used the little set


def plan_steps(graph: Graph) -> list[list[Node]]:
    """Group the node list into steps by the `seg` attrs; sync nodes are steps of their own."""
    steps: list[list[Node]] = []
    current = object()
    for n in graph.nodes:
        seg = n.attr("seg")
        if n.op in SYNC_OPS or seg is None or seg != current:
            steps.append([n])
            current = None if n.op in SYNC_OPS or seg is None else seg
        else:
            steps[-1].append(n)
    return steps


class Executor:
    def __init__(self, graph: Graph, kernels: Kernels, compile: bool = False, trace: list | None = None):
        errors = verify(graph)
        if errors:
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            raise GraphError(f"graph fails verification: {errors[0]}{more}", where=graph.name)
        self.graph = graph
        self.compile = compile
        # measured timeline: (name, op, stream, start_s, end_s, bytes) per node; eager runs only,
        # since inside a compiled segment nodes have no boundaries to time
        self.trace = trace if not compile else None
        self.executed: list[str] = []  # node names in the order the last eager forward ran them
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
            # a gate's decision is read by the executor itself, even where no node reads it
            live_out = [n.name for n in group if last_use.get(n.name, -1) > si or n.op is Op.IMPORTANCE_GATE]
            drop = [v for v, s in last_use.items() if s == si]
            fn = self._segment_fn(group, [kernels.build(n) for n in group], live_out)
            if compile and group[0].op not in SYNC_OPS:
                fn = torch.compile(fn, dynamic=True)
            little = any(n.op is Op.EXPERT and n.attr("variant") == "little" for n in group)
            self.steps.append(Step(group, fn, live_in, live_out, drop, little))

    def _segment_fn(self, nodes: list[Node], kernels: list[Kernel], live_out: list[str]):
        """Generate one straight-line Python function per step.

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
            if self.trace is not None:
                body += ["    t0 = clock()", f"    {call}",
                         f"    trace.append(({node.name!r}, {node.op.value!r}, 'compute', t0, clock(), 0))"]
            else:
                body.append(f"    {call}")
            if not self.compile:
                body.append(f"    executed.append({node.name!r})")
        outs = ", ".join(f"{n!r}: {var[n]}" for n in live_out)
        unpack = "".join(f"    {var[a]} = env[{a!r}]\n" for a in args)
        src = f"def segment(ctx, env):\n{unpack}" + "\n".join(body) + f"\n    return {{{outs}}}\n"
        scope: dict[str, Any] = {f"k{i}": k for i, k in enumerate(kernels)}
        scope.update(executed=self.executed, trace=self.trace, clock=time.perf_counter)
        exec(compile(src, f"<mobile segment {nodes[0].name}..{nodes[-1].name}>", "exec"), scope)
        fn = scope["segment"]
        fn.source = src
        return fn

    def forward(self, ctx: StepContext, tokens: torch.Tensor, mode: str = "decode") -> torch.Tensor | None:
        """Run the graph once. Regions (the `mobile` policy's two passes) follow `mode`:
        decode: the little pass runs and the importance gates decide whether the fallback runs (a
        per-layer mass gate that fires ends the little pass there);
        big: the little pass is skipped and the fallback (big) pass always runs;
        little: the little pass runs and never falls back;
        gate: as decode, but a token that falls back stops there and None is returned: the caller
        runs the big pass itself (the engine's KV refresh, which recomputes more positions)."""
        env: dict[str, Any] = {GRAPH_INPUTS[0]: tokens}
        self.executed.clear()
        run = {"little": mode != "big", "fallback": mode == "big"}
        self.fell_back: bool | None = None  # set by the importance gate, in decode mode
        self.ran_little = False
        for step in self.steps:
            region = step.nodes[0].attr("region")
            if region is not None and not run[region]:
                continue
            self.ran_little |= step.little
            env.update(step.fn(ctx, {k: env.get(k) for k in step.live_in}))
            if step.nodes[0].op is Op.IMPORTANCE_GATE and mode in ("decode", "gate"):
                self.fell_back = bool(env[step.nodes[0].name])
                if self.fell_back:  # the rest of the little pass (if any) cannot change the outcome
                    if mode == "gate":
                        return None
                    run["little"], run["fallback"] = False, True
            for v in step.drop_after:
                env.pop(v, None)
        return env[self.graph.outputs[0]]
