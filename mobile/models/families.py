"""What differs between model families in their checkpoints: tensor names and how experts are
stored (a config.json's mapping to a spec is mobile.spec.hf's).

Canonical tensor names are what lowering and the executor use (`q_proj`, `expert_up`, ...).
Each family maps them to the names its Hugging Face checkpoints use, as templates over {layer}
and {expert}. A spec may override any entry under `checkpoint.tensor_names`.
"""

from __future__ import annotations

_LAYER = "model.layers.{layer}"
_ATTN = _LAYER + ".self_attn"

_COMMON = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": _LAYER + ".input_layernorm.weight",
    "ffn_norm": _LAYER + ".post_attention_layernorm.weight",
    "q_proj": _ATTN + ".q_proj.weight",
    "k_proj": _ATTN + ".k_proj.weight",
    "v_proj": _ATTN + ".v_proj.weight",
    "o_proj": _ATTN + ".o_proj.weight",
    "q_bias": _ATTN + ".q_proj.bias",
    "k_bias": _ATTN + ".k_proj.bias",
    "v_bias": _ATTN + ".v_proj.bias",
    "q_norm": _ATTN + ".q_norm.weight",
    "k_norm": _ATTN + ".k_norm.weight",
    "router": _LAYER + ".mlp.gate.weight",
    "expert_gate": _LAYER + ".mlp.experts.{expert}.gate_proj.weight",
    "expert_up": _LAYER + ".mlp.experts.{expert}.up_proj.weight",
    "expert_down": _LAYER + ".mlp.experts.{expert}.down_proj.weight",
    "mlp_gate": _LAYER + ".mlp.gate_proj.weight",
    "mlp_up": _LAYER + ".mlp.up_proj.weight",
    "mlp_down": _LAYER + ".mlp.down_proj.weight",
}

TENSOR_NAMES: dict[str, dict[str, str]] = {
    "mixtral": {
        **_COMMON,
        "router": _LAYER + ".block_sparse_moe.gate.weight",
        "expert_gate": _LAYER + ".block_sparse_moe.experts.{expert}.w1.weight",
        "expert_up": _LAYER + ".block_sparse_moe.experts.{expert}.w3.weight",
        "expert_down": _LAYER + ".block_sparse_moe.experts.{expert}.w2.weight",
    },
    "olmoe": dict(_COMMON),
    "qwen3_moe": dict(_COMMON),
    "qwen2_moe": {
        **_COMMON,
        "shared_gate": _LAYER + ".mlp.shared_expert.gate_proj.weight",
        "shared_up": _LAYER + ".mlp.shared_expert.up_proj.weight",
        "shared_down": _LAYER + ".mlp.shared_expert.down_proj.weight",
        "shared_expert_gate": _LAYER + ".mlp.shared_expert_gate.weight",
    },
    "deepseek_v2": {
        **_COMMON,
        "q_a_proj": _ATTN + ".q_a_proj.weight",
        "q_a_norm": _ATTN + ".q_a_layernorm.weight",
        "q_b_proj": _ATTN + ".q_b_proj.weight",
        "kv_a_proj": _ATTN + ".kv_a_proj_with_mqa.weight",
        "kv_a_norm": _ATTN + ".kv_a_layernorm.weight",
        "kv_b_proj": _ATTN + ".kv_b_proj.weight",
        "shared_gate": _LAYER + ".mlp.shared_experts.gate_proj.weight",
        "shared_up": _LAYER + ".mlp.shared_experts.up_proj.weight",
        "shared_down": _LAYER + ".mlp.shared_experts.down_proj.weight",
    },
    # fused experts (EXPERT_STORAGE), so none of the per-expert templates
    "gpt_oss": {
        **{k: v for k, v in _COMMON.items() if not k.startswith("expert_")},
        "o_bias": _ATTN + ".o_proj.bias",
        "sinks": _ATTN + ".sinks",
        "router": _LAYER + ".mlp.router.weight",
        "router_bias": _LAYER + ".mlp.router.bias",
        "experts_gate_up": _LAYER + ".mlp.experts.gate_up_proj",
        "experts_gate_up_bias": _LAYER + ".mlp.experts.gate_up_proj_bias",
        "experts_down": _LAYER + ".mlp.experts.down_proj",
        "experts_down_bias": _LAYER + ".mlp.experts.down_proj_bias",
    },
}
# DeepSeek-V3 is V2's layout plus the router's correction bias; GLM-4.5 is the common layout plus
# V2's shared experts and that bias
_CORRECTION = {"router_correction": _LAYER + ".mlp.gate.e_score_correction_bias"}
TENSOR_NAMES["deepseek_v3"] = {**TENSOR_NAMES["deepseek_v2"], **_CORRECTION}
_SHARED_EXPERTS = {k: v for k, v in TENSOR_NAMES["deepseek_v2"].items() if k.startswith("shared_")}
TENSOR_NAMES["glm4_moe"] = {**_COMMON, **_SHARED_EXPERTS, **_CORRECTION}
# Sarvam-MoE and Param2-MoE (transformers runs them as GLM-4.5) keep Ling/Bailing's names: one fused
# q, k and v projection (its rows q's, then k's, then v's; its bias likewise), attention.dense for
# o_proj, word_embeddings, and expert_bias for the correction bias
_UNFUSED = ("q_proj", "k_proj", "v_proj", "q_bias", "k_bias", "v_bias")
TENSOR_NAMES["sarvam_moe"] = {
    **{k: v for k, v in TENSOR_NAMES["glm4_moe"].items() if k not in _UNFUSED},
    "embed": "model.word_embeddings.weight",
    "qkv_proj": _LAYER + ".attention.query_key_value.weight",
    "qkv_bias": _LAYER + ".attention.query_key_value.bias",
    "o_proj": _LAYER + ".attention.dense.weight",
    "q_norm": _LAYER + ".attention.query_layernorm.weight",
    "k_norm": _LAYER + ".attention.key_layernorm.weight",
    "router_correction": _LAYER + ".mlp.gate.expert_bias",
}
# MiniMax-M2 is Mixtral's layout (block_sparse_moe, w1/w3/w2) plus the correction bias, which sits
# beside the router rather than inside it; its q_norm and k_norm span all heads (mobile.spec.hf)
TENSOR_NAMES["minimax_m2"] = {
    **TENSOR_NAMES["mixtral"], "router_correction": _LAYER + ".block_sparse_moe.e_score_correction_bias"}

# Gemma 4 (26B-A4B): sandwich norms around attention and the feed-forward block, whose dense MLP
# (mlp_*, normed by ffn_norm and mlp_post_norm) runs beside the experts (moe_norm, moe_post_norm);
# the router's input scale and per-expert scale; a scalar per layer; fused experts (EXPERT_STORAGE)
TENSOR_NAMES["gemma4"] = {
    **{k: v for k, v in _COMMON.items() if not k.startswith("expert_") and k not in ("q_bias", "k_bias", "v_bias")},
    "ffn_norm": _LAYER + ".pre_feedforward_layernorm.weight",
    "post_attn_norm": _LAYER + ".post_attention_layernorm.weight",
    "post_ffn_norm": _LAYER + ".post_feedforward_layernorm.weight",
    "mlp_post_norm": _LAYER + ".post_feedforward_layernorm_1.weight",
    "moe_norm": _LAYER + ".pre_feedforward_layernorm_2.weight",
    "moe_post_norm": _LAYER + ".post_feedforward_layernorm_2.weight",
    "router": _LAYER + ".router.proj.weight",
    "router_scale": _LAYER + ".router.scale",
    "per_expert_scale": _LAYER + ".router.per_expert_scale",
    "layer_scalar": _LAYER + ".layer_scalar",
    "experts_gate_up": _LAYER + ".experts.gate_up_proj",
    "experts_down": _LAYER + ".experts.down_proj",
}

# Qwen3-Next and Qwen3.5-MoE: Qwen2-MoE's experts and sigmoid-gated shared expert, Qwen3's per-head
# q/k norm, and linear-attention layers (Gated DeltaNet: the la_* names). Qwen3-Next projects q, k,
# v and the output gate z in one matrix grouped by key head (la_qkvz), and b and a likewise (la_ba);
# Qwen3.5 in four plain ones (la_qkv: q's rows, k's, v's; la_z, la_b, la_a). The runtime keeps each
# matrix and reorders the outputs (mobile.models.deltanet.in_projection_order)
_LINEAR = _LAYER + ".linear_attn"
_GATED_DELTANET = {"la_conv": _LINEAR + ".conv1d.weight", "la_dt_bias": _LINEAR + ".dt_bias",
                   "la_a_log": _LINEAR + ".A_log", "la_norm": _LINEAR + ".norm.weight",
                   "la_out": _LINEAR + ".out_proj.weight"}
TENSOR_NAMES["qwen3_next"] = {**TENSOR_NAMES["qwen2_moe"], **_GATED_DELTANET,
                              "la_qkvz": _LINEAR + ".in_proj_qkvz.weight", "la_ba": _LINEAR + ".in_proj_ba.weight"}
TENSOR_NAMES["qwen3_5_moe"] = {**TENSOR_NAMES["qwen2_moe"], **_GATED_DELTANET,
                               **{f"la_{p}": _LINEAR + f".in_proj_{p}.weight" for p in ("qkv", "z", "b", "a")}}

# How a family's checkpoints store a layer's routed experts. per_expert: three [out, in] matrices
# per expert (expert_gate, expert_up, expert_down). fused_interleaved (gpt-oss): one tensor per
# projection for all experts, input-major: experts_gate_up [E, H, 2I] whose gate and up columns
# alternate (gate = [..., 0::2], up = [..., 1::2]), experts_down [E, I, H], and their biases
# [E, 2I] (interleaved likewise) and [E, H]; published checkpoints hold the two matrices as MXFP4
# (P_blocks, P_scales: mobile.models.mxfp4). fused (Gemma 4): one tensor per projection for all experts,
# output-major as nn.Linear: experts_gate_up [E, 2I, H] (gate rows, then up rows), experts_down [E, H, I],
# no biases. The loader turns each into mobile's canonical expert rows.
EXPERT_STORAGE = {"gpt_oss": "fused_interleaved", "gemma4": "fused"}


def expert_storage(family: str) -> str:
    return EXPERT_STORAGE.get(family, "per_expert")


def tensor_names(family: str, overrides: dict[str, str]) -> dict[str, str]:
    return {**TENSOR_NAMES[family], **overrides}
