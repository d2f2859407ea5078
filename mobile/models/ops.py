"""The dense model math of the graph's compute ops: norms, rope, attention, the dense MLP, the
importance gate's confidence. The routed-expert layer is mobile.moe's.

Shapes: T = tokens in this step, H = hidden, n = heads, D = head dim, L = KV-cache length.
These follow transformers' modeling code for each family; tests compare against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mobile.spec.schema import RopeSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: in float32, cast back, then scaled by the weight."""
    if x.dtype == torch.float32:  # torch's fused op: one call instead of six, the same float32 math
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rms_norm_scaled(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm times a float32 scale, all in float32, then cast back: the zero-centred norm of
    Qwen3-Next and Qwen3.5, whose scale is 1 + weight (zero_centered_scale)."""
    return F.rms_norm(x.float(), (x.shape[-1],), scale, eps).to(x.dtype)


def zero_centered_scale(weight: torch.Tensor) -> torch.Tensor:
    """A zero-centred norm's scale, 1 + weight, in float32 (as transformers computes it)."""
    return 1.0 + weight.float()


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def geglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Gemma's dense MLP: gelu (tanh approximation) in place of silu."""
    return F.linear(F.gelu(F.linear(x, gate), approximate="tanh") * F.linear(x, up), down)


def scaled_add(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A residual add, then the layer's learned scalar (Gemma 4's layer_scalar [1])."""
    return (a + b) * scale


# -- rope -------------------------------------------------------------------------------------


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(rope: RopeSpec, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [r/2], cos/sin scale), as transformers' rope init functions compute them.

    dim: the head's rope width; with a partial rotary factor only its first r = int(dim * factor)
    dims rotate, with frequencies of their own (GLM-4.5)."""
    base = rope.theta
    if rope.type == "proportional":  # Gemma 4: every pair of the head, only the first ones at a frequency
        angles = int(rope.partial_rotary_factor * dim // 2)
        inv = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.float32) / dim))
        return torch.cat((inv, torch.zeros(dim // 2 - angles))) / rope.factor, 1.0
    dim = int(dim * rope.partial_rotary_factor)
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


class Attention:
    """One layer's attention (GQA, MHA, with or without q/k norm, sinks, a sliding window):
    projections, rope, the KV-cache write and read, the output projection. A kernel: (ctx, x [T, H])
    -> [T, H]. w: the layer's weights by name (qkv_proj and qkv_bias fused: mobile.runtime.kernels.fuse_qkv).

    layer: its own shapes and rope where the spec gives full-attention layers theirs (Gemma 4's
    global layers: another head size and kv heads, v = k's projection, proportional rope, whose
    tables it makes from ctx.positions rather than reading the context's).

    With an output gate (Qwen3-Next, Qwen3.5), q_proj gives each head its q and then its gate, and
    the heads' output is times sigmoid(gate) before o_proj; their q/k norms are zero-centred."""

    def __init__(self, spec, w: dict, cache, scale: float, window: int, layer: int | None = None):
        a, m = spec.model.attention, spec.model
        self.w, self.cache, self.scale, self.window = w, cache, scale, window
        self.n, self.n_kv, self.d, self.eps = a.num_heads, a.num_kv_heads, a.head_dim, spec.model.norm_eps
        self.qk_norm, self.clip, self.interleaved = a.qk_norm, a.clip_qkv, spec.model.rope.interleaved
        self.v_norm, self.k_eq_v, self.inv_freq = a.v_norm, False, None
        self.gated = a.output_gate
        self.qk_scaled = spec.model.zero_centered_norms and a.qk_norm == "per_head"
        if self.qk_scaled:  # 1 + weight, once
            w["q_norm"], w["k_norm"] = zero_centered_scale(w["q_norm"]), zero_centered_scale(w["k_norm"])
        if layer is not None:
            self.n_kv, self.d = spec.attention_shape(layer)
            self.k_eq_v = a.full_k_eq_v and layer not in a.sliding_layers
            if spec.layer_rope(layer) is not m.rope:  # on the weights' device: a captured graph copies nothing
                inv_freq, self.rope_scale = rope_inv_freq(spec.layer_rope(layer), self.d, m.max_position_embeddings)
                self.inv_freq = inv_freq.to(w["o_proj"].device)

    def __call__(self, ctx, x: torch.Tensor) -> torch.Tensor:
        w, n, n_kv, d, T = self.w, self.n, self.n_kv, self.d, x.shape[0]
        gate = None
        if self.k_eq_v:  # v is k's projection, before k's norm and rope (Gemma 4's global layers)
            q, k = F.linear(x, w["qkv_proj"], w["qkv_bias"]).split([n * d, n_kv * d], dim=-1)
            v = k
        elif self.gated:  # each head's q, then its gate
            q, k, v = F.linear(x, w["qkv_proj"], w["qkv_bias"]).split([2 * n * d, n_kv * d, n_kv * d], dim=-1)
            q, gate = q.view(T, n, 2 * d).split([d, d], dim=-1)
            gate = gate.reshape(T, n * d)
        else:
            q, k, v = F.linear(x, w["qkv_proj"], w["qkv_bias"]).split([n * d, n_kv * d, n_kv * d], dim=-1)
        if self.qk_norm == "full":  # OLMoE: over all heads at once
            q, k = rms_norm(q, w["q_norm"], self.eps), rms_norm(k, w["k_norm"], self.eps)
        if self.clip is not None:
            q, k, v = q.clamp(-self.clip, self.clip), k.clamp(-self.clip, self.clip), v.clamp(-self.clip, self.clip)
        q, k, v = q.reshape(T, n, d), k.reshape(T, n_kv, d), v.reshape(T, n_kv, d)
        if self.qk_scaled:  # Qwen3-Next, Qwen3.5: over head_dim, zero-centred
            q, k = rms_norm_scaled(q, w["q_norm"], self.eps), rms_norm_scaled(k, w["k_norm"], self.eps)
        elif self.qk_norm == "per_head":  # Qwen3: over head_dim
            q, k = rms_norm(q, w["q_norm"], self.eps), rms_norm(k, w["k_norm"], self.eps)
        if self.v_norm:  # Gemma 4: over head_dim, without a weight
            v = F.rms_norm(v.float(), (d,), None, self.eps).to(v.dtype)
        cos, sin = ctx.cos, ctx.sin
        if self.inv_freq is not None:  # this layer's own rope (Gemma 4's global layers)
            cos, sin = rope_tables(ctx.positions, self.inv_freq, self.rope_scale, self.interleaved)
        q, k = apply_rope(torch.cat((q, k), dim=1), cos, sin, self.interleaved).split([n, n_kv], dim=1)
        cache = self.cache
        cache.k.index_copy_(0, ctx.positions, k)
        cache.v.index_copy_(0, ctx.positions, v)
        out = causal_attention(q, cache.k[: ctx.kv_len], cache.v[: ctx.kv_len], ctx.positions, self.scale,
                               ctx.all_visible, self.window, w["sinks"])
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return F.linear(out, w["o_proj"], w["o_bias"])


# DeepSeek's q_a and kv_a norms (V2 and V3, and transformers' ports) keep RMSNorm's default eps
# whatever rms_norm_eps says (Kimi-K2.5 sets 1e-5)
MLA_LATENT_NORM_EPS = 1e-6


class LatentAttention:
    """One layer's multi-head latent attention (DeepSeek's MLA): the KV cache holds the compressed
    latent [L, 1, r] (in k) and the shared rope key [L, 1, rd] (in v). A kernel: (ctx, x) -> [T, H]."""

    def __init__(self, spec, w: dict, cache, scale: float):
        a = spec.model.attention
        self.w, self.cache, self.scale = w, cache, scale
        self.n, self.nope, self.rd, self.dv, self.r = (a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim,
                                                       a.v_head_dim, a.kv_lora_rank)

    def __call__(self, ctx, x: torch.Tensor) -> torch.Tensor:
        w, n, nope, rd, dv, r, eps, T = (self.w, self.n, self.nope, self.rd, self.dv, self.r, MLA_LATENT_NORM_EPS,
                                         x.shape[0])
        if w["q_proj"] is not None:
            q = F.linear(x, w["q_proj"])
        else:
            q = F.linear(rms_norm(F.linear(x, w["q_a_proj"]), w["q_a_norm"], eps), w["q_b_proj"])
        q_nope, q_pe = q.view(T, n, nope + rd).split([nope, rd], dim=-1)
        latent, k_pe = F.linear(x, w["kv_a_proj"]).split([r, rd], dim=-1)
        latent = rms_norm(latent, w["kv_a_norm"], eps)  # [T, r]: what the cache keeps
        q_pe = apply_rope(q_pe, ctx.cos, ctx.sin, interleaved=True)
        k_pe = apply_rope(k_pe.view(T, 1, rd), ctx.cos, ctx.sin, interleaved=True)
        cache = self.cache
        cache.k.index_copy_(0, ctx.positions, latent.view(T, 1, r))
        cache.v.index_copy_(0, ctx.positions, k_pe)
        L = ctx.kv_len
        kv = F.linear(cache.k[:L, 0], w["kv_b_proj"]).view(L, n, nope + dv)  # expand the latents
        k_nope, v = kv.split([nope, dv], dim=-1)
        k = torch.cat((k_nope, cache.v[:L].expand(L, n, rd)), dim=-1)
        out = causal_attention(torch.cat((q_nope, q_pe), dim=-1), k, v, ctx.positions, self.scale)
        return F.linear(out, w["o_proj"])


def attention_scale(spec) -> float:
    """The softmax scale of the model's attention (MLA's with yarn rope: scaled by mscale squared)."""
    a = spec.model.attention
    if a.scale is not None:
        return a.scale
    if a.kind != "mla":
        return a.head_dim ** -0.5
    scale = (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5
    r = spec.model.rope
    if r.type != "default" and r.mscale_all_dim:
        scale *= _yarn_mscale(r.factor, r.mscale_all_dim) ** 2
    return scale


def shared_expert(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                  sigmoid_gate: torch.Tensor | None = None) -> torch.Tensor:
    """A MoE layer's shared expert: a dense SwiGLU, scaled by sigmoid(x @ gate) where it has one (Qwen-MoE)."""
    y = swiglu(x, gate, up, down)
    return y if sigmoid_gate is None else torch.sigmoid(F.linear(x, sigmoid_gate)) * y


class LMHead:
    """A kernel: (ctx, the final norm's output [T, H]) -> float32 logits [T, V] ([1, V] when the
    context wants the last position only)."""

    def __init__(self, weight: torch.Tensor, softcap: float | None = None):
        self.weight, self.softcap = weight, softcap

    def __call__(self, ctx, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x[-1:] if ctx.last_only else x, self.weight).float()
        if self.softcap is not None:  # Gemma: cap * tanh(logits / cap)
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# -- the importance gate ------------------------------------------------------------------


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
