"""Sizing the device expert cache from the spec: slots per layer, staging, and the minimum."""

from __future__ import annotations

from dataclasses import dataclass

from mobile.compiler.costs import expert_bytes
from mobile.compiler.emit import human_bytes
from mobile.errors import SpecError
from mobile.spec.schema import Spec
from mobile.spec.validate import parse_bytes


@dataclass(frozen=True)
class CachePlan:
    main: int  # slots per MoE layer beyond the staging share (one LRU pool holds main + staging)
    staging: int  # at most this many slots per layer hold prefetched experts not yet used
    expert_bytes: int
    layers: int
    clamped: bool = False  # the budget or slot count asked for more slots than the model has experts

    @property
    def total_bytes(self) -> int:
        return (self.main + self.staging) * self.expert_bytes * self.layers


def cache_plan(spec: Spec) -> CachePlan | None:
    """None for `resident` (everything on the device). Raises SpecError below the working set."""
    policy = spec.policy.traits
    if not policy.offloads or policy.placement == "host" or not spec.moe_layers:
        return None  # every expert on the device, or every one computed where it lives (host)
    moe, cfg = spec.model.moe, spec.runtime.expert_cache
    # the working set is the experts one token uses in one layer
    k = spec.little_k if policy.only_little else moe.top_k
    e, layers = moe.num_experts, len(spec.moe_layers)
    unit = expert_bytes(spec)
    # One unused prefetch per layer by default: with the link as the bottleneck, every wrong guess
    # costs a copy that demand needed (measured: a cap of k made lru-prefetch 16% slower than lru on
    # the demo model, a cap of 1 only 3%). `staging_slots` raises it.
    staging = (cfg.staging_slots or 1) if policy.prefetch else 0  # nothing else stages
    if not policy.reuses_cache:
        main, staging = k, 0  # nothing is reused, so K slots hold one use
    elif cfg.slots_per_layer is not None:
        main = cfg.slots_per_layer
    elif cfg.budget is not None:
        main = parse_bytes(cfg.budget) // (unit * layers) - staging
    else:
        # a small default that still rewards reuse, the same memory for every policy, so that
        # policies compiled from one spec compare at equal memory
        main = max(k, min(e, 3 * moe.top_k) - staging)
    clamped = main > e
    main = min(main, e)
    if main < k:
        need = (k + staging) * unit * layers
        key = "runtime.expert_cache.slots_per_layer" if cfg.slots_per_layer is not None else \
            "runtime.expert_cache.budget"
        raise SpecError(
            f"the expert cache is below the minimum working set: {main} main slots per layer, but one "
            f"token needs {k} experts per layer plus {staging} staging slots; the minimum is "
            f"{k + staging} slots per layer = {human_bytes(need)} over {layers} MoE layers "
            f"({human_bytes(unit)} per expert)", where=spec.source, key=key)
    return CachePlan(main=main, staging=staging, expert_bytes=unit, layers=layers, clamped=clamped)
