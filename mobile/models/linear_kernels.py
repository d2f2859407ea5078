"""The CUDA kernel libraries that linear attention (mobile.models.deltanet) uses where they are
installed, as transformers does: flash-linear-attention for the delta rule (its chunked kernel for
a prompt, its fused recurrent one for a decoded token) and causal-conv1d for a decoded token's conv
step. Anywhere else, and with MOBILE_LINEAR_KERNELS=torch (mobile.debug), the torch path of
mobile.models.deltanet runs; the stats say which ran (`linear_attention_kernels`)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearKernels:
    rule: str = "torch"  # the delta rule: torch or fla
    conv: str = "torch"  # a decoded token's conv step: torch or causal-conv1d

    def __str__(self) -> str:
        if self.rule == self.conv == "torch":
            return "torch"
        return f"delta rule {self.rule}, conv {self.conv}"


TORCH = LinearKernels()  # torch's, everywhere


def choose(device: torch.device, dtype: torch.dtype, asked: str) -> LinearKernels:
    """What runs on `device` for a model in `dtype`: the libraries where installed, on CUDA, unless
    asked for torch. flash-linear-attention's delta rule takes bfloat16 and float16 only (its
    chunked kernel refuses float32), so a float32 model keeps torch's."""
    if asked == "torch" or device.type != "cuda":
        return TORCH
    fla = importlib.util.find_spec("fla") is not None and dtype in (torch.bfloat16, torch.float16)
    return LinearKernels("fla" if fla else "torch",
                         "causal-conv1d" if importlib.util.find_spec("causal_conv1d") else "torch")


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               state: torch.Tensor) -> torch.Tensor:
    """flash-linear-attention's delta rule. q, k [T, nv, dk] (one head per v head, unnormed: the
    kernel l2-norms them and scales q by dk ** -0.5 itself), v [T, nv, dv], g [T, nv] float32,
    beta [T, nv]; state [nv, dk, dv] float32, advanced in place. -> [T, nv, dv] float32."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    rule = fused_recurrent_gated_delta_rule if q.shape[0] == 1 else chunk_gated_delta_rule
    out, final = rule(q[None], k[None], v[None], g=g[None], beta=beta[None], initial_state=state[None],
                      output_final_state=True, use_qk_l2norm_in_kernel=True)
    state.copy_(final[0])
    return out[0].float()


def conv_step(x: torch.Tensor, window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """causal-conv1d's one-token conv and silu. x [1, channels]; window [channels, kernel - 1],
    shifted in place; weight [channels, 1, kernel] -> [1, channels]."""
    from causal_conv1d import causal_conv1d_update

    column = x.t().contiguous()[None].to(window.dtype)  # [1, channels, 1]
    out = causal_conv1d_update(column, window[None], weight[:, 0], None, activation="silu")
    return out[0].t().to(x.dtype)
