"""`mobile import-hf` of Qwen3-Next and Qwen3.5-MoE (qwen3_next, qwen3_5_moe_text, qwen3_5_moe): the
layer types, the linear-attention shapes, the gated attention, partial rope and the MoE block; the
configs it refuses, by key; the spec checks of the layer types; and the memory plan, which counts
the linear layers' weights, their recurrent state and the full-attention layers' KV cache."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import run_cli
from test_families_v3 import import_error

from mobile.compiler.compile import memory_lines, memory_plan, memory_problems
from mobile.compiler.costs import (
    attention_params,
    kept_state_copies,
    kv_bytes_per_position,
    linear_attention_params,
    recurrent_state_bytes,
)
from mobile.compiler.emit import human_bytes
from mobile.errors import SpecError
from mobile.models.weights import TORCH_DTYPES
from mobile.runtime.kv import position_shapes
from mobile.spec.hf import spec_from_hf_config
from mobile.spec.load import load_spec, spec_from_dict, with_policy

LINEAR, FULL = "linear_attention", "full_attention"

# a small Qwen3-Next config.json in the published file's layout: full_attention_interval (no
# layer_types), partial_rotary_factor and rope_theta top-level
NEXT = {
    "model_type": "qwen3_next", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 6,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 96,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 8,
    "linear_conv_kernel_dim": 4, "full_attention_interval": 3, "num_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "partial_rotary_factor": 0.25, "rope_theta": 10000000,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "mtp_num_hidden_layers": 1,
}
# a small Qwen3.5-MoE text model in its published layout: layer_types listed, the rope's multimodal
# sections beside its partial rotary factor
QWEN35_TEXT = {
    "model_type": "qwen3_5_moe_text", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "attn_output_gate": True,
    "layer_types": [LINEAR, LINEAR, LINEAR, FULL], "full_attention_interval": 4,
    "linear_num_key_heads": 2, "linear_num_value_heads": 8, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4, "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 8192,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False, "dtype": "bfloat16",
}
# the multimodal checkpoint: the text model under text_config, the wrapper's own tie_word_embeddings
QWEN35 = {"model_type": "qwen3_5_moe", "text_config": QWEN35_TEXT, "tie_word_embeddings": True,
          "vision_config": {"depth": 27, "hidden_size": 1152, "model_type": "qwen3_5_moe"}}


def imported(tmp_path, cfg: dict):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return spec_from_dict(spec_from_hf_config(tmp_path))


def test_qwen3_next_import(tmp_path):
    spec = imported(tmp_path, NEXT)
    m, a, la, moe = spec.model, spec.model.attention, spec.model.linear_attention, spec.model.moe
    assert m.family == "qwen3_next" and m.zero_centered_norms and m.hidden_act == "silu" and m.norm_eps == 1e-6
    # full_attention_interval 3: two linear layers, then a full one (transformers' pattern)
    assert m.layer_types == [LINEAR, LINEAR, FULL, LINEAR, LINEAR, FULL] and spec.linear_layers == [0, 1, 3, 4]
    assert (la.kind, la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim, la.conv_kernel) == \
        ("gated_deltanet", 2, 4, 16, 8, 4)
    assert (a.kind, a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.qkv_bias, a.output_gate) == \
        ("gqa", 4, 2, 32, "per_head", False, True)
    assert (m.rope.theta, m.rope.partial_rotary_factor, m.rope.interleaved) == (1e7, 0.25, False)
    assert (moe.num_experts, moe.top_k, moe.intermediate_size, moe.norm_topk_prob, moe.dense_layers) == \
        (8, 2, 32, True, [])
    assert (moe.shared_expert.intermediate_size, moe.shared_expert.gate) == (48, "sigmoid")
    assert m.intermediate_size == 0  # every layer MoE: the config's intermediate_size is unused
    assert spec.checkpoint.tensor_names["la_qkvz"] == "model.layers.{layer}.linear_attn.in_proj_qkvz.weight"


def test_qwen3_next_dense_layers_and_defaults(tmp_path):
    """Dense layers as Qwen2-MoE's (mlp_only_layers, decoder_sparse_step), the model's
    intermediate_size kept for them; transformers' defaults where the config leaves a key out."""
    cfg = {k: v for k, v in NEXT.items() if k not in ("full_attention_interval", "partial_rotary_factor", "head_dim",
                                                       "norm_topk_prob")}
    spec = imported(tmp_path, {**cfg, "num_hidden_layers": 8, "mlp_only_layers": [0], "decoder_sparse_step": 2})
    m = spec.model
    assert m.moe.dense_layers == [0, 2, 4, 6] and m.intermediate_size == 96
    assert m.layer_types == [LINEAR, LINEAR, LINEAR, FULL] * 2  # full_attention_interval 4
    assert m.rope.partial_rotary_factor == 0.25 and m.attention.head_dim == 256 and m.moe.norm_topk_prob
    no_gate = imported(tmp_path, {**NEXT, "norm_topk_prob": False})
    assert not no_gate.model.moe.norm_topk_prob


@pytest.mark.parametrize("cfg", [QWEN35_TEXT, QWEN35], ids=["qwen3_5_moe_text", "qwen3_5_moe"])
def test_qwen3_5_import(tmp_path, cfg):
    spec = imported(tmp_path, cfg)
    m, la, moe = spec.model, spec.model.linear_attention, spec.model.moe
    assert m.family == "qwen3_5_moe" and m.zero_centered_norms and m.layer_types == QWEN35_TEXT["layer_types"]
    assert (la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim) == (2, 8, 16, 16)
    assert m.attention.output_gate and m.attention.num_kv_heads == 1
    # the rope's multimodal sections are read as the plain rope (text positions are one stream)
    assert (m.rope.type, m.rope.theta, m.rope.partial_rotary_factor) == ("default", 1e7, 0.25)
    assert (moe.num_experts, moe.top_k, moe.norm_topk_prob, moe.dense_layers) == (16, 4, True, [])
    assert moe.shared_expert.gate == "sigmoid" and m.intermediate_size == 0
    names = spec.checkpoint.tensor_names
    prefix = "model.language_model." if cfg is QWEN35 else "model."
    assert names["la_qkv"] == prefix + "layers.{layer}.linear_attn.in_proj_qkv.weight"
    assert names["embed"] == prefix + "embed_tokens.weight" and names["lm_head"] == "lm_head.weight"
    assert m.tie_word_embeddings == (cfg is QWEN35)  # the wrapper's key


TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=16, linear_conv_kernel_dim=3, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, shared_expert_intermediate_size=32,
            layer_types=[LINEAR, FULL, LINEAR, LINEAR, FULL, FULL])


def saved_configs():
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeTextConfig, Qwen3NextConfig

    return {"qwen3_next": Qwen3NextConfig(**TINY), "qwen3_5_moe_text": Qwen3_5MoeTextConfig(**TINY),
            "qwen3_5_moe": Qwen3_5MoeConfig(text_config=dict(TINY))}


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5_moe_text", "qwen3_5_moe"])
def test_import_of_what_transformers_saves(tmp_path, model_type):
    """A config transformers' own class writes (save_pretrained) imports as that class reads it."""
    config = saved_configs()[model_type]
    config.save_pretrained(tmp_path)
    text = config.get_text_config()
    spec = spec_from_dict(spec_from_hf_config(tmp_path))
    m, la, a = spec.model, spec.model.linear_attention, spec.model.attention
    assert m.family == ("qwen3_next" if model_type == "qwen3_next" else "qwen3_5_moe")
    assert m.layer_types == text.layer_types == TINY["layer_types"]
    assert (la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim, la.conv_kernel) == (
        text.linear_num_key_heads, text.linear_num_value_heads, text.linear_key_head_dim, text.linear_value_head_dim,
        text.linear_conv_kernel_dim)
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.output_gate) == (4, 2, text.head_dim, True)
    assert m.rope.partial_rotary_factor == text.rope_parameters["partial_rotary_factor"] == 0.25
    assert m.rope.theta == text.rope_parameters["rope_theta"]
    assert (m.moe.num_experts, m.moe.top_k, m.moe.norm_topk_prob) == (8, 2, True)
    assert m.tie_word_embeddings == config.tie_word_embeddings
    prefix = "model.language_model." if model_type == "qwen3_5_moe" else "model."
    assert spec.checkpoint.tensor_names["la_out"] == prefix + "layers.{layer}.linear_attn.out_proj.weight"


# -- refusals ------------------------------------------------------------------------------------


def without(cfg: dict, key: str) -> dict:
    return {k: v for k, v in cfg.items() if k != key}


@pytest.mark.parametrize("cfg, expected", [
    ({**NEXT, "layer_types": [LINEAR, FULL, "mamba", LINEAR, LINEAR, FULL]},
     "layer_types[2]: expected 'linear_attention' or 'full_attention', got 'mamba'"),
    ({**NEXT, "layer_types": [LINEAR, FULL]}, "layer_types: expected a list of 6 layer types (num_hidden_layers)"),
    ({**NEXT, "full_attention_interval": 0}, "full_attention_interval: expected an integer >= 1, got 0"),
    (without(NEXT, "linear_key_head_dim"), "linear_key_head_dim: config.json has no value for this key"),
    (without(NEXT, "linear_num_value_heads"), "linear_num_value_heads: config.json has no value for this key"),
    (without(NEXT, "shared_expert_intermediate_size"), "shared_expert_intermediate_size: config.json has no value"),
    ({**NEXT, "use_sliding_window": True}, "use_sliding_window: sliding-window attention is not supported"),
    ({**NEXT, "attn_output_gate": False}, "attn_output_gate: only true is supported: transformers' qwen3_next always "
     "gates the attention's output (got false)"),
    ({**NEXT, "decoder_sparse_step": 0}, "decoder_sparse_step: expected an integer >= 1, got 0"),
    ({**NEXT, "linear_num_value_heads": 3}, "model.linear_attention.num_value_heads: expected a multiple of "
     "num_key_heads=2"),
    ({**QWEN35_TEXT, "layer_types": [LINEAR, LINEAR, "sliding_attention", FULL]},
     "layer_types[2]: expected 'linear_attention' or 'full_attention', got 'sliding_attention'"),
    ({**QWEN35_TEXT, "norm_topk_prob": False}, "norm_topk_prob: only true is supported: transformers' qwen3_5_moe "
     "router always renormalizes"),
    ({**QWEN35_TEXT, "mlp_only_layers": [1]}, "mlp_only_layers: only [] is supported: transformers' qwen3_5_moe runs "
     "experts in every layer (got [1])"),
    ({**QWEN35, "text_config": None}, "text_config: expected the text model's config (a JSON object)"),
    ({**QWEN35, "text_config": without(QWEN35_TEXT, "linear_conv_kernel_dim")},
     "linear_conv_kernel_dim: config.json has no value for this key"),
])
def test_bad_configs_are_one_line_naming_the_key(tmp_path, capsys, cfg, expected):
    assert expected in import_error(tmp_path, capsys, cfg)


def test_linear_keys_are_required_only_with_linear_layers(tmp_path):
    cfg = {k: v for k, v in NEXT.items() if not k.startswith("linear_")}
    spec = imported(tmp_path, {**cfg, "full_attention_interval": 1})  # every layer full attention
    assert spec.model.layer_types == [FULL] * 6 and not spec.linear_layers


# -- spec checks ---------------------------------------------------------------------------------

QWEN36 = "specs/qwen3.6-35b-a3b.yaml"


def variant(tmp_path, edit, start: str = QWEN36):
    data = yaml.safe_load(open(start))
    edit(data)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("edit, key, expected", [
    (lambda d: d["model"]["layer_types"].pop(), "model.layer_types",
     "expected one layer type per layer (model.num_layers=40), got 39"),
    (lambda d: d["model"]["layer_types"].__setitem__(0, "mamba"), "model.layer_types[0]",
     "expected one of 'full_attention', 'linear_attention'"),
    (lambda d: d["model"].update(family="qwen3_moe"), "model.layer_types",
     "linear_attention layers need family qwen3_next or qwen3_5_moe, got qwen3_moe"),
    (lambda d: d["model"]["linear_attention"].update(key_head_dim=0), "model.linear_attention.key_head_dim",
     "expected an integer >= 1, got 0"),
    (lambda d: d["model"]["linear_attention"].update(num_key_heads=0), "model.linear_attention.num_key_heads",
     "expected an integer >= 1, got 0"),
    (lambda d: d["model"]["linear_attention"].update(num_value_heads=24), "model.linear_attention.num_value_heads",
     "expected a multiple of num_key_heads=16"),
    (lambda d: d["model"]["linear_attention"].update(conv_kernel=1), "model.linear_attention.conv_kernel",
     "expected an integer >= 2"),
    (lambda d: d["model"]["linear_attention"].update(chunk_size=0), "model.linear_attention.chunk_size",
     "expected an integer >= 1, got 0"),
])
def test_spec_errors_name_the_key(tmp_path, edit, key, expected):
    with pytest.raises(SpecError) as info:
        load_spec(variant(tmp_path, edit))
    assert info.value.key == key and expected in info.value.message


def test_output_gate_and_linear_layers_need_gqa(tmp_path):
    v3 = "specs/deepseek-v3.yaml"
    with pytest.raises(SpecError, match="expected false for mla attention") as info:
        load_spec(variant(tmp_path, lambda d: d["model"]["attention"].update(output_gate=True), v3))
    assert info.value.key == "model.attention.output_gate"
    layers = yaml.safe_load(open(v3))["model"]["num_layers"]
    with pytest.raises(SpecError) as info:
        load_spec(variant(tmp_path, lambda d: d["model"].update(family="qwen3_next", layer_types=[LINEAR] * layers),
                          v3))
    assert info.value.key == "model.layer_types" and "need model.attention.kind gqa" in info.value.message


def test_layer_types_length_mismatch_is_one_line_via_the_cli(tmp_path, capsys):
    path = variant(tmp_path, lambda d: d["model"]["layer_types"].pop())
    assert run_cli("compile", path, "-o", tmp_path / "g") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "model.layer_types: expected one layer type per layer (model.num_layers=40), got 39" in err


# -- memory plan ---------------------------------------------------------------------------------


def test_attention_weights_count_the_output_gate():
    spec = load_spec(QWEN36)
    h, a = spec.model.hidden_size, spec.model.attention
    q, kv, o = h * a.num_heads * a.head_dim * 2, 2 * h * a.num_kv_heads * a.head_dim, a.num_heads * a.head_dim * h
    assert attention_params(spec, 3) == q + kv + o  # q rows 2 * n * d: each head's query and its gate


def test_memory_plan_counts_linear_layers_state_and_kv():
    spec = load_spec(QWEN36)
    m, mp = spec.model, memory_plan(spec)
    assert len(spec.linear_layers) == 30 and spec.runtime.max_seq_len == 32768
    # the non-expert weights: each linear layer's Gated DeltaNet, each full layer's gated attention
    mixers = 30 * linear_attention_params(spec) + 10 * attention_params(spec, 3)
    h, moe = m.hidden_size, m.moe
    rest = m.vocab_size * h * 2 + 40 * (3 * h * moe.shared_expert.intermediate_size + 2 * h)
    assert mp.non_expert == (mixers + rest) * 2 + 40 * moe.num_experts * h * 4
    # the KV cache: the 10 full-attention layers only, at runtime.max_seq_len
    assert kv_bytes_per_position(spec) == 10 * 2 * 2 * 256 * 2 and mp.kv == kv_bytes_per_position(spec) * 32768
    assert kept_state_copies(spec) == 0 and mp.state == recurrent_state_bytes(spec)
    assert mp.device == mp.weights + mp.state + mp.kv
    line = next(ln for ln in memory_lines(spec) if ln.startswith("KV cache"))
    assert f"recurrent state {human_bytes(recurrent_state_bytes(spec))} over 30 linear-attention layers" in line
    assert "20.0KiB a position over 10 full-attention layers x 32768 positions (runtime.max_seq_len) = 640.0MiB" in line
    device = memory_lines(spec)[-1]
    assert device.startswith(f"device memory: {human_bytes(mp.device)} = {human_bytes(mp.weights)} of weights + "
                             f"{human_bytes(mp.state + mp.kv)} of KV cache and recurrent state")


def test_memory_plan_counts_the_kept_state_copies():
    """A policy that may fall back keeps copies of the state to restore (policy.kv_refresh + 1)."""
    spec = with_policy(load_spec(QWEN36), tau=0.5, kv_refresh=2)
    one = recurrent_state_bytes(spec)
    assert kept_state_copies(spec) == 3 and memory_plan(spec).state == 4 * one
    line = next(ln for ln in memory_lines(spec) if ln.startswith("KV cache"))
    assert f"recurrent state {human_bytes(one)} over 30 linear-attention layers x 4 (the live copy and 3 kept" in line
    assert line.endswith(f"= {human_bytes(4 * one)}")


def test_without_max_seq_len_the_kv_cache_is_per_position(tmp_path):
    spec = load_spec(variant(tmp_path, lambda d: d["runtime"].pop("max_seq_len")))
    mp = memory_plan(spec)
    assert mp.kv == 0 and mp.device == mp.weights + recurrent_state_bytes(spec)
    lines = memory_lines(spec)
    assert any("runtime.max_seq_len not set: counted per position" in ln for ln in lines)
    assert "of recurrent state (+ KV cache and activations)" in lines[-1]


def test_kv_bytes_count_every_layer_of_a_model_without_linear_layers():
    """Without linear layers the plan's KV bytes are what the runtime's cache allocates a position
    (mobile.runtime.kv.position_shapes, every layer's k and v)."""
    for name in ("qwen3-30b-a3b", "gemma-4-26b-a4b", "deepseek-v3", "gpt-oss-20b"):
        spec = load_spec(f"specs/{name}.yaml")
        shapes = [position_shapes(spec, layer) for layer in range(spec.model.num_layers)]
        allocated = sum(math.prod(k) + math.prod(v) for k, v in shapes) * TORCH_DTYPES[spec.dtype].itemsize
        assert kv_bytes_per_position(spec) == allocated
        assert memory_plan(spec).device == memory_plan(spec).weights  # their plan stays weights only


@pytest.mark.parametrize("policy, names", [
    ({}, ["runtime.max_seq_len"]), ({"tau": 0.5, "kv_refresh": 1}, ["runtime.max_seq_len", "policy.kv_refresh"])])
def test_a_kv_cache_that_does_not_fit_names_max_seq_len(tmp_path, capsys, policy, names):
    """The weights fit 16 GB, the KV cache of the model's whole context does not: --strict refuses in
    one line naming what to lower."""
    def edit(d):
        d["runtime"]["max_seq_len"] = 262144
        d["policy"].update(policy)
    path = variant(tmp_path, edit)
    spec = load_spec(path)
    assert memory_plan(spec).weights < 16 * 2**30 < memory_plan(spec).device
    (problem,) = memory_problems(spec, 16 * 2**30)
    assert all(name in problem for name in names)
    assert run_cli("compile", path, "-o", tmp_path / "g", "--device-memory", "16GiB", "--strict") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and not (tmp_path / "g").exists()
    assert "12.6GiB of weights fit, but not with" in err and "lower runtime.max_seq_len (262144 positions: " \
        "5.0GiB of KV cache)" in err
    assert ("policy.kv_refresh (2 kept copies of the recurrent state" in err) == ("policy.kv_refresh" in names)


# -- the published specs -------------------------------------------------------------------------

PUBLISHED = ["qwen3.6-35b-a3b", "qwen3.5-122b-a10b", "qwen3-next-80b-a3b"]


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_spec_is_the_import_of_its_config(name):
    imported = spec_from_dict(spec_from_hf_config(f"specs/hf/{name}")).model
    assert load_spec(f"specs/{name}.yaml").model == imported
    assert imported.layer_types == [LINEAR, LINEAR, LINEAR, FULL] * (imported.num_layers // 4)


def test_published_shapes():
    next80 = load_spec("specs/qwen3-next-80b-a3b.yaml").model
    assert (next80.moe.num_experts, next80.moe.top_k, next80.num_layers, next80.vocab_size) == (512, 10, 48, 151936)
    big = load_spec("specs/qwen3.5-122b-a10b.yaml").model
    assert (big.hidden_size, big.attention.num_heads, big.linear_attention.num_value_heads) == (3072, 32, 64)
    assert (big.moe.intermediate_size, big.moe.shared_expert.intermediate_size) == (1024, 1024)


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_specs_fit_a_16gb_card_with_their_state(tmp_path, capsys, name):
    assert run_cli("compile", f"specs/{name}.yaml", "-o", tmp_path / "g", "--device-memory", "16GiB", "--strict") == 0
    out, err = capsys.readouterr()
    spec = load_spec(f"specs/{name}.yaml")
    assert "warning" not in err and "routed experts (int4" in out
    assert f"recurrent state {human_bytes(recurrent_state_bytes(spec))} over" in out
    assert f"device memory: {human_bytes(memory_plan(spec).device)} = " in out
