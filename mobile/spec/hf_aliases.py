"""Model types that transformers runs with another family's modeling code (mobile.spec.hf's
MODEL_TYPES): what their config classes read otherwise than the family's.

RENAMED: the names their original configs use (the class's attribute_map) -> transformers'.
DEFAULTS: the class's own default of each key the import reads and a config.json may leave out (the
sizes stay required); tests/test_families_glm_lite.py checks them against the classes.
FIXED: what the modeling code runs whatever the config says; a config that says otherwise is refused."""

from __future__ import annotations

import json
from typing import Any

from mobile.errors import SpecError

RENAMED = {"sarvam_moe": {"num_experts": "n_routed_experts", "num_shared_experts": "n_shared_experts",
                           "use_qkv_bias": "attention_bias"},
            "sarvam_mla": {"num_experts": "n_routed_experts", "num_shared_experts": "n_shared_experts"}}
RENAMED["param2moe"] = RENAMED["sarvam_moe"]
ROUTING = {"n_group": 1, "topk_group": 1, "norm_topk_prob": True}
DEFAULTS: dict[str, dict[str, Any]] = {
    "glm4_moe_lite": {**ROUTING, "routed_scaling_factor": 1.8, "n_shared_experts": 1, "q_lora_rank": 768,
                      "rms_norm_eps": 1e-5, "max_position_embeddings": 202752},
    "sarvam_mla": {**ROUTING, "routed_scaling_factor": 2.5, "n_shared_experts": 1, "first_k_dense_replace": 1},
    "sarvam_moe": {**ROUTING, "routed_scaling_factor": 2.5, "n_shared_experts": 1, "first_k_dense_replace": 1,
                   "use_qk_norm": True, "partial_rotary_factor": 1.0, "rope_theta": 8e6, "head_dim": 64,
                   "num_key_value_heads": 4, "max_position_embeddings": 131072},
    "param2moe": {**ROUTING, "routed_scaling_factor": 2.5, "n_shared_experts": 2, "first_k_dense_replace": 1,
                  "use_qk_norm": True, "partial_rotary_factor": 1.0, "rope_theta": 5e5, "head_dim": 64,
                  "num_key_value_heads": 8, "max_position_embeddings": 32768, "tie_word_embeddings": True},
    "dots1": {**ROUTING, "norm_topk_prob": False, "routed_scaling_factor": 1.0, "first_k_dense_replace": 0,
              "num_key_value_heads": 32, "max_position_embeddings": 2048},
    "solar_open": {**ROUTING, "routed_scaling_factor": 1.0, "n_shared_experts": 1, "rope_theta": 1e6,
                   "head_dim": 128, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072},
}
FIXED: dict[str, dict[str, Any]] = {
    # its rotary embedding would cover only part of qk_rope_head_dim, which its MLA cannot apply
    "glm4_moe_lite": {"partial_rotary_factor": 1.0},
    "dots1": {"use_qk_norm": True, "partial_rotary_factor": 1.0},  # Qwen3's attention
    "solar_open": {"use_qk_norm": False, "partial_rotary_factor": 1.0, "first_k_dense_replace": 0},  # Llama's, all MoE
}


def as_transformers_reads(model_type: str, cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """cfg as transformers' config class of model_type reads it (RENAMED, DEFAULTS, FIXED above)."""
    cfg = dict(cfg)
    for old, new in RENAMED.get(model_type, {}).items():
        if old in cfg:
            value = cfg.pop(old)
            if cfg.get(new, value) != value:
                raise SpecError(f"is {json.dumps(value)} but {new} is {json.dumps(cfg[new])} (transformers reads "
                                f"both as {new})", where=where, key=old)
            cfg[new] = value
    for key, value in DEFAULTS.get(model_type, {}).items():
        cfg.setdefault(key, value)  # an explicit null stays null, as transformers keeps it
    rope = cfg.get("rope_parameters") or {}
    for key, want in FIXED.get(model_type, {}).items():
        # transformers reads rope_parameters' partial_rotary_factor before a top-level one
        name, value = (f"rope_parameters.{key}", rope[key]) if key in rope else (key, cfg.get(key, want))
        if value != want:
            raise SpecError(f"only {json.dumps(want)} is supported for {model_type} (as transformers runs it), "
                            f"got {json.dumps(value)}", where=where, key=name)
        cfg[key] = want
    scaling = cfg.get("rope_scaling") or {}
    if model_type == "sarvam_mla" and "deepseek_yarn" in (scaling.get("type"), scaling.get("rope_type")):
        # the original configs' name for YaRN, which transformers' SarvamMLAConfig reads as yarn
        cfg["rope_scaling"] = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "yarn"}
    return cfg
