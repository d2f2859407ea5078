"""Slot bookkeeping for one layer of the device expert cache. Pure logic, no tensors.

A layer has `main + staging` slots in one LRU pool. Demand lookups use all of them. Prefetches
(speculation) are capped: at most `staging` slots hold prefetched experts that no lookup has used
yet. A prefetched expert enters at the cold end of the LRU order, so speculation that does not pay
off is the first thing a demand miss evicts, and once the cap is reached a new prefetch replaces the
oldest unused one instead of evicting more real experts. Slots that the current step uses are
pinned and are never chosen as victims, by demand or by prefetch.

(An earlier layout reserved `staging` slots for prefetches only. With the link as the bottleneck it
made `lru-prefetch` move 2-3x the bytes of plain LRU at equal memory on the first demo model,
because the reserved slots were lost to reuse; see the README's offloading notes.)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


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
    def __init__(self, main: int, staging: int = 0):
        if main < 1 or staging < 0:
            raise ValueError(f"need main >= 1 and staging >= 0 slots, got {main} and {staging}")
        self.size, self.staging = main + staging, staging
        self.expert_in: list[int | None] = [None] * self.size  # slot -> expert
        self.slot_of: dict[int, int] = {}  # expert -> slot
        self.lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(self.size))  # coldest first
        self.pinned: set[int] = set()
        self.speculative: OrderedDict[int, str] = OrderedDict()  # slot -> prefetch kind, oldest first, until used
        self.counters = SlotCounters()

    # -- demand path ------------------------------------------------------------------------
    def begin_step(self) -> None:
        """The previous step's experts are done: nothing is pinned any more."""
        self.pinned.clear()

    def forget(self) -> None:
        """Drop every resident expert (the `ondemand` policy keeps nothing between uses)."""
        for s, e in enumerate(self.expert_in):
            if e is not None and s not in self.pinned:
                self._evict(s)

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
            self.counters.hits += 1
            if slot in self.speculative:
                kind = self.speculative.pop(slot)
                self.counters.prefetch_used += 1
                self.counters.used_by_kind[kind] = self.counters.used_by_kind.get(kind, 0) + 1
            self.lru.move_to_end(slot)
            self.pinned.add(slot)
            return slot, True
        slot = self._victim(self.lru)  # raises CacheFull before anything is counted or changed
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
        order = self.speculative if len(self.speculative) >= self.staging else \
            [s for s in self.lru if s not in self.speculative]
        try:
            slot = self._victim(order)
        except CacheFull:
            return None
        self._evict(slot)
        self._place(expert, slot)
        self.lru.move_to_end(slot, last=False)  # cold end: unused speculation goes first
        self.speculative[slot] = kind
        self.counters.prefetch_issued += 1
        self.counters.issued_by_kind[kind] = self.counters.issued_by_kind.get(kind, 0) + 1
        return slot

    # -- internals --------------------------------------------------------------------------
    def _victim(self, order) -> int:
        for slot in order:  # free slots first, then the coldest
            if self.expert_in[slot] is None and slot not in self.pinned:
                return slot
        for slot in order:
            if slot not in self.pinned:
                return slot
        raise CacheFull(f"all {len(order)} candidate slots are pinned")

    def _evict(self, slot: int) -> None:
        old = self.expert_in[slot]
        if old is None:
            return
        if slot in self.speculative:
            del self.speculative[slot]
            self.counters.prefetch_wasted += 1
        del self.slot_of[old]
        self.expert_in[slot] = None

    def _place(self, expert: int, slot: int) -> None:
        self.expert_in[slot] = expert
        self.slot_of[expert] = slot

