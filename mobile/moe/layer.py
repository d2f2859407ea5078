"""One routed-expert layer, end to end: route -> plan (the one host read) -> fetch -> wait -> experts.

A MoELayer is built once per MoE layer, from its router node's attributes, and gives the layer's
graph nodes their kernels, each fixed to its node's keep rule (`rule_of`: the little pass's or the
big pass's) when the executor builds it:

    router     x [T, H] -> routed (weights [T, K], ids [T, K])                  compute
    fetch      routed -> plan: KeepRule.status (+ the big set, for the estimate)  host: read, then
               -> cache.fetch(the status as read)                                 act on what was read
    wait       the fetch's handle -> the slot map: the fetched experts are usable  host
    experts    x, routed, slot map -> [T, H]: torch.ops.mobile.moe_experts       compute
    host_experts  x, routed -> [T, H], computed on the host (placement host)      host: read, then compute
    host_join  experts, the fetch's handle -> experts + the host's share          host (lru-host, placement)
    predict    the previous layer's hidden state -> this layer's likely ids       compute
    prefetch   ids -> cache.prefetch: stage them at low priority                  host

The host reads what one sync step's nodes need in one copy (the executor gathers their reads), so
a layer costs one read: which of the needed experts are missing, with the routes and predictions
of the same step riding along. Where the experts are is the ExpertCache's business
(mobile.moe.cache), which of them a token uses the KeepRule's (mobile.moe.rule), and what they
compute the op's (mobile.moe.op).
"""

from __future__ import annotations

import dataclasses

import torch

from mobile.compiler.ir import Node
from mobile.moe.cache import ExpertCache, FetchHandle, OffloadedCache, ResidentCache
from mobile.moe.hostcache import HostCache
from mobile.moe.hostwork import Hosted
from mobile.moe.op import ExpertKind
from mobile.moe.router import Router
from mobile.moe.rule import KeepRule
from mobile.runtime.context import StepContext, SyncKernel


def rule_of(node: Node) -> KeepRule:
    """A fetch or routed-expert node's keep rule, in the pass it is built for (lowering writes the
    decode pass's, and the big pass's where a fallback runs the node again: mobile.compiler.lower)."""
    return KeepRule.parse(node.attr("rule"))


class MoELayer:
    """One MoE layer's protocol. router: its router (its weights, its scoring); cache: where its
    experts are; kind: what an expert is (its format and MLP). The kernels it gives a node take the
    node's keep rule (rule_of), fixed when the executor builds them."""

    def __init__(self, layer: int, router: Router, cache: ExpertCache, kind: ExpertKind, count_routes: bool = False):
        """count_routes: the router node counts each expert's uses on the device (`route_counts` [E]),
        for a routing profile (mobile.moe.profile)."""
        self.layer, self.router, self.cache = layer, router, cache
        weight = router.weight
        self.route_counts = torch.zeros(weight.shape[0], dtype=torch.long, device=weight.device) \
            if count_routes else None
        self.kind_text = kind.text
        self.arena = cache.arena(layer)
        # persistent, current after every wait: what a plan and (with no wait: nothing moves) the op read
        self.slot_map = cache.slot_map(layer)
        # eval on a graph without fetches: the resident cache counts the experts each layer ran
        self.count_use = cache.note_use if isinstance(cache, ResidentCache) and cache.track_use else None

    # -- compute ------------------------------------------------------------------------------------
    def route(self, shuffled: bool = False):
        """The router node's kernel: x [T, H] -> (weights [T, K], ids [T, K]), in selection order;
        shuffled: each token's big set in a random order (the random-halving baseline)."""
        router = self.router.shuffled(self.layer) if shuffled else self.router
        counts = self.route_counts
        if counts is None:
            return router

        def counted(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            weights, ids = router(x)
            counts.index_add_(0, ids.flatten(), torch.ones_like(ids.flatten()))  # on the device: no host read
            return weights, ids

        return counted

    def predict(self, top_k: int):
        """A kernel: the previous layer's hidden state -> the ids of this layer's top_k (next-layer
        prediction: this layer's own choice, its biases and groups too, from an earlier state)."""
        guess = self.router.with_top_k(top_k)
        return guess.predict

    def experts_kernel(self, node: Node):
        """The expert node's kernel: x, routed, slot map -> [T, H], under the node's keep rule.
        Without a slot map (a graph with no wait: every expert resident) the cache's own; a Rounds (a
        prompt with more experts than the cache holds) runs once per round, on a map of that round's
        experts only, so no pair runs twice and the rule alone decides."""
        op, arena, kind, layer, count_use = torch.ops.mobile.moe_experts, self.arena, self.kind_text, self.layer, \
            self.count_use
        rule = rule_of(node)
        text, round_text, resident = rule.text, dataclasses.replace(rule, cached=False).text, self.slot_map

        def experts(x: torch.Tensor, routed: tuple[torch.Tensor, torch.Tensor], slot_map=None) -> torch.Tensor:
            weights, ids = routed  # [T, K], in selection order
            if slot_map is None:
                slot_map = resident
                if count_use is not None:
                    count_use(layer, rule.pairs(weights, ids, slot_map)[1])
            if isinstance(slot_map, torch.Tensor):
                return op(x, weights, ids, slot_map, arena, text, kind)
            out = torch.zeros_like(x)
            for round_map in slot_map:
                out += op(x, weights, ids, round_map, arena, round_text, kind)
            return out

        return experts

    # -- host ---------------------------------------------------------------------------------------
    def fetch_kernel(self, node: Node) -> SyncKernel:
        """The fetch node's: plan, what the host reads (which experts to fetch under the node's keep
        rule; with the cache's estimate, the big set too); fetch, the copies of the missing ones,
        given what was read."""
        layer, cache, tracks, slot_map, rule, tag = (self.layer, self.cache, self.cache.tracks_routes,
                                                     self.slot_map, rule_of(node), node.name)
        if len(node.inputs) == 2 and isinstance(cache, OffloadedCache) and cache.host_placement is not None \
                and cache.host_placement.rule != "move":  # the read also brings the weights and hidden rows
            return self._placed_fetch_kernel(cache, rule, tag)

        # (a placed graph whose placement moves every miss, adaptive's `move`, reads no floats: the
        # hidden rows, its fetch's second input, go unread)
        def plan(ctx: StepContext, routed, *unread) -> list[torch.Tensor]:
            weights, ids = routed
            status = rule.status(weights, ids, slot_map)
            return [status, ids.int()] if tracks else [status]  # int32, as the host reads them: no cast there

        def fetch(ctx: StepContext, values: list[list[int]], routed, *unread) -> FetchHandle:
            return cache.fetch(layer, values[0], (values[1], routed[1].shape[1]) if tracks else None, tag)

        return SyncKernel(fetch, plan)

    def _placed_fetch_kernel(self, cache: OffloadedCache, rule: KeepRule, tag: str) -> SyncKernel:
        """The fetch of a cache that may compute misses on the host (lru-host; mobile with
        placement): the same one read, with the router's weights and the hidden rows riding along
        (floats), so that the host can start on its share at once."""
        layer, slot_map = self.layer, self.slot_map

        def plan(ctx: StepContext, routed, x: torch.Tensor) -> list[torch.Tensor]:
            weights, ids = routed
            return [rule.status(weights, ids, slot_map), ids, weights.float(), x.float()]

        def fetch(ctx: StepContext, values: list[torch.Tensor], routed, x: torch.Tensor) -> FetchHandle:
            T, K = routed[1].shape
            status, ids = values[0].tolist(), values[1]
            hosted = Hosted(values[3].view(T, -1), values[2].view(T, K), ids.view(T, K), rule)
            return cache.fetch(layer, status, (ids.tolist(), K), tag, hosted=hosted)

        return SyncKernel(fetch, plan, raw=True)

    def join_kernel(self) -> SyncKernel:
        """The host_join node's: the device's experts plus the host's share of the layer."""
        cache = self.cache
        assert isinstance(cache, OffloadedCache)

        def join(ctx: StepContext, values, experts: torch.Tensor, handle: FetchHandle) -> torch.Tensor:
            host = cache.host_result(handle)
            return experts if host is None else experts + host.to(device=experts.device, dtype=experts.dtype)

        return SyncKernel(join)

    def host_kernel(self, node: Node) -> SyncKernel:
        """The host_experts node's (placement host): its one host read brings the router's choice and
        the layer's hidden rows; the host computes every pair the node's rule keeps, and the output
        goes back to the device."""
        layer, cache, rule, tag = self.layer, self.cache, rule_of(node), node.name
        assert isinstance(cache, HostCache), "a host_experts node runs on a HostCache"

        def read(ctx: StepContext, x: torch.Tensor, routed) -> list[torch.Tensor]:
            weights, ids = routed
            return [x.float(), weights.float(), ids]

        def act(ctx: StepContext, values: list[torch.Tensor], x: torch.Tensor, routed) -> torch.Tensor:
            T, K = routed[1].shape
            h, weights, ids = values[0].view(T, -1), values[1].view(T, K), values[2].view(T, K)
            return cache.compute(layer, h, weights, ids, rule, tag).to(device=x.device, dtype=x.dtype)

        return SyncKernel(act, read, raw=True)

    def wait_kernel(self) -> SyncKernel:
        cache = self.cache
        return SyncKernel(lambda ctx, values, handle: cache.wait(handle))

    def prefetch_kernel(self, node: Node) -> SyncKernel:
        """The prefetch node's: stage experts of this layer, the predicted ids (set "predicted", read
        from a predict node), or the big set's ranks [lo, hi) of the router's output (set
        "complement": what a fallback would add to the little set; the node also reads the fetch,
        which orders it after)."""
        layer, cache, kind, tag = self.layer, self.cache, node.attr("set"), node.name
        lo, hi = node.attr("lo", 0), node.attr("hi")

        def act(ctx: StepContext, values, *inputs) -> None:
            cache.prefetch(layer, values[0], kind, tag)

        if kind == "complement":
            return SyncKernel(act, lambda ctx, routed, fetched: [routed[1][:, lo:hi]])
        return SyncKernel(act, lambda ctx, ids: [ids])
