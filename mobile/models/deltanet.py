"""Gated DeltaNet, the linear attention of Qwen3-Next and Qwen3.5: a layer that mixes tokens through
a recurrent state (mobile.runtime.state) instead of a KV cache.

Per token t and value head h, with q, k l2-normed and q scaled by key_head_dim ** -0.5:

    S <- exp(g_t) S                              decay (g <= 0: -exp(A_log) softplus(a + dt_bias))
    S <- S + k_t (beta_t (v_t - S^T k_t))^T      the delta rule: write the correction, at rate beta
    o_t = S^T q_t

A decoded token runs that step once (`recurrent`). A prompt runs it in chunks (`chunked`): within
a chunk the steps are one triangular solve and a few matmuls, and only the state crosses chunks, as
transformers' torch_chunk_gated_delta_rule and flash-linear-attention compute it. Both follow
transformers' modeling code (models/qwen3_next), the reference the tests compare with; the
state stays in float32 as it does there.

Before the rule, q, k and v pass through a causal depthwise conv (kernel conv_kernel) and silu;
its window of the last conv_kernel - 1 inputs is the other half of the state. After it, a
gated RMSNorm per head (normed, times silu(z)) and the output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mobile.models import linear_kernels
from mobile.models.linear_kernels import LinearKernels

L2_EPS = 1e-6  # transformers' and flash-linear-attention's l2norm eps


# the input projections as each family stores them (mobile.models.families)
IN_PROJECTIONS = {"qwen3_next": ("la_qkvz", "la_ba"), "qwen3_5_moe": ("la_qkv", "la_z", "la_b", "la_a")}


def in_projection_order(spec) -> torch.Tensor | None:
    """Where each of [q | k | v | z | b | a] (q, k, v in the conv's channel order; z, b and a by
    value head) sits in the family's projections' outputs, concatenated; None: already in order
    (Qwen3.5's la_qkv, la_z, la_b, la_a). Qwen3-Next groups them by key head: la_qkvz holds each key
    head's q, k, its value heads' v, then their z; la_ba each key head's b, then a.

    The projections stay the matrices the checkpoint has, each its own matmul, as transformers
    runs them: one fused matmul sums in another order, and this layer's gated norm amplifies
    that last-bit difference (measured: 1.8e-4 on a tiny checkpoint's logits, against 1e-5 apart)."""
    if spec.model.family != "qwen3_next":
        return None
    la = spec.model.linear_attention
    nk, dk, dv, r = la.num_key_heads, la.key_head_dim, la.value_head_dim, la.num_value_heads // la.num_key_heads
    qkvz = torch.arange(nk * (2 * dk + 2 * r * dv))
    ba = torch.arange(nk * 2 * r) + qkvz.numel()
    q, k, v, z = qkvz.view(nk, -1).split([dk, dk, r * dv, r * dv], dim=1)
    b, a = ba.view(nk, -1).split([r, r], dim=1)
    return torch.cat([t.reshape(-1) for t in (q, k, v, z, b, a)])


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2_EPS)


def recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              state: torch.Tensor) -> torch.Tensor:
    """The delta rule one token at a time. q, k [T, nv, dk] (normed and scaled), v [T, nv, dv], g,
    beta [T, nv], all float32; state [nv, dk, dv] float32, advanced in place. -> [T, nv, dv]."""
    S = state  # each step makes a new tensor: the state is written once, at the end
    out = []
    for t in range(q.shape[0]):
        S = S * g[t].exp()[:, None, None]
        remembered = (S * k[t][:, :, None]).sum(dim=-2)  # S^T k: what the state recalls for k, [nv, dv]
        S = S + k[t][:, :, None] * ((v[t] - remembered) * beta[t][:, None])[:, None, :]
        out.append((S * q[t][:, :, None]).sum(dim=-2))
    state.copy_(S)
    return torch.stack(out)


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            state: torch.Tensor, chunk: int) -> torch.Tensor:
    """The delta rule over a prompt, `chunk` positions at a time; the same arguments and result as
    `recurrent`. Within a chunk, with G the cumulative decay and D[i, j] = exp(G_i - G_j) (j <= i),
    the chunk's corrections u solve (I + tril(beta k k^T * D, -1)) u = beta v - (its reads of the
    state), which one unit-triangular solve gives for every position at once."""
    T, nv, dk = k.shape
    pad = -T % chunk
    # [nv, T', d], contiguous: the matmuls below then sum in transformers' order, bit for bit
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(0, 1).contiguous() for x in (q, k, v))
    g, beta = (F.pad(x, (0, 0, 0, pad)).transpose(0, 1).contiguous() for x in (g, beta))  # [nv, T']
    n = q.shape[1] // chunk
    q, k, v = (x.reshape(nv, n, chunk, -1) for x in (q, k, v))
    g, beta = g.reshape(nv, n, chunk), beta.reshape(nv, n, chunk)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    G = g.cumsum(dim=-1)
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(upper, float("-inf")).exp()  # D, [nv, n, C, C]
    system = (k_beta @ k.transpose(-1, -2)) * decay  # its diagonal is ignored: unitriangular
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * G.exp()[..., None], upper=False, unitriangular=True)
    within = (q @ k.transpose(-1, -2)) * decay
    q_read = q * G.exp()[..., None]  # q's reads of the state at the chunk's start, decayed to its position
    k_write = k * (G[..., -1:] - G).exp()[..., None]  # k's writes, decayed to the chunk's end
    span = G[..., -1].exp()[..., None, None]  # [nv, n, 1, 1]
    S = state  # each chunk makes a new tensor: the state is written once, at the end
    out = torch.empty_like(v)
    for i in range(n):
        correction = u[:, i] - w[:, i] @ S
        out[:, i] = q_read[:, i] @ S + within[:, i] @ correction
        S = S * span[:, i] + k_write[:, i].transpose(-1, -2) @ correction
    state.copy_(S)
    return out.reshape(nv, n * chunk, -1)[:, :T].transpose(0, 1)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, then times silu(gate), as transformers' RMSNormGated: normed in
    float32, cast back, scaled, gated in float32, cast back."""
    dtype = x.dtype
    x32 = x.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return (normed * F.silu(gate.float())).to(dtype)


class GatedDeltaNet:
    """One linear-attention layer. A kernel: (ctx, x [T, H]) -> [T, H]; reads and advances its
    layer's recurrent state (mobile.runtime.state.LayerState) in place.

    kernels: torch's (this file), or on CUDA the libraries installed there (mobile.models.linear_kernels:
    flash-linear-attention's delta rule, causal-conv1d's conv step for a decoded token)."""

    def __init__(self, spec, w: dict[str, torch.Tensor], state, kernels: LinearKernels = linear_kernels.TORCH):
        """w: the layer's weights by canonical name (mobile.models.families: la_*)."""
        la = spec.model.linear_attention
        self.state, self.kernels, self.chunk, self.eps = state, kernels, la.chunk_size, spec.model.norm_eps
        self.nk, self.nv, self.dk, self.dv = la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim
        key, value = self.nk * self.dk, self.nv * self.dv
        self.split = [2 * key + value, value, self.nv, self.nv]  # the in-projection's [qkv | z | b | a]
        self.w = w
        self.projections = [w[key] for key in IN_PROJECTIONS[spec.model.family]]
        order = in_projection_order(spec)
        self.order = None if order is None else order.to(w["la_out"].device)
        self.conv = w["la_conv"]  # [channels, 1, conv_kernel]: depthwise (its shape checked at load)
        self.neg_a = -w["la_a_log"].float().exp()  # the per-head decay rate, -exp(A_log) (float32, as transformers)

    def __call__(self, ctx, x: torch.Tensor) -> torch.Tensor:
        w, T = self.w, x.shape[0]
        projected = torch.cat([F.linear(x, p) for p in self.projections], dim=-1)
        if self.order is not None:
            projected = projected[:, self.order]
        qkv, z, b, a = projected.split(self.split, dim=-1)
        qkv = self._conv(qkv)
        q, k, v = qkv.split([self.nk * self.dk, self.nk * self.dk, self.nv * self.dv], dim=-1)
        q, k, v = q.view(T, self.nk, self.dk), k.view(T, self.nk, self.dk), v.view(T, self.nv, self.dv)
        beta = b.sigmoid()
        g = self.neg_a * F.softplus(a.float() + w["la_dt_bias"])
        out = self._rule(q, k, v, g, beta).to(x.dtype)
        out = gated_rms_norm(out, z.view(T, self.nv, self.dv), w["la_norm"], self.eps)
        return F.linear(out.reshape(T, -1), w["la_out"])

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """The causal depthwise conv over [window | x] and silu; the window becomes x's last inputs."""
        window = self.state.conv  # [channels, kernel - 1]
        if self.kernels.conv == "causal-conv1d" and x.shape[0] == 1:
            return linear_kernels.conv_step(x, window, self.conv)
        both = torch.cat((window, x.t().to(window.dtype)), dim=-1)  # [channels, kernel - 1 + T]
        out = F.conv1d(both[None], self.conv, groups=both.shape[0])[0]  # [channels, T]
        window.copy_(both[:, -window.shape[1]:])
        return F.silu(out).t().to(x.dtype)

    def _rule(self, q, k, v, g, beta) -> torch.Tensor:
        """The delta rule on this layer's state, in float32: [T, nv, dv]."""
        groups = self.nv // self.nk  # each q/k head serves this many consecutive v heads
        if groups > 1:
            q, k = q.repeat_interleave(groups, dim=1), k.repeat_interleave(groups, dim=1)
        if self.kernels.rule == "fla":
            return linear_kernels.delta_rule(q, k, v, g, beta, self.state.ssm)
        q, k = l2norm(q.float()), l2norm(k.float())
        v, beta = v.float(), beta.float()
        if q.shape[0] == 1:  # q scaled as transformers' two forms each scale it, to the last bit
            return recurrent(q / self.dk ** 0.5, k, v, g, beta, self.state.ssm)
        return chunked(q * self.dk ** -0.5, k, v, g, beta, self.state.ssm, self.chunk)
