"""How `mobile import-hf` reads Gemma 4's config.json (gemma4, and gemma4_text, its text model):
the text model's keys, Gemma4TextConfig's defaults, the layer types with their rope and shapes, and
what the 26B-A4B model does not use, refused by key (mobile.spec.hf)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mobile.errors import SpecError
from mobile.spec.hf_families import sliding_layers

# Gemma4TextConfig's defaults of the keys this import reads (a config.json may leave them out);
# global_head_dim and num_global_key_value_heads are keys its __post_init__ reads (into
# per_layer_config) where no per_layer_config is given
GEMMA4_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262144, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 30,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False,
    "sliding_window": 512, "final_logit_softcapping": None, "use_bidirectional_attention": None,
    "hidden_size_per_layer_input": 256, "attention_k_eq_v": False, "num_kv_shared_layers": 0,
    "enable_moe_block": False, "use_double_wide_mlp": False, "global_head_dim": 512,
    "num_global_key_value_heads": None,
}
GEMMA4_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}


def gemma4_reads(model_type: str, cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """A Gemma 4 config.json as Gemma4TextConfig reads it: the text model's keys (gemma4: its
    text_config, with the wrapper's tie_word_embeddings and dtype), the class's defaults, and the
    common import's key names (top_k_experts as num_experts_per_tok, hidden_activation as
    hidden_act; the sliding layers' rope as rope_parameters, the full layers' as _full_rope)."""
    if model_type == "gemma4":
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise SpecError("expected the text model's config (a JSON object)", where=where, key="text_config")
        outer: dict[str, Any] = {k: cfg[k] for k in ("tie_word_embeddings", "dtype", "torch_dtype", "_name_or_path")
                                 if k in cfg}
        cfg = {**text, **outer}
    cfg = {**GEMMA4_DEFAULTS, **cfg}  # an explicit null stays null, as transformers keeps it
    for key, value in (("num_experts_per_tok", "top_k_experts"), ("hidden_act", "hidden_activation")):
        cfg[key] = cfg.get(value)
    rope = cfg.get("rope_parameters") or GEMMA4_ROPE
    if not isinstance(rope, dict) or set(rope) - set(GEMMA4_ROPE):
        raise SpecError(f"expected one rope per layer type (full_attention, sliding_attention), got {rope!r:.80}",
                        where=where, key="rope_parameters")
    rope = {**GEMMA4_ROPE, **rope}
    cfg["rope_parameters"], cfg["_full_rope"] = rope["sliding_attention"], rope["full_attention"]
    return cfg


def gemma4(cfg: dict, g: Callable[..., Any], where: str, layers: int, model: dict, attention: dict,
            moe: dict) -> None:
    """Gemma 4 with its MoE block on (26B-A4B): sliding and global layers, the global ones with their
    own head size and kv heads, values equal to keys (attention_k_eq_v) and proportional rope; q, k
    and v norms, softmax scale 1, sandwich norms, a dense GeGLU MLP beside a MoE block of fused
    GeGLU experts, a router with a normed input and per-expert scales, scaled embeddings, a scalar
    per layer and soft-capped logits. What the 26B-A4B config does not use (per-layer input
    embeddings, shared KV layers, attention biases) is refused by key."""
    refuse = {"enable_moe_block": (True, "a Gemma 4 without its MoE block has no routed experts"),
              "hidden_size_per_layer_input": (0, "per-layer input embeddings (Gemma 3n-style) are not supported"),
              "num_kv_shared_layers": (0, "layers that reuse another layer's KV are not supported"),
              "use_double_wide_mlp": (False, "double-wide MLPs (of shared-KV layers) are not supported"),
              "attention_bias": (False, "attention biases are not supported for gemma4"),
              "hidden_act": ("gelu_pytorch_tanh", "only gelu_pytorch_tanh is supported for gemma4")}
    for key, (want, why) in refuse.items():
        if (cfg.get(key) or 0) != (want or 0):
            raise SpecError(f"{why} (got {json.dumps(cfg.get(key))})", where=where,
                            key="hidden_activation" if key == "hidden_act" else key)
    if cfg.get("use_bidirectional_attention") == "all":
        raise SpecError("bidirectional attention over text is not supported (got \"all\")", where=where,
                        key="use_bidirectional_attention")
    types = cfg.get("layer_types")
    if types is None:  # Gemma4TextConfig's default: 5 sliding layers, then a full one; the last one full
        types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)]
    types = list(types)
    if types:
        types[-1] = "full_attention"  # as transformers forces it
    sliding = sliding_layers(types, layers, where)
    full = [i for i in range(layers) if i not in sliding]
    head_dim, kv_heads = g("head_dim"), g("num_key_value_heads")
    k_eq_v = bool(g("attention_k_eq_v"))
    full_dim, full_kv = g("global_head_dim"), (cfg.get("num_global_key_value_heads") if k_eq_v else None) or kv_heads
    overrides = cfg.get("per_layer_config")
    if overrides is not None:  # what transformers writes (and reads before global_head_dim)
        if not isinstance(overrides, dict):
            raise SpecError(f"expected a JSON object, got {overrides!r:.80}", where=where, key="per_layer_config")
        shapes = {}
        for i in range(layers):
            o = overrides.get(str(i), overrides.get(i, {})) or {}
            if set(o) - {"head_dim", "num_key_value_heads"}:
                raise SpecError(f"only head_dim and num_key_value_heads overrides are supported, got {sorted(o)}",
                                where=where, key=f"per_layer_config.{i}")
            shapes[i] = (o.get("head_dim", head_dim), o.get("num_key_value_heads", kv_heads))
        if any(shapes[i] != (head_dim, kv_heads) for i in sliding) or len({shapes[i] for i in full}) > 1:
            raise SpecError("expected the sliding layers as the config's head_dim and num_key_value_heads and every "
                            "full layer alike", where=where, key="per_layer_config")
        full_dim, full_kv = shapes[full[0]] if full else (head_dim, kv_heads)
    window = g("sliding_window")
    attention.update(qk_norm="per_head", v_norm=True, scale=1.0, sliding_layers=sliding,
                     sliding_window=window if sliding else 0)
    if full:
        attention.update(full_head_dim=full_dim, full_num_kv_heads=full_kv, full_k_eq_v=k_eq_v)
        model["full_rope"] = gemma4_rope(cfg["_full_rope"], where, "rope_parameters.full_attention")
    if cfg["rope_parameters"].get("rope_type", "default") != "default":
        raise SpecError("only the default rope is supported for the sliding layers", where=where,
                        key="rope_parameters.sliding_attention.rope_type")
    cfg["rope_parameters"] = {"rope_theta": cfg["rope_parameters"].get("rope_theta", 10000.0)}
    cap = cfg.get("final_logit_softcapping")
    model.update(scale_embeddings=True, sandwich_norms=True, layer_scalar=True,
                 final_logit_softcap=None if cap is None else float(cap))
    moe.update(num_experts=g("num_experts"), intermediate_size=g("moe_intermediate_size"), norm_topk_prob=True,
               activation="geglu", router_norm=True, per_expert_scale=True, parallel_mlp=True)


def gemma4_rope(params: dict, where: str, key: str) -> dict[str, Any]:
    """A Gemma 4 layer type's rope: default (its partial_rotary_factor unread, as transformers'
    Gemma4 computes it), or proportional."""
    kind = params.get("rope_type", "default")
    if kind not in ("default", "proportional"):
        raise SpecError(f"expected default or proportional, got {kind!r}", where=where, key=f"{key}.rope_type")
    out: dict[str, Any] = {"theta": float(params.get("rope_theta", 10000.0)), "type": kind}
    if kind == "proportional":
        out["partial_rotary_factor"] = float(params.get("partial_rotary_factor", 1.0))
        if params.get("factor") is not None:
            out["factor"] = float(params["factor"])
    return out
