"""The policy registry: what each policy is, in one place. Lowering, the expert cache, the cache
planner, eval, bench and the CLI ask it; nothing else matches policy names.

A policy says where experts live (resident or offloaded) and where a missing one runs (moved to
the device, or on the host), which experts a decode pass uses (big:
top-K; little: top-k, optionally with the per-layer rule and the experts already cached), whether
a confidence gate can send a token back through a big pass, which speculative copies its graph
may issue, and which eviction rule its cache uses by default.

This module imports nothing of mobile, so that the spec's schema can take its names from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Pass = Literal["big", "little"]
# where a missed expert runs: moved into a cache slot; on the host (no cache); on the host now and
# copied in behind; by the placement rule per expert (mobile.moe.placement); by that rule where the
# costs weighed at load let the host win a miss, else moved (adaptive); or on the host, the cache
# holding a fixed hot set that never changes (static)
Placement = Literal["move", "host", "both", "choose", "adaptive", "static"]
# the placements whose misses may run on the host beside a device cache: their fetch reads the
# hidden rows too, and a host_join adds the host's share (mobile.compiler.lower)
PLACED: tuple[Placement, ...] = ("both", "choose", "adaptive", "static")
Eviction = Literal["lru", "lfu"]
EvalMode = Literal["reference", "resident", "cache"]


@dataclass(frozen=True)
class Policy:
    name: str
    summary: str
    offloads: bool = True  # routed experts live on the host and stream into a bounded device cache
    reuses_cache: bool = True  # keeps experts between uses (ondemand forgets them every step)
    decode_pass: Pass = "big"  # which expert set a decoded token's first (or only) pass uses
    fallback: bool = False  # a gate on the little pass's output may recompute the token with big experts
    tau_is: Literal["gate", "layer_mass"] | None = None  # what policy.tau means for it
    layer_rule: Literal["prefix", "switch"] | None = None  # its per-layer rule under layer_rule: auto
    layer_tau: bool = False  # the per-layer rule at policy.layer_tau applies to its little pass
    prefetch: frozenset[str] = frozenset()  # speculative copies its graph may issue
    cache_aware: bool = False  # cached_complement applies: its little pass may use cached dropped experts
    eviction: Eviction = "lru"  # under eviction: auto
    only_little: bool = False  # never uses more than little_k experts of a token (the cache's working set)
    # where a routed expert that is not on the device runs: moved into a cache slot, or computed on
    # the host from host memory (mobile.moe.hostcache; the placement rule: mobile.moe.placement)
    placement: Placement = "move"

    @property
    def can_tune_tau(self) -> bool:
        return self.tau_is is not None

    @property
    def passes(self) -> tuple[Pass, ...]:
        """The passes its graph runs: the decode pass, and the big one where a fallback may follow
        (it also runs `mobile`'s prompts, prefill: big)."""
        return ("little", "big") if self.fallback else (self.decode_pass,)


POLICIES: dict[str, Policy] = {p.name: p for p in [
    Policy("resident", "all experts on the device (the upper bound when the model fits)", offloads=False),
    Policy("ondemand", "fetch every needed expert on every use; no reuse (naive offloading)", reuses_cache=False),
    Policy("host", "every routed expert computed on the host, from host memory; no device expert cache, the link "
           "unused (llama.cpp's --n-cpu-moe over all layers)", reuses_cache=False, placement="host"),
    Policy("lru", "per-layer LRU expert cache, demand fetch on a miss (mixtral-offloading style)"),
    Policy("lru-host", "per-layer LRU expert cache whose misses are computed on the host and copied in behind "
           "(llama.cpp's expert-cache pull requests)", placement="both"),
    Policy("hybrid-static", "each layer's most-used experts (a routing profile: --profile) resident on the device, "
           "every other one computed on the host; nothing moves after loading (KTransformers' placement)",
           placement="static"),
    Policy("lru-prefetch", "lru plus next-layer prediction prefetch (the strong baseline)",
           prefetch=frozenset({"predicted"})),
    Policy("little", "always the top ceil(K/2) experts (speed bound, quality floor)", decode_pass="little",
           prefetch=frozenset({"predicted"}), eviction="lfu", only_little=True),
    Policy("mobile", "big-little: a little pass with the per-layer rule and the cached experts, an optional "
           "confidence gate and big fallback", decode_pass="little", fallback=True, tau_is="gate",
           layer_rule="prefix", layer_tau=True, prefetch=frozenset({"predicted", "complement"}), cache_aware=True,
           eviction="lfu"),
    Policy("layer-mass", "per layer: little experts when they carry tau of the big set's router mass, else big; "
           "no recompute", decode_pass="little", tau_is="layer_mass", layer_rule="switch",
           prefetch=frozenset({"predicted"}), cache_aware=True, eviction="lfu"),
]}
NAMES = tuple(POLICIES)
REFERENCE = "resident"  # big experts, nothing moves: the reference every policy is compared with
DEFAULT = "resident"  # what `mobile import-hf` writes


def get(name: str) -> Policy:
    """The policy called `name`; a KeyError names the choices (the spec loader validates names first)."""
    try:
        return POLICIES[name]
    except KeyError:
        raise KeyError(f"unknown policy {name!r} (choose from {', '.join(NAMES)})") from None


def eval_mode(name: str, cached_complement: bool) -> EvalMode:
    """How `mobile eval` runs a policy:
    reference: it decodes exactly as big experts do, so the big row is its row;
    resident: with every expert on the device, since offloading does not change what it computes;
    cache: with its real expert cache, since its little pass uses whatever the cache holds."""
    p = get(name)
    if p.decode_pass == "big":
        return "reference"
    return "cache" if p.cache_aware and cached_complement else "resident"
