"""`mobile import-hf`: a Hugging Face config.json -> a spec (a plain dict, ready to dump as YAML).

Each supported model_type maps to a family (mobile.models.families); another is one line naming the
supported ones. A checkpoint quantized by `mobile quantize` records its expert format, and the spec
says so too.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mobile import policy as policies
from mobile.errors import SpecError
from mobile.files import read_json
from mobile.models.families import TENSOR_NAMES
from mobile.models.weights import expert_format_of

# config.json's model_type -> family. Kimi-K2 is DeepSeek-V3's architecture under a name of its own
# (transformers reads and writes it as deepseek_v3)
MODEL_TYPES = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "olmoe": "olmoe",
               "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3", "kimi_k2": "deepseek_v3",
               "glm4_moe": "glm4_moe", "gpt_oss": "gpt_oss"}



def _rope(cfg: dict, where: str, interleaved: bool) -> dict[str, Any]:
    # transformers 5 writes rope_parameters; older Hub configs have rope_theta + rope_scaling.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or scaling.get("rope_type") \
        or scaling.get("type") or "default"
    merged = {**scaling, **params}
    out: dict[str, Any] = {"theta": float(theta), "type": rope_type, "interleaved": interleaved}
    for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                "mscale_all_dim", "truncate"):
        if merged.get(key) is not None:
            out[key] = merged[key]
    return out


# Keys that transformers versions and Hub configs spell differently.
_ALIASES = {"num_experts": ("num_local_experts",), "num_local_experts": ("num_experts",)}


def _get(cfg: dict, key: str, where: str, default: Any = ...) -> Any:
    for k in (key, *_ALIASES.get(key, ())):
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    if default is ...:
        raise SpecError("config.json has no value for this key, which the family needs", where=where, key=key)
    return default


def spec_from_hf_config(config_dir: str | Path, name: str | None = None,
                        checkpoint_path: str | None = None) -> dict[str, Any]:
    """Read DIR/config.json and return a spec as a plain dict (ready to dump as YAML)."""
    config_dir = Path(config_dir)
    path = config_dir / "config.json" if config_dir.is_dir() else config_dir
    where = str(path)
    cfg = read_json(path, SpecError, missing="no config.json here")
    if not isinstance(cfg, dict):
        raise SpecError(f"expected a JSON object, got {type(cfg).__name__}", where=where)
    cfg = typing.cast(dict[str, Any], cfg)
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise SpecError(f"unsupported model_type {model_type!r} (supported: {', '.join(MODEL_TYPES)})",
                        where=where, key="model_type")
    family = MODEL_TYPES[model_type]
    g = lambda key, default=...: _get(cfg, key, where, default)  # noqa: E731

    hidden, heads = g("hidden_size"), g("num_attention_heads")
    num_layers = g("num_hidden_layers")
    model: dict[str, Any] = {
        "family": family,
        "vocab_size": g("vocab_size"),
        "hidden_size": hidden,
        "num_layers": num_layers,
        "intermediate_size": g("intermediate_size", 0),
        "max_position_embeddings": g("max_position_embeddings", 4096),
        "tie_word_embeddings": bool(g("tie_word_embeddings", False)),
        "hidden_act": g("hidden_act", "silu"),
        "norm_eps": float(g("rms_norm_eps", 1e-6)),
    }
    attention: dict[str, Any] = {
        "kind": "gqa",
        "num_heads": heads,
        "num_kv_heads": g("num_key_value_heads", heads),
        "head_dim": g("head_dim", hidden // heads),
    }
    moe: dict[str, Any] = {"top_k": g("num_experts_per_tok")}
    interleaved, partial_rotary = False, 1.0

    if family == "mixtral":
        moe.update(num_experts=g("num_local_experts"), intermediate_size=g("intermediate_size"),
                   norm_topk_prob=True)
    elif family == "olmoe":
        moe.update(num_experts=g("num_experts"), intermediate_size=g("intermediate_size"),
                   norm_topk_prob=bool(g("norm_topk_prob", False)))
        attention.update(qk_norm="full", qkv_bias=bool(g("attention_bias", False)))
        if cfg.get("clip_qkv") is not None:
            attention["clip_qkv"] = float(cfg["clip_qkv"])
    elif family in ("qwen2_moe", "qwen3_moe"):
        step = g("decoder_sparse_step", 1)
        mlp_only = list(g("mlp_only_layers", []))
        dense = [i for i in range(num_layers) if i in mlp_only or (i + 1) % step != 0]
        moe.update(num_experts=g("num_experts"), intermediate_size=g("moe_intermediate_size"),
                   norm_topk_prob=bool(g("norm_topk_prob", False)), dense_layers=dense)
        if family == "qwen2_moe":
            attention["qkv_bias"] = bool(g("qkv_bias", True))
            shared = g("shared_expert_intermediate_size", 0)
            if shared:
                moe["shared_expert"] = {"intermediate_size": shared, "gate": "sigmoid"}
        else:
            attention.update(qk_norm="per_head", qkv_bias=bool(g("attention_bias", False)))
        if g("use_sliding_window", False):
            raise SpecError("sliding-window attention is not supported yet", where=where,
                            key="use_sliding_window")
    elif family == "deepseek_v2":
        if g("topk_method", "greedy") != "greedy":
            raise SpecError(f"only topk_method 'greedy' is supported, got {cfg['topk_method']!r}",
                            where=where, key="topk_method")
        first_dense = g("first_k_dense_replace", 0)
        freq = g("moe_layer_freq", 1)
        dense = [i for i in range(num_layers) if i < first_dense or i % freq != 0]
        moe.update(num_experts=g("n_routed_experts"), intermediate_size=g("moe_intermediate_size"),
                   # transformers' DeepseekV2 router never renormalizes the top-k weights
                   norm_topk_prob=False,
                   routed_scaling_factor=float(g("routed_scaling_factor", 1.0)), dense_layers=dense)
        _shared_experts(moe, g)
        attention = _mla_attention(cfg, g, heads)
        interleaved = True
    elif family == "deepseek_v3":
        _refuse_v3_variants(cfg, g, where)
        moe.update(_sigmoid_moe(g, num_layers))
        _shared_experts(moe, g)
        attention = _mla_attention(cfg, g, heads)
        interleaved = True
    elif family == "glm4_moe":
        moe.update(_sigmoid_moe(g, num_layers))
        _shared_experts(moe, g)
        attention.update(qk_norm="per_head" if g("use_qk_norm", False) else "none",
                         qkv_bias=bool(g("attention_bias", False)))
        # transformers' Glm4MoeConfig rotates half of each head unless the config says otherwise
        partial_rotary = float((cfg.get("rope_parameters") or {}).get(
            "partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5)))
    elif family == "gpt_oss":
        _gpt_oss(g, where, num_layers, attention, moe)
    if not moe.get("dense_layers"):  # no dense MLP layers: a config's intermediate_size is the experts' (or unused)
        model["intermediate_size"] = 0
    model["attention"] = attention
    model["rope"] = _rope(cfg, where, interleaved)
    if partial_rotary != 1:
        model["rope"]["partial_rotary_factor"] = partial_rotary
    model["moe"] = moe

    dtype = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(
        str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"), "bfloat16")
    default_name = (cfg.get("_name_or_path") or config_dir.resolve().name or family).split("/")[-1]
    return {
        "name": _clean_name(name or default_name),
        "model": model,
        "dtype": dtype,
        "checkpoint": {"path": checkpoint_path, "tensor_names": TENSOR_NAMES[family]},
        "policy": {"name": policies.DEFAULT},
        "runtime": {"device": "cpu", **_expert_format(path, cfg)},
    }


def _mla_attention(cfg: dict, g: Callable[..., Any], heads: int) -> dict[str, Any]:
    """DeepSeek's multi-head latent attention (V2 and V3)."""
    return {
        "kind": "mla", "num_heads": heads, "num_kv_heads": g("num_key_value_heads", heads),
        "head_dim": g("qk_nope_head_dim") + g("qk_rope_head_dim"),
        "q_lora_rank": cfg.get("q_lora_rank"), "kv_lora_rank": g("kv_lora_rank"),
        "qk_nope_head_dim": g("qk_nope_head_dim"), "qk_rope_head_dim": g("qk_rope_head_dim"),
        "v_head_dim": g("v_head_dim"),
    }


def _shared_experts(moe: dict[str, Any], g: Callable[..., Any]) -> None:
    """DeepSeek's and GLM's n_shared_experts, as one expert n times as wide (transformers builds it so)."""
    shared = g("n_shared_experts", 0) or 0
    if shared:
        moe["shared_expert"] = {"intermediate_size": shared * g("moe_intermediate_size")}


def _sigmoid_moe(g: Callable[..., Any], num_layers: int) -> dict[str, Any]:
    """DeepSeek-V3's router (GLM-4.5's too): sigmoid scores, chosen with the correction bias within
    the best groups, then renormalized and scaled as the config says; the first
    first_k_dense_replace layers are dense. Every routing key is required: the config classes'
    defaults differ by family, so a missing one is not guessed."""
    return {"num_experts": g("n_routed_experts"), "intermediate_size": g("moe_intermediate_size"),
            "norm_topk_prob": bool(g("norm_topk_prob")), "routed_scaling_factor": float(g("routed_scaling_factor")),
            "scoring": "sigmoid", "correction_bias": True, "n_group": g("n_group"), "topk_group": g("topk_group"),
            "dense_layers": list(range(min(g("first_k_dense_replace"), num_layers)))}


def _refuse_v3_variants(cfg: dict, g: Callable[..., Any], where: str) -> None:
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


def _gpt_oss(g: Callable[..., Any], where: str, layers: int, attention: dict, moe: dict) -> None:
    """gpt-oss: a router with a bias and a softmax over its top-k logits; experts with biases and
    the clamped SwiGLU; attention with q/k/v/o biases, sinks, and sliding-window layers."""
    # transformers' default when a config lists no layer_types: even layers slide, odd ones are full
    types = g("layer_types", ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    if not isinstance(types, list) or len(types) != layers:
        raise SpecError(f"expected a list of {layers} layer types (num_hidden_layers), got {types!r:.80}",
                        where=where, key="layer_types")
    for i, kind in enumerate(types):
        if kind not in ("sliding_attention", "full_attention"):
            raise SpecError(f"expected 'sliding_attention' or 'full_attention', got {kind!r}", where=where,
                            key=f"layer_types[{i}]")
    sliding = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    bias = bool(g("attention_bias", True))
    attention.update(qkv_bias=bias, o_bias=bias, sinks=True, sliding_layers=sliding,
                     sliding_window=g("sliding_window") if sliding else 0)
    moe.update(num_experts=g("num_local_experts"), intermediate_size=g("intermediate_size"),
               scoring="softmax_topk", norm_topk_prob=False, router_bias=True, expert_bias=True,
               # configs written before transformers made alpha a config field have none: 1.702 was fixed
               activation="clamped_swiglu", swiglu_alpha=float(g("swiglu_alpha", 1.702)),
               swiglu_limit=float(g("swiglu_limit")))


def _expert_format(config: Path, cfg: dict) -> dict[str, Any]:
    """A checkpoint quantized by `mobile quantize` records its expert format; the spec says so too.
    An FP8 checkpoint's shapes are the model's: its spec imports and compiles weight-free, and
    loading its weights is refused there (mobile.models.weights.expert_format_of)."""
    quant = cfg.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") == "fp8":
        return {}
    found = expert_format_of(quant, config)
    return {} if found is None else {"expert_format": found[0], "expert_group_size": found[1]}


def _clean_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip("-")
    return cleaned or "model"

