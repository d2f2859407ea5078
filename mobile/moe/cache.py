"""The expert cache: where routed experts live, and how a fetch makes them usable.

An ExpertCache is what a MoE layer (mobile.moe.layer) talks to:
    slot_map(layer)                  -> [E] device tensor: each usable expert's slot in the arena, else -1
    fetch(layer, entries, routes)    -> handle    entries: KeepRule.status, as the host read it;
                                                  routes: the big set, for the big-only estimate
    wait(handle)                     -> slot map  the fetched experts are usable now (a Rounds object
                                                  when a prompt needs more experts than the cache holds)
    prefetch(layer, ids)                          a low-priority hint: stage these experts (mobile.moe.slots)
    arena(layer)                     -> [S, row]  the device slot storage the expert op reads
Two implementations: ResidentCache (every expert on the device) and OffloadedCache (a bounded
per-layer slot cache filled over the host link).

The slot map lives on the device. The cache manager keeps its own record of it on the host (pinned
on CUDA): an expert enters when a wait has covered its copy, and leaves the moment its slot is given
to another. A changed record reaches the device as one copy of the [E] map before anything reads it
(`slot_map`). So a speculative copy counts only once a demand fetch has waited for it, however early
it landed, and the experts a cache-aware little pass takes for free never depend on timing: the
same ids give the same tokens on every run.

An expert is stored input-major (mobile.moe.layout: gate_up [H, 2I], then down [I, H]) as one
contiguous row of the host store and of the device arena, so it moves as one copy: in the spec's
dtype, or with runtime.expert_format int8 / int4 as packed bytes, weights plus scales and zeros
(mobile.moe.quant), which the expert op dequantizes as it computes. Cache slots hold packed rows, so
a byte budget holds about 4x more int4 experts than bf16 ones. Experts with biases (gpt-oss) carry
them in the same row, after the matrices, so they move and are cached with their expert
(mobile.moe.rows loads them).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import torch

from mobile.compiler.budget import CachePlan
from mobile.compiler.costs import expert_bytes
from mobile.models.weights import WeightStore
from mobile.moe.hoststore import load_host_store
from mobile.moe.hostwork import Hosted, HostJob, HostPlacement, host_job
from mobile.moe.placement import Miss, Placement, always, choose
from mobile.moe.rows import load_expert_rows
from mobile.moe.rule import FREE, MISSING, UNUSED
from mobile.moe.shadow import SHADOW_BATCH, BigOnlyShadow, Routes
from mobile.moe.slots import CacheFull, SlotTable
from mobile.moe.transfer import DEMAND, PREFETCH, CopyEngine, CopyJob, LinkModel
from mobile.runtime.stats import Stats
from mobile.spec.schema import Spec


class ExpertCache(Protocol):
    """What the MoE layers of one engine use, whether the experts move or not."""

    link: str  # "none", "emulated" or "real"
    tracks_routes: bool  # fetch wants the router's big set (the big-only estimate)

    @property
    def failure(self) -> BaseException | None:
        """What ended a worker thread, after which nothing more can be fetched."""

    def slot_map(self, layer: int) -> torch.Tensor: ...
    def fetch(self, layer: int, entries: list[int], routes: tuple[list[int], int] | None = None,
              tag: str = "") -> FetchHandle: ...
    def wait(self, handle: FetchHandle) -> torch.Tensor | Rounds: ...
    def prefetch(self, layer: int, ids: list[int], kind: str = "predicted", tag: str = "") -> None: ...
    def arena(self, layer: int) -> torch.Tensor: ...
    def expert_rows(self, layer: int) -> torch.Tensor | None: ...
    def begin_forward(self) -> None: ...
    def end_forward(self, refreshed: int = 0) -> None: ...
    def settle(self) -> None: ...
    def collect_stats(self) -> None: ...
    def reset_counters(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class FetchHandle:
    layer: int
    tag: str = ""  # the fetch node: names its copies (and its rounds') in a trace
    round: int = 0  # a prompt's round, after the first (Rounds)
    jobs: list[CopyJob] = field(default_factory=list)
    placed: list[tuple[int, int]] = field(default_factory=list)  # (expert, slot) usable once waited for
    rounds: list[list[int]] = field(default_factory=list)  # when the set exceeds the cache (a prompt)
    host_job: HostJob | None = None  # the layer's share computed on the host, under a host placement


class Rounds:
    """What a wait yields when one forward needs more experts than a layer's cache holds (a long
    prompt): the expert node runs once per round, on a slot map of that round's experts only, each
    round's experts loaded once for all tokens."""

    def __init__(self, owner: OffloadedCache, handle: FetchHandle):
        self.owner, self.handle = owner, handle

    def __iter__(self):
        for r, members in enumerate(self.handle.rounds):
            if r:
                self.owner.load_round(self.handle.layer, members, self.handle.tag, r)
            yield self.owner.round_map(self.handle.layer, members)


class ResidentCache:
    """All experts of every MoE layer on the device: nothing moves, every lookup hits.

    A resident graph has no fetch nodes. A graph of another policy may still run on it (`mobile
    eval` does, where offloading would not change the result); its fetches then only count."""

    link = "none"
    tracks_routes = False  # nothing moves, so no big-only estimate
    failure = None  # no worker thread to fail

    def __init__(self, spec: Spec, store: WeightStore, device: torch.device, dtype: torch.dtype, stats: Stats,
                 reader, progress=None, track_use: bool = False):
        self.spec, self.stats, self.reader = spec, stats, reader
        self.rows: dict[int, torch.Tensor] = {}
        for layer in spec.moe_layers:
            self.rows[layer] = load_expert_rows(spec, store, layer, dtype).to(device)
            if progress is not None:
                progress.update(1)
        self.num_experts = spec.model.moe.num_experts
        self.identity = torch.arange(self.num_experts, device=device)
        # which experts each layer used in the current forward, counted on the device for graphs
        # without fetches (only when asked: the resident hot path does no bookkeeping)
        self.track_use = track_use
        self.index = {layer: i for i, layer in enumerate(spec.moe_layers)}
        self.used = torch.zeros(len(self.index), self.num_experts, dtype=torch.bool, device=device)
        self.used_total = torch.zeros((), dtype=torch.long, device=device)
        self.hits = 0

    def slot_map(self, layer: int) -> torch.Tensor:
        return self.identity

    def note_use(self, layer: int, slots: torch.Tensor) -> None:
        """slots [T, K], -1 where dropped: the experts one routed expert node ran (track_use only)."""
        # shifted by one, so that the dropped pairs (-1) land in a column of their own
        used = torch.zeros(self.num_experts + 1, dtype=torch.bool, device=slots.device)
        self.used[self.index[layer]] |= used.index_fill_(0, (slots + 1).flatten(), True)[1:]

    def fetch(self, layer: int, entries: list[int], routes: tuple[list[int], int] | None = None,
              tag: str = "") -> FetchHandle:
        """Counts what the layer uses: nothing moves (routes and tag are for a cache that moves experts)."""
        cached, missing, _ = decode_status(entries, self.num_experts)
        needed = cached + missing
        self.hits += len(needed)
        if needed:
            self.used[self.index[layer], needed] = True
        return FetchHandle(layer)

    def wait(self, handle: FetchHandle) -> torch.Tensor:
        return self.identity

    def prefetch(self, layer: int, ids: list[int], kind: str = "predicted", tag: str = "") -> None:
        """Nothing to stage: every expert is on the device."""

    def arena(self, layer: int) -> torch.Tensor:
        return self.rows[layer]

    def expert_rows(self, layer: int) -> torch.Tensor | None:
        """Every expert of `layer` as stored, one row each (None for a layer without experts)."""
        return self.rows.get(layer)

    def begin_forward(self) -> None:
        if self.track_use:
            self.used.zero_()

    def end_forward(self, refreshed: int = 0) -> None:
        # each (layer, expert) once per forward: a fallback reuses what its little pass fetched
        if self.track_use:
            self.used_total += self.used.sum()

    def settle(self) -> None:
        """Nothing is left for later: no copies, no estimate."""

    def collect_stats(self) -> None:
        self.stats.expert_hits = self.hits
        if self.track_use:
            (used,), = self.reader.ints([self.used_total])
            self.stats.extra["expert_bytes_used"] = used * expert_bytes(self.spec)

    def reset_counters(self) -> None:
        self.hits = 0
        self.used_total.zero_()

    def close(self) -> None:
        """Nothing to release but memory, which goes with the object."""


class OffloadedCache:
    """Experts in host memory, a bounded per-layer slot cache on the device, copies on a copy engine.

    ondemand keeps nothing between uses; every other policy reuses cached experts and takes the
    prefetches its graph issues (next-layer prediction, complement sets) into the same slot pool,
    where at most `staging` slots hold speculation (mobile.moe.slots). A prefetch goes on the link at
    the next wait, once the demand copies issued with it have landed: it never delays a copy that
    compute is about to wait for, and whether it is staged depends on the graph, never on timing.
    """

    tracks_routes = True  # the fetch's host read carries the router's big set, for the shadow
    track_use = False  # its fetches count what each forward uses (ResidentCache needs asking)

    def __init__(self, spec: Spec, store: WeightStore, device: torch.device, dtype: torch.dtype, stats: Stats,
                 plan: CachePlan, link: LinkModel, trace: list | None = None, progress=None, compiled: bool = False,
                 host: HostPlacement | None = None):
        self.spec, self.stats, self.plan, self.device = spec, stats, plan, device
        self.host_placement = host  # where a miss may run besides a slot (lru-host; mobile with placement)
        self.reuses = spec.policy.traits.reuses_cache
        self.num_experts = E = spec.model.moe.num_experts
        pin = device.type == "cuda"
        self.link = "real" if link.kind == "real" else "emulated"
        self.rows: dict[int, torch.Tensor] = {}
        self.tables: dict[int, SlotTable] = {}
        self.pending: dict[int, dict[int, CopyJob]] = {}  # layer -> slot -> its copy, until a wait covers it
        self.usable: dict[int, torch.Tensor] = {}  # layer -> the host record of the slot map [E]
        self.record: dict[int, list[int]] = {}  # the same, as Python ints: compared without touching tensors
        self.maps: dict[int, torch.Tensor] = {}  # layer -> the device slot map [E]
        self.dirty: set[int] = set()  # layers whose host record changed since the last copy
        self.eviction = eviction = spec.policy.effective_eviction
        # one allocation for every layer, pinned once (mobile.moe.hoststore)
        self.store, self.host = load_host_store(spec, store, dtype, pin, progress)
        for layer in spec.moe_layers:
            # zeros, not empty: the expert op may compute a pair against any slot and mask it after,
            # which must never meet a NaN in a slot no copy has filled yet (packed: zero scales)
            row = self.host[layer]
            self.rows[layer] = torch.zeros(plan.main + plan.staging, row.shape[1], dtype=row.dtype, device=device)
            self.tables[layer] = SlotTable(plan.main, plan.staging, eviction)
            self.pending[layer] = {}
            self.usable[layer] = torch.full((E,), -1, dtype=torch.long, pin_memory=pin)
            self.record[layer] = [-1] * E
            self.maps[layer] = torch.full((E,), -1, dtype=torch.long, device=device)
        self.engine = CopyEngine(device, link, trace)
        self.cuda = device.type == "cuda"
        # CUDA: per layer, an event after the last compute that read its slots, so that a copy into
        # one waits for that only (not for all compute queued); `released` is the layer a wait has
        # handed to its expert op, whose event is recorded at the next call here (the op is queued then)
        self.read_done: dict[int, torch.cuda.Event] = {}
        self.released: int | None = None
        assert self.store is not None
        stats.extra.update(host_expert_bytes=self.store.nbytes, pinned_host_bytes=self.store.pinned_bytes)
        self.shadow = BigOnlyShadow(spec.moe_layers, plan.main + plan.staging, expert_bytes(spec), eviction)
        self.deferred: list[tuple[int, list[int], str, str]] = []  # prefetches waiting for the next wait
        self.routes: Routes = {}  # this forward's big sets: layer -> (ids [T*K], K)
        self.unestimated: list[tuple[Routes, int]] = []  # forwards the estimate has not replayed yet
        if compiled:  # host work (copies, the slot table): a compiled expert segment must call it eagerly
            # (on the instance, only with compile: torch.compiler.disable imports torch._dynamo, a second)
            self.load_round = torch.compiler.disable(self.load_round)  # type: ignore[method-assign]

    # -- the slot map ---------------------------------------------------------------------------
    def slot_map(self, layer: int) -> torch.Tensor:
        """The device slot map: one persistent tensor per layer, current after every wait (and
        every forward's end), when the host's record of the changes is copied over."""
        return self.maps[layer]

    def _publish(self) -> None:
        """Copy every changed layer's record to its device map: one copy of E entries each; on CUDA
        from pinned memory, queued on the compute stream before whatever reads the map. A record is
        next written after its layer's next host read, which waits for that stream, so the copy has
        long landed by then."""
        for layer in self.dirty:
            self.maps[layer].copy_(self.usable[layer], non_blocking=True)
        self.dirty.clear()

    def _set_usable(self, layer: int, expert: int, slot: int) -> None:
        record = self.record[layer]
        if record[expert] != slot:
            record[expert] = slot
            self.usable[layer][expert] = slot
            self.dirty.add(layer)

    def _forget_evicted(self, layer: int) -> None:
        for e in self.tables[layer].take_evicted():
            self._set_usable(layer, e, -1)

    def round_map(self, layer: int, members: list[int]) -> torch.Tensor:
        """A slot map of `members` only (one round of a prompt too large for the cache)."""
        table = self.tables[layer]
        m = torch.full((self.num_experts,), -1, dtype=torch.long)
        m[members] = torch.tensor([table.slot_of[e] for e in members])
        return m.to(self.device)

    # -- fetch, wait, prefetch ------------------------------------------------------------------
    def _mark_read(self) -> None:
        """CUDA: the released layer's expert op is queued by now; its slots are free to overwrite
        once the compute stream passes this point."""
        if self.cuda and self.released is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.read_done[self.released] = event
            self.released = None

    def fetch(self, layer: int, entries: list[int], routes: tuple[list[int], int] | None = None,
              tag: str = "", hosted: Hosted | None = None) -> FetchHandle:
        """entries: the layer's status as the host read it (mobile.moe.rule.KeepRule.status);
        routes: the router's big set (ids [T*K], K), for the big-only estimate (a fallback's big
        pass overwrites its little pass's); tag: the fetch node, which names its copies in a trace;
        hosted: under a host placement, what the host needs to compute misses (decode only)."""
        if routes is not None:
            self.routes[layer] = routes
        self._mark_read()
        cached, missing, free = decode_status(entries, self.num_experts)
        if free:
            self.stats.extra["free_complement_experts"] = self.stats.extra.get("free_complement_experts", 0) + free
        handle = FetchHandle(layer, tag)
        # a decoded token's misses are placed (unless adaptive found the host cannot win: rule move);
        # under a static hot set a prompt's too, since nothing moves
        hp = self.host_placement
        if hp is not None and hp.rule != "move" and hosted is not None and \
                (hosted.x.shape[0] == 1 or hp.rule == "static"):
            missing = self._place_misses(layer, missing, hosted, handle)
        needed = sorted(cached + missing)
        if len(needed) > self.plan.main:
            handle.rounds = [needed[i:i + self.plan.main] for i in range(0, len(needed), self.plan.main)]
            needed = handle.rounds[0]
        self._request(layer, needed, handle, forget=not self.reuses)
        return handle

    def _request(self, layer: int, needed: list[int], handle: FetchHandle, forget: bool = False) -> None:
        lookups, evicted = self.tables[layer].step(needed, forget)
        for e in evicted:
            self._set_usable(layer, e, -1)
        for e, slot, hit in lookups:
            if hit:
                job = self.pending[layer].get(slot)
                if job is not None:  # a prefetch no wait has covered yet: this one will
                    self.engine.promote(job)  # still queued? it is needed now: demand priority
                    handle.jobs.append(job)
            else:
                handle.jobs.append(self._copy(layer, e, slot, DEMAND, handle.tag, handle.round))
            handle.placed.append((e, slot))

    def _place_misses(self, layer: int, missing: list[int], hosted: Hosted, handle: FetchHandle) -> list[int]:
        """One decode step's misses placed (mobile.moe.placement): the ones to move are returned;
        the host computes the others now, on the host worker, and a BOTH one is also copied in
        behind, at prefetch priority and outside this step's slot map, so the device never computes
        a pair the host does. A miss whose copy is already under way (staged) is moved."""
        hp, table = self.host_placement, self.tables[layer]
        assert hp is not None
        ids = hosted.ids
        in_flight = [e for e in missing if e in table.slot_of]
        candidates = [e for e in missing if e not in table.slot_of]
        if not candidates:
            return missing
        pairs = Counter(ids.flatten().tolist())  # each miss's (token, expert) pairs in this step
        misses = [Miss(e, pairs[e], table.score(e)) for e in candidates]
        if hp.rule in ("both", "static"):
            placed = always(Placement.BOTH if hp.rule == "both" else Placement.HOST, misses)
        else:
            now = time.perf_counter()
            residents = [table.score(e) for e in table.residents()]
            placed = choose(misses, hp.costs, max(0.0, self.engine.link_free - now), hp.worker.free_in(now),
                            min(residents) if residents else 0.0)
        on_host = [e for e, p in placed.items() if p is not Placement.MOVE]
        behind = [e for e, p in placed.items() if p is Placement.BOTH]
        counts = self.stats.extra
        for key, n in (("experts_moved", len(missing) - len(on_host)), ("experts_on_host", len(on_host) - len(behind)),
                       ("experts_both", len(behind))):
            counts[key] = counts.get(key, 0) + n
        if on_host:  # no job at all when every miss moves: the join then only passes the device's output on
            handle.host_job = hp.worker.submit(host_job(self.host[layer], hosted.x, hosted.weights, ids, hosted.rule,
                                                        only=on_host, tag=f"{handle.tag}.host"))
        for e in on_host:
            if e not in behind:
                table.note_use(e)  # its use still counts towards what is hot
        self._copy_behind(layer, behind, handle.tag)
        return in_flight + [e for e, p in placed.items() if p is Placement.MOVE]

    def load_static(self, hot: dict[int, list[int]]) -> None:
        """Load each layer's hot set (hybrid-static) and wait for it: the slots it fills are the only
        experts the device ever holds, since every miss is computed on the host."""
        for layer, experts in hot.items():
            handle = FetchHandle(layer, "static")
            self._request(layer, experts, handle)
            self.wait(handle)

    def _copy_behind(self, layer: int, experts: list[int], tag: str) -> None:
        """Copy these experts into slots at prefetch priority, for the tokens after: no wait of this
        step covers them, so they enter the slot map only when a later step's fetch finds them."""
        table = self.tables[layer]
        for e in experts:
            try:
                slot, _ = table.access(e)
            except CacheFull:  # every slot is pinned by this step's demand: the host alone computes it
                continue
            self._copy(layer, e, slot, PREFETCH, tag)
        self._forget_evicted(layer)

    def host_result(self, handle: FetchHandle) -> torch.Tensor | None:
        """The host's share of the layer (after its job has run), or None; the wait counts as stall."""
        if handle.host_job is None:
            return None
        out, blocked = handle.host_job.wait()
        self.stats.stall_s += blocked
        return out

    def _copy(self, layer: int, expert: int, slot: int, priority: int, tag: str, round: int = 0) -> CopyJob:
        old = self.pending[layer].get(slot)
        if old is not None and not old.done.is_set():
            self.engine.retire(old)  # never let a stale copy land after the new one
        after = []
        if self.cuda:  # the same two orderings on the copy streams: the slot's last reader, a stale copy
            if layer in self.read_done:
                after.append(self.read_done[layer])
            if old is not None and old.event is not None:
                after.append(old.event)
        detail = {"layer": layer, "expert": expert, "slot": slot, **({"round": round} if round else {})}
        job = self.engine.submit(self.host[layer][expert], self.rows[layer][slot], priority, tag=tag, after=after,
                                 detail=detail)
        self.pending[layer][slot] = job
        self.stats.bytes_h2d += job.nbytes
        return job

    def wait(self, handle: FetchHandle) -> torch.Tensor | Rounds:
        if handle.jobs:  # (a layer that hit everything has nothing to wait for)
            self.stats.stall_s += self.engine.wait(handle.jobs)
        pending = self.pending[handle.layer]
        for e, slot in handle.placed:  # covered by this wait: usable from now on
            self._set_usable(handle.layer, e, slot)
            pending.pop(slot, None)
        self._issue_deferred()  # the demand copies have landed: the link is free for speculation
        self._publish()
        self.released = handle.layer
        return Rounds(self, handle) if handle.rounds else self.maps[handle.layer]

    def load_round(self, layer: int, members: list[int], tag: str = "", round: int = 0) -> None:
        """The previous round's experts are done: unpin them, load the next round, wait for it."""
        self._mark_read()  # the previous round's op is queued: the next round's copies follow it
        handle = FetchHandle(layer, tag, round)
        self._request(layer, members, handle)
        self.wait(handle)

    def prefetch(self, layer: int, ids: list[int], kind: str = "predicted", tag: str = "") -> None:
        """Stage these experts of `layer`, at the next wait (see the class docstring); tag: the
        prefetch node, which names its copies in a trace."""
        self.deferred.append((layer, ids, kind, tag))

    def _issue_deferred(self) -> None:
        for layer, ids, kind, tag in self.deferred:
            table = self.tables[layer]
            for e in sorted(set(ids)):
                # never evicts an expert the current step uses: those are pinned until the next fetch
                slot = table.stage(e, kind)
                if slot is not None:
                    self._copy(layer, e, slot, PREFETCH, tag)
            self._forget_evicted(layer)
        self.deferred.clear()

    def arena(self, layer: int) -> torch.Tensor:
        return self.rows[layer]

    def expert_rows(self, layer: int) -> torch.Tensor | None:
        """Every expert of `layer` as the host store holds it, one row each (None without experts)."""
        return self.host.get(layer)

    # -- bookkeeping ----------------------------------------------------------------------------
    def begin_forward(self) -> None:
        """Nothing to reset: what a forward leaves behind is cleared at its end."""

    def end_forward(self, refreshed: int = 0) -> None:
        """refreshed: how many positions before the token a KV refresh recomputed in this forward."""
        self._mark_read()
        self.deferred.clear()  # a prefetch no wait followed (its pass ended at a gate) is stale now
        self._publish()
        routes, self.routes = self.routes, {}
        if routes:  # the big-only estimate's input, handed over in batches (mobile.moe.shadow)
            self.unestimated.append((routes, refreshed))
            ids, k = next(iter(routes.values()))
            if len(ids) > k or len(self.unestimated) >= SHADOW_BATCH:
                self.shadow.replay(self.unestimated, self.tables)

    def settle(self) -> None:
        """Bring the statistics up to date (the big-only estimate replays its pending forwards; on
        CUDA the copies' and waits' timing events are read)."""
        self.stats.extra["big_only_bytes_h2d"] = self.shadow.replay(self.unestimated, self.tables)
        self.stats.stall_s += self.engine.collect()

    def collect_stats(self) -> None:
        self.settle()
        c = [t.counters for t in self.tables.values()]
        self.stats.expert_hits = sum(x.hits for x in c)
        self.stats.expert_misses = sum(x.misses for x in c)
        if self.host_placement is not None:
            self.stats.extra.update(self.host_placement.worker.stats())
        self.stats.extra.update(
            link_busy_s=self.engine.busy_s, eviction=self.eviction, prefetch_issued=sum(x.prefetch_issued for x in c),
            prefetch_used=sum(x.prefetch_used for x in c),
            prefetch_wasted=sum(x.prefetch_wasted for x in c),
            complement_prefetch_issued=sum(x.issued_by_kind.get("complement", 0) for x in c),
            complement_prefetch_used=sum(x.used_by_kind.get("complement", 0) for x in c),
            cache_hit_rate_per_layer={layer: round(t.counters.hits / max(1, t.counters.hits + t.counters.misses), 4)
                                      for layer, t in self.tables.items()})

    def reset_counters(self) -> None:
        self.settle()
        self.shadow.bytes = 0
        self.engine.busy_s = 0.0
        if self.host_placement is not None:
            self.host_placement.worker.busy_s = 0.0
        for t in self.tables.values():
            t.counters = type(t.counters)()

    @property
    def failure(self) -> BaseException | None:
        """What ended the copy worker (or the host worker), if it failed."""
        if self.host_placement is not None and self.host_placement.worker.failure is not None:
            return self.host_placement.worker.failure
        return self.engine.failure

    def close(self) -> None:
        self.engine.close()
        if self.host_placement is not None:
            self.host_placement.worker.close()
        if self.store is not None:
            if self.cuda:
                torch.cuda.synchronize(self.device)  # no copy may still read the store
            self.store.close()


def decode_status(entries: list[int], num_experts: int) -> tuple[list[int], list[int], int]:
    """KeepRule.status as read by the host -> (experts already on the device that run, experts to
    fetch, how many of the first came free to a cached rule)."""
    cached: list[int] = []
    missing: list[int] = []
    free = 0
    for entry in entries:
        code, expert = divmod(entry, num_experts)
        if code == UNUSED:
            break
        (missing if code == MISSING else cached).append(expert)
        free += code == FREE
    return cached, missing, free
