"""The plain-torch reference of the op's implementations (mobile.moe.native and the Triton kernels
of kernels/experts.py), which the tests compare them with: one slot at a time, in float32."""

from __future__ import annotations

import torch

from mobile.moe.layout import ExpertMLP, arena_views, bias_views


def reference(x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, arena: torch.Tensor,
              mlp: ExpertMLP | None = None) -> torch.Tensor:
    """The plain-torch reference of `native` and the Triton kernels: one slot at a time, on all of
    its tokens, in float32. Reads the slots on the host (a sync on CUDA)."""
    mlp = mlp or ExpertMLP.of_arena(arena, x.shape[1])
    gate_up, down = arena_views(arena, x.shape[1], mlp.inter)
    gu_bias, down_bias = bias_views(arena, mlp) if mlp.bias else (None, None)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for slot in sorted(set(slots.flatten().tolist()) - {-1}):
        token, k = (slots == slot).nonzero(as_tuple=True)
        h = x[token].float() @ gate_up[slot].float()  # [n, 2I]
        if gu_bias is not None:
            h = h + gu_bias[slot].float()
        y = mlp.activate(h) @ down[slot].float()  # [n, H]
        if down_bias is not None:
            y = y + down_bias[slot].float()
        out.index_add_(0, token, y * weights[token, k, None].float())
    return out.to(x.dtype)
