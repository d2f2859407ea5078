"""How an expert lies in a row of the host store and of a cache slot, and what it computes: shared
by the op, its native and reference implementations and the Triton kernels (kernels/experts.py).

An expert row is input-major, so that it is applied as x @ W: gate_up [H, 2I] (gate columns, then
up columns), then down [I, H] (arena_views). With biases (gpt-oss) the row carries gate_up's and
down's after the matrices (bias_views; the row's length: mobile.moe.quant.native_row_elems), so
they travel with the expert and live in its slot. A packed row (int8, int4) is described by
mobile.moe.quant.Layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mobile.moe import quant


@dataclass(frozen=True)
class ExpertMLP:
    """What one routed expert computes besides its weights' values: H, I, whether its row carries
    biases, and its activation (swiglu, clamped_swiglu at alpha and limit, or geglu)."""

    hidden: int
    inter: int
    bias: bool = False
    act: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0

    @classmethod
    def of_arena(cls, arena: torch.Tensor, hidden: int) -> ExpertMLP:
        """A native arena of plain SwiGLU experts without biases: I follows from its rows."""
        return cls(hidden, arena.shape[1] // (3 * hidden))

    @classmethod
    def of_spec(cls, spec) -> ExpertMLP:
        moe = spec.model.moe
        return cls(spec.model.hidden_size, moe.intermediate_size, moe.expert_bias, moe.activation, moe.swiglu_alpha,
                   moe.swiglu_limit)

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., 2I] (x @ gate_up, plus its bias) -> the activations [..., I]."""
        gate, up = h.chunk(2, dim=-1)
        if self.act == "clamped_swiglu":
            return clamped_swiglu(gate, up, self.alpha, self.limit)
        if self.act == "geglu":  # Gemma 4: gelu's tanh approximation
            return F.gelu(gate, approximate="tanh") * up
        return F.silu(gate) * up


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's expert activation, as transformers' GptOssExperts computes it: the gate clamped
    from above, up from both sides, then gate * sigmoid(alpha * gate) * (up + 1)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return gate * torch.sigmoid(gate * alpha) * (up + 1)


def packed_layout(spec) -> quant.Layout | None:
    """The packed layout of the spec's int8 / int4 experts; None for native ones."""
    if spec.runtime.expert_format == "native":
        return None
    return quant.Layout(spec.runtime.expert_format, spec.expert_group, spec.model.hidden_size,
                        spec.model.moe.intermediate_size, spec.model.moe.expert_bias)


def arena_views(arena: torch.Tensor, hidden: int, inter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """arena [S, row] -> gate_up [S, H, 2I] and down [S, I, H], as views (no copy). inter: I, needed
    when rows carry biases (else it follows from the row length)."""
    S, n = arena.shape
    inter = n // (3 * hidden) if inter is None else inter
    row, start = arena.stride(0), arena.storage_offset()
    gate_up = arena.as_strided((S, hidden, 2 * inter), (row, 2 * inter, 1), start)
    down = arena.as_strided((S, inter, hidden), (row, hidden, 1), start + 2 * inter * hidden)
    return gate_up, down


def bias_views(arena: torch.Tensor, mlp: ExpertMLP) -> tuple[torch.Tensor, torch.Tensor]:
    """A native arena with biases -> gate_up's [S, 2I] and down's [S, H] biases, as views."""
    (gu, d), S = quant.native_bias_offsets(mlp.hidden, mlp.inter), arena.shape[0]
    row, start = arena.stride(0), arena.storage_offset()
    return (arena.as_strided((S, 2 * mlp.inter), (row, 1), start + gu),
            arena.as_strided((S, mlp.hidden), (row, 1), start + d))


def sort_by_slot(slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """slots [T, K], -1 where dropped -> (the pairs in slot order, dropped ones last [T*K]; pairs per
    slot [S]). No bincount: on CUDA it reads its input's max on the host to size its output."""
    flat = slots.flatten().long()
    key = torch.where(flat >= 0, flat, num_slots)
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=slots.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return torch.argsort(key, stable=True), counts[:num_slots]
