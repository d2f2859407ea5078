"""How `mobile import-hf` reads Qwen3-Next's and Qwen3.5-MoE's config.json (qwen3_next; qwen3_5_moe_text,
and qwen3_5_moe, the multimodal checkpoint whose text model is its text_config): the layer types, the
linear-attention (Gated DeltaNet) shapes, the gated full attention with partial rope, and the sparse MoE
block with its sigmoid-gated shared expert (mobile.spec.hf).

Not read: the vision tower (qwen3_5_moe's vision_config), and the multi-token-prediction head (mtp_*
keys: a draft layer for speculative decoding, which transformers does not load either)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mobile.errors import SpecError
from mobile.spec import hf_families

LAYER_TYPES = ("linear_attention", "full_attention")
# transformers' Qwen3NextConfig and Qwen3_5MoeTextConfig (their __post_init__): a config without
# layer_types has a full-attention layer every full_attention_interval layers, linear ones between;
# and rotates a quarter of each head unless the config says otherwise
FULL_ATTENTION_INTERVAL = 4
PARTIAL_ROTARY_FACTOR = 0.25
# transformers' default where the config has no head_dim (both classes'), not hidden_size // heads
HEAD_DIM = 256
# the linear-attention shapes. transformers' config classes default each of them, but a config.json
# without one is refused here, by key: a guessed shape would load a checkpoint it does not fit, or
# plan memory for a model that is not the one on disk
LINEAR_KEYS = {"num_key_heads": "linear_num_key_heads", "num_value_heads": "linear_num_value_heads",
               "key_head_dim": "linear_key_head_dim", "value_head_dim": "linear_value_head_dim",
               "conv_kernel": "linear_conv_kernel_dim"}


def qwen3_5_reads(model_type: str, cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """A Qwen3.5-MoE config.json as Qwen3_5MoeTextConfig reads it: qwen3_5_moe's text model is its
    text_config, with the wrapper's tie_word_embeddings and dtype (its vision_config is not read)."""
    if model_type != "qwen3_5_moe":
        return cfg
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise SpecError("expected the text model's config (a JSON object)", where=where, key="text_config")
    outer = {k: cfg[k] for k in ("tie_word_embeddings", "dtype", "torch_dtype", "_name_or_path") if k in cfg}
    return {**text, **outer}


def qwen3_next(cfg: dict, g: Callable[..., Any], where: str, family: str, layers: int, model: dict,
               attention: dict, moe: dict) -> float:
    """Qwen3-Next and Qwen3.5-MoE: linear-attention and full-attention layers (layer_types), norms
    stored zero-centred, full attention with a per-head q/k norm and an output gate, every layer (bar
    mlp_only_layers, Qwen3-Next only) MoE with a sigmoid-gated shared expert. Returns the partial
    rotary factor."""
    types = layer_types(cfg, where, layers)
    model.update(zero_centered_norms=True, layer_types=types)
    if "linear_attention" in types:
        model["linear_attention"] = {"kind": "gated_deltanet", **{k: g(key) for k, key in LINEAR_KEYS.items()}}
    # transformers' attention always splits q_proj into q and a per-head gate; Qwen3.5's configs say so
    # (attn_output_gate), and one that says otherwise describes a checkpoint transformers cannot load
    if cfg.get("attn_output_gate", True) is not True:
        raise SpecError(f"only true is supported: transformers' {family} always gates the attention's output "
                        f"(got {json.dumps(cfg['attn_output_gate'])})", where=where, key="attn_output_gate")
    if g("use_sliding_window", False):
        raise SpecError("sliding-window attention is not supported yet", where=where, key="use_sliding_window")
    attention.update(head_dim=g("head_dim", HEAD_DIM), qk_norm="per_head", qkv_bias=bool(g("attention_bias", False)),
                     output_gate=True)
    moe.update(num_experts=g("num_experts"), intermediate_size=g("moe_intermediate_size"),
               norm_topk_prob=_norm_topk_prob(cfg, g, where, family),
               dense_layers=_dense_layers(cfg, g, where, family, layers),
               shared_expert={"intermediate_size": g("shared_expert_intermediate_size"), "gate": "sigmoid"})
    # Qwen3.5's rope_parameters also carry mrope_section and mrope_interleaved: its multimodal rope
    # gives each frequency pair one of three position streams (time, height, width), but for text
    # all three are the token's position, so it is the plain rope (its partial rotary factor
    # included); the import reads neither key. Precedence as transformers': rope_parameters, then a
    # top-level partial_rotary_factor (Qwen3-Next's published config), then the default
    params = cfg.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", PARTIAL_ROTARY_FACTOR)))


def layer_types(cfg: dict, where: str, layers: int) -> list[str]:
    """Each layer's token mixer, 'linear_attention' or 'full_attention': the config's layer_types,
    else transformers' pattern from full_attention_interval."""
    types = cfg.get("layer_types")
    if types is None:
        interval = cfg.get("full_attention_interval", FULL_ATTENTION_INTERVAL)
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise SpecError(f"expected an integer >= 1, got {json.dumps(interval)}", where=where,
                            key="full_attention_interval")
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    return hf_families.checked_layer_types(types, LAYER_TYPES, layers, where)


def _norm_topk_prob(cfg: dict, g: Callable[..., Any], where: str, family: str) -> bool:
    """Qwen3-Next's router renormalizes its top-k weights as the config says (by default it does);
    Qwen3.5's always does (its router reads no such key), so a config saying otherwise is refused."""
    if family == "qwen3_next":
        return bool(g("norm_topk_prob", True))
    if cfg.get("norm_topk_prob", True) is not True:
        raise SpecError(f"only true is supported: transformers' qwen3_5_moe router always renormalizes its "
                        f"top-k weights (got {json.dumps(cfg['norm_topk_prob'])})", where=where, key="norm_topk_prob")
    return True


def _dense_layers(cfg: dict, g: Callable[..., Any], where: str, family: str, layers: int) -> list[int]:
    """Qwen3-Next's dense layers, as Qwen2-MoE's: mlp_only_layers, and those off decoder_sparse_step.
    Qwen3.5 runs experts in every layer whatever those keys say (its config class has neither), so a
    config that says otherwise is refused rather than read one way."""
    if family == "qwen3_next":
        return hf_families.qwen2_dense_layers(g, where, layers)
    for key, want in (("mlp_only_layers", []), ("decoder_sparse_step", 1)):
        if cfg.get(key) not in (None, want):
            raise SpecError(f"only {json.dumps(want)} is supported: transformers' qwen3_5_moe runs experts in every "
                            f"layer (got {json.dumps(cfg[key])})", where=where, key=key)
    return []
