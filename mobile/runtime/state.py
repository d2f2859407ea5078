"""The recurrent state of one sequence: what each linear-attention layer (mobile.models.deltanet)
carries from token to token in place of a KV cache, and the copies of it that big-little needs.

A KV cache entry belongs to one position, so a fallback's big pass simply writes its positions
again. A recurrent state is every position folded into one tensor: the little pass has already
advanced it when the gate fires, and running the big pass on top would count the token twice. So
before a gated little pass the state is kept (`keep`), and a fallback restores it (`restore`)
before the big pass advances it again. A KV refresh recomputes up to kv_refresh positions before
the token, so it needs the state as it was before the first of them: a ring of kv_refresh + 1
kept copies, one per position, gives it.

Every buffer is allocated once and changed only in place (copy_): a captured CUDA graph reads and
writes the addresses it saw at capture (mobile.runtime.graphs), with or without graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mobile.compiler.costs import kept_state_copies
from mobile.spec.schema import Spec


@dataclass
class LayerState:
    conv: torch.Tensor  # [channels, conv_kernel - 1]: the conv's last inputs, in the model's dtype
    ssm: torch.Tensor  # [value heads, key_head_dim, value_head_dim] float32: the delta-rule matrix


class RecurrentState:
    def __init__(self, spec: Spec, device: torch.device, dtype: torch.dtype):
        la = spec.model.linear_attention
        channels = 2 * la.num_key_heads * la.key_head_dim + la.num_value_heads * la.value_head_dim

        def fresh() -> dict[int, LayerState]:
            with torch.inference_mode(False):  # ordinary tensors, as the KV cache's (mobile.runtime.kv)
                return {i: LayerState(torch.zeros(channels, la.conv_kernel - 1, device=device, dtype=dtype),
                                      torch.zeros(la.num_value_heads, la.key_head_dim, la.value_head_dim,
                                                  device=device, dtype=torch.float32))
                        for i in spec.linear_layers}

        self.layers = fresh()
        self.kept = [fresh() for _ in range(kept_state_copies(spec))]  # the ring, by position
        self.kept_at: list[int | None] = [None] * len(self.kept)  # the position each copy was kept before

    def tensors(self) -> list[torch.Tensor]:
        """Every live buffer: what the layers advance in place (CUDA graphs rewind them: mobile.runtime.graphs)."""
        return [t for s in self.layers.values() for t in (s.conv, s.ssm)]

    def reset(self) -> None:
        """A new sequence: every layer's state zero."""
        for t in self.tensors():
            t.zero_()

    def keep(self, position: int) -> None:
        """Keep the state as it is before `position` runs."""
        slot = position % len(self.kept)
        self.kept_at[slot] = position
        for i, s in self.kept[slot].items():
            s.conv.copy_(self.layers[i].conv)
            s.ssm.copy_(self.layers[i].ssm)

    def restore(self, position: int, layers: frozenset[int] | None = None) -> None:
        """The state of `layers` (None: every layer) as it was before `position` ran. Its copy must
        be one of the last len(kept) positions kept, which the engine's refresh window ensures."""
        slot = position % len(self.kept) if self.kept else 0
        if not self.kept or self.kept_at[slot] != position:  # a bug, never a user's error: say so, do not run on
            raise RuntimeError(f"the recurrent state before position {position} was not kept")
        for i, s in self.kept[slot].items():
            if layers is None or i in layers:
                self.layers[i].conv.copy_(s.conv)
                self.layers[i].ssm.copy_(s.ssm)

    @property
    def nbytes(self) -> int:
        """The live state and its kept copies."""
        kept = [t for states in self.kept for s in states.values() for t in (s.conv, s.ssm)]
        return sum(t.numel() * t.element_size() for t in (*self.tensors(), *kept))
