"""`mobile profile`: a routing profile of a graph's model over a text (mobile.moe.profile), for
`hybrid-static`'s hot sets. `mobile bench --profile-text` takes one the same way."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from mobile.moe.profile import CHUNK, RoutingProfile
from mobile.runtime.engine import Engine
from mobile.tools.evaluate import load_ids


def take_profile(graph: str | Path, text: str | Path, tokens: int | None = None, weights: str | None = None,
                 device: str = "cpu", progress: bool = True) -> RoutingProfile:
    """Run the first `tokens` tokens of `text` (all of it: None) through the graph's model with every
    expert resident, CHUNK positions a forward, each router counting its choices on the device."""
    # no CUDA graphs: a captured segment's set-up runs it more than once, and would count a chunk's
    # routes as often (a profile's forwards are prompts, which run eagerly anyway, but its last chunk
    # may be short enough for the graph runner)
    engine = Engine.load(graph, weights=weights, device=device, policy="resident", count_routes=True,
                         cuda_graphs="off")
    try:
        ids = load_ids(engine, text, tokens, what="profiling")
        chunks = [ids[i:i + CHUNK] for i in range(0, ids.numel(), CHUNK)]
        with torch.inference_mode():
            for chunk in tqdm(chunks, desc="profiling routes", unit="chunk", disable=None if progress else True,
                              leave=False):
                engine._forward(chunk, 0, last_only=True)
        counts = {}
        for layer in engine.spec.moe_layers:
            routed = engine.kernels.moe(layer).route_counts
            assert routed is not None  # the engine counts them (count_routes)
            counts[layer] = routed.tolist()
        return RoutingProfile(counts, ids.numel(), str(text), engine.graph.name, engine.spec.model.moe.top_k)
    finally:
        engine.close()
