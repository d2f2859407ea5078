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

# How a family's checkpoints store a layer's routed experts. per_expert: three [out, in] matrices
# per expert (expert_gate, expert_up, expert_down). fused_interleaved (gpt-oss): one tensor per
# projection for all experts, input-major: experts_gate_up [E, H, 2I] whose gate and up columns
# alternate (gate = [..., 0::2], up = [..., 1::2]), experts_down [E, I, H], and their biases
# [E, 2I] (interleaved likewise) and [E, H]; published checkpoints hold the two matrices as MXFP4
# (P_blocks, P_scales: mobile.models.mxfp4). The loader turns either into mobile's canonical expert rows.
EXPERT_STORAGE = {"gpt_oss": "fused_interleaved"}


def expert_storage(family: str) -> str:
    return EXPERT_STORAGE.get(family, "per_expert")


def tensor_names(family: str, overrides: dict[str, str]) -> dict[str, str]:
    return {**TENSOR_NAMES[family], **overrides}
