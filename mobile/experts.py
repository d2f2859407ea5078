"""Where routed experts live, and how a fetch makes them usable.

An expert set is what the graph's fetch, wait, prefetch and expert nodes talk to:
    slot_map(layer)          -> [E] device tensor: each usable expert's slot in the arena, else -1
    fetch(layer, entries)    -> handle    entries: mobile.moe.fetch_status, as the host read it
    wait(handle)             -> slot map  the fetched experts are usable now (a Rounds object when a
                                          prompt needs more experts than the layer's cache holds)
    prefetch(layer, ids)                  a low-priority hint: stage these experts (mobile.slots)
    arena(layer)             -> [S, row] the device slot storage the expert op reads
    note_route(layer, ids, K)             the router's big set (flat, K per token), for the big-only estimate

The slot map lives on the device. The cache manager keeps its own record of it on the host (pinned
on CUDA): an expert enters when a wait has covered its copy, and leaves the moment its slot is given
to another. A changed record reaches the device as one copy of the [E] map before anything reads it
(`slot_map`). So a speculative copy counts only once a demand fetch has waited for it, however early
it landed, and the experts a cache-aware little pass takes for free never depend on timing: the
same ids give the same tokens on every run.

An expert is stored input-major (mobile.moe.arena_views: gate_up [H, 2I], then down [I, H]) as one
contiguous row of the host store and of the device arena, so it moves as one copy: in the spec's
dtype, or with runtime.expert_format int8 / int4 as packed bytes, weights plus scales and zeros
(mobile.quant), which the expert op dequantizes as it computes. Cache slots hold packed rows, so
a byte budget holds about 4x more int4 experts than bf16 ones. Experts with biases (gpt-oss) carry
them in the same row, after the matrices, so they move and are cached with their expert. Whatever
a checkpoint's storage (one tensor per expert, or gpt-oss's fused, interleaved and possibly MXFP4
tensors: mobile.families.EXPERT_STORAGE), `expert_matrices` hands the loader canonical matrices.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from mobile import mxfp4, quant
from mobile.budget import CachePlan
from mobile.costs import expert_bytes
from mobile.families import expert_storage, tensor_names
from mobile.hoststore import HostStore
from mobile.moe import ExpertMLP, arena_views, bias_views, decode_status
from mobile.quantize import load_packed_expert
from mobile.slots import Eviction, SlotTable
from mobile.spec import Spec
from mobile.stats import Stats
from mobile.transfer import DEMAND, PREFETCH, CopyEngine, CopyJob, LinkModel
from mobile.weights import EXPERT_PROJECTIONS, FUSED_BIASES, FUSED_MATRICES, WeightStore, expert_tensor_names

SHADOW_BATCH = 64  # forwards the big-only estimate buffers before it replays them


def load_expert_rows(spec: Spec, store: WeightStore, layer: int, dtype: torch.dtype) -> torch.Tensor:
    """All experts of one layer in the spec's expert format, one row each, in host memory: native,
    [E, native_row_elems] in `dtype` (mobile.moe.arena_views, biases after the matrices); int8 /
    int4, [E, row_bytes] uint8 (mobile.quant), read packed from a quantized checkpoint or quantized
    now from a native (or MXFP4) one."""
    moe, h = spec.model.moe, spec.model.hidden_size
    i = moe.intermediate_size
    if spec.runtime.expert_format != "native":
        layout = expert_layout(spec)
        rows = torch.empty(moe.num_experts, layout.row_bytes, dtype=torch.uint8)
        if store.expert_format is not None:
            for e, tensors in enumerate(expert_tensor_names(spec, layer)):
                rows[e] = load_packed_expert(spec, store, layout, tensors)
        else:
            for e, (gate_up, down, biases) in enumerate(expert_matrices(spec, store, layer)):
                rows[e] = quant.quantize_matrices(layout, gate_up, down, biases)
        return rows
    rows = torch.empty(moe.num_experts, quant.native_row_elems(h, i, moe.expert_bias), dtype=dtype)
    rows[:, 3 * h * i + (2 * i + h if moe.expert_bias else 0):].zero_()  # the padding (quant.native_row_elems)
    gate_up, down = arena_views(rows, h, i)
    bias_rows = bias_views(rows, ExpertMLP(h, i, bias=True)) if moe.expert_bias else ()
    for e, (gu, d, biases) in enumerate(expert_matrices(spec, store, layer)):
        gate_up[e].copy_(gu)
        down[e].copy_(d)
        if biases is not None:
            for view, b in zip(bias_rows, biases, strict=True):
                view[e].copy_(b)
    return rows


ExpertTensors = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]


def expert_matrices(spec: Spec, store: WeightStore, layer: int) -> Iterator[ExpertTensors]:
    """A layer's routed experts one at a time, whatever the checkpoint's storage
    (mobile.families.EXPERT_STORAGE), as mobile's canonical input-major matrices: (gate_up [H, 2I],
    gate columns then up columns; down [I, H]; with model.moe.expert_bias, (gate_up's [2I], down's
    [H]) biases, else None). Native tensors come as stored (views where they can be); MXFP4 ones
    decoded to float32 (mobile.mxfp4)."""
    if expert_storage(spec.model.family) == "per_expert":
        for t in expert_tensor_names(spec, layer):
            gate, up, down = (store.get(t[p]) for p in EXPERT_PROJECTIONS)  # [out, in], as nn.Linear
            yield torch.cat((gate.T, up.T), dim=1), down.T, None
        return
    names = tensor_names(spec.model.family, spec.checkpoint.tensor_names)
    fused = {key: names[key].format(layer=layer) for key in (*FUSED_MATRICES, *FUSED_BIASES)}
    # each tensor opened once (a memory-mapped view), each expert's slice read as it is needed
    if store.mxfp4:
        parts = {key: [store.get(n) for n in mxfp4.parts(fused[key])] for key in FUSED_MATRICES}

        def matrix(key: str, e: int) -> torch.Tensor:  # stored [E, out, in]
            blocks, scales = (t[e] for t in parts[key])
            return mxfp4.decode(blocks, scales, where=store.dir, name=fused[key]).T
    else:
        dense = {key: store.get(fused[key]) for key in FUSED_MATRICES}

        def matrix(key: str, e: int) -> torch.Tensor:  # stored [E, in, out]
            return dense[key][e]
    gu_bias, down_bias = (store.get(fused[k]) for k in FUSED_BIASES) if spec.model.moe.expert_bias else (None, None)
    for e in range(spec.model.moe.num_experts):
        gate_up = matrix("experts_gate_up", e)
        # the checkpoint interleaves gate and up columns (gate = 0::2, up = 1::2); mobile keeps them apart
        canonical = torch.cat((gate_up[:, 0::2], gate_up[:, 1::2]), dim=1)
        biases = None
        if gu_bias is not None and down_bias is not None:
            biases = torch.cat((gu_bias[e, 0::2], gu_bias[e, 1::2])), down_bias[e]
        yield canonical, matrix("experts_down", e), biases


def expert_layout(spec: Spec) -> quant.Layout:
    """The packed layout of the spec's int8 / int4 experts."""
    return quant.Layout(spec.runtime.expert_format, spec.expert_group, spec.model.hidden_size,
                        spec.model.moe.intermediate_size, spec.model.moe.expert_bias)


@dataclass
class FetchHandle:
    layer: int
    jobs: list[CopyJob] = field(default_factory=list)
    placed: list[tuple[int, int]] = field(default_factory=list)  # (expert, slot) usable once waited for
    rounds: list[list[int]] = field(default_factory=list)  # when the set exceeds the cache (a prompt)


class Rounds:
    """What a wait yields when one forward needs more experts than a layer's cache holds (a long
    prompt): the expert node runs once per round, on a slot map of that round's experts only, each
    round's experts loaded once for all tokens."""

    def __init__(self, owner: OffloadedExperts, handle: FetchHandle):
        self.owner, self.handle = owner, handle

    def __iter__(self):
        for r, members in enumerate(self.handle.rounds):
            if r:
                self.owner.load_round(self.handle.layer, members)
            yield self.owner.round_map(self.handle.layer, members)


class BigOnlyShadow:
    """What big-only decoding would have moved in the same run, for the bytes-saved stat.

    A bookkeeping-only slot table per layer with the run's slot count (main + staging: the same
    device memory) and the run's eviction rule, fed every forward's big set (the top-K of the last
    pass that ran each layer) and charging one expert's bytes per miss: demand fetches only, no
    prefetch. It is an estimate: a real big-only run would see slightly different hidden states
    after a little pass, so slightly different routes.

    The routes come with each layer's one host read; decoded tokens are replayed in batches of
    SHADOW_BATCH forwards (and whenever the stats are read), not one by one on the decode path.
    """

    def __init__(self, layers: list[int], slots: int, expert_bytes: int, eviction: Eviction = "lru"):
        self.expert_bytes = expert_bytes
        self.tables = {layer: SlotTable(slots, eviction=eviction, record_evictions=False) for layer in layers}
        self.routes: dict[int, tuple[list[int], int]] = {}  # this forward's: layer -> (ids [T*K], K)
        self.pending: list[tuple[dict[int, tuple[list[int], int]], int]] = []  # forwards not replayed yet
        self.bytes = 0  # what big-only decoding would have moved, replayed so far

    def note(self, layer: int, ids: list[int], k: int) -> None:
        self.routes[layer] = (ids, k)  # a fallback's big pass overwrites its little pass's routes

    def end_forward(self, tables: dict[int, SlotTable] | None = None, refreshed: int = 0) -> None:
        """tables: the real cache. After a prompt (which runs big under every policy, in rounds when
        it needs more experts than a layer holds), the estimate starts again from the real cache's
        demand-loaded contents, so that decoding is compared from the same state. refreshed: the
        first rows were a KV refresh's recomputed positions, which big-only decoding ran once
        already; only the rest count."""
        if not self.routes:
            return
        routes, self.routes = self.routes, {}
        prompt = any(len(ids) > (1 + refreshed) * k for ids, k in routes.values())
        self.pending.append((routes, refreshed))
        if prompt or len(self.pending) >= SHADOW_BATCH:
            self.flush()
        if prompt and tables is not None:
            self.tables = {layer: table.demand_copy() for layer, table in tables.items()}

    def flush(self) -> int:
        """Replay the pending forwards; returns the estimate so far."""
        misses = 0
        for routes, refreshed in self.pending:
            for layer, (ids, k) in routes.items():
                table = self.tables[layer]
                needed = sorted(set(ids[refreshed * k:]))
                for i in range(0, len(needed), table.size):  # in rounds, as the real cache runs a long prompt
                    table.begin_step()
                    misses += sum(not hit for _, _, hit in table.lookup(needed[i:i + table.size]))
        self.pending.clear()
        self.bytes += misses * self.expert_bytes
        return self.bytes


class ResidentExperts:
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

    def fetch(self, layer: int, entries: list[int]) -> FetchHandle:
        cached, missing, _ = decode_status(entries, self.num_experts)
        needed = cached + missing
        self.hits += len(needed)
        if needed:
            self.used[self.index[layer], needed] = True
        return FetchHandle(layer)

    def note_route(self, layer: int, ids: list[int], k: int) -> None:
        return None  # nothing moves, so there is nothing to compare with

    def wait(self, handle: FetchHandle) -> torch.Tensor:
        return self.identity

    def prefetch(self, layer: int, ids: list[int], kind: str = "predicted") -> None:
        return None

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
        return None

    def collect_stats(self) -> None:
        self.stats.expert_hits = self.hits
        if self.track_use:
            (used,), = self.reader.ints([self.used_total])
            self.stats.extra["expert_bytes_used"] = used * expert_bytes(self.spec)

    def reset_counters(self) -> None:
        self.hits = 0
        self.used_total.zero_()

    def close(self) -> None:
        return None


class OffloadedExperts:
    """Experts in host memory, a bounded per-layer slot cache on the device, copies on a copy engine.

    ondemand keeps nothing between uses; every other policy reuses cached experts and takes the
    prefetches its graph issues (next-layer prediction, complement sets) into the same slot pool,
    where at most `staging` slots hold speculation (mobile.slots). A prefetch goes on the link at
    the next wait, once the demand copies issued with it have landed: it never delays a copy that
    compute is about to wait for, and whether it is staged depends on the graph, never on timing.
    """

    tracks_routes = True  # the fetch's host read carries the router's big set, for the shadow
    track_use = False  # its fetches count what each forward uses (ResidentExperts needs asking)

    def __init__(self, spec: Spec, store: WeightStore, device: torch.device, dtype: torch.dtype, stats: Stats,
                 plan: CachePlan, link: LinkModel, trace: list | None = None, progress=None, compiled: bool = False):
        self.spec, self.stats, self.plan, self.device = spec, stats, plan, device
        self.reuses = spec.policy.traits.reuses_cache
        self.num_experts = E = spec.model.moe.num_experts
        pin = device.type == "cuda"
        self.link = "real" if link.kind == "real" else "emulated"
        self.host: dict[int, torch.Tensor] = {}
        self.rows: dict[int, torch.Tensor] = {}
        self.tables: dict[int, SlotTable] = {}
        self.pending: dict[int, dict[int, CopyJob]] = {}  # layer -> slot -> its copy, until a wait covers it
        self.usable: dict[int, torch.Tensor] = {}  # layer -> the host record of the slot map [E]
        self.record: dict[int, list[int]] = {}  # the same, as Python ints: compared without touching tensors
        self.maps: dict[int, torch.Tensor] = {}  # layer -> the device slot map [E]
        self.dirty: set[int] = set()  # layers whose host record changed since the last copy
        self.eviction = eviction = spec.policy.effective_eviction
        self.store: HostStore | None = None
        for i, layer in enumerate(spec.moe_layers):
            rows = load_expert_rows(spec, store, layer, dtype)
            if self.store is None:  # one allocation for every layer, pinned once (mobile.hoststore)
                self.store = HostStore(len(spec.moe_layers), E, rows.shape[1], rows.dtype, pin)
            self.host[layer] = self.store.views[i]
            self.host[layer].copy_(rows)
            del rows  # only the store's copy stays
            # zeros, not empty: the expert op may compute a pair against any slot and mask it after,
            # which must never meet a NaN in a slot no copy has filled yet (packed: zero scales)
            host = self.host[layer]
            self.rows[layer] = torch.zeros(plan.main + plan.staging, host.shape[1], dtype=host.dtype, device=device)
            self.tables[layer] = SlotTable(plan.main, plan.staging, eviction)
            self.pending[layer] = {}
            self.usable[layer] = torch.full((E,), -1, dtype=torch.long, pin_memory=pin)
            self.record[layer] = [-1] * E
            self.maps[layer] = torch.full((E,), -1, dtype=torch.long, device=device)
            if progress is not None:
                progress.update(1)
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
        self.deferred: list[tuple[int, list[int], str]] = []  # prefetches waiting for the next wait
        if compiled:  # host work (copies, the slot table): a compiled expert segment must call it eagerly
            # (on the instance, only with compile: torch.compiler.disable imports torch._dynamo, a second)
            self.load_round = torch.compiler.disable(self.load_round)  # type: ignore[method-assign]

    # -- the slot map ---------------------------------------------------------------------------
    def slot_map(self, layer: int) -> torch.Tensor:
        """The device slot map, with every change of the host record copied over first."""
        if layer in self.dirty:
            # one copy of E entries; on CUDA from pinned memory, queued on the compute stream
            # before whatever reads the map. The record is next written after this layer's next
            # host read, which waits for that stream, so the copy has long landed by then.
            self.maps[layer].copy_(self.usable[layer], non_blocking=True)
            self.dirty.discard(layer)
        return self.maps[layer]

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

    def fetch(self, layer: int, entries: list[int]) -> FetchHandle:
        self._mark_read()
        table = self.tables[layer]
        table.begin_step()
        if not self.reuses:
            table.forget()
        cached, missing, free = decode_status(entries, self.num_experts)
        if free:
            self.stats.extra["free_complement_experts"] = self.stats.extra.get("free_complement_experts", 0) + free
        needed = sorted(cached + missing)
        handle = FetchHandle(layer)
        if len(needed) > self.plan.main:
            handle.rounds = [needed[i:i + self.plan.main] for i in range(0, len(needed), self.plan.main)]
            needed = handle.rounds[0]
        self._request(layer, needed, handle)
        return handle

    def _request(self, layer: int, needed: list[int], handle: FetchHandle) -> None:
        table = self.tables[layer]
        for e, slot, hit in table.lookup(needed):
            if hit:
                job = self.pending[layer].get(slot)
                if job is not None:  # a prefetch no wait has covered yet: this one will
                    self.engine.promote(job)  # still queued? it is needed now: demand priority
                    handle.jobs.append(job)
            else:
                handle.jobs.append(self._copy(layer, e, slot, DEMAND))
            handle.placed.append((e, slot))
        self._forget_evicted(layer)

    def _copy(self, layer: int, expert: int, slot: int, priority: int) -> CopyJob:
        old = self.pending[layer].get(slot)
        if old is not None and not old.done.is_set():
            self.engine.retire(old)  # never let a stale copy land after the new one
        after = []
        if self.cuda:  # the same two orderings on the copy streams: the slot's last reader, a stale copy
            if layer in self.read_done:
                after.append(self.read_done[layer])
            if old is not None and old.event is not None:
                after.append(old.event)
        job = self.engine.submit(self.host[layer][expert], self.rows[layer][slot], priority,
                                 tag=f"L{layer}.e{expert}->s{slot}", after=after)
        self.pending[layer][slot] = job
        self.stats.bytes_h2d += job.nbytes
        return job

    def wait(self, handle: FetchHandle) -> torch.Tensor | Rounds:
        self.stats.stall_s += self.engine.wait(handle.jobs)
        pending = self.pending[handle.layer]
        for e, slot in handle.placed:  # covered by this wait: usable from now on
            self._set_usable(handle.layer, e, slot)
            pending.pop(slot, None)
        self._issue_deferred()  # the demand copies have landed: the link is free for speculation
        self.released = handle.layer
        return Rounds(self, handle) if handle.rounds else self.slot_map(handle.layer)

    def load_round(self, layer: int, members: list[int]) -> None:
        """The previous round's experts are done: unpin them, load the next round, wait for it."""
        self._mark_read()  # the previous round's op is queued: the next round's copies follow it
        self.tables[layer].begin_step()
        handle = FetchHandle(layer)
        self._request(layer, members, handle)
        self.wait(handle)

    def prefetch(self, layer: int, ids: list[int], kind: str = "predicted") -> None:
        """Stage these experts of `layer`, at the next wait (see the class docstring)."""
        self.deferred.append((layer, ids, kind))

    def _issue_deferred(self) -> None:
        for layer, ids, kind in self.deferred:
            table = self.tables[layer]
            for e in sorted(set(ids)):
                # never evicts an expert the current step uses: those are pinned until the next fetch
                slot = table.stage(e, kind)
                if slot is not None:
                    self._copy(layer, e, slot, PREFETCH)
            self._forget_evicted(layer)
        self.deferred.clear()

    def arena(self, layer: int) -> torch.Tensor:
        return self.rows[layer]

    def expert_rows(self, layer: int) -> torch.Tensor | None:
        """Every expert of `layer` as the host store holds it, one row each (None without experts)."""
        return self.host.get(layer)

    # -- bookkeeping ----------------------------------------------------------------------------
    def note_route(self, layer: int, ids: list[int], k: int) -> None:
        """ids [T*K], K per token: the router's big set, whatever this pass uses of it."""
        self.shadow.note(layer, ids, k)

    def begin_forward(self) -> None:
        return None

    def end_forward(self, refreshed: int = 0) -> None:
        """refreshed: how many positions before the token a KV refresh recomputed in this forward."""
        self._mark_read()
        self.deferred.clear()  # a prefetch no wait followed (its pass ended at a gate) is stale now
        self.shadow.end_forward(self.tables, refreshed)

    def settle(self) -> None:
        """Bring the statistics up to date (the big-only estimate replays its pending forwards; on
        CUDA the copies' and waits' timing events are read)."""
        self.stats.extra["big_only_bytes_h2d"] = self.shadow.flush()
        self.stats.stall_s += self.engine.collect()

    def collect_stats(self) -> None:
        self.settle()
        c = [t.counters for t in self.tables.values()]
        self.stats.expert_hits = sum(x.hits for x in c)
        self.stats.expert_misses = sum(x.misses for x in c)
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
        for t in self.tables.values():
            t.counters = type(t.counters)()

    @property
    def failure(self) -> BaseException | None:
        """What ended the copy worker, if it failed: no copy lands any more."""
        return self.engine.failure

    def close(self) -> None:
        self.engine.close()
        if self.store is not None:
            if self.cuda:
                torch.cuda.synchronize(self.device)  # no copy may still read the store
            self.store.close()


def expert_compute_seconds(spec: Spec, device: torch.device, dtype: torch.dtype, repeats: int = 30) -> float:
    """Median time to run one native expert (the spec's dtype, whatever the expert format) for one
    token on this machine: the unit --link-ratio calibrates against, so that every format shares
    one link."""
    import time

    h = spec.model.hidden_size
    x = torch.randn(1, h, dtype=dtype, device=device)
    arena = torch.randn(1, 3 * h * spec.model.moe.intermediate_size, dtype=dtype, device=device) * 0.02
    weights, ids = torch.ones(1, 1, device=device), torch.zeros(1, 1, dtype=torch.long, device=device)
    slot_map = torch.zeros(1, dtype=torch.long, device=device)
    times = []
    for n in range(repeats + 5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.ops.mobile.moe_experts(x, weights, ids, slot_map, arena, "top", 1, 0.0, False, False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if n >= 5:  # warm-up excluded
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
