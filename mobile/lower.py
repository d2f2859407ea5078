"""Lowering: Spec -> Graph, one decoder layer at a time, in the naive order.

Every routed-expert use is lowered as router -> fetch -> wait -> expert (for a policy that keeps
every expert on the device, `resident`, just router -> expert): the fetch moves the set the
policy's rule asks for into device cache slots and the wait hands the expert node its slot map.
Each fetch, prefetch and wait sits right before its use; moving them earlier, where they overlap
compute, is the scheduler's job (mobile.passes.schedule), not lowering's.

The `mobile` policy lowers two passes over the same position:

    little pass (region "little")  -> little logits -> importance_gate -> fallback
        (with policy.mass_tau, also a mass_gate after each router: it can end the little pass early)
    big pass    (region "big", reads the fallback node) -> big logits
    logits = select(little logits, big logits)

The big pass also runs a prompt (`policy.prefill: big`). When no gate can fire (tau 0, no mass
gate), the fold_dead_gates pass removes the gate and the fallback node, and the big pass is then
entered only by a prompt.

Everything up to the first MoE layer's router (embedding, dense layers, that layer's attention) is
the same in both passes, so it is lowered once, outside both regions, and both passes start at that
layer's experts. The executor runs the big region only when a gate asks for it (or for a prompt);
its attention writes the later layers' KV-cache positions again, so a fallen-back token leaves
big-pass KV entries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from mobile.budget import CachePlan, cache_plan
from mobile.ir import Graph, Node, Op
from mobile.spec import Spec


@dataclass(frozen=True)
class PassPlan:
    """How one forward pass uses its experts."""

    prefix: str  # node-name prefix: "" for the main pass, "B." for the fallback pass
    variant: str  # "big" | "little"
    region: str | None  # None, "little" or "big"
    k: int  # experts per token (upper bound when layer_tau lets a layer go big)
    layer_tau: float | None = None  # little only where the little set carries >= this share of the mass
    complement_prefetch: bool = False
    predict_prefetch: bool = False
    mass_tau: float | None = None  # a per-layer importance gate on the router's little-set share


def lower(spec: Spec) -> Graph:
    plan = cache_plan(spec)  # raises if the cache budget is below the working set
    policy, K, k = spec.policy.traits, spec.model.moe.top_k, spec.little_k
    mode = spec.policy.prefetch
    if mode == "auto":
        # measured on the demo model (docs/big-little-quality.md): once the little pass takes what the cache holds,
        # speculative copies cost more link time and cache room than they save
        mode = "none" if spec.policy.cache_aware else "both"
    predicted = plan is not None and "predicted" in policy.prefetch and mode in ("both", "predicted")
    complement = plan is not None and "complement" in policy.prefetch and mode in ("both", "complement")
    nodes: list[Node] = []
    add = nodes.append
    add(Node.make("embed", Op.EMBED, ["tokens"]))
    if policy.decode_pass == "big":
        _lower_pass(spec, PassPlan("", "big", None, K, predict_prefetch=predicted), "embed", "logits", plan, add)
    elif policy.fallback:
        little = PassPlan("", "little", "little", K if _may_go_big(spec, spec.policy.layer_tau) else k,
                          layer_tau=spec.policy.layer_tau, complement_prefetch=complement, predict_prefetch=predicted,
                          mass_tau=spec.policy.mass_tau)
        shared = _lower_shared_prefix(spec, "embed", add)
        little_logits = _lower_pass(spec, little, "embed", "little_logits", plan, add, shared)
        add(Node.make("importance_gate", Op.IMPORTANCE_GATE, [little_logits], region="little",
                      signal=spec.policy.signal, tau=spec.policy.tau))
        # the big pass enters here: the fallback node hands it the shared router output
        add(Node.make("fallback", Op.FALLBACK, ["importance_gate", shared.router], region="big"))
        big = PassPlan("B.", "big", "big", K)
        big_logits = _lower_pass(spec, big, "embed", "B.logits", plan, add,
                                 dataclasses.replace(shared, router="fallback"))
        add(Node.make("logits", Op.SELECT, [little_logits, big_logits]))
    else:
        tau = spec.policy.tau if policy.tau_is == "layer_mass" else None
        _lower_pass(spec, PassPlan("", "little", None, K if _may_go_big(spec, tau) else k, layer_tau=tau,
                                   predict_prefetch=predicted), "embed", "logits", plan, add)
    return Graph(name=spec.name, nodes=tuple(nodes), spec=spec.to_dict(), passes=("lower",))


def _may_go_big(spec: Spec, layer_tau: float | None) -> bool:
    """Whether a little pass may use more than little_k experts of a token at some layer."""
    return layer_tau is not None or spec.policy.cache_aware


@dataclass(frozen=True)
class Entry:
    """Where a pass starts when a shared prefix ran before it: layer `layer`'s MoE block, given the
    values of its residual input, its normed hidden state and its router."""

    layer: int
    attn_res: str
    h: str
    router: str
    shared_expert: str | None  # the layer's shared expert, which reads only h


def _lower_shared_prefix(spec: Spec, x: str, add: Callable[[Node], None]) -> Entry:
    """Dense layers, then the first MoE layer up to its router: identical in the little and big
    passes, so `mobile` computes them once."""
    first = spec.moe_layers[0]
    for layer in range(first + 1):
        node = _node_maker(add, f"L{layer}.", layer, {})
        attn_res, h = _lower_attention(spec, x, node)
        if layer < first:
            x = node("out", Op.ADD, [attn_res, node("mlp", Op.MLP, [h])])
    router = _router(spec, "little", h, node)
    shared = None
    if spec.model.moe.shared_expert.intermediate_size:
        shared = node("shared", Op.EXPERT, [h], variant="shared", gate=spec.model.moe.shared_expert.gate)
    return Entry(first, attn_res, h, router, shared)


def _node_maker(add: Callable[[Node], None], prefix: str, layer: int, region: dict) -> Callable[..., str]:
    """node(name, op, inputs, **attrs) -> the new node's full name, with prefix, layer and region."""

    def node(name: str, op: Op, inputs: list[str], **attrs) -> str:
        add(Node.make(prefix + name, op, inputs, layer=layer, **region, **attrs))
        return prefix + name

    return node


def _lower_attention(spec: Spec, x: str, node) -> tuple[str, str]:
    """attn_norm -> attention -> residual -> ffn_norm; returns (residual, normed hidden state)."""
    attn = node("attn", Op.ATTENTION, [node("attn_norm", Op.NORM, [x], weight="attn_norm")],
                kind=spec.model.attention.kind)
    attn_res = node("attn_res", Op.ADD, [x, attn])
    return attn_res, node("ffn_norm", Op.NORM, [attn_res], weight="ffn_norm")


def _lower_pass(spec: Spec, pp: PassPlan, x: str, out: str, plan: CachePlan | None,
                add: Callable[[Node], None], entry: Entry | None = None) -> str:
    m = spec.model
    region = {} if pp.region is None else {"region": pp.region}
    ahead: str | None = None  # the previous MoE layer's hidden state, for next-layer prediction
    for layer in range(entry.layer if entry else 0, m.num_layers):
        node = _node_maker(add, f"{pp.prefix}L{layer}.", layer, region)
        router = shared = None
        if entry is not None and layer == entry.layer:
            attn_res, h, router, shared = entry.attn_res, entry.h, entry.router, entry.shared_expert
        else:
            attn_res, h = _lower_attention(spec, x, node)
        if spec.is_moe_layer(layer):
            predict = ahead if pp.predict_prefetch and plan is not None else None
            ffn = _lower_moe(spec, pp, h, plan, node, router, shared, predict_from=predict)
            ahead = h
        else:
            ffn = node("mlp", Op.MLP, [h])
        x = node("out", Op.ADD, [attn_res, ffn])
    add(Node.make(pp.prefix + "final_norm", Op.NORM, [x], weight="final_norm", **region))
    add(Node.make(out, Op.LM_HEAD, [pp.prefix + "final_norm"], **region))
    return out


def _router(spec: Spec, variant: str, h: str, node) -> str:
    """The router always ranks the big set (top-K); the little variant uses its first little_k."""
    moe = spec.model.moe
    order = {"order": "random"} if variant == "little" and spec.policy.little_select == "random" else {}
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
    """router, shared: values computed before this pass (the shared prefix), else new nodes.
    predict_from: the previous MoE layer's hidden state; its prediction of this layer's experts is
    prefetched (next-layer prediction)."""
    moe = spec.model.moe
    K, k = moe.top_k, spec.little_k
    router = router or _router(spec, pp.variant, h, node)
    if pp.mass_tau is not None and K > k:
        # known as soon as the router has run: a token found important here skips the rest of
        # its little pass and goes straight to the big pass
        node("mass_gate", Op.IMPORTANCE_GATE, [router], signal="router_mass", tau=pp.mass_tau, little_k=k)
    use: dict[str, object] = {"k": pp.k}
    if pp.variant == "little":
        use.update(little_k=k, little_weights=spec.policy.little_weights)
        if pp.layer_tau is not None:
            use.update(layer_tau=pp.layer_tau, layer_rule=spec.policy.effective_layer_rule)
        if spec.policy.cache_aware:
            use["cached"] = True
    if predict_from is not None:
        assert plan is not None  # _lower_pass predicts only with a cache
        # the most probable predictions first; never more than the staging slots can take
        k_pred = min(k if pp.variant == "little" else K, plan.staging)
        predict = node("predict", Op.PREDICT, [predict_from], top_k=k_pred, **_scoring_attrs(spec))
        node("prefetch", Op.PREFETCH, [predict], set="predicted", k=k_pred, staging=plan.staging)
    if plan is None:  # every expert is on the device: nothing to fetch or wait for
        experts = node("experts", Op.EXPERT, [h, router], variant=pp.variant, **use)
    else:
        fetch = node("fetch", Op.FETCH, [router], set=pp.variant, variant=pp.variant, **use)
        experts = node("experts", Op.EXPERT, [h, router, node("wait", Op.WAIT, [fetch])], variant=pp.variant, **use)
    if moe.shared_expert.intermediate_size:
        shared = shared or node("shared", Op.EXPERT, [h], variant="shared", gate=moe.shared_expert.gate)
        experts = node("moe", Op.COMBINE, [experts, shared])
    if pp.complement_prefetch and plan is not None and K > k:
        # S_K minus S_k is known once the router has run; stage it at low priority, for a possible
        # fallback. It reads the fetch too, so it runs after the little set is pinned and can never evict it.
        hi = min(K, k + plan.staging)  # the complement's best-ranked experts, if staging is small
        node("complement", Op.PREFETCH, [router, fetch], set="complement", lo=k, hi=hi, k=hi - k,
             staging=plan.staging)
    return experts
