"""How `mobile import-hf` reads each family's config.json keys (mobile.spec.hf): MLA, shared
experts, the sigmoid routers, sliding layers, gpt-oss, MiniMax-M2, and what each refuses.

Each takes the config (`cfg`, as its transformers config class reads it), a getter `g(key,
default)` that names a missing key, and `where` (the file) for its errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mobile.errors import SpecError


def qwen2_dense_layers(g: Callable[..., Any], where: str, layers: int) -> list[int]:
    """Qwen2-MoE's dense layers (Qwen3-MoE's and Qwen3-Next's too): those in mlp_only_layers, and
    those off decoder_sparse_step."""
    step, mlp_only = g("decoder_sparse_step", 1), list(g("mlp_only_layers", []))
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise SpecError(f"expected an integer >= 1, got {json.dumps(step)}", where=where, key="decoder_sparse_step")
    return [i for i in range(layers) if i in mlp_only or (i + 1) % step != 0]


def mla_attention(cfg: dict, g: Callable[..., Any], heads: int) -> dict[str, Any]:
    """DeepSeek's multi-head latent attention (V2 and V3)."""
    return {
        "kind": "mla", "num_heads": heads, "num_kv_heads": g("num_key_value_heads", heads),
        "head_dim": g("qk_nope_head_dim") + g("qk_rope_head_dim"),
        "q_lora_rank": cfg.get("q_lora_rank"), "kv_lora_rank": g("kv_lora_rank"),
        "qk_nope_head_dim": g("qk_nope_head_dim"), "qk_rope_head_dim": g("qk_rope_head_dim"),
        "v_head_dim": g("v_head_dim"),
    }


def shared_experts(moe: dict[str, Any], g: Callable[..., Any]) -> None:
    """DeepSeek's and GLM's n_shared_experts, as one expert n times as wide (transformers builds it so)."""
    shared = g("n_shared_experts", 0) or 0
    if shared:
        moe["shared_expert"] = {"intermediate_size": shared * g("moe_intermediate_size")}


def sigmoid_moe(g: Callable[..., Any], num_layers: int, dense: list[int] | None = None) -> dict[str, Any]:
    """DeepSeek-V3's router (GLM-4.5's too): sigmoid scores, chosen with the correction bias within
    the best groups, then renormalized and scaled as the config says; the first
    first_k_dense_replace layers are dense (or the `dense` ones). Every routing key is required: the
    config classes' defaults differ by family, so a missing one is not guessed."""
    if dense is None:
        dense = list(range(min(g("first_k_dense_replace"), num_layers)))
    return {"num_experts": g("n_routed_experts"), "intermediate_size": g("moe_intermediate_size"),
            "norm_topk_prob": bool(g("norm_topk_prob")), "routed_scaling_factor": float(g("routed_scaling_factor")),
            "scoring": "sigmoid", "correction_bias": True, "n_group": g("n_group"), "topk_group": g("topk_group"),
            "dense_layers": dense}


def refuse_v3_variants(cfg: dict, g: Callable[..., Any], where: str) -> None:
    """Config keys of DeepSeek-V3 checkpoints that transformers' DeepseekV3 reads differently from
    DeepSeek's own code, or that mobile does not run: refused rather than run one way silently."""
    for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if cfg.get(key, want) != want:
            raise SpecError(f"only {want!r} is supported for deepseek_v3, got {cfg[key]!r}", where=where, key=key)
    if not g("rope_interleave", True):
        raise SpecError("only true is supported: mobile's MLA rotates adjacent pairs", where=where,
                        key="rope_interleave")
    if g("attention_bias", False):
        raise SpecError("attention biases are not supported with MLA attention", where=where, key="attention_bias")


def mlp_layer_types(cfg: dict, where: str, layers: int) -> list[int]:
    """GLM-4.7-Flash's dense layers. transformers' Glm4MoeLite reads mlp_layer_types (by default the
    first layer dense, the rest MoE) and ignores first_k_dense_replace, which the published config
    carries: one that says otherwise is refused rather than read one way."""
    types = cfg.get("mlp_layer_types")
    if types is None:
        types = ["dense"] + ["sparse"] * (layers - 1)
    if not isinstance(types, list) or len(types) != layers:
        raise SpecError(f"expected a list of {layers} MLP types (num_hidden_layers), got {types!r:.80}",
                        where=where, key="mlp_layer_types")
    for i, kind in enumerate(types):
        if kind not in ("dense", "sparse"):
            raise SpecError(f"expected 'dense' or 'sparse', got {kind!r}", where=where, key=f"mlp_layer_types[{i}]")
    dense = [i for i, kind in enumerate(types) if kind == "dense"]
    first = cfg.get("first_k_dense_replace")
    if first is not None and dense != list(range(min(first, layers))):
        raise SpecError(f"transformers' glm4_moe_lite ignores it and runs dense MLPs at layers {dense} "
                        f"(mlp_layer_types), not the first {first}", where=where, key="first_k_dense_replace")
    return dense


def dots1_attention(cfg: dict, g: Callable[..., Any], where: str, layers: int) -> dict[str, Any]:
    """dots.llm1's attention is Qwen3's (its q/k norm is fixed: mobile.spec.hf_aliases), with sliding-window layers as
    layer_types says: by default, where sliding_window is set, those from max_window_layers on."""
    if g("attention_bias", False):
        raise SpecError("attention biases are not supported for dots1 (its o_proj would have one too)", where=where,
                        key="attention_bias")
    window = cfg.get("sliding_window", 4096)  # transformers' Dots1Config defaults
    types = cfg.get("layer_types")
    if types is None:
        first = cfg.get("max_window_layers", 62)
        types = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(layers)]
    sliding = sliding_layers(types, layers, where)
    if not sliding:
        return {}
    if not isinstance(window, int) or window < 1:
        raise SpecError(f"expected an integer >= 1 for the sliding layers, got {window!r}", where=where,
                        key="sliding_window")
    return {"sliding_layers": sliding, "sliding_window": window}


def checked_layer_types(types: Any, kinds: tuple[str, str], layers: int, where: str) -> list[str]:
    """A config's layer_types: a list of one of `kinds` a layer, or an error naming the key."""
    if not isinstance(types, list) or len(types) != layers:
        raise SpecError(f"expected a list of {layers} layer types (num_hidden_layers), got {types!r:.80}",
                        where=where, key="layer_types")
    for i, kind in enumerate(types):
        if kind not in kinds:
            raise SpecError(f"expected {kinds[0]!r} or {kinds[1]!r}, got {kind!r}", where=where,
                            key=f"layer_types[{i}]")
    return types


def sliding_layers(types: Any, layers: int, where: str) -> list[int]:
    """The sliding-window layers of a config's layer_types: one 'sliding_attention' or
    'full_attention' a layer."""
    types = checked_layer_types(types, ("sliding_attention", "full_attention"), layers, where)
    return [i for i, kind in enumerate(types) if kind == "sliding_attention"]


def gpt_oss(g: Callable[..., Any], where: str, layers: int, attention: dict, moe: dict) -> None:
    """gpt-oss: a router with a bias and a softmax over its top-k logits; experts with biases and
    the clamped SwiGLU; attention with q/k/v/o biases, sinks, and sliding-window layers."""
    # transformers' default when a config lists no layer_types: even layers slide, odd ones are full
    types = g("layer_types", ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    sliding = sliding_layers(types, layers, where)
    bias = bool(g("attention_bias", True))
    attention.update(qkv_bias=bias, o_bias=bias, sinks=True, sliding_layers=sliding,
                     sliding_window=g("sliding_window") if sliding else 0)
    moe.update(num_experts=g("num_local_experts"), intermediate_size=g("intermediate_size"),
               scoring="softmax_topk", norm_topk_prob=False, router_bias=True, expert_bias=True,
               # configs written before transformers made alpha a config field have none: 1.702 was fixed
               activation="clamped_swiglu", swiglu_alpha=float(g("swiglu_alpha", 1.702)),
               swiglu_limit=float(g("swiglu_limit")))


def minimax_m2(cfg: dict, g: Callable[..., Any], where: str, attention: dict, moe: dict) -> float:
    """MiniMax-M2 (M2.1, M2.5): Mixtral's experts; a sigmoid router whose choice adds the correction
    bias (no groups), its top-k weights renormalized and unscaled; q/k norm over all heads at once;
    partial rotary. Returns the partial rotary factor. Its config.json also carries MiniMax's own
    keys, which transformers' MiniMaxM2 reads none of: a value that would make MiniMax's own code
    run another model than transformers' (a shared expert, per-head q/k norm, linear-attention
    layers, a sliding window) is refused rather than ignored."""
    for key, want in (("scoring_func", "sigmoid"), ("use_routing_bias", True), ("use_qk_norm", True),
                      ("qk_norm_type", "per_layer"), ("shared_intermediate_size", 0), ("attention_bias", False),
                      ("routed_scaling_factor", 1.0), ("sliding_window", None)):
        if cfg.get(key, want) != want:
            raise SpecError(f"only {json.dumps(want)} is supported for minimax_m2 (as transformers runs it), "
                            f"got {json.dumps(cfg[key])}", where=where, key=key)
    kinds = cfg.get("attn_type_list")  # MiniMax-01's per-layer 0 (lightning, linear) or 1 (softmax)
    if kinds is not None and any(kind != 1 for kind in kinds):
        raise SpecError("only softmax-attention layers (1) are supported for minimax_m2, got "
                        f"{sorted(set(kinds))}", where=where, key="attn_type_list")
    head_dim = g("head_dim", 128)  # MiniMaxM2Config's default, not hidden_size // heads
    attention.update(head_dim=head_dim, qk_norm="full")
    moe.update(num_experts=g("num_local_experts"), intermediate_size=g("intermediate_size"), norm_topk_prob=True,
               scoring="sigmoid", correction_bias=True)
    # transformers' precedence: rope_parameters, then a top-level partial_rotary_factor, then the
    # published configs' rotary_dim (the rotated dims of each head)
    factor = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if factor is None:
        rotary_dim = cfg.get("rotary_dim")
        factor = 1.0 if rotary_dim is None else rotary_dim / head_dim
    return float(factor)
