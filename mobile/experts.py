"""Where routed experts live, and how a fetch makes them usable.

Every cache exposes the same three calls, which the graph's fetch, wait and expert nodes use:
    fetch(layer, ids) -> handle     start moving the experts in `ids` into device slots
    wait(handle)      -> slot_map   block until they are there; slot_map [E] gives each expert's slot
    arena(layer)      -> (w13, w2)  the device slot storage the expert kernel reads

`ResidentExperts` keeps every expert on the device: fetches move nothing and always hit.
The offloading caches (ondemand, lru, lru-prefetch) implement the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mobile.spec import Spec
from mobile.stats import Stats
from mobile.weights import WeightStore


def expert_tensor_names(spec: Spec, layer: int, expert: int) -> tuple[str, str, str]:
    from mobile.families import tensor_names

    names = tensor_names(spec.model.family, spec.checkpoint.tensor_names)
    return tuple(names[k].format(layer=layer, expert=expert)  # type: ignore[return-value]
                 for k in ("expert_gate", "expert_up", "expert_down"))


@dataclass
class FetchHandle:
    layer: int
    slot_map: torch.Tensor  # [E] long: slot of each expert (-1: not resident)


class ResidentExperts:
    """All experts of every MoE layer on the device, stacked as [E, 2I, H] and [E, H, I]."""

    link = "none"

    def __init__(self, spec: Spec, store: WeightStore, device: torch.device, dtype: torch.dtype,
                 stats: Stats, progress=None):
        moe = spec.model.moe
        self.stats = stats
        self.num_experts = moe.num_experts
        self.w13: dict[int, torch.Tensor] = {}
        self.w2: dict[int, torch.Tensor] = {}
        h, i = spec.model.hidden_size, moe.intermediate_size
        for layer in spec.moe_layers:
            w13 = torch.empty(moe.num_experts, 2 * i, h, dtype=dtype, device=device)
            w2 = torch.empty(moe.num_experts, h, i, dtype=dtype, device=device)
            for e in range(moe.num_experts):
                gate, up, down = expert_tensor_names(spec, layer, e)
                w13[e, :i].copy_(store.get(gate))
                w13[e, i:].copy_(store.get(up))
                w2[e].copy_(store.get(down))
            self.w13[layer], self.w2[layer] = w13, w2
            if progress is not None:
                progress.update(1)
        self.identity = torch.arange(moe.num_experts, device=device)

    def fetch(self, layer: int, ids: torch.Tensor) -> FetchHandle:
        # Every lookup is a hit; count unique experts per step, as an offloading cache would.
        self.stats.expert_hits += int(torch.unique(ids).numel())
        return FetchHandle(layer, self.identity)

    def wait(self, handle: FetchHandle) -> torch.Tensor:
        return handle.slot_map

    def arena(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13[layer], self.w2[layer]
