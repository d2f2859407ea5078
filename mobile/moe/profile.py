"""A routing profile: how often each layer's router chose each expert over a profiling text, and the
hot set it gives `hybrid-static` (KTransformers' placement: each layer's most-used experts resident
on the device, the rest computed on the host).

`mobile profile` (and `mobile bench --profile-text`) takes one: the text runs through the model
with every expert resident, in prompt-sized chunks, each router counting its choices on the device
(mobile.moe.layer.MoELayer.route_counts), with no host read until the end. The file is JSON:

    {"format": "mobile.routing-profile", "version": 1, "graph": NAME, "text": FILE, "tokens": N,
     "top_k": K, "layers": {"0": [count of expert 0, count of expert 1, ...], ...}}

A profile belongs to a model, not a policy or a format: it is checked against the model's MoE
layers and expert count when it loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mobile.errors import MobileError
from mobile.files import read_json
from mobile.outputs import atomic_write_text, stamp
from mobile.spec.schema import Spec

FORMAT, VERSION = "mobile.routing-profile", 1
CHUNK = 256  # positions per forward: the KV cache restarts at each, as in `mobile eval`'s windows


class ProfileError(MobileError):
    """A routing profile that cannot serve this model."""


@dataclass(frozen=True)
class RoutingProfile:
    counts: dict[int, list[int]]  # MoE layer -> uses of each expert
    tokens: int = 0
    source: str = ""  # what it was taken on (the text file)
    graph: str = ""  # the graph whose model it profiles, by name
    top_k: int = 0

    def hot(self, layer: int, n: int) -> list[int]:
        """The layer's n most-used experts (ties: the lower id first)."""
        counts = self.counts[layer]
        return sorted(range(len(counts)), key=lambda e: (-counts[e], e))[:n]

    def coverage(self, layer: int, n: int) -> float:
        """The share of the layer's profiled uses its hot set of n covers."""
        counts = self.counts[layer]
        total = sum(counts)
        return sum(counts[e] for e in self.hot(layer, n)) / total if total else 0.0

    def save(self, path: str | Path) -> None:
        layers = {str(layer): counts for layer, counts in sorted(self.counts.items())}
        data = {"written_by": stamp("profile"), "format": FORMAT, "version": VERSION, "graph": self.graph,
                "text": self.source, "tokens": self.tokens, "top_k": self.top_k, "layers": layers}
        atomic_write_text(path, json.dumps(data) + "\n")


def load_profile(path: str | Path, spec: Spec, key: str = "policy.profile") -> RoutingProfile:
    """The profile at `path`, checked against the spec's model: its format, one list of counts per
    MoE layer, one count per expert. Every problem names the file and the key."""
    data = read_json(Path(path), ProfileError, missing=f"no routing profile here ({key}; `mobile profile` writes one)")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ProfileError(f"not a routing profile (expected \"format\": \"{FORMAT}\", written by `mobile profile`)",
                           where=path, key="format")
    if data.get("version") != VERSION:
        raise ProfileError(f"expected version {VERSION}, got {data.get('version')!r}", where=path, key="version")
    layers = data.get("layers")
    if not isinstance(layers, dict):
        raise ProfileError("expected a mapping of MoE layer -> expert counts", where=path, key="layers")
    for key in ("tokens", "top_k"):
        if not count(data.get(key, 0)):
            raise ProfileError(f"expected an integer >= 0, got {json.dumps(data.get(key))}", where=path, key=key)
    E, counts = spec.model.moe.num_experts, {}
    for layer in spec.moe_layers:
        c = layers.get(str(layer))
        if not isinstance(c, list) or len(c) != E or not all(count(v) for v in c):
            other = ": is the profile of another model?" if not isinstance(c, list) or len(c) != E else ""
            raise ProfileError(f"expected {E} counts (one per expert, integers >= 0) for MoE layer {layer} of "
                               f"{spec.name}{other}", where=path, key=f"layers.{layer}")
        counts[layer] = c
    extra = sorted(set(layers) - {str(layer) for layer in spec.moe_layers})
    if extra:
        raise ProfileError(f"layer {extra[0]} is not a MoE layer of {spec.name}: is the profile of another model?",
                           where=path, key=f"layers.{extra[0]}")
    return RoutingProfile(counts, data.get("tokens", 0), str(data.get("text") or ""), str(data.get("graph") or ""),
                          data.get("top_k", 0))


def count(value) -> bool:
    """A count: an integer >= 0 (JSON's true and false are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
