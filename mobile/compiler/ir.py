"""The graph IR: one small immutable node type, an op enum, and a graph that is a node list in order.

A graph is a straight-line program over one forward step of T tokens (T = prompt length in
prefill, 1 in decode). Node order is program order: passes reorder nodes, the executor runs them
in that order. Values are named by the node that produces them; the graph input is `tokens`.

A forward runs the nodes in one pass or two (Pass): under a big-little policy a decoded token's
little pass, then, when an importance gate fires, the big pass over the same nodes. A pass is which
keep rule the routed-expert nodes apply. A node's attrs describe its decode pass; an attr `big_X`
overrides `X` in the big pass (big_rule, big_k, big_top_k), and `pass` names the only pass a node
runs in (the gates and the complement prefetch: "little"). The nodes with `region` "pass" are what the big
pass runs again after a fallback; the ones before them (the embedding up to the first MoE layer's
router) run once.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

GRAPH_FORMAT = "mobile.graph"
GRAPH_VERSION = 2  # 2: one copy of the nodes for both passes (1 lowered a second copy, B.*)
GRAPH_INPUTS = ("tokens",)
REGION = "pass"  # the region attr of the nodes a fallback runs again
BIG_PREFIX = "big_"  # attrs that override others in the big pass


class Pass(enum.Enum):
    LITTLE = "little"
    BIG = "big"


class Op(enum.Enum):
    EMBED = "embed"  # token ids [T] -> hidden [T, H]
    NORM = "norm"  # RMSNorm
    ATTENTION = "attention"  # projections, rope, KV-cache write and read, output projection
    # a linear-attention layer (Gated DeltaNet): projections, conv and delta rule over the layer's
    # recurrent state (mobile.runtime.state), gated norm, output projection
    LINEAR_ATTENTION = "linear_attention"
    ADD = "add"  # residual add
    MLP = "mlp"  # dense SwiGLU MLP (dense layers)
    ROUTER = "router"  # hidden -> (weights [T, K], expert ids [T, K]) for the big set
    IMPORTANCE_GATE = "importance_gate"  # reads the little pass's output; decides fallback
    FETCH = "fetch"  # move an expert set host -> device cache slots (copy stream)
    PREFETCH = "prefetch"  # a non-blocking, low-priority hint of a set needed soon
    WAIT = "wait"  # compute waits for a fetch; yields the slot map
    EXPERT = "expert"  # routed (little | big) or shared experts
    COMBINE = "combine"  # routed + shared expert outputs
    LM_HEAD = "lm_head"  # final norm output -> logits [T, V]
    PREDICT = "predict"  # next-layer prediction: layer l+1's router on layer l's hidden state
    HOST_EXPERTS = "host_experts"  # routed experts computed on the host: reads routes and hidden rows, adds nothing
    HOST_JOIN = "host_join"  # the device's experts plus the host's share of the layer (its fetch's host job)


# Ops that cross the host: the executor runs them between compiled segments. Their reads of device
# values take only what compute made.
SYNC_OPS = frozenset({Op.FETCH, Op.PREFETCH, Op.WAIT, Op.IMPORTANCE_GATE, Op.HOST_EXPERTS, Op.HOST_JOIN})
COPY_OPS = frozenset({Op.FETCH, Op.PREFETCH})


def stream_of(op: Op) -> str:
    """Where a node's work runs in the planned timeline: transfers on the copy stream, routed experts
    computed on the host on the host lane, everything else on the compute stream. (A host_join runs
    on the compute stream; its host share is planned on the host lane: passes.plan_timeline.)"""
    return "copy" if op in COPY_OPS else "host" if op is Op.HOST_EXPERTS else "compute"


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class Node:
    """name: the value it produces; inputs: names of values it reads; attrs: sorted (key, value) pairs."""

    name: str
    op: Op
    inputs: tuple[str, ...] = ()
    attrs: tuple[tuple[str, Any], ...] = ()

    @staticmethod
    def make(name: str, op: Op, inputs: Iterable[str] = (), **attrs: Any) -> Node:
        return Node(name, op, tuple(inputs), tuple(sorted((k, _freeze(v)) for k, v in attrs.items())))

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    def runs_in(self, p: Pass) -> bool:
        only = self.attr("pass")
        return only is None or only == p.value

    def in_pass(self, p: Pass) -> Node:
        """The node as pass `p` runs it: in the big pass, each `big_X` attr in place of `X`."""
        big = {k[len(BIG_PREFIX):]: v for k, v in self.attrs if k.startswith(BIG_PREFIX)}
        if p is not Pass.BIG or not big:
            return self
        return self.with_attrs(**big).without_attrs(*(BIG_PREFIX + k for k in big))

    @property
    def attr_dict(self) -> dict[str, Any]:
        return dict(self.attrs)

    def with_attrs(self, **updates: Any) -> Node:
        merged = {**self.attr_dict, **{k: _freeze(v) for k, v in updates.items()}}
        return replace(self, attrs=tuple(sorted(merged.items())))

    def without_attrs(self, *keys: str) -> Node:
        return replace(self, attrs=tuple((k, v) for k, v in self.attrs if k not in keys))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op.value, "inputs": list(self.inputs),
                "attrs": {k: _thaw(v) for k, v in self.attrs}}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Node:
        return Node.make(data["name"], Op(data["op"]), data.get("inputs", ()), **data.get("attrs", {}))


@dataclass(frozen=True)
class Graph:
    name: str
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...] = ("logits",)
    spec: dict[str, Any] = field(default_factory=dict)  # the spec it was lowered from
    passes: tuple[str, ...] = ()  # the passes that produced it, in order

    def with_nodes(self, nodes: Iterable[Node], pass_name: str | None = None) -> Graph:
        passes = self.passes + ((pass_name,) if pass_name else ())
        return replace(self, nodes=tuple(nodes), passes=passes)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def by_op(self, op: Op) -> list[Node]:
        return [n for n in self.nodes if n.op is op]

    def users(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i, []).append(n.name)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"format": GRAPH_FORMAT, "version": GRAPH_VERSION, "name": self.name,
                "inputs": list(GRAPH_INPUTS), "outputs": list(self.outputs), "passes": list(self.passes),
                "spec": self.spec, "nodes": [n.to_json() for n in self.nodes]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Graph:
        return Graph(name=data["name"], nodes=tuple(Node.from_json(n) for n in data["nodes"]),
                     outputs=tuple(data.get("outputs", ("logits",))), spec=dict(data.get("spec", {})),
                     passes=tuple(data.get("passes", ())))
