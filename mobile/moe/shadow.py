"""The big-only estimate: what big-only decoding would have moved in the same run, for the
bytes-saved statistics (`decode_bytes_vs_big_only`)."""

from __future__ import annotations

from mobile.moe.slots import Eviction, SlotTable

SHADOW_BATCH = 64  # decoded forwards the cache queues for the estimate before it has them replayed


Routes = dict[int, tuple[list[int], int]]  # a forward's big set per layer: (ids [T*K], K)


class BigOnlyShadow:
    """What big-only decoding would have moved in the same run, for the bytes-saved stat.

    A bookkeeping-only slot table per layer with the run's slot count (main + staging: the same
    device memory) and the run's eviction rule, fed every forward's big set (the top-K of the last
    pass that ran each layer) and charging one expert's bytes per miss: demand fetches only, no
    prefetch. It is an estimate: a real big-only run would see slightly different hidden states
    after a little pass, so slightly different routes.

    The routes come with each layer's one host read. The cache queues each forward's and hands
    them over (`replay`) in batches: at the latest after SHADOW_BATCH forwards, at once after a
    forward of more than one row (a prompt resyncs the estimate), and whenever the stats are read.
    So a decoded token's path makes no call into the estimate.
    """

    def __init__(self, layers: list[int], slots: int, expert_bytes: int, eviction: Eviction = "lru"):
        self.expert_bytes = expert_bytes
        self.tables = {layer: SlotTable(slots, eviction=eviction, record_evictions=False) for layer in layers}
        self.bytes = 0  # what big-only decoding would have moved, replayed so far

    def replay(self, forwards: list[tuple[Routes, int]], tables: dict[int, SlotTable] | None = None) -> int:
        """Replay these forwards, in order, and empty the list; returns the estimate so far.

        Each is (routes, refreshed): refreshed, the first rows were a KV refresh's recomputed
        positions, which big-only decoding ran once already; only the rest count. tables: the real
        cache. After a prompt (which runs big under every policy, in rounds when it needs more
        experts than a layer holds), the estimate starts again from the real cache's demand-loaded
        contents, so that decoding is compared from the same state."""
        for routes, refreshed in forwards:
            misses = 0
            for layer, (ids, k) in routes.items():
                table = self.tables[layer]
                needed = sorted(set(ids[refreshed * k:]))
                for i in range(0, len(needed), table.size):  # in rounds, as the real cache runs a long prompt
                    table.begin_step()
                    misses += sum(not hit for _, _, hit in table.lookup(needed[i:i + table.size]))
            self.bytes += misses * self.expert_bytes
            prompt = any(len(ids) > (1 + refreshed) * k for ids, k in routes.values())
            if prompt and tables is not None:
                self.tables = {layer: table.demand_copy() for layer, table in tables.items()}
        forwards.clear()
        return self.bytes
