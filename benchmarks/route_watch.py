"""Watch an engine's routes from a study: each MoE layer's router output, as the layer computes it.

The segments call each layer's Router directly, so a study wraps Router.__call__ (the class's,
which a call looks up) and names the layer by the router object its engine's MoELayer holds."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mobile.moe.router import Router

Watcher = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer, weights [T, K], ids [T, K])


def watch_routes(engine, watcher: Watcher) -> None:
    """Call watcher(layer, weights, ids) after every route of `engine`'s MoE layers (its first
    forward builds them, so call this before generating)."""
    kernels, call = engine.kernels, Router.__call__
    for layer in engine.spec.moe_layers:
        kernels.moe(layer)
    layer_of = {id(m.router): layer for layer, m in kernels.layers.items()}

    def watched(router: Router, x: torch.Tensor):
        weights, ids = call(router, x)
        layer = layer_of.get(id(router))
        if layer is not None:
            watcher(layer, weights, ids)
        return weights, ids

    Router.__call__ = watched  # type: ignore[method-assign]
