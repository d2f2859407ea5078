"""Lowering: Spec -> Graph, one decoder layer at a time.

Every routed-expert use is lowered as router -> fetch -> wait -> expert, whatever the policy: the
fetch moves the routed set into device cache slots (a no-op for `resident`) and the wait hands the
expert node its slot map. The transfers are explicit so that passes can move them.
"""

from __future__ import annotations

from mobile.budget import PREFETCH_POLICIES, cache_plan
from mobile.ir import Graph, Node, Op
from mobile.spec import Spec


def lower(spec: Spec) -> Graph:
    m = spec.model
    nodes: list[Node] = []
    add = nodes.append

    plan = cache_plan(spec)  # raises if the cache budget is below the working set
    prefetch = spec.policy.name in PREFETCH_POLICIES
    run_k = spec.little_k if spec.policy.name == "little" else m.moe.top_k  # experts each token uses
    moe_layers = spec.moe_layers
    add(Node.make("embed", Op.EMBED, ["tokens"]))
    x = "embed"
    for layer in range(m.num_layers):
        p = f"L{layer}."
        add(Node.make(p + "attn_norm", Op.NORM, [x], layer=layer, weight="attn_norm"))
        add(Node.make(p + "attn", Op.ATTENTION, [p + "attn_norm"], layer=layer, kind=m.attention.kind))
        add(Node.make(p + "attn_res", Op.ADD, [x, p + "attn"], layer=layer))
        add(Node.make(p + "ffn_norm", Op.NORM, [p + "attn_res"], layer=layer, weight="ffn_norm"))
        h = p + "ffn_norm"
        nxt = next((n for n in moe_layers if n > layer), None)
        if prefetch and nxt is not None and plan is not None and spec.is_moe_layer(layer):
            # next-layer prediction: layer nxt's router on this layer's hidden state
            q = f"L{nxt}."
            add(Node.make(q + "predict", Op.PREDICT, [h], layer=nxt, top_k=run_k))
            add(Node.make(q + "prefetch", Op.PREFETCH, [q + "predict"], layer=nxt, set="predicted",
                          k=run_k, staging=plan.staging))
        if spec.is_moe_layer(layer):
            ffn = _lower_moe(spec, layer, h, add)
        else:
            add(Node.make(p + "mlp", Op.MLP, [h], layer=layer))
            ffn = p + "mlp"
        add(Node.make(p + "out", Op.ADD, [p + "attn_res", ffn], layer=layer))
        x = p + "out"
    add(Node.make("final_norm", Op.NORM, [x], weight="final_norm"))
    add(Node.make("logits", Op.LM_HEAD, ["final_norm"]))
    return Graph(name=spec.name, nodes=tuple(nodes), spec=spec.to_dict(), passes=("lower",))


def _lower_moe(spec: Spec, layer: int, h: str, add) -> str:
    """The router always ranks the big set (top-K); the little variant uses its first little_k."""
    moe = spec.model.moe
    p = f"L{layer}."
    little = spec.policy.name == "little"
    k = spec.little_k if little else moe.top_k
    variant = {"variant": "little", "little_weights": spec.policy.little_weights} if little else {"variant": "big"}
    add(Node.make(p + "router", Op.ROUTER, [h], layer=layer, top_k=moe.top_k, num_experts=moe.num_experts,
                  norm_topk_prob=moe.norm_topk_prob, scaling=moe.routed_scaling_factor))
    add(Node.make(p + "fetch", Op.FETCH, [p + "router"], layer=layer, set=variant["variant"], k=k))
    add(Node.make(p + "wait", Op.WAIT, [p + "fetch"], layer=layer))
    add(Node.make(p + "experts", Op.EXPERT, [h, p + "router", p + "wait"], layer=layer, k=k, **variant))
    if moe.shared_expert.intermediate_size == 0:
        return p + "experts"
    add(Node.make(p + "shared", Op.EXPERT, [h], layer=layer, variant="shared", gate=moe.shared_expert.gate))
    add(Node.make(p + "moe", Op.COMBINE, [p + "experts", p + "shared"], layer=layer))
    return p + "moe"
