"""Slot bookkeeping for one layer of the device expert cache. Pure logic, no tensors.

A layer has `main + staging` slots in one pool. Demand lookups use all of them. Prefetches
(speculation) are capped: at most `staging` slots hold prefetched experts that no lookup has used
yet. A prefetched expert enters at the cold end of the LRU order, so speculation that does not pay
off is the first thing a demand miss evicts, and once the cap is reached a new prefetch replaces the
oldest unused one instead of evicting more real experts. Slots that the current step uses are
pinned and are never chosen as victims, by demand or by prefetch.

Eviction is LRU (the baselines' rule) or LFU: the victim is the expert with the fewest recent uses,
each use's weight decaying by `LFU_DECAY` per step of the layer (a half-life of about 35 tokens), so
the score follows what the text uses now. Expert use in trained MoEs is skewed and bursty:
replaying the demo model's routes on its training text through an 8-slot cache, this LFU missed
16-28% less than LRU, for big-only routes and for mobile's alike (benchmarks/eviction_study.py).
Ties go to the least recently used. Scores outlive eviction: an expert that comes back remembers
its history.

(An earlier layout reserved `staging` slots for prefetches only. With the link as the bottleneck it
made `lru-prefetch` move 2-3x the bytes of plain LRU at equal memory on the first demo model,
because the reserved slots were lost to reuse; see docs/offloading-baselines.md.)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

Eviction = Literal["lru", "lfu"]
LFU_DECAY = 0.98  # per step of the layer; chosen on the demo's training text (benchmarks/eviction_study.py)


class CacheFull(RuntimeError):
    """Every candidate slot is pinned: the budget is below the working set (a planning bug)."""


@dataclass
class SlotCounters:
    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    issued_by_kind: dict[str, int] = field(default_factory=dict)  # "predicted" | "complement"
    used_by_kind: dict[str, int] = field(default_factory=dict)


class SlotTable:
    def __init__(self, main: int, staging: int = 0, eviction: Eviction = "lru", decay: float = LFU_DECAY,
                 record_evictions: bool = True):
        if main < 1 or staging < 0:
            raise ValueError(f"need main >= 1 and staging >= 0 slots, got {main} and {staging}")
        if eviction not in ("lru", "lfu"):
            raise ValueError(f"eviction must be 'lru' or 'lfu', got {eviction!r}")
        self.size, self.staging, self.eviction, self.decay = main + staging, staging, eviction, decay
        self.expert_in: list[int | None] = [None] * self.size  # slot -> expert
        self.slot_of: dict[int, int] = {}  # expert -> slot
        self.lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(self.size))  # coldest first
        self.pinned: set[int] = set()
        self.speculative: OrderedDict[int, str] = OrderedDict()  # slot -> prefetch kind, oldest first, until used
        self.counters = SlotCounters()
        self.clock = 0  # steps of this layer so far
        self.uses: dict[int, tuple[float, int]] = {}  # lfu: expert -> (decayed use count, clock when last set)
        self.record_evictions = record_evictions
        self.evicted: list[int] = []  # experts whose slots were given away since take_evicted()

    # -- demand path ------------------------------------------------------------------------
    def begin_step(self) -> None:
        """The previous step's experts are done: nothing is pinned any more."""
        self.pinned.clear()
        self.clock += 1

    def forget(self) -> None:
        """Drop every resident expert (the `ondemand` policy keeps nothing between uses)."""
        for s, e in enumerate(self.expert_in):
            if e is not None and s not in self.pinned:
                self._evict(s)

    def step(self, experts: list[int], forget: bool = False) -> tuple[list[tuple[int, int, bool]], list[int]]:
        """One step's demand in one call: begin_step, forget everything first (ondemand), the
        lookups; returns them and the experts evicted since the last call (take_evicted)."""
        self.begin_step()
        if forget:
            self.forget()
        return self.lookup(experts), self.take_evicted()

    def lookup(self, experts: list[int]) -> list[tuple[int, int, bool]]:
        """Demand lookups for one step: (expert, slot, hit) each. Hits are taken (and pinned) first,
        so a miss never evicts an expert this same step is about to use."""
        present = [e for e in experts if e in self.slot_of]
        absent = [e for e in experts if e not in self.slot_of]
        return [(e, *self.access(e)) for e in present + absent]

    def access(self, expert: int) -> tuple[int, bool]:
        """A demand lookup. Returns (slot, hit); on a miss the caller must copy the expert in."""
        slot = self.slot_of.get(expert)
        if slot is not None:
            self._count_use(expert)
            self.counters.hits += 1
            if slot in self.speculative:
                kind = self.speculative.pop(slot)
                self.counters.prefetch_used += 1
                self.counters.used_by_kind[kind] = self.counters.used_by_kind.get(kind, 0) + 1
            self.lru.move_to_end(slot)
            self.pinned.add(slot)
            return slot, True
        slot = self._victim(self.lru, by_score=True)  # raises CacheFull before anything is counted or changed
        self._count_use(expert)
        self.counters.misses += 1
        self._evict(slot)
        self._place(expert, slot)
        self.lru.move_to_end(slot)
        self.pinned.add(slot)
        return slot, False

    # -- prefetch path ----------------------------------------------------------------------
    def stage(self, expert: int, kind: str = "predicted") -> int | None:
        """A prefetch hint. Returns the slot to copy into, or None (present, no staging, or no room)."""
        if expert in self.slot_of or not self.staging:
            return None
        # below the cap, the coldest slot that holds no speculation; at the cap, the oldest speculation
        at_cap = len(self.speculative) >= self.staging
        order = self.speculative if at_cap else [s for s in self.lru if s not in self.speculative]
        try:
            slot = self._victim(order, by_score=not at_cap)
        except CacheFull:
            return None
        self._evict(slot)
        self._place(expert, slot)
        self.lru.move_to_end(slot, last=False)  # cold end: unused speculation goes first
        self.speculative[slot] = kind
        self.counters.prefetch_issued += 1
        self.counters.issued_by_kind[kind] = self.counters.issued_by_kind.get(kind, 0) + 1
        return slot

    def score(self, expert: int) -> float:
        """lfu: the expert's decayed use count now."""
        count, when = self.uses.get(expert, (0.0, self.clock))
        return count * self.decay ** (self.clock - when)

    def note_use(self, expert: int) -> None:
        """A miss computed elsewhere (on the host): a miss all the same (the cache did not hold it),
        and its use counts towards what is hot (lfu)."""
        self._count_use(expert)
        self.counters.misses += 1

    def take_evicted(self) -> list[int]:
        """The experts evicted since the last call (the device slot map must forget them)."""
        out, self.evicted = self.evicted, []
        return out

    def residents(self) -> list[int]:
        """The experts held, coldest (least recently used) first."""
        return [e for e in (self.expert_in[s] for s in self.lru) if e is not None]

    def demand_copy(self) -> SlotTable:
        """A copy that holds only what demand loaded, in one pool of all the slots, with the same
        eviction and history: where the big-only estimate (mobile.moe.shadow) restarts."""
        copy = SlotTable(self.size, 0, self.eviction, self.decay, record_evictions=False)
        copy.lru = OrderedDict(self.lru)
        for e in self.residents():
            if self.slot_of[e] not in self.speculative:
                copy._place(e, self.slot_of[e])
        copy.clock, copy.uses = self.clock, dict(self.uses)
        return copy

    # -- internals --------------------------------------------------------------------------
    def _count_use(self, expert: int) -> None:
        if self.eviction == "lfu":
            self.uses[expert] = (self.score(expert) + 1.0, self.clock)

    def _victim(self, order, by_score: bool = False) -> int:
        """order: candidate slots, coldest first. Free slots go first; then, under lfu with
        by_score, unused speculation (it sits at the cold end of the LRU order) and then the lowest
        score; otherwise the coldest."""
        for slot in order:
            if self.expert_in[slot] is None and slot not in self.pinned:
                return slot
        candidates = [s for s in order if s not in self.pinned]
        if not candidates:
            raise CacheFull(f"all {len(order)} candidate slots are pinned")
        if by_score and self.eviction == "lfu":
            spare = [s for s in candidates if s in self.speculative]
            if spare:
                return spare[0]
            return min(candidates, key=lambda s: self.score(self.expert_in[s]))  # type: ignore[arg-type]
        return candidates[0]

    def _evict(self, slot: int) -> None:
        old = self.expert_in[slot]
        if old is None:
            return
        if slot in self.speculative:
            del self.speculative[slot]
            self.counters.prefetch_wasted += 1
        del self.slot_of[old]
        self.expert_in[slot] = None
        if self.record_evictions:
            self.evicted.append(old)

    def _place(self, expert: int, slot: int) -> None:
        self.expert_in[slot] = expert
        self.slot_of[expert] = slot

