"""Where a missed expert runs: moved over the link into a cache slot (MOVE), computed on the host
from the host store (HOST), or both: computed on the host now and copied in behind, for the
tokens after (BOTH).

One rule decides, from what the layer's one host read already returns (which experts are missing
and how many of the step's pairs each has) and what the host knows without reading anything: each
expert's use count (the cache's decayed LFU score), when the link and the host are next free, and
what moving and computing cost (Costs). The layer then waits for both the device and the host
(mobile.moe.hostwork), so the rule shares the misses out to finish the layer soonest:

- Misses are taken in order of most pairs first (the longest jobs first: the usual greedy for two
  machines).
- Each goes to whichever of the link (then the device computes it) and the host finishes it
  earlier, given what is already queued on each.
- A miss placed on the host is also copied behind (BOTH) when it is hot: its use count is at least
  the coldest resident expert's, so the cache would keep it. The copy goes on the link after this
  step's moves, where it delays no one this step.

The baselines' rules are constant: `lru-host` (the expert-cache PRs) computes every miss on the
host and copies it in behind (`always`). `hybrid-static` (KTransformers) computes every miss on
the host, a prompt's too, its cache a hot set loaded once from a routing profile
(mobile.moe.profile). `host` (llama.cpp's -ot exps=CPU) has no cache at all
(mobile.moe.hostcache). OffloadedCache applies the rule to a decoded token's misses; a prompt's
experts are moved, many tokens sharing each (but under hybrid-static).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Placement(enum.Enum):
    MOVE = "move"
    HOST = "host"
    BOTH = "both"


@dataclass(frozen=True)
class Costs:
    """Seconds: to move one expert over the link (latency included), and to compute one (token,
    expert) pair on the device and on the host."""

    move: float
    device_pair: float
    host_pair: float


@dataclass(frozen=True)
class Miss:
    """A missing expert of this step: its id, how many of the step's pairs use it, its use count."""

    expert: int
    pairs: int
    score: float


def choose(misses: list[Miss], costs: Costs, link_free: float, host_free: float,
           coldest_resident: float) -> dict[int, Placement]:
    """Each miss's placement, finishing the layer soonest (see the module docstring). link_free and
    host_free: seconds from now until the link and the host are free; coldest_resident: the lowest
    use count in the layer's cache (a miss at least as hot would be kept there)."""
    out: dict[int, Placement] = {}
    link, cpu = link_free, host_free
    for m in sorted(misses, key=lambda m: (-m.pairs, -m.score, m.expert)):
        by_link = link + costs.move + m.pairs * costs.device_pair
        by_host = cpu + m.pairs * costs.host_pair
        if by_link <= by_host:
            out[m.expert] = Placement.MOVE
            link += costs.move
        else:
            out[m.expert] = Placement.BOTH if m.score >= coldest_resident else Placement.HOST
            cpu += m.pairs * costs.host_pair
    return out


def always(placement: Placement, misses: list[Miss]) -> dict[int, Placement]:
    """A baseline's constant rule."""
    return {m.expert: placement for m in misses}
