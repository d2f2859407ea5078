"""The pass pipeline: named Graph -> Graph functions, run in one list, verified after each one.

    lower -> assign_streams -> schedule -> plan_segments -> plan_timeline

A verification failure names the pass that broke the graph and the passes before it.
With MOBILE_DEBUG=1 a text dump of the graph is written after every pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache

from mobile import debug
from mobile.costs import node_cost, node_time_us
from mobile.errors import GraphError
from mobile.ir import COPY_OPS, SYNC_OPS, Graph, Node, Op
from mobile.lower import lower
from mobile.spec import Spec, spec_from_dict
from mobile.verify import verify

log = logging.getLogger("mobile.passes")

Pass = Callable[[Graph], Graph]


@lru_cache(maxsize=8)
def _spec_of(graph_spec_json: str) -> Spec:
    import json

    return spec_from_dict(json.loads(graph_spec_json))


def spec_of(g: Graph) -> Spec:
    import json

    return _spec_of(json.dumps(g.spec, sort_keys=True))


def assign_streams(g: Graph) -> Graph:
    """Transfers go on the copy stream, everything else on the compute stream."""
    nodes = [n.with_attrs(stream="copy" if n.op in COPY_OPS else "compute") for n in g.nodes]
    return g.with_nodes(nodes, "assign_streams")


def schedule(g: Graph) -> Graph:
    """List scheduling over the dependency graph.

    Ready importance gates go first (one that fires ends the pass), then ready transfers (as early
    as their inputs allow), waits last (right before the first node that needs them), and other
    compute keeps program order. So independent compute such as a shared expert slides between a
    fetch and its wait, where it overlaps the copy.
    A transfer that cannot move earlier gets a `hoist_limit` attr saying which input holds it.
    """
    index = {n.name: i for i, n in enumerate(g.nodes)}
    deps = {n.name: [i for i in n.inputs if i in index] for n in g.nodes}
    users = g.users()
    waiting = {n.name: len(deps[n.name]) for n in g.nodes}
    ready = [n for n in g.nodes if waiting[n.name] == 0]
    order: list[Node] = []

    def priority(n: Node) -> tuple[int, int]:
        # a gate first: it may end the pass, and then the copies behind it would be wasted
        rank = -1 if n.op is Op.IMPORTANCE_GATE else 0 if n.op in COPY_OPS else 2 if n.op is Op.WAIT else 1
        return rank, index[n.name]

    while ready:
        ready.sort(key=priority)
        node = ready.pop(0)
        if node.op in COPY_OPS and deps[node.name]:
            holder = max(deps[node.name], key=lambda d: index[d])
            reason = f"needs {holder} ({_why(g.node(holder))})"
            node = node.with_attrs(hoist_limit=reason)
            log.debug("cannot hoist %s above %s: %s", node.name, holder, reason)
        order.append(node)
        for u in users.get(node.name, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(g.node(u))
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
    free = {"compute": 0.0, "copy": 0.0}
    nodes = []
    for n in g.nodes:
        flops, dev_bytes, h2d = node_cost(spec, n)
        stream = n.attr("stream", "compute")
        start = max([free[stream], *(end.get(i, 0.0) for i in n.inputs)])
        dur = 0.0 if n.op is Op.WAIT else node_time_us(spec, flops, dev_bytes, h2d)
        end[n.name] = start + dur
        free[stream] = end[n.name]
        nodes.append(n.with_attrs(flops=int(flops), bytes=dev_bytes, h2d_bytes=h2d,
                                  start_us=round(start, 3), end_us=round(start + dur, 3)))
    return g.with_nodes(nodes, "plan_timeline")


PIPELINE: list[tuple[str, Pass]] = [
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
