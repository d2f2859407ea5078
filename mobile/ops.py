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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: in float32, cast back, then scaled by the weight."""
    if x.dtype == torch.float32:  # torch's fused op: one call instead of six, the same float32 math
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's expert activation, as transformers' GptOssExperts computes it: the gate clamped
    from above, up from both sides, then gate * sigmoid(alpha * gate) * (up + 1)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return gate * torch.sigmoid(gate * alpha) * (up + 1)


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

        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:  # whole dimensions (transformers' default); gpt-oss keeps the fractions
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
        return inv, attention_factor
    raise NotImplementedError(rope.type)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, interleaved: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> (cos, signed sin), each [T, 1, D] in float32, in the layout apply_rope uses:
    halves (Llama: cos and sin repeated, sin negated on the first half) or adjacent pairs
    (DeepSeek's complex form: each repeated twice, sin negated on the even element). Computed once
    per forward and shared by every layer."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    cos, sin = freqs.cos() * scale, freqs.sin() * scale
    if interleaved:
        c, s = cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)
    else:
        c, s = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    return c[:, None, :], s[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [T, n, D]; cos, sin [T, 1, D] from rope_tables. Each rotated pair (a, b) becomes
    (a cos - b sin, b cos + a sin): x * cos plus x with each pair swapped times the signed sin."""
    dtype = x.dtype
    x = x.float()
    if interleaved:
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    else:
        a, b = x.chunk(2, dim=-1)
        swapped = torch.cat((b, a), dim=-1)
    return (x * cos + swapped * sin).to(dtype)


# -- attention --------------------------------------------------------------------------------


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     scale: float, all_visible: bool = False, window: int = 0,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, n, D], k [L, n_kv, D], v [L, n_kv, Dv], positions [T] -> [T, n * Dv].

    Key j is visible to query t iff j <= positions[t]; this also hides cache rows not yet written.
    window > 0 (a sliding-window layer): also iff j > positions[t] - window.
    all_visible: the caller knows every key is visible to every query (one decoded token attending
    over exactly the rows before it), so no mask is built (a window still masks).
    sinks [n]: one more logit per head in each softmax (sink_attention); None: torch's fused SDPA.
    """
    mask: torch.Tensor | None = None
    if window or sinks is not None or not all_visible:
        j = torch.arange(k.shape[0], device=q.device)[None, :]
        mask = j <= positions[:, None]
        if window:
            mask = mask & (j > positions[:, None] - window)
        if sinks is not None:
            return sink_attention(q, k, v, mask, scale, sinks)
    # a batch of one: with 4-D inputs torch picks its fused (flash) CPU kernel, with 3-D its math one
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)  # [1, n, T, Dv] -> [T, n * Dv]


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                   sinks: torch.Tensor) -> torch.Tensor:
    """Attention with a learned sink logit per head (gpt-oss), in plain torch: SDPA takes no extra
    softmax column. q [T, n, D], k [L, n_kv, D], v [L, n_kv, Dv], mask [T, L] (True: visible),
    sinks [n] -> [T, n * Dv]. As transformers' eager GptOss attention: the sink joins the softmax
    after the row max is subtracted and is dropped before the weighted sum of the values."""
    T, n, _ = q.shape
    groups = n // k.shape[1]  # query head h reads kv head h // groups, as repeat_kv
    qg = q.transpose(0, 1).unflatten(0, (k.shape[1], groups))  # [n_kv, g, T, D]
    scores = torch.matmul(qg, k.permute(1, 2, 0)[:, None]) * scale  # [n_kv, g, T, L]
    scores = scores.masked_fill(~mask, float("-inf")).flatten(0, 1)  # [n, T, L]
    logits = torch.cat((scores, sinks.to(scores.dtype)[:, None, None].expand(n, T, 1)), dim=-1)
    probs = (logits - logits.amax(dim=-1, keepdim=True)).softmax(dim=-1)[..., :-1]  # [n, T, L]
    out = torch.matmul(probs.unflatten(0, (k.shape[1], groups)).to(v.dtype), v.transpose(0, 1)[:, None])
    return out.flatten(0, 1).transpose(0, 1).reshape(T, -1)  # [n, T, Dv] -> [T, n * Dv]


# -- MoE --------------------------------------------------------------------------------------


def route(x: torch.Tensor, router_w: torch.Tensor, top_k: int, norm_topk_prob: bool,
          scaling: float, bias: torch.Tensor | None = None, scoring: str = "softmax"
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (weights [T, K] float32, expert ids [T, K]), sorted by weight, descending.

    Logits and softmax run in float32 (as DeepSeek does; identical for float32 models).
    bias [E]: the router's bias, where it has one. scoring (model.moe.scoring): softmax, or
    softmax_topk (route_topk_softmax).
    """
    if scoring == "softmax_topk":
        weights, ids = route_topk_softmax(x, router_w, bias, top_k)
    else:
        logits = F.linear(x.float(), router_w.float(), None if bias is None else bias.float())  # [T, E]
        weights, ids = torch.topk(logits.softmax(dim=-1), top_k, dim=-1)  # [T, K]
        if norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights * scaling if scaling != 1 else weights), ids


def route_topk_softmax(x: torch.Tensor, router_w: torch.Tensor, bias: torch.Tensor | None, top_k: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss's router: the top-k of the logits (with the router's bias), then a softmax over
    those k only, so the weights sum to 1. x [T, H] -> (weights [T, K] float32, ids [T, K])."""
    logits = F.linear(x.float(), router_w.float(), None if bias is None else bias.float())  # [T, E]
    top, ids = torch.topk(logits, top_k, dim=-1)  # [T, K], sorted descending
    return top.softmax(dim=-1), ids


def little_weights(weights: torch.Tensor, k: int) -> torch.Tensor:
    """weights [T, K] sorted descending -> [T, k], rescaled to carry the big set's total weight."""
    little = weights[:, :k]
    return little * (weights.sum(dim=-1, keepdim=True) / little.sum(dim=-1, keepdim=True))


def expert_choice(weights: torch.Tensor, little_k: int, layer_tau: float | None, rescale: bool,
                  rule: str = "switch") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Which of the top-K experts a little-pass token uses at one layer, and with what weights.

    weights [T, K] sorted descending -> (weights [T, K'], keep [T, K'] or None). Without a layer
    rule (layer_tau None): the top little_k, K' = little_k. With one, K' = K and `keep` is
    rule_keep's. rescale: the kept experts carry the big set's total weight; else the router's own.
    """
    if layer_tau is None:
        little = weights[:, :little_k]
        return (little_weights(weights, little_k) if rescale else little), None
    keep = rule_keep(weights, little_k, layer_tau, rule)
    return kept_weights(weights, keep, rescale), keep


def rule_keep(weights: torch.Tensor, little_k: int, layer_tau: float, rule: str) -> torch.Tensor:
    """The per-layer rule: weights [T, K] sorted descending -> keep [T, K] bool. Each token keeps
    - switch: its little set (the top little_k) when that carries at least `layer_tau` of the big
      set's router mass, else the whole big set;
    - prefix: the fewest top experts, at least little_k, that carry at least `layer_tau` of it.
    """
    K = weights.shape[1]
    share = weights.cumsum(-1) / weights.sum(-1, keepdim=True)  # [T, K]: mass of the top 1..K
    if rule == "prefix":
        n = ((share < layer_tau).sum(-1, keepdim=True) + 1).clamp(little_k, K)  # first n reaching tau
    else:
        n = torch.where(share[:, little_k - 1:little_k] >= layer_tau, little_k, K)
    return torch.arange(K, device=weights.device)[None, :] < n  # [T, K]


def kept_weights(weights: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """weights [T, K] with the pairs that `keep` drops zeroed; rescale: the kept ones then carry the
    big set's total weight, else the router's own weights."""
    kept = weights.masked_fill(~keep, 0.0)
    if rescale:
        kept = kept * (weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True))
    return kept


def confidence(logits: torch.Tensor, signal: str) -> torch.Tensor:
    """How sure a next-token distribution is, in [0, 1] (an importance gate fires below its tau):
    max_prob, the top probability; margin, the top probability minus the second; entropy, one minus
    the entropy over its maximum, log(V). logits [V] -> a 0-dim float32 tensor."""
    p = torch.softmax(logits.float(), dim=-1)
    if signal == "entropy":
        return 1 - (-(p * torch.log(p.clamp_min(1e-30))).sum()) / math.log(p.numel())
    if signal == "margin":
        top = torch.topk(p, 2).values
        return top[0] - top[1]
    return p.max()
