"""Invariants of a valid graph, written as rules. The pipeline checks them after every pass, and the
executor checks them again on the graph it loads, so a hand-edited graph.json cannot run broken.
"""

from __future__ import annotations

from collections.abc import Callable

from mobile import policy as policies
from mobile.compiler.ir import GRAPH_INPUTS, REGION, SYNC_OPS, Graph, Op, stream_of

REQUIRED_ATTRS: dict[Op, tuple[str, ...]] = {
    Op.NORM: ("weight",),
    Op.ATTENTION: ("layer", "kind"),
    Op.LINEAR_ATTENTION: ("layer", "kind"),
    Op.MLP: ("layer",),
    Op.ROUTER: ("layer", "top_k", "num_experts"),
    Op.FETCH: ("layer", "k", "rule"),
    Op.WAIT: ("layer",),
    Op.PREDICT: ("layer", "top_k"),
    Op.PREFETCH: ("layer", "k", "staging"),
    Op.IMPORTANCE_GATE: ("signal", "tau"),
    Op.EXPERT: ("layer", "variant"),
    Op.HOST_EXPERTS: ("layer", "rule", "k"),
    Op.HOST_JOIN: ("layer",),
}
# a complement prefetch also reads its layer's fetch (an ordering edge: the little set is pinned first)
ARITY: dict[Op, tuple[int, ...]] = {
    Op.EMBED: (1,), Op.NORM: (1,), Op.ATTENTION: (1,), Op.LINEAR_ATTENTION: (1,), Op.ADD: (2,), Op.MLP: (1,),
    Op.ROUTER: (1,),
    Op.FETCH: (1, 2), Op.WAIT: (1,), Op.PREDICT: (1,), Op.PREFETCH: (1, 2), Op.IMPORTANCE_GATE: (1,),
    Op.COMBINE: (2,), Op.LM_HEAD: (1,), Op.HOST_EXPERTS: (2,), Op.HOST_JOIN: (2,)}


def rule_names_unique(g: Graph) -> list[str]:
    seen: set[str] = set()
    errors = []
    for n in g.nodes:
        if n.name in seen or n.name in GRAPH_INPUTS:
            errors.append(f"{n.name}: value name defined twice")
        seen.add(n.name)
    return errors


def rule_topological(g: Graph) -> list[str]:
    defined = set(GRAPH_INPUTS)
    all_names = {n.name for n in g.nodes}
    errors = []
    for n in g.nodes:
        for i in n.inputs:
            if i not in defined:
                why = "is used before it is computed" if i in all_names else "is not produced by any node"
                errors.append(f"{n.name}: input {i} {why}")
        defined.add(n.name)
    for out in g.outputs:
        if out not in defined:
            errors.append(f"graph output {out} is not produced by any node")
    return errors


def rule_attrs_and_arity(g: Graph) -> list[str]:
    errors = []
    for n in g.nodes:
        missing = [a for a in REQUIRED_ATTRS.get(n.op, ()) if n.attr(a) is None]
        if missing:
            errors.append(f"{n.name}: {n.op.value} node lacks attrs {missing}")
        if n.op in ARITY and len(n.inputs) not in ARITY[n.op]:
            want = " or ".join(map(str, ARITY[n.op]))
            errors.append(f"{n.name}: {n.op.value} takes {want} inputs, has {len(n.inputs)}")
    return errors


def rule_experts_fetched(g: Graph) -> list[str]:
    """Every routed expert node of a policy that offloads reads its weights through a wait on a
    fetch of the same layer; under one that keeps every expert on the device, none does."""
    nodes = {n.name: n for n in g.nodes}
    name = g.spec.get("policy", {}).get("name", policies.REFERENCE)
    offloads = policies.get(name).offloads if name in policies.POLICIES else True
    errors = []
    for n in g.nodes:
        if n.op is Op.EXPERT and n.attr("variant") != "shared":
            if n.attr("rule") is None:
                errors.append(f"{n.name}: routed expert node lacks attrs ['rule']")
            waits = [nodes[i] for i in n.inputs if i in nodes and nodes[i].op is Op.WAIT]
            if not waits:
                if offloads:
                    errors.append(f"{n.name}: routed expert computed without waiting for a fetch of its weights")
                continue
            if not offloads:
                errors.append(f"{n.name}: policy {name} keeps every expert on the device, yet this expert waits "
                              "for a fetch")
            for w in waits:
                fetch = nodes.get(w.inputs[0]) if w.inputs else None
                if fetch is None or fetch.op is not Op.FETCH:
                    errors.append(f"{n.name}: {w.name} does not wait on a fetch")
                elif fetch.attr("layer") != n.attr("layer"):
                    errors.append(f"{n.name}: uses {fetch.name}, a fetch for layer {fetch.attr('layer')}")
                else:
                    for key in ("rule", "big_rule"):
                        if fetch.attr(key) != n.attr(key):
                            errors.append(f"{n.name}: computes under {key} {n.attr(key)!r}, {fetch.name} fetches "
                                          f"under {fetch.attr(key)!r}")
    users = g.users()
    for n in g.nodes:
        if n.op is Op.FETCH and not any(nodes[u].op is Op.WAIT for u in users.get(n.name, [])):
            errors.append(f"{n.name}: fetch is never waited for")
    return errors


def rule_staging_budget(g: Graph) -> list[str]:
    """A prefetch never puts more experts in flight than its layer has staging slots."""
    return [f"{n.name}: prefetches {n.attr('k')} experts into {n.attr('staging')} staging slots"
            for n in g.nodes if n.op is Op.PREFETCH and (n.attr("k") or 0) > (n.attr("staging") or 0)]


def rule_passes(g: Graph) -> list[str]:
    """The passes over the nodes (mobile.compiler.ir): the big pass keeps each token's whole big set, a node
    that runs in one pass only names a pass, the gates decide during the little pass, and the region
    a fallback runs again comes after everything that runs once."""
    errors = []
    top_ks = {n.attr("layer"): n.attr("top_k") for n in g.nodes if n.op is Op.ROUTER}
    entered = False
    for n in g.nodes:
        big_rule = n.attr("big_rule")
        if big_rule is not None and big_rule != f"top n={top_ks.get(n.attr('layer'))}":
            errors.append(f"{n.name}: the big pass must keep the whole top-{top_ks.get(n.attr('layer'))}, not "
                          f"{big_rule!r}")
        only = n.attr("pass")
        if only not in (None, "little", "big"):
            errors.append(f"{n.name}: pass {only!r} is not a pass (little or big)")
        if n.op is Op.IMPORTANCE_GATE and only != "little":
            errors.append(f"{n.name}: a gate decides during the little pass only (pass: little)")
        in_region = n.attr("region") == REGION
        if entered and not in_region:
            errors.append(f"{n.name}: runs once, yet comes after the region a fallback runs again")
        entered |= in_region
    return errors


def rule_streams(g: Graph) -> list[str]:
    errors = []
    for n in g.nodes:
        stream = n.attr("stream")
        if stream is None:
            continue
        want = stream_of(n.op)
        # a graph compiled before the plan had a host lane put host_experts on compute: it runs the same
        if stream != want and not (n.op is Op.HOST_EXPERTS and stream == "compute"):
            errors.append(f"{n.name}: {n.op.value} must run on the {want} stream, not {stream}")
    return errors


def rule_segments(g: Graph) -> list[str]:
    """Segments are contiguous runs of compute nodes; sync nodes sit between them."""
    errors = []
    closed: set[int] = set()
    current = None
    for n in g.nodes:
        seg = n.attr("seg")
        if n.op in SYNC_OPS and seg is not None:
            errors.append(f"{n.name}: {n.op.value} is a sync point and cannot sit inside segment {seg}")
        if seg != current:
            if current is not None:
                closed.add(current)
            if seg is not None and seg in closed:
                errors.append(f"{n.name}: segment {seg} is not contiguous")
            current = seg
    return errors


RULES: list[Callable[[Graph], list[str]]] = [rule_names_unique, rule_topological, rule_attrs_and_arity,
                                              rule_experts_fetched, rule_staging_budget, rule_passes,
                                              rule_streams, rule_segments]


def verify(g: Graph) -> list[str]:
    return [e for rule in RULES for e in rule(g)]
