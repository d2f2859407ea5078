"""The KV cache of one sequence: per-layer buffers indexed by position.

GQA layers keep k, v [L, n_kv, D]. MLA layers keep the compressed latent [L, 1, kv_lora_rank] in
`k` and the shared rotated key [L, 1, rope_dim] in `v`, as transformers' DeepSeek-V2 cache does.
Writing a position twice overwrites it: that is how a fallback recomputes a token.

Two ways to hold it:
- grown (the default): capacity grows in steps of GROW positions, each growth a new allocation
  the old rows are copied into, up to max_seq_len;
- preallocated (`fixed`, what CUDA graphs need: a captured kernel reads and writes the addresses it
  saw at capture): max_seq_len positions at once, whose storage never moves. max_seq_len is
  `runtime.max_seq_len`, by default the model's context capped at what fits in KV_BUDGET_BYTES.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mobile.compiler.costs import kv_bytes_per_position
from mobile.errors import MobileError
from mobile.spec.schema import Spec

GROW = 256  # capacity grows in steps of this many positions, so compiled shapes rarely change
# A preallocated cache's default size: the model's context, or as many positions as fit in this
# many bytes (1 GiB: Qwen3-30B-A3B's 40,960-position context would take 3.75 GiB in bf16 and keep
# 10,752 positions; the demo's whole 2,048 take 16 MiB). runtime.max_seq_len sets it explicitly.
KV_BUDGET_BYTES = 1 << 30


def position_shapes(spec: Spec, layer: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of one position's k and v entries in `layer` (Gemma 4's full-attention layers
    have shapes of their own: Spec.attention_shape). A linear-attention layer keeps none: its
    recurrent state is mobile.runtime.state's."""
    a = spec.model.attention
    if spec.is_linear_layer(layer):
        return (0,), (0,)
    if a.kind == "mla":
        return (1, a.kv_lora_rank), (1, a.qk_rope_head_dim)
    n_kv, d = spec.attention_shape(layer)
    return (n_kv, d), (n_kv, d)


def bytes_per_position(spec: Spec) -> int:
    """KV-cache bytes one position takes over every layer, in the spec's dtype: the plan's count
    (mobile.compiler.costs.kv_bytes_per_position), of the shapes position_shapes gives."""
    return kv_bytes_per_position(spec)


def max_seq_len(spec: Spec, preallocated: bool) -> int:
    """The longest sequence the runtime holds: runtime.max_seq_len when the spec gives it; else the
    model's context, which a preallocated cache caps at KV_BUDGET_BYTES (whole GROW blocks, when
    at least one fits)."""
    if spec.runtime.max_seq_len is not None:
        return spec.runtime.max_seq_len
    context = spec.model.max_position_embeddings
    if not preallocated:
        return context
    fits = KV_BUDGET_BYTES // bytes_per_position(spec)
    return max(1, min(context, fits // GROW * GROW if fits >= GROW else fits))


@dataclass
class LayerKV:
    k: torch.Tensor
    v: torch.Tensor


class KVCache:
    def __init__(self, spec: Spec, device: torch.device, dtype: torch.dtype, capacity: int = GROW,
                 limit: int | None = None, fixed: bool = False, compiled: bool = False):
        """limit: the most positions it may hold (default: the model's context). fixed: allocate
        `limit` positions now and never move them. compiled: torch.compile reads it (its length is
        then marked dynamic; without compile that would import torch._dynamo for nothing: a second)."""
        self.shapes = [position_shapes(spec, layer) for layer in range(spec.model.num_layers)]
        self.k_shape, self.v_shape = self.shapes[0]
        self.device, self.dtype = device, dtype
        self.compiled = compiled
        self.max_positions = limit if limit is not None else spec.model.max_position_embeddings
        self.fixed = fixed
        self.capacity = 0
        self.layers = [LayerKV(torch.empty(0), torch.empty(0)) for _ in range(spec.model.num_layers)]
        if fixed:
            self._allocate(self.max_positions)
        else:
            self.ensure(capacity)

    def ensure(self, length: int) -> None:
        """Make room for positions [0, length); keeps what is stored."""
        if length <= self.capacity:
            return
        if self.fixed:  # the engine refuses longer sequences first; a captured graph must never see it move
            raise MobileError(f"a sequence of {length} positions exceeds the preallocated KV cache of "
                              f"{self.capacity} (runtime.max_seq_len)", key="runtime.max_seq_len")
        self._allocate(min(max(-(-length // GROW) * GROW, GROW), max(self.max_positions, length)))

    def _allocate(self, cap: int) -> None:
        # always ordinary tensors, also when growing inside inference mode (decoding): an inference
        # tensor has other dispatch keys, and a compiled segment that reads the cache would recompile
        with torch.inference_mode(False):
            for layer, (k_shape, v_shape) in zip(self.layers, self.shapes, strict=True):
                k = torch.zeros((cap, *k_shape), device=self.device, dtype=self.dtype)
                v = torch.zeros((cap, *v_shape), device=self.device, dtype=self.dtype)
                if self.capacity:
                    k[: self.capacity].copy_(layer.k)
                    v[: self.capacity].copy_(layer.v)
                # its length grows with the sequence: compiled code must not specialize on it (each
                # growth would be a recompile, and past the recompile limit torch falls back to eager)
                if self.compiled:
                    torch._dynamo.maybe_mark_dynamic(k, 0)
                    torch._dynamo.maybe_mark_dynamic(v, 0)
                layer.k, layer.v = k, v
        self.capacity = cap
