"""Tiny checkpoints of each supported family, built with transformers' own config classes and
saved with save_pretrained (the Hub layout: per-expert tensors in safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "deepseek_v2", "qwen3_moe")

_COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)


def config_for(family: str, **overrides):
    import transformers as tf

    if family == "mixtral":
        cfg = tf.MixtralConfig(**_COMMON, intermediate_size=24, num_local_experts=6, num_experts_per_tok=3)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**_COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=4,
                             norm_topk_prob=False)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**_COMMON, intermediate_size=40, moe_intermediate_size=16, num_experts=8,
                                num_experts_per_tok=4, shared_expert_intermediate_size=24, norm_topk_prob=False,
                                mlp_only_layers=[1])
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**_COMMON, intermediate_size=40, moe_intermediate_size=16, num_experts=8,
                                num_experts_per_tok=4, norm_topk_prob=True, head_dim=8)
    elif family == "deepseek_v2":
        # MLA expands every head's k/v from the latent: real configs set kv heads = heads
        cfg = tf.DeepseekV2Config(**{**_COMMON, "num_key_value_heads": 4}, intermediate_size=40,
                                  moe_intermediate_size=16, n_routed_experts=8,
                                  num_experts_per_tok=4, n_shared_experts=2, first_k_dense_replace=1,
                                  kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=8, routed_scaling_factor=2.5, topk_method="greedy")
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def model_class(family: str):
    import transformers as tf

    return {"mixtral": tf.MixtralForCausalLM, "olmoe": tf.OlmoeForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM,
            "qwen3_moe": tf.Qwen3MoeForCausalLM, "deepseek_v2": tf.DeepseekV2ForCausalLM}[family]


def build_tiny(family: str, out: Path, seed: int = 0, **overrides):
    """Save a randomly initialised tiny model of `family` to `out`; returns the transformers model."""
    torch.manual_seed(seed)
    cfg = config_for(family, **overrides)
    model = model_class(family)(cfg).eval()
    # default init leaves routers near-uniform; spread them so routing is decisive and varied
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.dim() == 2 and p.shape[0] > 1:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return model


def save_char_tokenizer(out: Path) -> None:
    """A character-level tokenizer (75 ids, fits the tiny vocab of 97), saved transformers-style."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in string.ascii_lowercase + string.ascii_uppercase + " .,;:!?'\n" + string.digits:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(out)


# -- DeepSeek-V3 (and Kimi-K2) and GLM-4.5: sigmoid routers with a correction bias ----------------

# Each variant covers what the others do not: MLA with and without q_lora_rank, group-limited
# top-k and plain top-k, renormalized and raw weights, yarn rope, partial rotary with and without
# q/k norm, dense first layers and none. Kimi-K2's config.json says model_type kimi_k2.
SIGMOID_VARIANTS = ("deepseek_v3", "kimi_k2", "glm4_moe", "glm4_moe_air")
# GLM-4.7-Flash (MLA, GLM's router, dense layers by mlp_layer_types) and the model types transformers
# runs with those families' code (tests/test_families_glm_lite.py); glm4_moe_lite_mixed: dense layers
# not a prefix, groups, no q_lora_rank, raw weights
ALIAS_VARIANTS = ("glm4_moe_lite", "glm4_moe_lite_mixed", "sarvam_mla", "sarvam_moe", "param2moe", "dots1",
                  "solar_open")
_SIGMOID_MOE = dict(intermediate_size=40, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4)
_MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8)


def sigmoid_config_for(variant: str, **overrides):
    import transformers as tf

    if variant == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**{**_COMMON, "num_key_value_heads": 4}, **_SIGMOID_MOE, n_shared_experts=1,
                                  first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=12, qk_rope_head_dim=8,
                                  qk_nope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2, norm_topk_prob=True,
                                  routed_scaling_factor=2.5)
    elif variant == "kimi_k2":
        # Kimi-K2's yarn (its beta_fast 1, mscale 1) at a tiny original context, so that it is active;
        # rms_norm_eps 1e-5, which MLA's latent norms do not take
        rope = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0, "original_max_position_embeddings": 16,
                "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
        cfg = tf.DeepseekV3Config(**{**_COMMON, "num_key_value_heads": 4}, **_SIGMOID_MOE, n_shared_experts=2,
                                  first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                  qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1, norm_topk_prob=False,
                                  routed_scaling_factor=2.827, rope_parameters=rope, rms_norm_eps=1e-5)
    elif variant == "glm4_moe":
        cfg = tf.Glm4MoeConfig(**_COMMON, **_SIGMOID_MOE, head_dim=16, n_shared_experts=1, first_k_dense_replace=1,
                               n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.5,
                               use_qk_norm=True, attention_bias=True)
    elif variant == "glm4_moe_air":  # GLM-4.5-Air's choices: no q/k norm, one group, no scaling
        cfg = tf.Glm4MoeConfig(**_COMMON, **_SIGMOID_MOE, head_dim=16, n_shared_experts=1, first_k_dense_replace=0,
                               n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
                               use_qk_norm=False, attention_bias=True)
    elif variant == "glm4_moe_lite":  # GLM-4.7-Flash's choices; v_head_dim unlike the q/k heads, as there
        cfg = tf.Glm4MoeLiteConfig(**{**_COMMON, "num_key_value_heads": 4}, **_SIGMOID_MOE, **_MLA, q_lora_rank=12,
                                   v_head_dim=12, n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
                                   routed_scaling_factor=1.8, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 1e6})
    elif variant == "glm4_moe_lite_mixed":
        cfg = tf.Glm4MoeLiteConfig(**{**_COMMON, "num_key_value_heads": 4}, **_SIGMOID_MOE, **_MLA, q_lora_rank=None,
                                   v_head_dim=8, n_shared_experts=2, n_group=4, topk_group=2, norm_topk_prob=False,
                                   routed_scaling_factor=2.0, mlp_layer_types=["sparse", "dense", "sparse"])
    elif variant == "sarvam_mla":
        cfg = tf.SarvamMLAConfig(**{**_COMMON, "num_key_value_heads": 4}, **_SIGMOID_MOE, **_MLA, v_head_dim=8,
                                 n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2)
    elif variant == "sarvam_moe":  # Ling's checkpoint names: one q/k/v tensor, with its bias here
        cfg = tf.SarvamMoEConfig(**_COMMON, **_SIGMOID_MOE, head_dim=16, n_shared_experts=1, first_k_dense_replace=1,
                                 n_group=4, topk_group=2, attention_bias=True)
    elif variant == "param2moe":  # its own default: tied embeddings
        cfg = tf.Param2MoeConfig(**{**_COMMON, "tie_word_embeddings": True}, **_SIGMOID_MOE, head_dim=8,
                                 n_shared_experts=2, first_k_dense_replace=1)
    elif variant == "dots1":  # Qwen3's attention, with a sliding layer whose window (5) the prompts pass
        cfg = tf.Dots1Config(**_COMMON, **_SIGMOID_MOE, head_dim=16, n_shared_experts=1, first_k_dense_replace=1,
                             n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=2.5,
                             sliding_window=5, layer_types=["full_attention", "sliding_attention", "full_attention"])
    elif variant == "solar_open":  # Llama's attention (q/k/v biases, none on o_proj) and MoE in every layer
        cfg = tf.SolarOpenConfig(**_COMMON, **{k: v for k, v in _SIGMOID_MOE.items() if k != "intermediate_size"},
                                 head_dim=16, attention_bias=True, n_group=4, topk_group=2, routed_scaling_factor=2.0)
    else:
        raise ValueError(variant)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_tiny_sigmoid(variant: str, out: Path, seed: int = 0, **overrides):
    """Save a tiny model of a SIGMOID_VARIANTS or ALIAS_VARIANTS variant to `out`, with every tensor
    that init leaves at zero or one filled with random values (a zero bias tests nothing); returns
    the model."""
    import json

    import transformers as tf

    torch.manual_seed(seed)
    cfg = sigmoid_config_for(variant, **overrides)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("mlp.gate.weight"):
                t.normal_(0, 0.5)  # decisive routing
            elif name.endswith("e_score_correction_bias"):
                t.normal_(0, 0.5)  # the size of the scores' spread: it reorders the choice
            elif name.endswith(".bias"):
                t.normal_(0, 0.5)
            elif "norm" in name and t.dim() == 1:
                t.add_(torch.randn_like(t) * 0.2)
            elif "mlp.experts." in name:
                t.normal_(0, 0.1)  # experts large enough that choosing others shows in the logits
            elif variant in ALIAS_VARIANTS and t.dim() == 2:
                t.normal_(0, 0.4)  # varied greedy tokens: init's 0.02 (Sarvam's 0.006) settles on one or two
    model.save_pretrained(out)
    if variant == "kimi_k2":  # transformers writes deepseek_v3; Kimi-K2's own config.json says kimi_k2
        path = out / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "model_type": "kimi_k2"}, indent=2))
    return model


# -- gpt-oss (its own builder: its experts are fused tensors, its zero-init tensors many) -------

GPT_OSS_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def gpt_oss_config(**overrides):
    """A tiny GptOssConfig: sliding and full layers with a window (5) shorter than the tests' prompts,
    I = H = 32 (MXFP4 blocks hold 32 input values), a swiglu_limit that the scaled expert weights
    (build_tiny_gpt_oss) cross, and the family's YaRN rope (truncate false)."""
    import transformers as tf

    cfg = tf.GptOssConfig(**{**_COMMON, "num_hidden_layers": 3}, head_dim=8, intermediate_size=32,
                          num_local_experts=6, num_experts_per_tok=3, sliding_window=5,
                          layer_types=GPT_OSS_LAYER_TYPES, swiglu_limit=1.5)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_tiny_gpt_oss(out: Path, seed: int = 0, **overrides):
    """Save a tiny GptOssForCausalLM to `out`; returns the model. Every tensor that init leaves at
    zero (or near it) is random: attention and expert biases, the router's bias, the sinks. Attention
    and expert weights are larger than init's, so that greedy decoding does not settle on one token."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.GptOssForCausalLM(gpt_oss_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.normal_(0, 0.5)
            elif name.endswith("router.weight"):
                p.normal_(0, 0.5)  # decisive, varied routing
            elif name.endswith("experts.gate_up_proj"):
                p.normal_(0, 0.4)  # gate and up values cross swiglu_limit
            elif name.endswith("experts.down_proj"):
                p.normal_(0, 0.3)
            elif "self_attn" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    return model
