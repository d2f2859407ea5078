"""GLM-4.7-Flash (glm4_moe_lite) and the model types transformers runs with the code of families
mobile runs (sarvam_mla, sarvam_moe, param2moe, dots1, solar_open): exact against transformers under
every policy; their imports, the defaults they read, their spec and their refusals.

The tiny checkpoints (tests/tiny.py, ALIAS_VARIANTS) come from each model type's own config class,
saved as transformers saves it (Sarvam-MoE and Param2-MoE in their Ling names, q/k/v fused), with
every bias, correction bias and norm filled with random values, so none of them is a no-op.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import run_cli, tiny_cache
from test_families_v3 import PROMPT, SigmoidTiny, import_error, tau_extremes_are_big_and_little
from test_offload import offloading_matches_resident
from tiny import ALIAS_VARIANTS

import mobile
from mobile.spec import hf_aliases
from mobile.spec.hf import spec_from_hf_config
from mobile.spec.load import load_spec, spec_from_dict

OFFLOAD = ["ondemand", "lru", "lru-prefetch"]


@pytest.fixture(scope="module")
def alias_tiny(tmp_path_factory):
    return tiny_cache(tmp_path_factory, SigmoidTiny)


# -- exact against transformers ------------------------------------------------------------------


@pytest.mark.parametrize("variant", ALIAS_VARIANTS)
def test_logits_and_32_greedy_tokens_match_transformers(alias_tiny, variant):
    t = alias_tiny(variant)
    engine = mobile.Engine.load(t.graph)
    try:
        ours = engine.logits(PROMPT)
        tokens = engine.generate(PROMPT, max_new_tokens=32, stop_ids=[])
    finally:
        engine.close()
    with torch.no_grad():
        ref = t.model(PROMPT[None]).logits[0].float()
        ref_tokens = t.model.generate(PROMPT[None], max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, PROMPT.numel():].tolist()
    assert (ours - ref).abs().max().item() < 1e-4
    assert tokens == ref_tokens
    assert len(set(tokens)) >= 8  # greedy decoding that settles on a token or two would test little


@pytest.mark.parametrize("variant", ALIAS_VARIANTS)
@pytest.mark.parametrize("policy", OFFLOAD)
def test_offloading_gives_residents_tokens(alias_tiny, variant, policy):
    offloading_matches_resident(alias_tiny(variant), policy, PROMPT)


@pytest.mark.parametrize("variant", ALIAS_VARIANTS)
def test_mobile_at_the_tau_extremes_is_big_and_little(alias_tiny, tmp_path, variant):
    tau_extremes_are_big_and_little(alias_tiny(variant), tmp_path)


def test_imported_variants_carry_their_quirks(alias_tiny):
    spec = lambda variant: load_spec(alias_tiny(variant).spec).model  # noqa: E731
    lite, mixed = spec("glm4_moe_lite"), spec("glm4_moe_lite_mixed")
    assert lite.family == mixed.family == "deepseek_v3"  # DeepSeek-V3's tensor names, GLM's routing values
    assert (lite.attention.q_lora_rank, lite.attention.v_head_dim, lite.moe.dense_layers) == (12, 12, [0])
    assert (lite.moe.routed_scaling_factor, lite.rope.theta, lite.norm_eps) == (1.8, 1e6, 1e-5)
    assert mixed.attention.q_lora_rank is None and mixed.moe.dense_layers == [1]  # mlp_layer_types
    assert (mixed.moe.n_group, mixed.moe.topk_group, mixed.moe.norm_topk_prob) == (4, 2, False)
    assert spec("sarvam_mla").family == "deepseek_v3" and spec("sarvam_mla").moe.dense_layers == [0]
    sarvam, param2 = spec("sarvam_moe"), spec("param2moe")
    assert sarvam.family == param2.family == "sarvam_moe"
    assert sarvam.attention.qk_norm == "per_head" and sarvam.attention.qkv_bias  # use_qk_norm's default: on
    assert sarvam.rope.partial_rotary_factor == 1 and sarvam.rope.theta == 8e6  # not GLM-4.5's 0.5
    assert param2.tie_word_embeddings and param2.moe.shared_expert.intermediate_size == 2 * 16
    dots1, solar = spec("dots1"), spec("solar_open")
    assert dots1.family == solar.family == "glm4_moe"
    assert dots1.attention.qk_norm == "per_head" and dots1.rope.partial_rotary_factor == 1
    assert (dots1.attention.sliding_layers, dots1.attention.sliding_window) == ([1], 5)
    assert not dots1.moe.norm_topk_prob and dots1.moe.dense_layers == [0]
    assert solar.attention.qk_norm == "none" and solar.attention.qkv_bias and not solar.attention.o_bias
    assert solar.moe.dense_layers == [] and solar.rope.partial_rotary_factor == 1 and solar.rope.theta == 1e6


# -- what each config class reads ----------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(hf_aliases.DEFAULTS))
def test_the_defaults_are_the_config_classes(model_type):
    """What the import fills in for a key a config.json leaves out is what transformers' config class
    of that model type would use."""
    import transformers as tf

    cfg = tf.CONFIG_MAPPING[model_type]()
    rope = cfg.rope_parameters
    for key, value in hf_aliases.DEFAULTS[model_type].items():
        theirs = rope[key] if key in ("rope_theta", "partial_rotary_factor") else getattr(cfg, key)
        assert theirs == value, key


def without_defaults(cfg: dict, model_type: str) -> dict:
    """cfg less every key whose value is the model type's default (as a published config may be)."""
    defaults = hf_aliases.DEFAULTS[model_type]
    return {k: v for k, v in cfg.items() if k not in defaults or defaults[k] != v}


def test_original_configs_import_as_transformers_reads_them(alias_tiny, tmp_path):
    """Sarvam's and Param2's own configs name keys otherwise (the config classes' attribute_map),
    SarvamMLA's call YaRN deepseek_yarn and carry a vLLM head_dim: they import as transformers reads
    them, which is as the configs transformers writes do."""
    import transformers as tf

    experts = {"n_routed_experts": "num_experts", "n_shared_experts": "num_shared_experts"}
    for variant, renamed in [("sarvam_moe", {**experts, "attention_bias": "use_qkv_bias"}),
                             ("param2moe", experts), ("sarvam_mla", experts)]:
        written = json.loads((alias_tiny(variant).ckpt / "config.json").read_text())
        original = {renamed.get(k, k): v for k, v in without_defaults(written, variant).items()}
        assert all(k not in original for k in renamed)
        folder = tmp_path / variant
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(original))
        theirs = tf.AutoConfig.from_pretrained(folder)
        assert all(getattr(theirs, key) == written[key] for key in renamed)
        assert spec_from_hf_config(folder)["model"] == spec_from_hf_config(alias_tiny(variant).ckpt)["model"]

    yarn = {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
            "mscale_all_dim": 1.0}
    written = json.loads((alias_tiny("sarvam_mla").ckpt / "config.json").read_text())
    legacy = {**written, "rope_scaling": {**yarn, "type": "deepseek_yarn"}, "head_dim": 16 + 8, "q_head_dim": 16}
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "config.json").write_text(json.dumps({k: v for k, v in legacy.items()
                                                                 if k != "rope_parameters"}))
    assert tf.AutoConfig.from_pretrained(tmp_path / "legacy").rope_parameters["rope_type"] == "yarn"
    rope = spec_from_dict(spec_from_hf_config(tmp_path / "legacy")).model.rope
    assert (rope.type, rope.factor, rope.original_max_position_embeddings, rope.interleaved) == ("yarn", 4.0, 64, True)


@pytest.mark.parametrize("extra, sliding", [({}, []), ({"max_window_layers": 2}, [2, 3]),
                                             ({"max_window_layers": 2, "sliding_window": None}, [])])
def test_dots1_sliding_layers_default_as_its_config_class_computes_them(tmp_path, extra, sliding):
    """With no layer_types, Dots1Config slides the layers from max_window_layers on (62 by default),
    where sliding_window (4096 by default) is set."""
    import transformers as tf

    cfg = {"vocab_size": 97, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 4, "num_experts_per_tok": 2, "n_routed_experts": 8, "moe_intermediate_size": 16,
           "n_shared_experts": 1, **extra}
    theirs = tf.Dots1Config(**cfg)
    assert [i for i, kind in enumerate(theirs.layer_types) if kind == "sliding_attention"] == sliding
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dots1", **cfg}))
    attention = spec_from_dict(spec_from_hf_config(tmp_path)).model.attention
    assert attention.sliding_layers == sliding
    assert attention.sliding_window == (theirs.sliding_window if sliding else 0)


# -- the published spec --------------------------------------------------------------------------


def test_published_glm_4_7_flash():
    m = spec_from_dict(spec_from_hf_config("specs/hf/glm-4.7-flash")).model
    assert m.family == "deepseek_v3" and m.attention.kind == "mla" and m.rope.interleaved
    assert (m.moe.num_experts, m.moe.top_k, m.moe.n_group, m.moe.dense_layers) == (64, 4, 1, [0])
    assert (m.moe.routed_scaling_factor, m.moe.shared_expert.intermediate_size) == (1.8, 1536)
    assert (m.attention.q_lora_rank, m.attention.kv_lora_rank, m.attention.v_head_dim) == (768, 512, 256)
    assert (m.attention.qk_nope_head_dim, m.attention.qk_rope_head_dim, m.num_layers) == (192, 64, 47)


def test_glm_4_7_flash_fits_a_16gb_card_as_shipped_and_24gb_resident(tmp_path, capsys):
    assert run_cli("compile", "specs/glm-4.7-flash.yaml", "-o", tmp_path / "g", "--device-memory", "16GiB",
                   "--strict") == 0
    out = capsys.readouterr()
    assert "warning" not in out.err and "int4" in out.out
    assert run_cli("compile", "specs/glm-4.7-flash.yaml", "-o", tmp_path / "r", "--policy", "resident",
                   "--device-memory", "24GiB", "--strict") == 0
    assert run_cli("compile", "specs/glm-4.7-flash.yaml", "-o", tmp_path / "r16", "--policy", "resident",
                   "--device-memory", "16GiB") == 0
    assert "more than --device-memory (16.0GiB)" in capsys.readouterr().err


# -- refusals ------------------------------------------------------------------------------------


GLM_LITE = json.loads(open("specs/hf/glm-4.7-flash/config.json").read())


@pytest.mark.parametrize("edit, expected", [
    ({"first_k_dense_replace": 2}, "first_k_dense_replace: transformers' glm4_moe_lite ignores it and runs dense "
                                   "MLPs at layers [0] (mlp_layer_types), not the first 2"),
    ({"mlp_layer_types": ["dense"] * 3}, "mlp_layer_types: expected a list of 47 MLP types"),
    ({"mlp_layer_types": ["dense"] + ["moe"] * 46}, "mlp_layer_types[1]: expected 'dense' or 'sparse', got 'moe'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor: only 1.0 is supported for glm4_moe_lite"),
    ({"rope_parameters": {"rope_theta": 1e6, "partial_rotary_factor": 0.5}},
     "rope_parameters.partial_rotary_factor: only 1.0 is supported for glm4_moe_lite"),
    ({"rope_interleave": False}, "rope_interleave: only true is supported"),
    ({"topk_method": "greedy"}, "topk_method: only 'noaux_tc' is supported"),
    ({"attention_bias": True}, "attention_bias: attention biases are not supported with MLA"),
])
def test_glm_lite_configs_mobile_would_run_differently_are_refused(tmp_path, capsys, edit, expected):
    assert expected in import_error(tmp_path, capsys, {**GLM_LITE, **edit})


@pytest.mark.parametrize("variant, edit, expected", [
    ("dots1", {"attention_bias": True}, "attention_bias: attention biases are not supported for dots1"),
    ("dots1", {"use_qk_norm": False}, "use_qk_norm: only true is supported for dots1 (as transformers runs it)"),
    ("dots1", {"partial_rotary_factor": 0.5}, "partial_rotary_factor: only 1.0 is supported for dots1"),
    ("dots1", {"layer_types": ["full_attention"]}, "layer_types: expected a list of 3 layer types"),
    ("solar_open", {"first_k_dense_replace": 1}, "first_k_dense_replace: only 0 is supported for solar_open"),
    ("solar_open", {"use_qk_norm": True}, "use_qk_norm: only false is supported for solar_open"),
    ("sarvam_moe", {"num_experts": 8}, "num_experts: is 8 but n_routed_experts is 16 (transformers reads both"),
])
def test_alias_configs_mobile_would_run_differently_are_refused(alias_tiny, tmp_path, capsys, variant, edit,
                                                                expected):
    cfg = json.loads((alias_tiny(variant).ckpt / "config.json").read_text())
    assert expected in import_error(tmp_path, capsys, {**cfg, **edit})


@pytest.mark.parametrize("model_type", ["axk1", "minicpm5_moe"])
def test_model_types_that_are_not_aliases_are_refused(tmp_path, capsys, model_type):
    """A.X-K1 normalizes each MoE block's output (post_mlp_layernorm); MiniCPM5-MoE gates its
    attention output (q_gate_proj): neither is a model mobile runs."""
    err = import_error(tmp_path, capsys, {"model_type": model_type, "hidden_size": 32})
    assert f"unsupported model_type {model_type!r}" in err


def test_sarvam_spec_names_the_fused_qkv_tensor(alias_tiny):
    names = yaml.safe_load(alias_tiny("sarvam_moe").spec.read_text())["checkpoint"]["tensor_names"]
    assert names["qkv_proj"] == "model.layers.{layer}.attention.query_key_value.weight"
    assert "q_proj" not in names and names["embed"] == "model.word_embeddings.weight"
