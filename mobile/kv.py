"""The KV cache of one sequence: per-layer buffers indexed by position.

GQA layers keep k, v [L, n_kv, D]. MLA layers keep the compressed latent [L, 1, kv_lora_rank] in
`k` and the shared rotated key [L, 1, rope_dim] in `v`, as transformers' DeepSeek-V2 cache does.
Writing a position twice overwrites it: that is how a fallback recomputes a token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mobile.spec import Spec

GROW = 256  # capacity grows in steps of this many positions, so compiled shapes rarely change


@dataclass
class LayerKV:
    k: torch.Tensor
    v: torch.Tensor


class KVCache:
    def __init__(self, spec: Spec, device: torch.device, dtype: torch.dtype, capacity: int = GROW):
        a = spec.model.attention
        if a.kind == "mla":
            self.k_shape, self.v_shape = (1, a.kv_lora_rank), (1, a.qk_rope_head_dim)
        else:
            self.k_shape = self.v_shape = (a.num_kv_heads, a.head_dim)
        self.device, self.dtype = device, dtype
        self.max_positions = spec.model.max_position_embeddings
        self.capacity = 0
        self.layers = [LayerKV(torch.empty(0), torch.empty(0)) for _ in range(spec.model.num_layers)]
        self.ensure(capacity)

    def ensure(self, length: int) -> None:
        """Make room for positions [0, length); keeps what is stored."""
        if length <= self.capacity:
            return
        cap = min(max(-(-length // GROW) * GROW, GROW), max(self.max_positions, length))
        # always ordinary tensors, also when growing inside inference mode (decoding): an inference
        # tensor has other dispatch keys, and a compiled segment that reads the cache would recompile
        with torch.inference_mode(False):
            for layer in self.layers:
                k = torch.zeros((cap, *self.k_shape), device=self.device, dtype=self.dtype)
                v = torch.zeros((cap, *self.v_shape), device=self.device, dtype=self.dtype)
                if self.capacity:
                    k[: self.capacity].copy_(layer.k)
                    v[: self.capacity].copy_(layer.v)
                # its length grows with the sequence: compiled code must not specialize on it (each
                # growth would be a recompile, and past the recompile limit torch falls back to eager)
                torch._dynamo.maybe_mark_dynamic(k, 0)
                torch._dynamo.maybe_mark_dynamic(v, 0)
                layer.k, layer.v = k, v
        self.capacity = cap
