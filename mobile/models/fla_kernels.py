"""flash-linear-attention's delta rule, for mobile.models.deltanet on CUDA where the package is
installed (as transformers uses it). Its chunked kernel serves prompts, its fused recurrent one a
decoded token; both take q and k unnormed (they l2-norm inside, use_qk_l2norm_in_kernel) and
scale q by key_head_dim ** -0.5 themselves, as the torch path does by hand."""

from __future__ import annotations

import importlib.util

import torch


def installed() -> bool:
    return importlib.util.find_spec("fla") is not None


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               state: torch.Tensor) -> torch.Tensor:
    """q, k [T, nv, dk] (one head per v head), v [T, nv, dv], g [T, nv] float32, beta [T, nv];
    state [nv, dk, dv] float32, advanced in place. -> [T, nv, dv] float32."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    rule = fused_recurrent_gated_delta_rule if q.shape[0] == 1 else chunk_gated_delta_rule
    out, final = rule(q[None], k[None], v[None], g=g[None], beta=beta[None], initial_state=state[None],
                      output_final_state=True, use_qk_l2norm_in_kernel=True)
    state.copy_(final[0])
    return out[0].float()
