"""Where routed experts live, and how a fetch makes them usable.

Every expert set exposes the calls that the graph's fetch, wait, prefetch and expert nodes use:
    fetch(layer, ids)    -> handle     start moving the experts in `ids` into device slots
    wait(handle)         -> slot_map   block until they are there; slot_map [E] gives each slot
                                       (a Rounds object when a prefill needs more than the cache holds)
    prefetch(layer, ids)               a low-priority hint: stage these if the link is idle
    arena(layer)         -> (w13, w2)  the device slot storage the expert kernel reads

An expert is stored packed, [gate rows; up rows] then down, as one contiguous row of the host
store and of the device arena, so it moves as one copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mobile.budget import CachePlan
from mobile.costs import expert_bytes
from mobile.families import tensor_names
from mobile.slots import Eviction, SlotTable
from mobile.spec import Spec
from mobile.stats import Stats
from mobile.transfer import DEMAND, PREFETCH, CopyEngine, CopyJob, LinkModel
from mobile.weights import WeightStore


def packed_views(rows: torch.Tensor, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [S, 3*I*H] -> w13 [S, 2I, H] and w2 [S, H, I], as views (no copy)."""
    n = rows.shape[1]
    w13 = rows.as_strided((rows.shape[0], 2 * inter, hidden), (n, hidden, 1), rows.storage_offset())
    w2 = rows.as_strided((rows.shape[0], hidden, inter), (n, inter, 1), rows.storage_offset() + 2 * inter * hidden)
    return w13, w2


def load_packed_experts(spec: Spec, store: WeightStore, layer: int, dtype: torch.dtype,
                        pin: bool = False) -> torch.Tensor:
    """All experts of one layer from the checkpoint, packed: [E, 3*I*H] in host memory."""
    moe, h = spec.model.moe, spec.model.hidden_size
    i = moe.intermediate_size
    names = tensor_names(spec.model.family, spec.checkpoint.tensor_names)
    rows = torch.empty(moe.num_experts, 3 * i * h, dtype=dtype, pin_memory=pin)
    w13, w2 = packed_views(rows, h, i)
    for e in range(moe.num_experts):
        fmt = {"layer": layer, "expert": e}
        w13[e, :i].copy_(store.get(names["expert_gate"].format(**fmt)))
        w13[e, i:].copy_(store.get(names["expert_up"].format(**fmt)))
        w2[e].copy_(store.get(names["expert_down"].format(**fmt)))
    return rows


@dataclass
class FetchHandle:
    layer: int
    jobs: list[CopyJob] = field(default_factory=list)
    slot_map: torch.Tensor | None = None
    rounds: list[list[int]] = field(default_factory=list)  # when the set exceeds the cache (prefill)
    experts: list[int] = field(default_factory=list)  # what this fetch asked for (its slot map's members)


class Rounds:
    """What a wait yields when one forward needs more experts than a layer's cache holds (a long
    prefill): the expert node runs once per round, each round's experts loaded once for all tokens."""

    def __init__(self, owner: OffloadedExperts, handle: FetchHandle, first: torch.Tensor):
        self.owner, self.handle, self.first = owner, handle, first

    def __iter__(self):
        for r, members in enumerate(self.handle.rounds):
            slot_map = self.first if r == 0 else self.owner.load_round(self.handle.layer, members)
            yield torch.tensor(members, device=slot_map.device), slot_map


class BigOnlyShadow:
    """What big-only decoding would have moved in the same run, for the bytes-saved stat.

    A bookkeeping-only slot table per layer with the run's slot count (main + staging: the same
    device memory) and the run's eviction rule, fed every forward's big set (the top-K of the last
    pass that ran each layer) and charging one expert's bytes per miss: demand fetches only, no
    prefetch. It is an estimate: a real big-only run would see slightly different hidden states
    after a little pass, so slightly different routes.
    """

    def __init__(self, layers: list[int], slots: int, expert_bytes: int, eviction: Eviction = "lru"):
        self.expert_bytes = expert_bytes
        self.tables = {layer: SlotTable(slots, eviction=eviction) for layer in layers}
        self.routes: dict[int, torch.Tensor] = {}

    def note(self, layer: int, ids: torch.Tensor) -> None:
        self.routes[layer] = ids  # a fallback's big pass overwrites its little pass's routes

    def commit(self, tables: dict[int, SlotTable] | None = None, refreshed: int = 0) -> int:
        """End of a forward: replay its big sets; returns the bytes big-only would have moved.
        tables: after a prompt (which runs big under every policy, in rounds when it needs more
        experts than a layer holds), start again from the real cache's demand-loaded contents, so
        that decoding is compared from the same state. refreshed: the first rows were a KV refresh's
        recomputed positions, which big-only decoding ran once already; only the rest count."""
        if not self.routes:
            return 0
        misses = 0
        # every layer's routes of one forward have the same shape: one host transfer for all of them
        stacked = torch.stack(list(self.routes.values()))[:, refreshed:]
        routes = dict(zip(self.routes, stacked.tolist(), strict=True))
        prompt = any(len(rows) > 1 for rows in routes.values())
        for layer, rows in routes.items():
            table = self.tables[layer]
            needed = sorted({e for row in rows for e in row})
            for i in range(0, len(needed), table.size):  # in rounds, as the real cache runs a long prompt
                table.begin_step()
                misses += sum(not hit for _, _, hit in table.lookup(needed[i:i + table.size]))
        self.routes.clear()
        if prompt and tables is not None:
            self.tables = {layer: table.demand_copy() for layer, table in tables.items()}
        return misses * self.expert_bytes


class ResidentExperts:
    """All experts of every MoE layer on the device: fetches move nothing and always hit."""

    link = "none"

    def __init__(self, spec: Spec, store: WeightStore, device: torch.device, dtype: torch.dtype, stats: Stats,
                 progress=None):
        self.spec, self.stats = spec, stats
        self.rows: dict[int, torch.Tensor] = {}
        for layer in spec.moe_layers:
            self.rows[layer] = load_packed_experts(spec, store, layer, dtype).to(device)
            if progress is not None:
                progress.update(1)
        self.identity = torch.arange(spec.model.moe.num_experts, device=device)
        # Counted on the device, so a resident fetch never waits for the host: which experts each
        # layer used in the current forward, and running totals read back only by collect_stats.
        self.index = {layer: i for i, layer in enumerate(spec.moe_layers)}
        self.used = torch.zeros(len(self.index), spec.model.moe.num_experts, dtype=torch.bool, device=device)
        self.hits = torch.zeros((), dtype=torch.long, device=device)
        self.used_total = torch.zeros((), dtype=torch.long, device=device)

    @property
    def step_sets(self) -> dict[int, set[int]]:
        """layer -> experts the last forward used."""
        return {layer: set(self.used[i].nonzero().flatten().tolist()) for layer, i in self.index.items()}

    def begin_forward(self) -> None:
        self.used.zero_()

    def end_forward(self, refreshed: int = 0) -> None:
        # each (layer, expert) once per forward: a fallback reuses what its little pass fetched
        self.used_total += self.used.sum()

    def fetch(self, layer: int, ids: torch.Tensor | list[int]) -> FetchHandle:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.used.device)
        mask = torch.zeros_like(self.used[0]).index_fill_(0, ids.flatten(), True)
        self.hits += mask.sum()  # every lookup hits; unique experts per fetch, as a cache counts them
        self.used[self.index[layer]] |= mask
        return FetchHandle(layer, slot_map=self.identity)

    def note_route(self, layer: int, weights: torch.Tensor, ids: torch.Tensor) -> None:
        return None  # nothing moves, so there is nothing to compare with

    def ready(self, layer: int, experts: set[int]) -> set[int]:
        """Which of these experts are on the device with no copy pending: all of them."""
        return experts

    def note_free(self, n: int) -> None:
        return None

    def wait(self, handle: FetchHandle) -> torch.Tensor | Rounds:
        assert handle.slot_map is not None
        return handle.slot_map

    def prefetch(self, layer: int, ids: torch.Tensor, kind: str = "predicted") -> None:
        return None

    def arena(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return packed_views(self.rows[layer], self.spec.model.hidden_size, self.spec.model.moe.intermediate_size)

    def collect_stats(self) -> None:
        self.stats.expert_hits = int(self.hits)
        self.stats.extra["expert_bytes_used"] = int(self.used_total) * expert_bytes(self.spec)

    def reset_counters(self) -> None:
        self.hits.zero_()
        self.used_total.zero_()

    def close(self) -> None:
        return None


class OffloadedExperts:
    """Experts in host memory, a bounded per-layer slot cache on the device, copies on a copy engine.

    ondemand keeps nothing between uses; every other policy reuses cached experts (LRU) and takes
    the prefetches its graph issues (next-layer prediction, complement sets), only while the link is
    idle, into the same slot pool, where at most `staging` slots hold speculation (mobile.slots).
    """

    def __init__(self, spec: Spec, store: WeightStore, device: torch.device, dtype: torch.dtype, stats: Stats,
                 plan: CachePlan, link: LinkModel, trace: list | None = None, progress=None):
        self.spec, self.stats, self.plan, self.device = spec, stats, plan, device
        self.policy = spec.policy.name
        self.num_experts = spec.model.moe.num_experts
        pin = device.type == "cuda"
        self.link = "real" if link.kind == "real" else "emulated"
        self.host: dict[int, torch.Tensor] = {}
        self.rows: dict[int, torch.Tensor] = {}
        self.tables: dict[int, SlotTable] = {}
        self.pending: dict[int, dict[int, CopyJob]] = {}  # layer -> slot -> last copy into it
        self.slot_maps: dict[int, torch.Tensor] = {}
        numel = 3 * spec.model.hidden_size * spec.model.moe.intermediate_size
        self.eviction = eviction = spec.policy.effective_eviction
        for layer in spec.moe_layers:
            self.host[layer] = load_packed_experts(spec, store, layer, dtype, pin=pin)
            self.rows[layer] = torch.empty(plan.main + plan.staging, numel, dtype=dtype, device=device)
            self.tables[layer] = SlotTable(plan.main, plan.staging, eviction)
            self.pending[layer] = {}
            self.slot_maps[layer] = torch.full((self.num_experts,), -1, dtype=torch.long, device=device)
            if progress is not None:
                progress.update(1)
        self.engine = CopyEngine(device, link, trace)
        self.shadow = BigOnlyShadow(spec.moe_layers, plan.main + plan.staging, expert_bytes(spec), eviction)

    def _copy(self, layer: int, expert: int, slot: int, priority: int) -> CopyJob:
        old = self.pending[layer].get(slot)
        if old is not None and not old.done.is_set():
            self.engine.retire(old)  # never let a stale copy land after the new one
        job = self.engine.submit(self.host[layer][expert], self.rows[layer][slot], priority,
                                 tag=f"L{layer}.e{expert}->s{slot}")
        self.pending[layer][slot] = job
        self.stats.bytes_h2d += job.nbytes
        return job

    def fetch(self, layer: int, ids: torch.Tensor | list[int]) -> FetchHandle:
        table = self.tables[layer]
        table.begin_step()
        if self.policy == "ondemand":
            table.forget()
        handle = FetchHandle(layer)
        # host sync: a fetch is a sync point in the graph
        needed = torch.unique(ids).tolist() if isinstance(ids, torch.Tensor) else sorted(set(ids))
        if len(needed) > self.plan.main:
            handle.rounds = [needed[i:i + self.plan.main] for i in range(0, len(needed), self.plan.main)]
            needed = handle.rounds[0]
        self._request(layer, needed, handle)
        return handle

    def ready(self, layer: int, experts: set[int]) -> set[int]:
        """Which of these experts are in the layer's cache with their copies done: using them costs
        no transfer and no wait."""
        table, pending = self.tables[layer], self.pending[layer]
        out = set()
        for e in experts:
            slot = table.slot_of.get(e)
            job = None if slot is None else pending.get(slot)
            if slot is not None and (job is None or job.finished()):
                out.add(e)
        return out

    def note_free(self, n: int) -> None:
        """n dropped experts that a little pass used because they were already in the cache."""
        self.stats.extra["free_complement_experts"] = self.stats.extra.get("free_complement_experts", 0) + n

    def _request(self, layer: int, needed: list[int], handle: FetchHandle) -> None:
        table = self.tables[layer]
        handle.experts.extend(needed)
        for e, slot, hit in table.lookup(needed):
            if hit:
                job = self.pending[layer].get(slot)
                if job is not None and not job.finished():
                    self.engine.promote(job)  # a prefetch still in flight is now needed: demand priority
                    handle.jobs.append(job)
            else:
                handle.jobs.append(self._copy(layer, e, slot, DEMAND))

    def wait(self, handle: FetchHandle) -> torch.Tensor | Rounds:
        stall = sum(job.wait() for job in handle.jobs)
        self.stats.stall_s += stall
        slot_map = self.slot_maps[handle.layer]
        table = self.tables[handle.layer]
        # only this fetch's experts: others in the cache may still be in flight (prefetches)
        members = [-1] * self.num_experts
        for e in handle.experts:
            members[e] = table.slot_of[e]
        slot_map.copy_(torch.tensor(members), non_blocking=True)
        return Rounds(self, handle, slot_map) if handle.rounds else slot_map

    @torch.compiler.disable  # host work (copies, the slot table): a compiled expert segment calls it eagerly
    def load_round(self, layer: int, members: list[int]) -> torch.Tensor:
        """The previous round's experts are done: unpin them, load the next round, wait for it."""
        self.tables[layer].begin_step()
        handle = FetchHandle(layer)
        self._request(layer, members, handle)
        slot_map = self.wait(handle)
        assert isinstance(slot_map, torch.Tensor)
        return slot_map.clone()  # the shared slot-map buffer is rewritten by the next round

    def prefetch(self, layer: int, ids: torch.Tensor, kind: str = "predicted") -> None:
        if not self.engine.idle():
            # only while the link is idle: speculation must never delay a copy that compute waits for
            self.stats.extra["prefetch_skipped_busy"] = self.stats.extra.get("prefetch_skipped_busy", 0) + 1
            return
        table = self.tables[layer]
        for e in torch.unique(ids).tolist():
            slot = table.stage(e, kind)
            if slot is not None:
                self._copy(layer, e, slot, PREFETCH)

    def arena(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return packed_views(self.rows[layer], self.spec.model.hidden_size, self.spec.model.moe.intermediate_size)

    def note_route(self, layer: int, weights: torch.Tensor, ids: torch.Tensor) -> None:
        """weights, ids [T, K]: the router's big set, whatever this pass uses of it."""
        self.shadow.note(layer, ids)

    def begin_forward(self) -> None:
        return None

    def end_forward(self, refreshed: int = 0) -> None:
        """refreshed: how many positions before the token a KV refresh recomputed in this forward."""
        extra = self.stats.extra
        extra["big_only_bytes_h2d"] = extra.get("big_only_bytes_h2d", 0) + self.shadow.commit(self.tables, refreshed)

    def collect_stats(self) -> None:
        c = [t.counters for t in self.tables.values()]
        self.stats.expert_hits = sum(x.hits for x in c)
        self.stats.expert_misses = sum(x.misses for x in c)
        self.stats.extra.update(
            eviction=self.eviction, prefetch_issued=sum(x.prefetch_issued for x in c),
            prefetch_used=sum(x.prefetch_used for x in c),
            prefetch_wasted=sum(x.prefetch_wasted for x in c),
            complement_prefetch_issued=sum(x.issued_by_kind.get("complement", 0) for x in c),
            complement_prefetch_used=sum(x.used_by_kind.get("complement", 0) for x in c),
            cache_hit_rate_per_layer={layer: round(t.counters.hits / max(1, t.counters.hits + t.counters.misses), 4)
                                      for layer, t in self.tables.items()})

    def reset_counters(self) -> None:
        for t in self.tables.values():
            t.counters = type(t.counters)()

    def close(self) -> None:
        self.engine.close()


def expert_compute_seconds(rows: torch.Tensor, spec: Spec, device: torch.device, repeats: int = 30) -> float:
    """Median time to run one expert for one token on this machine (calibrates --link-ratio)."""
    import time

    from mobile.ops import routed_experts

    h, i = spec.model.hidden_size, spec.model.moe.intermediate_size
    w13, w2 = packed_views(rows[:1].to(device), h, i)
    x = torch.randn(1, h, dtype=rows.dtype, device=device)
    weights, slots = torch.ones(1, 1, device=device), torch.zeros(1, 1, dtype=torch.long, device=device)
    times = []
    for n in range(repeats + 5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        routed_experts(x, weights, slots, w13, w2)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if n >= 5:  # warm-up excluded
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
