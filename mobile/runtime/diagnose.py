"""Where a non-finite value enters the model, for the one-line error that ends a run whose logits
are NaN or infinite (the check itself rides on the sampled token's read: mobile.runtime.sampling).

The weights the engine holds are scanned in the order a token meets them: the embedding, then
each layer's dense weights and its routed experts, then the final norm and the head. Packed experts
are judged by their float sections (scales, zeros, biases), which a NaN weight poisons when it is
quantized. One pass over the weights, run only after a failure.
"""

from __future__ import annotations

import torch

from mobile.moe.cache import ExpertCache
from mobile.moe.layout import packed_layout
from mobile.spec.schema import Spec

Weights = dict[tuple[str, int | None], torch.Tensor]


def first_nonfinite_weight(spec: Spec, weights: Weights, experts: ExpertCache) -> str | None:
    """'layer 1 (routed expert 3)', 'layer 0 (qkv_proj)', 'the embedding (embed)', ...: the first
    place, in the order a token meets it, whose weights (the dense ones, keyed (name, layer), and
    the routed experts' rows) hold a NaN or an infinity; None when none does."""
    by_layer: dict[int | None, list[str]] = {}
    for key, layer in weights:
        by_layer.setdefault(layer, []).append(key)

    def bad(key: str, layer: int | None) -> bool:
        return not bool(torch.isfinite(weights[(key, layer)]).all())

    if ("embed", None) in weights and bad("embed", None):
        return "the embedding (embed)"
    for layer in range(spec.model.num_layers):
        dense = [k for k in by_layer.get(layer, []) if bad(k, layer)]
        if dense:
            return f"layer {layer} ({', '.join(dense)})"
        rows = experts.expert_rows(layer)
        poisoned = [] if rows is None else nonfinite_rows(spec, rows)
        if poisoned:
            more = f" and {len(poisoned) - 1} more" if len(poisoned) > 1 else ""
            return f"layer {layer} (routed expert {poisoned[0]}{more})"
    tail = [k for k in by_layer.get(None, []) if k != "embed" and bad(k, None)]
    return f"the model's head ({', '.join(tail)})" if tail else None


def nonfinite_rows(spec: Spec, rows: torch.Tensor) -> list[int]:
    """The experts (rows of a layer's store) that hold a non-finite value."""
    if rows.dtype.is_floating_point:
        finite = torch.isfinite(rows).all(dim=1)
    else:  # packed: the scale, zero and bias sections are the float ones
        layout = packed_layout(spec)
        assert layout is not None  # packed rows have a layout
        finite = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
        for name, section in layout.sections.items():
            if section.dtype.is_floating_point:
                finite &= torch.isfinite(layout.view(rows, name)).flatten(1).all(dim=1)
    return torch.nonzero(~finite).flatten().tolist()
