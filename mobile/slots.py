"""Slot bookkeeping for one layer of the device expert cache. Pure logic, no tensors.

A layer has `main` slots (LRU-managed, hold the experts in use) and `staging` slots (receive
low-priority prefetches). A prefetch only ever lands in a staging slot, so speculation never
evicts a hot expert. When a demand lookup hits a staged expert, the slot is promoted to main and
the main slot LRU would evict next becomes the staging slot instead: no copy, just a role swap.
Slots that the current step uses are pinned and are never chosen as victims.
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
        self.size = main + staging
        self.expert_in: list[int | None] = [None] * self.size  # slot -> expert
        self.slot_of: dict[int, int] = {}  # expert -> slot
        self.staging: set[int] = set(range(main, self.size))
        self.lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(main))  # oldest first
        self.stage_order: OrderedDict[int, None] = OrderedDict((s, None) for s in self.staging)
        self.pinned: set[int] = set()
        self.speculative: dict[int, str] = {}  # slot -> why it was staged (prefetch kind), until used
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

    def access(self, expert: int) -> tuple[int, bool]:
        """A demand lookup. Returns (slot, hit); on a miss the caller must copy the expert in."""
        slot = self.slot_of.get(expert)
        if slot is not None:
            self.counters.hits += 1
            if slot in self.speculative:
                kind = self.speculative.pop(slot)
                self.counters.prefetch_used += 1
                self.counters.used_by_kind[kind] = self.counters.used_by_kind.get(kind, 0) + 1
            if slot in self.staging:
                try:
                    self._promote(slot)
                except CacheFull:
                    pass  # every main slot is in use: serve it from staging this time (pinned)
            if slot in self.lru:
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
        """A prefetch hint. Returns the staging slot to copy into, or None (present, or no room)."""
        if expert in self.slot_of or not self.staging:
            return None
        try:
            slot = self._victim(self.stage_order)
        except CacheFull:
            return None
        self._evict(slot)
        self._place(expert, slot)
        self.stage_order.move_to_end(slot)
        self.speculative[slot] = kind
        self.counters.prefetch_issued += 1
        self.counters.issued_by_kind[kind] = self.counters.issued_by_kind.get(kind, 0) + 1
        return slot

    # -- internals --------------------------------------------------------------------------
    def _victim(self, order: OrderedDict[int, None]) -> int:
        for slot in order:  # free slots first, then least recently used
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

    def _promote(self, slot: int) -> None:
        """Staging slot -> main; the main slot LRU would evict next takes its place in staging."""
        victim = self._victim(self.lru)
        self.staging.discard(slot)
        del self.stage_order[slot]
        self.lru[slot] = None
        del self.lru[victim]
        self.staging.add(victim)
        self.stage_order[victim] = None
        self.stage_order.move_to_end(victim, last=False)  # reused first, as LRU would have

    def slot_array(self, num_experts: int) -> list[int]:
        """[E] slot of each expert, -1 where absent."""
        out = [-1] * num_experts
        for e, s in self.slot_of.items():
            out[e] = s
        return out
