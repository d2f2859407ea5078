"""Plain-torch reference implementations of the graph's compute ops.

Shapes: T = tokens in this step, H = hidden, E = experts, K = experts per token, S = cache slots,
I = expert intermediate size, n = heads, D = head dim, L = KV-cache length.
These follow transformers' modeling code for each family; tests compare against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mobile.spec import RopeSpec

# On CUDA, below this many (token, expert) pairs, experts run by gathering their weights per token
# (no host sync, graph-capturable). Otherwise each used slot runs once on all its tokens: on a CPU
# that is ~7x faster even for one token, since the gather copies every weight it reads.
GATHER_MAX_PAIRS = 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


# -- rope -------------------------------------------------------------------------------------


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(rope: RopeSpec, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim/2], cos/sin scale), as transformers' rope init functions compute them."""
    base = rope.theta
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if rope.type == "default":
        return inv, 1.0
    if rope.type == "linear":
        return inv / rope.factor, 1.0
    if rope.type == "yarn":
        factor = rope.factor
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
        original = rope.original_max_position_embeddings or max_position_embeddings

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low: float = max(math.floor(correction_dim(rope.beta_fast)), 0)
        high: float = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
        return inv, attention_factor
    raise NotImplementedError(rope.type)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, D/2] in float32."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos() * scale, freqs.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [T, n, D]; cos/sin [T, D/2]. Halves layout (Llama) or adjacent pairs (DeepSeek's complex form)."""
    dtype = x.dtype
    x = x.float()
    c, s = cos[:, None, :], sin[:, None, :]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).to(dtype)
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1).to(dtype)


# -- attention --------------------------------------------------------------------------------


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q [T, n, D], k [L, n_kv, D], v [L, n_kv, Dv], positions [T] -> [T, n * Dv].

    Key j is visible to query t iff j <= positions[t]; this also hides cache rows not yet written.
    """
    n, n_kv = q.shape[1], k.shape[1]
    if n != n_kv:
        k = k.repeat_interleave(n // n_kv, dim=1)
        v = v.repeat_interleave(n // n_kv, dim=1)
    mask = torch.arange(k.shape[0], device=q.device)[None, :] <= positions[:, None]  # [T, L]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)  # [n, T, Dv]
    return out.transpose(0, 1).reshape(q.shape[0], -1)


# -- MoE --------------------------------------------------------------------------------------


def route(x: torch.Tensor, router_w: torch.Tensor, top_k: int, norm_topk_prob: bool,
          scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (weights [T, K] float32, expert ids [T, K]), sorted by weight, descending.

    Logits and softmax run in float32 (as DeepSeek does; identical for float32 models).
    """
    probs = F.linear(x.float(), router_w.float()).softmax(dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * scaling, ids


def little_weights(weights: torch.Tensor, k: int) -> torch.Tensor:
    """weights [T, K] sorted descending -> [T, k], rescaled to carry the big set's total weight."""
    little = weights[:, :k]
    return little * (weights.sum(dim=-1, keepdim=True) / little.sum(dim=-1, keepdim=True))


def expert_choice(weights: torch.Tensor, little_k: int, layer_tau: float | None, rescale: bool,
                  rule: str = "switch") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Which of the top-K experts a little-pass token uses at one layer, and with what weights.

    weights [T, K] sorted descending -> (weights [T, K'], keep [T, K'] or None). Without a layer
    rule (layer_tau None): the top little_k, K' = little_k. With one, K' = K and each token keeps
    - switch: its little set when that carries at least `layer_tau` of the big set's router mass,
      else the whole big set;
    - prefix: the fewest top experts, at least little_k, that carry at least `layer_tau` of it.
    rescale: the kept experts carry the big set's total weight; else the router's own weights.
    """
    if layer_tau is None:
        little = weights[:, :little_k]
        return (little_weights(weights, little_k) if rescale else little), None
    K = weights.shape[1]
    share = weights.cumsum(-1) / weights.sum(-1, keepdim=True)  # [T, K]: mass of the top 1..K
    if rule == "prefix":
        n = ((share < layer_tau).sum(-1, keepdim=True) + 1).clamp(little_k, K)  # first n reaching tau
    else:
        n = torch.where(share[:, little_k - 1:little_k] >= layer_tau, little_k, K)
    keep = torch.arange(K, device=weights.device)[None, :] < n  # [T, K]
    return kept_weights(weights, keep, rescale), keep


def kept_weights(weights: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """weights [T, K] with the pairs that `keep` drops zeroed; rescale: the kept ones then carry the
    big set's total weight, else the router's own weights."""
    kept = weights.masked_fill(~keep, 0.0)
    if rescale:
        kept = kept * (weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True))
    return kept


def routed_experts(x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, w13: torch.Tensor,
                   w2: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{slots[t, k]}(x[t]) over the pairs that `keep` allows (all if None).

    x [T, H], weights [T, K], slots [T, K] (cache slot of each chosen expert), w13 [S, 2I, H] (gate
    rows then up rows), w2 [S, H, I], keep [T, K] bool -> [T, H].
    """
    T, K = slots.shape
    if not x.is_cuda or T * K > GATHER_MAX_PAIRS:
        return _grouped_experts(x, weights, slots, w13, w2, keep)
    safe = slots.clamp(min=0)  # dropped pairs may have no slot; their output is masked out below
    g13 = w13[safe]  # [T, K, 2I, H]
    gate, up = torch.einsum("th,tkih->tki", x, g13).chunk(2, dim=-1)  # [T, K, I] each
    y = torch.einsum("tki,tkhi->tkh", F.silu(gate) * up, w2[safe])  # [T, K, H]
    y = y * weights[..., None].to(y.dtype)
    if keep is not None:
        y = torch.where(keep[..., None], y, 0)
    return y.sum(dim=1)


# A custom op: its data-dependent loop (with a host sync) is opaque to torch.compile, which then
# compiles a whole graph segment around it instead of breaking the segment at every expert call.
@torch.library.custom_op("mobile::grouped_experts", mutates_args=())
def _grouped_experts(x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, w13: torch.Tensor,
                     w2: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """routed_experts for many tokens: each used slot runs once, on all of its tokens."""
    K = slots.shape[1]
    out = torch.zeros_like(x)
    flat = slots.flatten()
    if keep is not None:
        flat = torch.where(keep.flatten(), flat, -1)  # dropped pairs sort first and are skipped
    order = torch.argsort(flat, stable=True)
    used, counts = torch.unique_consecutive(flat[order], return_counts=True)
    tokens = order // K  # token of each (token, k) pair, grouped by slot
    w_sorted = weights.flatten()[order]
    start = 0
    for slot, count in zip(used.tolist(), counts.tolist(), strict=True):  # host sync
        if slot < 0:
            start += count
            continue
        idx = tokens[start:start + count]
        gate, up = F.linear(x[idx], w13[slot]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[slot]) * w_sorted[start:start + count, None].to(x.dtype)
        out.index_add_(0, idx, y)
        start += count
    return out


@_grouped_experts.register_fake
def _(x, weights, slots, w13, w2, keep=None):
    return torch.empty_like(x)


def warm_up_expert_op(device: torch.device, dtype: torch.dtype) -> None:
    """The custom op's first call imports torch's compiler stack (about a second): engines pay it
    while loading, not inside the first prefill's timing."""
    x = torch.zeros(1, 1, dtype=dtype, device=device)
    _grouped_experts(x, torch.ones(1, 1, device=device), torch.zeros(1, 1, dtype=torch.long, device=device),
                     torch.zeros(1, 2, 1, dtype=dtype, device=device), torch.zeros(1, 1, 1, dtype=dtype, device=device))
