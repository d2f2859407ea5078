"""The cost model behind the planned schedule: FLOPs and bytes of each node for one decode token.

Times are max(FLOPs / compute rate, weight bytes / HBM bandwidth) on the plan device
(`runtime.plan`), and transfer bytes / link bandwidth on the copy stream. Attention's
context-dependent work is left out: at decode it is small next to the weight reads.
"""

from __future__ import annotations

from mobile.compiler.ir import Node, Op
from mobile.moe.quant import row_bytes
from mobile.spec.schema import Spec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def expert_bytes(spec: Spec) -> int:
    """Bytes of one routed expert's row (gate, up, down, and their biases where the family has them)
    in its format (the spec's dtype, or packed: mobile.moe.quant): the unit a fetch moves and a cache
    slot holds."""
    m = spec.model
    return row_bytes(spec.runtime.expert_format, spec.expert_group, m.hidden_size, m.moe.intermediate_size,
                     DTYPE_BYTES[spec.dtype], m.moe.expert_bias)


def native_expert_bytes(spec: Spec) -> int:
    """Bytes of one routed expert in the spec's dtype, whatever its format."""
    m = spec.model
    return 3 * m.hidden_size * m.moe.intermediate_size * DTYPE_BYTES[spec.dtype]


def attention_params(spec: Spec, layer: int = 0) -> int:
    """One layer's attention weights (Gemma 4's full-attention layers have shapes of their own)."""
    m, a = spec.model, spec.model.attention
    h = m.hidden_size
    if a.kind == "gqa":
        n_kv, d = spec.attention_shape(layer)
        kv = 1 if a.full_k_eq_v and layer not in a.sliding_layers else 2  # v is k (Gemma 4's global layers)
        q = 2 if a.output_gate else 1  # q_proj also gives each head its output gate (Qwen3-Next, Qwen3.5)
        return h * a.num_heads * d * (q + 1) + h * n_kv * d * kv
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    q = h * a.num_heads * qk if a.q_lora_rank is None else h * a.q_lora_rank + a.q_lora_rank * a.num_heads * qk
    kv = h * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + a.num_heads * a.v_head_dim * h


def linear_attention_params(spec: Spec) -> int:
    """One linear-attention layer's weights (Gated DeltaNet): the in-projection (q, k, v, the output
    gate z, b and a), the conv, the output projection and the per-head vectors."""
    la, h = spec.model.linear_attention, spec.model.hidden_size
    key, value = la.num_key_heads * la.key_head_dim, la.num_value_heads * la.value_head_dim
    conv = 2 * key + value
    return h * (conv + value + 2 * la.num_value_heads) + conv * la.conv_kernel + value * h \
        + 2 * la.num_value_heads + la.value_head_dim


def kv_bytes_per_position(spec: Spec) -> int:
    """KV-cache bytes one position takes over the layers that keep one (a linear-attention layer
    keeps a recurrent state instead: recurrent_state_bytes), in the spec's dtype. A GQA layer keeps
    k and v [n_kv, D] (Gemma 4's full-attention layers their own shapes, v too where v is k); an MLA
    layer its compressed latent and shared rotated key (mobile.runtime.kv)."""
    a = spec.model.attention
    full = [i for i in range(spec.model.num_layers) if not spec.is_linear_layer(i)]
    if a.kind == "mla":
        per_layer = [a.kv_lora_rank + a.qk_rope_head_dim] * len(full)
    else:
        per_layer = [2 * n_kv * d for n_kv, d in (spec.attention_shape(i) for i in full)]
    return sum(per_layer) * DTYPE_BYTES[spec.dtype]


def recurrent_state_bytes(spec: Spec) -> int:
    """The recurrent state of every linear-attention layer, for one sequence: its conv window (the
    last conv_kernel - 1 inputs, in the spec's dtype) and its delta-rule matrix [value heads,
    key_head_dim, value_head_dim] in float32 (as transformers and flash-linear-attention keep it).
    One copy; a policy that may fall back keeps more (kept_state_copies)."""
    la = spec.model.linear_attention
    conv = (2 * la.num_key_heads * la.key_head_dim + la.num_value_heads * la.value_head_dim) * (la.conv_kernel - 1)
    per_layer = conv * DTYPE_BYTES[spec.dtype] + la.num_value_heads * la.key_head_dim * la.value_head_dim * 4
    return per_layer * len(spec.linear_layers)


def kept_state_copies(spec: Spec) -> int:
    """Copies of the recurrent state kept beside the live one (mobile.runtime.state): none unless a
    decoded token may fall back; then one per position a fallback may recompute, the token's own
    and up to policy.kv_refresh before it (each restored before its big pass)."""
    if not spec.linear_layers or not spec.policy.can_fall_back:
        return 0
    return spec.policy.kv_refresh + 1


def node_cost(spec: Spec, node: Node) -> tuple[float, int, int]:
    """(flops, device bytes read, host-to-device bytes) of one node for one decode token."""
    m = spec.model
    h, dt = m.hidden_size, DTYPE_BYTES[spec.dtype]
    op = node.op
    if op is Op.EMBED or op is Op.NORM or op is Op.ADD or op is Op.COMBINE:
        return 0.0, h * dt, 0
    if op is Op.ATTENTION:
        p = attention_params(spec, node.attr("layer") or 0)
        return 2.0 * p, p * dt, 0
    if op is Op.LINEAR_ATTENTION:
        p = linear_attention_params(spec)
        return 2.0 * p, p * dt, 0
    if op is Op.MLP:
        p = 3 * h * m.intermediate_size
        return 2.0 * p, p * dt, 0
    if op is Op.ROUTER or op is Op.PREDICT:
        p = h * m.moe.num_experts
        return 2.0 * p, p * 4, 0  # routers run in float32
    if op is Op.EXPERT:
        if node.attr("variant") == "shared":
            p = 3 * h * m.moe.shared_expert.intermediate_size
            return 2.0 * p, p * dt, 0
        k = node.attr("k") or m.moe.top_k
        p = 3 * h * m.moe.intermediate_size
        return 2.0 * p * k, expert_bytes(spec) * k, 0
    if op is Op.FETCH or op is Op.PREFETCH:
        # a static hot set (hybrid-static) moves nothing after loading: every miss runs on the host
        moves = spec.policy.traits.offloads and spec.policy.effective_placement != "static"
        moved = (node.attr("k") or 0) * expert_bytes(spec) if moves else 0
        return 0.0, 0, moved
    if op is Op.LM_HEAD:
        p = h * m.vocab_size
        return 2.0 * p, p * dt, 0
    return 0.0, 0, 0


def host_time_us(spec: Spec, node: Node) -> float:
    """A host_experts node's time, or a fetch's experts all computed on the host: their bytes read
    from host memory (a host expert kernel runs near the DRAM read bandwidth: mobile.moe.host)."""
    k = node.attr("k") or spec.model.moe.top_k
    return k * expert_bytes(spec) / (spec.runtime.plan.host_gbps * 1e3)


def node_time_us(spec: Spec, flops: float, device_bytes: int, h2d_bytes: int) -> float:
    plan = spec.runtime.plan
    if h2d_bytes:
        return h2d_bytes / (plan.link_gbps * 1e3)  # GB/s -> bytes per microsecond
    return max(flops / (plan.compute_tflops * 1e6), device_bytes / (plan.hbm_gbps * 1e3))
