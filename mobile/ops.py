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
    """(inverse frequencies [r/2], cos/sin scale), as transformers' rope init functions compute them.

    dim: the head's rope width; with a partial rotary factor only its first r = int(dim * factor)
    dims rotate, with frequencies of their own (GLM-4.5)."""
    dim = int(dim * rope.partial_rotary_factor)
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
    """x [T, n, D]; cos, sin [T, 1, R] from rope_tables, R <= D. Each rotated pair (a, b) becomes
    (a cos - b sin, b cos + a sin): x * cos plus x with each pair swapped times the signed sin. Only
    the first R dims rotate (a partial rotary factor); the rest pass through unchanged."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary], cos, sin, interleaved), x[..., rotary:]), dim=-1)
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


def route(x: torch.Tensor, router_w: torch.Tensor, top_k: int, norm_topk_prob: bool, scaling: float,
          scoring: str = "softmax", correction: torch.Tensor | None = None, n_group: int = 1,
          topk_group: int = 1, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (weights [T, K] float32, expert ids [T, K]), in selection order: by weight,
    descending; with a correction bias (sigmoid scoring), by corrected score, which the weights need
    not follow. The first little_k are the little set, so the big-little policies act on the order
    the model chooses in.

    scoring (mobile.spec.MoESpec): softmax; sigmoid with its correction bias [E] and groups
    (sigmoid_topk); or softmax_topk (route_topk_softmax). bias [E]: the router's own bias, where it
    has one (gpt-oss). Logits and scores run in float32, as DeepSeek does (identical for float32
    models); the renormalization and the routed scaling follow the choice, as in transformers' routers.
    """
    logits = F.linear(x.float(), router_w.float(), None if bias is None else bias.float())  # [T, E]
    if scoring == "softmax_topk":
        weights, ids = route_topk_softmax(logits, top_k)
        return (weights * scaling if scaling != 1 else weights), ids
    if scoring == "sigmoid":
        weights, ids = sigmoid_topk(logits, top_k, correction, n_group, topk_group)
    else:
        weights, ids = torch.topk(logits.softmax(dim=-1), top_k, dim=-1)  # [T, K]
    if norm_topk_prob:
        # + 1e-20 as DeepSeek-V3 writes it: a guard for sigmoid scores that all underflow; below
        # float32's resolution for any softmax top-k (whose sum is at least k / E)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return (weights * scaling if scaling != 1 else weights), ids


def sigmoid_topk(logits: torch.Tensor, top_k: int, correction: torch.Tensor | None, n_group: int,
                 topk_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router choice (noaux_tc; GLM-4.5 too): logits [T, E] -> (sigmoid scores [T, K],
    ids [T, K]), sorted by the corrected score (scores + correction), which chooses; the scores
    returned are the uncorrected ones. With n_group > 1, only the topk_group groups whose top-2
    corrected scores sum highest are chosen from."""
    scores = logits.sigmoid()  # [T, E]
    choice = scores if correction is None else scores + correction.float()
    if n_group > 1:
        T, E = choice.shape
        group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        best = torch.topk(group_scores, topk_group, dim=-1).indices  # [T, topk_group]
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~allowed.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices  # [T, K], best corrected score first
    return scores.gather(1, ids), ids


def route_topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss's router choice: the top-k of the logits (its bias included), then a softmax over
    those k only, so the weights sum to 1. logits [T, E] -> (weights [T, K] float32, ids [T, K])."""
    top, ids = torch.topk(logits, top_k, dim=-1)  # [T, K], sorted descending
    return top.softmax(dim=-1), ids


def little_weights(weights: torch.Tensor, k: int) -> torch.Tensor:
    """weights [T, K] in selection order -> [T, k], rescaled to carry the big set's total weight."""
    little = weights[:, :k]
    return little * (weights.sum(dim=-1, keepdim=True) / little.sum(dim=-1, keepdim=True))


def expert_choice(weights: torch.Tensor, little_k: int, layer_tau: float | None, rescale: bool,
                  rule: str = "switch") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Which of the top-K experts a little-pass token uses at one layer, and with what weights.

    weights [T, K] in selection order (route) -> (weights [T, K'], keep [T, K'] or None). Without a layer
    rule (layer_tau None): the top little_k, K' = little_k. With one, K' = K and `keep` is
    rule_keep's. rescale: the kept experts carry the big set's total weight; else the router's own.
    """
    if layer_tau is None:
        little = weights[:, :little_k]
        return (little_weights(weights, little_k) if rescale else little), None
    keep = rule_keep(weights, little_k, layer_tau, rule)
    return kept_weights(weights, keep, rescale), keep


def rule_keep(weights: torch.Tensor, little_k: int, layer_tau: float, rule: str) -> torch.Tensor:
    """The per-layer rule: weights [T, K] in selection order (route) -> keep [T, K] bool. Each token keeps
    - switch: its little set (the first little_k) when that carries at least `layer_tau` of the big
      set's router mass, else the whole big set;
    - prefix: the fewest first experts, at least little_k, that carry at least `layer_tau` of it.
    "First" is the router's order: by weight, or by corrected score where the router has a
    correction bias (then a prefix is the model's own preference, not the heaviest experts).
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
