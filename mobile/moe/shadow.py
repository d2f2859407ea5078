"""The big-only estimate: what big-only decoding would have moved in the same run, for the
bytes-saved statistics (`decode_bytes_vs_big_only`)."""

from __future__ import annotations

from mobile.moe.slots import Eviction, SlotTable

SHADOW_BATCH = 64  # forwards the estimate buffers before it replays them


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
        self.pending: list[tuple[dict[int, tuple[list[int], int]], int]] = []  # forwards not replayed yet
        self.bytes = 0  # what big-only decoding would have moved, replayed so far

    def end_forward(self, routes: dict[int, tuple[list[int], int]], tables: dict[int, SlotTable] | None = None,
                    refreshed: int = 0) -> None:
        """routes: the forward's big set per layer, (ids [T*K], K). tables: the real cache. After a prompt
        (which runs big under every policy, in rounds when it needs more experts than a layer
        holds), the estimate starts again from the real cache's demand-loaded contents, so that
        decoding is compared from the same state. refreshed: the first rows were a KV refresh's
        recomputed positions, which big-only decoding ran once already; only the rest count."""
        if not routes:
            return
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
