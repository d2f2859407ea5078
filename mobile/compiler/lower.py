"""Lowering: Spec -> Graph, one decoder layer at a time, in the naive order.

Every routed-expert use is lowered as router -> fetch -> wait -> expert (for a policy that keeps
every expert on the device, `resident`, just router -> expert): the fetch moves the set the
node's keep rule asks for into device cache slots and the wait hands the expert node its slot map.
Each fetch, prefetch and wait sits right before its use; moving them earlier, where they overlap
compute, is the scheduler's job (mobile.compiler.passes.schedule), not lowering's.

A graph is lowered once, whatever passes run it (mobile.compiler.ir: Pass). Its routed-expert nodes carry
the keep rule of the policy's decode pass (`rule`, a mobile.moe.rule.KeepRule's text). Under
`mobile`, whose tokens may fall back, they also carry the big pass's (`big_rule`: the whole big
set), and the graph is

    embedding .. the first MoE layer's router                run once per forward
    region "pass": its experts .. logits                     the little pass; the big pass again
    importance_gate (pass: little)                           after a fallback, and for a prompt

with, under policy.mass_tau, a mass gate after each router (pass: little), which can end the little
pass early. The speculative copies (next-layer prediction, the complement of the little set) are
the little pass's too. When no gate can fire (tau 0, no mass gate), fold_dead_gates removes the gate and the
big pass runs only for prompts (`prefill: big`). A fallback's big pass writes the region's
KV-cache positions again, so a fallen-back token leaves big-pass KV entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mobile import policy as policies
from mobile.compiler.budget import CachePlan, cache_plan
from mobile.compiler.ir import REGION, Graph, Node, Op
from mobile.moe.rule import KeepRule
from mobile.spec.schema import Spec


@dataclass(frozen=True)
class PassPlan:
    """How the graph's routed-expert nodes use their experts: the decode pass's rule and, where a
    big pass runs the same nodes again, the big set's."""

    variant: str  # the decode pass: "big" | "little"
    rule: KeepRule
    k: int  # experts per token, at most (a little pass whose rule may keep more than little_k: K)
    big: bool = False  # the region runs again as the big pass (mobile)
    complement_prefetch: bool = False
    predict_prefetch: bool = False
    mass_tau: float | None = None  # a per-layer importance gate on the router's little-set share


def decode_rule(spec: Spec) -> KeepRule:
    """The keep rule of the policy's decode pass: the big set, or the little set with the
    per-layer rule (layer_tau) and the cached experts (cached_complement) where the policy has them."""
    policy, p = spec.policy.traits, spec.policy
    if policy.decode_pass == "big":
        return KeepRule.big(spec.model.moe.top_k)
    tau = p.layer_tau if policy.layer_tau else (p.tau if policy.tau_is == "layer_mass" else None)
    rescale = p.little_weights == "rescale"
    if tau is None:
        return KeepRule("top", spec.little_k, rescale=rescale, cached=p.cache_aware)
    return KeepRule(p.effective_layer_rule, spec.little_k, float(tau), rescale, p.cache_aware)


def lower(spec: Spec) -> Graph:
    plan = cache_plan(spec)  # raises if the cache budget is below the working set
    policy, K = spec.policy.traits, spec.model.moe.top_k
    mode = spec.policy.effective_prefetch
    predicted = plan is not None and "predicted" in policy.prefetch and mode in ("both", "predicted")
    complement = plan is not None and "complement" in policy.prefetch and mode in ("both", "complement")
    rule = decode_rule(spec)
    k = K if rule.kind != "top" or rule.cached else rule.n
    pp = PassPlan(policy.decode_pass, rule, k, big=policy.fallback, complement_prefetch=complement and policy.fallback,
                  predict_prefetch=predicted, mass_tau=spec.policy.mass_tau if policy.fallback else None)
    nodes: list[Node] = []
    add = nodes.append
    add(Node.make("embed", Op.EMBED, ["tokens"]))
    if policy.fallback:
        entry = _lower_shared_prefix(spec, "embed", add)
        logits = _lower_pass(spec, pp, "embed", "logits", plan, add, entry)
        add(Node.make("importance_gate", Op.IMPORTANCE_GATE, [logits], region=REGION, signal=spec.policy.signal,
                      tau=spec.policy.tau, **{"pass": "little"}))
    else:
        _lower_pass(spec, pp, "embed", "logits", plan, add)
    return Graph(name=spec.name, nodes=tuple(nodes), spec=spec.to_dict(), passes=("lower",))


@dataclass(frozen=True)
class Entry:
    """Where the region starts after the part that runs once: layer `layer`'s MoE block, given the
    values of its residual input, its normed hidden state and its router."""

    layer: int
    attn_res: str
    h: str  # what the experts read
    router: str
    shared_expert: str | None  # the layer's shared expert (Gemma 4: its dense MLP), which the experts do not feed
    router_in: str  # what the router read (h, or Gemma 4's residual stream)


def _lower_shared_prefix(spec: Spec, x: str, add: Callable[[Node], None]) -> Entry:
    """Dense layers, then the first MoE layer up to its router: identical in the little and big
    passes, so `mobile` computes them once."""
    first = spec.moe_layers[0]
    for layer in range(first + 1):
        node = _node_maker(add, f"L{layer}.", layer, {})
        attn_res, h = _lower_attention(spec, x, node, layer)
        if layer < first:
            x = _layer_out(spec, attn_res, node("mlp", Op.MLP, [h]), node)
    h, router_in, shared = _ffn_inputs(spec, attn_res, h, node)
    router = _router(spec, router_in, node)
    if spec.model.moe.shared_expert.intermediate_size:
        shared = node("shared", Op.EXPERT, [h], variant="shared", gate=spec.model.moe.shared_expert.gate)
    return Entry(first, attn_res, h, router, shared, router_in)


def _node_maker(add: Callable[[Node], None], prefix: str, layer: int, region: dict) -> Callable[..., str]:
    """node(name, op, inputs, **attrs) -> the new node's full name, with prefix, layer and region."""

    def node(name: str, op: Op, inputs: list[str], **attrs) -> str:
        add(Node.make(prefix + name, op, inputs, layer=layer, **region, **attrs))
        return prefix + name

    return node


def _lower_attention(spec: Spec, x: str, node, layer: int) -> tuple[str, str]:
    """attn_norm -> attention (-> post_attn_norm, Gemma's sandwich) -> residual -> ffn_norm;
    returns (residual, normed hidden state). A linear-attention layer's token mixer is its own node
    kind: it reads and advances a recurrent state, which a fallback must restore (mobile.runtime.state)."""
    normed = node("attn_norm", Op.NORM, [x], weight="attn_norm")
    if spec.is_linear_layer(layer):
        attn = node("linear_attn", Op.LINEAR_ATTENTION, [normed], kind=spec.model.linear_attention.kind)
    else:
        attn = node("attn", Op.ATTENTION, [normed], kind=spec.model.attention.kind)
    if spec.model.sandwich_norms:
        attn = node("post_attn_norm", Op.NORM, [attn], weight="post_attn_norm")
    attn_res = node("attn_res", Op.ADD, [x, attn])
    return attn_res, node("ffn_norm", Op.NORM, [attn_res], weight="ffn_norm")


def _ffn_inputs(spec: Spec, attn_res: str, h: str, node) -> tuple[str, str, str | None]:
    """A MoE layer's (experts' input, router's input, its parallel dense branch or None). Gemma 4:
    the experts read their own norm of the residual stream, the router reads the stream itself (it
    norms it: mobile.moe.router), and the dense MLP runs on h beside them, post-normed."""
    moe = spec.model.moe
    if not moe.parallel_mlp:
        return h, h, None
    dense = node("mlp_post_norm", Op.NORM, [node("mlp", Op.MLP, [h])], weight="mlp_post_norm")
    experts_in = node("moe_norm", Op.NORM, [attn_res], weight="moe_norm")
    return experts_in, attn_res if moe.router_norm else h, dense


def _layer_out(spec: Spec, attn_res: str, ffn: str, node) -> str:
    """The feed-forward output (post-normed under Gemma's sandwich) added to the residual, times the
    layer's scalar where it has one."""
    m = spec.model
    if m.sandwich_norms:
        ffn = node("post_ffn_norm", Op.NORM, [ffn], weight="post_ffn_norm")
    return node("out", Op.ADD, [attn_res, ffn], **({"scale": "layer_scalar"} if m.layer_scalar else {}))


def _lower_pass(spec: Spec, pp: PassPlan, x: str, out: str, plan: CachePlan | None,
                add: Callable[[Node], None], entry: Entry | None = None) -> str:
    m = spec.model
    region = {} if entry is None else {"region": REGION}
    ahead: str | None = None  # the previous MoE layer's hidden state, for next-layer prediction
    for layer in range(entry.layer if entry else 0, m.num_layers):
        node = _node_maker(add, f"L{layer}.", layer, region)
        router = shared = None
        if entry is not None and layer == entry.layer:
            attn_res, h, router, shared = entry.attn_res, entry.h, entry.router, entry.shared_expert
            router_in = entry.router_in
        else:
            attn_res, h = _lower_attention(spec, x, node, layer)
            if spec.is_moe_layer(layer):
                h, router_in, shared = _ffn_inputs(spec, attn_res, h, node)
        if spec.is_moe_layer(layer):
            predict = ahead if pp.predict_prefetch and plan is not None else None
            router = router or _router(spec, router_in, node)
            ffn = _lower_moe(spec, pp, h, plan, node, router, shared, predict_from=predict)
            ahead = router_in  # what the next layer's router is applied to, to predict it
        else:
            ffn = node("mlp", Op.MLP, [h])
        x = _layer_out(spec, attn_res, ffn, node)
    add(Node.make("final_norm", Op.NORM, [x], weight="final_norm", **region))
    add(Node.make(out, Op.LM_HEAD, ["final_norm"], **region))
    return out


def _router(spec: Spec, h: str, node) -> str:
    """The router always ranks the big set (top-K); a little rule keeps its first little_k."""
    moe = spec.model.moe
    order = {"order": "random"} if spec.policy.traits.decode_pass == "little" and \
        spec.policy.little_select == "random" else {}
    return node("router", Op.ROUTER, [h], top_k=moe.top_k, num_experts=moe.num_experts,
                norm_topk_prob=moe.norm_topk_prob, scaling=moe.routed_scaling_factor, **order,
                **_scoring_attrs(spec))


def _scoring_attrs(spec: Spec) -> dict[str, object]:
    """How a router node (and a prediction of it) chooses experts, where that is not the softmax
    default (mobile.moe.router): the attrs of a softmax router stay as they were."""
    moe = spec.model.moe
    if moe.scoring != "sigmoid":
        return {} if moe.scoring == "softmax" else {"scoring": moe.scoring}
    return {"scoring": moe.scoring, "correction_bias": moe.correction_bias, "n_group": moe.n_group,
            "topk_group": moe.topk_group}


def _lower_moe(spec: Spec, pp: PassPlan, h: str, plan: CachePlan | None, node, router: str | None = None,
               shared: str | None = None, predict_from: str | None = None) -> str:
    """router, shared: values computed before the region (the shared prefix), else new nodes.
    predict_from: the previous MoE layer's hidden state; its prediction of this layer's experts is
    prefetched (next-layer prediction)."""
    moe = spec.model.moe
    K, k = moe.top_k, spec.little_k
    router = router or _router(spec, h, node)
    if pp.mass_tau is not None and K > k:
        # known as soon as the router has run: a token found important here skips the rest of
        # its little pass and goes straight to the big pass
        node("mass_gate", Op.IMPORTANCE_GATE, [router], signal="router_mass", tau=pp.mass_tau, little_k=k,
             **{"pass": "little"})
    use: dict[str, object] = {"variant": pp.variant, "rule": pp.rule.text, "k": pp.k}
    if pp.big:
        use.update(big_variant="big", big_rule=KeepRule.big(K).text, big_k=K)
    if predict_from is not None:
        assert plan is not None  # _lower_pass predicts only with a cache
        # the most probable predictions first; never more than the staging slots can take. A big
        # pass after a fallback (or for a prompt) predicts nothing: the decode pass's copies serve it
        k_pred = min(k if pp.variant == "little" else K, plan.staging)
        only = {"pass": pp.variant} if pp.big else {}
        predict = node("predict", Op.PREDICT, [predict_from], top_k=k_pred, **only, **_scoring_attrs(spec))
        node("prefetch", Op.PREFETCH, [predict], set="predicted", k=k_pred, staging=plan.staging, **only)
    if spec.policy.traits.placement == "host":  # every expert computed where it lives, on the host
        experts = node("host_experts", Op.HOST_EXPERTS, [h, router], **use)
    elif plan is None:  # every expert is on the device: nothing to fetch or wait for
        experts = node("experts", Op.EXPERT, [h, router], **use)
    else:
        # a placement that may compute misses on the host reads the hidden rows with the routes
        placed = spec.policy.effective_placement in policies.PLACED
        fetch = node("fetch", Op.FETCH, [router, h] if placed else [router], **use)
        experts = node("experts", Op.EXPERT, [h, router, node("wait", Op.WAIT, [fetch])], **use)
        if placed:  # the host's share of the layer, computed while the device runs its own
            experts = node("host_join", Op.HOST_JOIN, [experts, fetch])
    if moe.parallel_mlp:  # Gemma 4: the experts' output post-normed, then the dense branch's added
        assert shared is not None  # _ffn_inputs made it
        experts = node("moe", Op.COMBINE, [shared, node("moe_post_norm", Op.NORM, [experts], weight="moe_post_norm")])
    elif moe.shared_expert.intermediate_size:
        shared = shared or node("shared", Op.EXPERT, [h], variant="shared", gate=moe.shared_expert.gate)
        experts = node("moe", Op.COMBINE, [experts, shared])
    if pp.complement_prefetch and plan is not None and K > k:
        # S_K minus S_k is known once the router has run; stage it at low priority, for a possible
        # fallback. It reads the fetch too, so it runs after the little set is pinned and can never evict it.
        hi = min(K, k + plan.staging)  # the complement's best-ranked experts, if staging is small
        node("complement", Op.PREFETCH, [router, fetch], set="complement", lo=k, hi=hi, k=hi - k,
             staging=plan.staging, **{"pass": "little"})
    return experts
