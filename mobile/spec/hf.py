"""`mobile import-hf`: a Hugging Face config.json -> a spec (a plain dict, ready to dump as YAML).

Each supported model_type maps to a family (mobile.models.families); another is one line naming the
supported ones. A checkpoint quantized by `mobile quantize` records its expert format, and the spec
says so too.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from mobile import policy as policies
from mobile.errors import SpecError
from mobile.files import read_json
from mobile.models.families import TENSOR_NAMES
from mobile.models.weights import expert_format_of
from mobile.spec import hf_aliases, hf_families, hf_gemma4, hf_qwen3_next

# config.json's model_type -> family. Kimi-K2 is DeepSeek-V3's architecture under a name of its own
# (transformers reads and writes it as deepseek_v3)
MODEL_TYPES = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "olmoe": "olmoe",
               "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3", "kimi_k2": "deepseek_v3",
               "glm4_moe": "glm4_moe", "gpt_oss": "gpt_oss", "minimax_m2": "minimax_m2"}
# Model types that transformers runs with a family's modeling code (its models/auto/modeling_auto.py),
# or with parts of two (glm4_moe_lite: DeepSeek-V3's MLA and GLM-4.5's MoE): their config classes read
# some keys under other names or with other defaults (mobile.spec.hf_aliases). Sarvam-MoE's and
# Param2-MoE's checkpoints keep names of their own (mobile.models.families)
MODEL_TYPES.update({"glm4_moe_lite": "deepseek_v3", "sarvam_mla": "deepseek_v3", "sarvam_moe": "sarvam_moe",
                    "param2moe": "sarvam_moe", "dots1": "glm4_moe", "solar_open": "glm4_moe"})
# Gemma 4's MoE models (26B-A4B): gemma4 is the multimodal checkpoint, whose text model is gemma4_text
# under model.language_model. (its vision and audio towers are not read)
MODEL_TYPES.update({"gemma4": "gemma4", "gemma4_text": "gemma4"})
# Qwen3-Next and Qwen3.5-MoE (Qwen3.6 too): linear-attention layers between full-attention ones.
# qwen3_5_moe is the multimodal checkpoint, whose text model is qwen3_5_moe_text under
# model.language_model. (its vision tower is not read)
MODEL_TYPES.update({"qwen3_next": "qwen3_next", "qwen3_5_moe": "qwen3_5_moe", "qwen3_5_moe_text": "qwen3_5_moe"})
# the multimodal checkpoints, whose text model's tensors are under model.language_model.
MULTIMODAL = ("gemma4", "qwen3_5_moe")


def _rope(cfg: dict, where: str, interleaved: bool, default_theta: float = 10000.0) -> dict[str, Any]:
    # transformers 5 writes rope_parameters; older Hub configs have rope_theta + rope_scaling.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", default_theta))
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
    if family == "gemma4":
        cfg = hf_gemma4.gemma4_reads(model_type, cfg, where)
    elif family == "qwen3_5_moe":
        cfg = hf_qwen3_next.qwen3_5_reads(model_type, cfg, where)
    cfg = hf_aliases.as_transformers_reads(model_type, cfg, where)
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
        dense = hf_families.qwen2_dense_layers(g, where, num_layers)
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
        hf_families.shared_experts(moe, g)
        attention = hf_families.mla_attention(cfg, g, heads)
        interleaved = True
    elif family == "deepseek_v3":
        hf_families.refuse_v3_variants(cfg, g, where)
        by_type = hf_families.mlp_layer_types(cfg, where, num_layers) if model_type == "glm4_moe_lite" else None
        moe.update(hf_families.sigmoid_moe(g, num_layers, by_type))
        hf_families.shared_experts(moe, g)
        attention = hf_families.mla_attention(cfg, g, heads)
        interleaved = True
    elif family in ("glm4_moe", "sarvam_moe"):
        moe.update(hf_families.sigmoid_moe(g, num_layers))
        hf_families.shared_experts(moe, g)
        attention.update(qk_norm="per_head" if g("use_qk_norm", False) else "none",
                         qkv_bias=bool(g("attention_bias", False)))
        # transformers' Glm4MoeConfig rotates half of each head unless the config says otherwise
        partial_rotary = float((cfg.get("rope_parameters") or {}).get(
            "partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5)))
        if model_type == "dots1":
            attention.update(hf_families.dots1_attention(cfg, g, where, num_layers))
    elif family == "gpt_oss":
        hf_families.gpt_oss(g, where, num_layers, attention, moe)
    elif family == "minimax_m2":
        partial_rotary = hf_families.minimax_m2(cfg, g, where, attention, moe)
    elif family == "gemma4":
        hf_gemma4.gemma4(cfg, g, where, num_layers, model, attention, moe)
    elif family in ("qwen3_next", "qwen3_5_moe"):
        partial_rotary = hf_qwen3_next.qwen3_next(cfg, g, where, family, num_layers, model, attention, moe)
    # no dense MLP (no dense layers, and none beside the experts as Gemma 4's): a config's
    # intermediate_size is the experts' (or unused)
    if not moe.get("dense_layers") and not moe.get("parallel_mlp"):
        model["intermediate_size"] = 0
    model["attention"] = attention
    # transformers' MiniMaxM2Config's default_theta; the others' is 10000
    model["rope"] = _rope(cfg, where, interleaved, 5e6 if family == "minimax_m2" else 10000.0)
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
        "checkpoint": {"path": checkpoint_path, "tensor_names": _tensor_names(model_type, family)},
        "policy": {"name": policies.DEFAULT},
        "runtime": {"device": "cpu", **_expert_format(path, cfg)},
    }


def _tensor_names(model_type: str, family: str) -> dict[str, str]:
    """The family's tensor names; a multimodal checkpoint (Gemma 4, Qwen3.5) keeps its text model
    under model.language_model."""
    names = TENSOR_NAMES[family]
    if model_type in MULTIMODAL:
        return {k: v.replace("model.", "model.language_model.", 1) if v.startswith("model.") else v
                for k, v in names.items()}
    return names


def _expert_format(config: Path, cfg: dict) -> dict[str, Any]:
    """A checkpoint quantized by `mobile quantize` records its expert format; the spec says so too.
    An FP8 checkpoint's weights are dequantized as they load (mobile.models.fp8), its experts to
    the spec's format: native (the spec's dtype) unless the spec or a flag asks for int8 or int4,
    so its spec says native outright. A format mobile cannot read is refused here, by name."""
    quant = cfg.get("quantization_config")
    if not isinstance(quant, dict):
        return {}
    found = expert_format_of(quant, config)
    if found is None:
        return {"expert_format": "native"} if quant.get("quant_method") == "fp8" else {}
    return {"expert_format": found[0], "expert_group_size": found[1]}


def _clean_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip("-")
    return cleaned or "model"

