"""The pass pipeline: named Graph -> Graph functions, run in one list, verified after each one.

    lower -> fold_dead_gates -> assign_streams -> schedule -> plan_segments -> plan_timeline

A verification failure names the pass that broke the graph and the passes before it.
With MOBILE_DEBUG=1 a text dump of the graph is written after every pass.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from functools import lru_cache

from mobile import debug
from mobile.compiler.costs import host_time_us, node_cost, node_time_us
from mobile.compiler.ir import COPY_OPS, REGION, SYNC_OPS, Graph, Node, Op, stream_of
from mobile.compiler.lower import lower
from mobile.compiler.verify import verify
from mobile.errors import GraphError
from mobile.spec.load import spec_from_dict
from mobile.spec.schema import Spec

log = logging.getLogger("mobile.compiler.passes")

Pass = Callable[[Graph], Graph]


@lru_cache(maxsize=8)
def _spec_of(graph_spec_json: str) -> Spec:
    import json

    return spec_from_dict(json.loads(graph_spec_json))


def spec_of(g: Graph) -> Spec:
    import json

    return _spec_of(json.dumps(g.spec, sort_keys=True))


def fold_dead_gates(g: Graph) -> Graph:
    """Remove the importance gates that can never fire.

    Every gate signal is a confidence or a mass share in [0, 1] and fires below its tau, so a gate
    with tau <= 0 never fires. With none left, no fallback runs the region again: the big pass runs
    only for prompts (prefill: big), from the first node, and the region marks go too."""
    dead = {n.name for n in g.nodes if n.op is Op.IMPORTANCE_GATE and float(n.attr("tau")) <= 0}
    nodes = [n for n in g.nodes if n.name not in dead]
    if not any(n.op is Op.IMPORTANCE_GATE for n in nodes):
        nodes = [n.without_attrs("region") for n in nodes]
    return g.with_nodes(nodes, "fold_dead_gates")


def assign_streams(g: Graph) -> Graph:
    """Transfers go on the copy stream, experts computed on the host on the host lane, everything
    else on the compute stream (mobile.compiler.ir.stream_of)."""
    nodes = [n.with_attrs(stream=stream_of(n.op)) for n in g.nodes]
    return g.with_nodes(nodes, "assign_streams")


def schedule(g: Graph) -> Graph:
    """List scheduling over the dependency graph; lowering's order is the tie-break.

    Ready nodes go in this order of preference:
    1. importance gates: one that fires ends the pass, and the copies behind it would be wasted;
    2. compute that a transfer reads (routers, next-layer predictions), so that the transfers of
       one layer are ready together and the host reads their inputs in one copy;
    3. transfers, demand fetches before prefetches, as early as their inputs allow;
    4. other compute, in program order (a shared expert slides between a fetch and its wait, where
       it overlaps the copy);
    5. waits, right before the first node that needs them.
    The region a fallback runs again is kept after the part that runs once. A node that moves ahead
    gets a `hoisted` attr: how many nodes that lowering put before it it now precedes. A transfer
    that cannot move earlier gets a `hoist_limit` attr saying which input holds it.
    """
    index = {n.name: i for i, n in enumerate(g.nodes)}
    by_name = {n.name: n for n in g.nodes}
    deps = {n.name: [i for i in n.inputs if i in index] for n in g.nodes}
    users = g.users()
    feeds_copy = {n.name for n in g.nodes if n.op not in SYNC_OPS
                  and any(by_name[u].op in COPY_OPS for u in users.get(n.name, []))}
    waiting = {n.name: len(deps[n.name]) for n in g.nodes}
    ready = [n for n in g.nodes if waiting[n.name] == 0]
    order: list[Node] = []
    done: list[int] = []  # the lowered indexes of the nodes scheduled so far, sorted

    def priority(n: Node) -> tuple[int, int, int]:
        if n.op is Op.IMPORTANCE_GATE:
            rank = 0
        elif n.name in feeds_copy:
            rank = 1
        elif n.op is Op.FETCH:
            rank = 2
        elif n.op is Op.PREFETCH:
            rank = 3
        elif n.op is Op.WAIT:
            rank = 5
        else:
            rank = 4
        return int(n.attr("region") == REGION), rank, index[n.name]

    while ready:
        ready.sort(key=priority)
        node = ready.pop(0)
        if node.op in COPY_OPS and deps[node.name]:
            holder = max(deps[node.name], key=lambda d: index[d])
            reason = f"needs {holder} ({_why(by_name[holder])})"
            node = node.with_attrs(hoist_limit=reason)
            log.debug("cannot hoist %s above %s: %s", node.name, holder, reason)
        jumped = index[node.name] - bisect.bisect(done, index[node.name])  # earlier in lowering, later now
        if jumped > 0:
            node = node.with_attrs(hoisted=jumped)
        bisect.insort(done, index[node.name])
        order.append(node)
        for u in users.get(node.name, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(by_name[u])
    if len(order) != len(g.nodes):
        stuck = sorted(n for n, c in waiting.items() if c > 0)
        raise GraphError(f"cycle detected among {stuck[:5]}", where=g.name)
    return g.with_nodes(order, "schedule")


def _why(node: Node) -> str:
    if node.op is Op.ROUTER:
        return "the expert ids it moves are known only after routing"
    if node.op is Op.PREDICT:
        return "the predicted expert ids"
    return f"its {node.op.value} output"


def plan_segments(g: Graph) -> Graph:
    """Number the maximal runs of compute between sync points. Each run is one compiled region."""
    nodes, seg, open_run, region = [], -1, False, None
    for n in g.nodes:
        if n.op in SYNC_OPS:
            nodes.append(n.without_attrs("seg"))
            open_run = False
            continue
        if not open_run or n.attr("region") != region:  # a region runs or is skipped as a whole
            seg, open_run, region = seg + 1, True, n.attr("region")
        nodes.append(n.with_attrs(seg=seg))
    return g.with_nodes(nodes, "plan_segments")


def plan_timeline(g: Graph) -> Graph:
    """Cost each node for one decode token and simulate the two streams: planned start/end in us."""
    spec = spec_of(g)
    end: dict[str, float] = {}
    begin: dict[str, float] = {}
    by_name = {n.name: n for n in g.nodes}
    free = {"compute": 0.0, "copy": 0.0, "host": 0.0}
    nodes = []
    for n in g.nodes:  # the decode pass's attrs: a fallback's big pass is not part of the plan
        flops, dev_bytes, h2d = node_cost(spec, n)
        stream = n.attr("stream", "compute")
        start = max([free[stream], *(end.get(i, 0.0) for i in n.inputs)])
        host: dict[str, float] = {}
        if n.op is Op.HOST_JOIN:
            # the host's share of the layer starts at its fetch's read, beside the device's experts,
            # and the join waits for both. Planned at its worst case, every miss on the host, as the
            # fetch's copies are planned at theirs, every miss moved
            fetch = by_name[n.inputs[1]]
            host_start = max(free["host"], begin[fetch.name])
            free["host"] = host_start + host_time_us(spec, fetch)
            host = {"host_start_us": round(host_start, 3), "host_end_us": round(free["host"], 3)}
            start = max(start, free["host"])
        dur = 0.0 if n.op in (Op.WAIT, Op.HOST_JOIN) else host_time_us(spec, n) if n.op is Op.HOST_EXPERTS else \
            node_time_us(spec, flops, dev_bytes, h2d)
        begin[n.name], end[n.name] = start, start + dur
        free[stream] = end[n.name]
        nodes.append(n.with_attrs(flops=int(flops), bytes=dev_bytes, h2d_bytes=h2d,
                                  start_us=round(start, 3), end_us=round(start + dur, 3), **host))
    return g.with_nodes(nodes, "plan_timeline")


PIPELINE: list[tuple[str, Pass]] = [
    ("fold_dead_gates", fold_dead_gates),
    ("assign_streams", assign_streams),
    ("schedule", schedule),
    ("plan_segments", plan_segments),
    ("plan_timeline", plan_timeline),
]


def check(g: Graph, after: str, done: list[str]) -> None:
    errors = verify(g)
    if errors:
        before = f" (after {', '.join(done)})" if done else ""
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise GraphError(f"pass {after!r}{before} broke the graph: {errors[0]}{more}", where=g.name)


def run_pipeline(g: Graph, passes: list[tuple[str, Pass]] | None = None) -> Graph:
    done: list[str] = ["lower"]
    check(g, "lower", [])
    debug.dump_after_pass(g, "lower")
    for name, fn in PIPELINE if passes is None else passes:
        g = fn(g)
        check(g, name, done)
        done.append(name)
        debug.dump_after_pass(g, name)
    return g


def compile_spec(spec: Spec) -> Graph:
    return run_pipeline(lower(spec))
