"""MiniMax-M2 (M2.1, M2.5): Mixtral's expert layout under a sigmoid router with a correction bias and
no groups, q/k norm over all heads at once, partial rotary; exact against transformers under every
policy; its published spec and its refusals.

The tiny checkpoint comes from transformers' MiniMaxM2Config, with every tensor that init leaves at
zero or one (the correction bias, the norms) filled with random values, so none of them is a no-op.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Tiny, run_cli, tiny_cache
from test_families_v3 import import_error, tau_extremes_are_big_and_little
from test_offload import offloading_matches_resident
from test_vs_transformers import test_greedy_matches_generate as greedy_matches_generate
from test_vs_transformers import test_logits_match as logits_match
from tiny import _COMMON

import mobile
from mobile.errors import SpecError
from mobile.moe import router as routing
from mobile.spec.hf import spec_from_hf_config
from mobile.spec.load import load_spec, spec_from_dict

PROMPT = torch.randint(3, 97, (24,), generator=torch.Generator().manual_seed(1))
OFFLOAD = ["ondemand", "lru", "lru-prefetch"]


def minimax_config(**overrides):
    """A tiny MiniMaxM2Config: heads * head_dim (64) unlike hidden_size (32), so a q/k norm over the
    wrong width cannot load; rotary_dim 12 of head_dim 16 (a factor of 0.75, not GLM's default 0.5);
    16 experts, top-8 (the published top_k: a little set of 4)."""
    import transformers as tf

    cfg = tf.MiniMaxM2Config(**_COMMON, head_dim=16, intermediate_size=16, num_local_experts=16,
                             num_experts_per_tok=8, rotary_dim=12)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_tiny_minimax(out, seed: int = 0, **overrides):
    """Save a tiny MiniMaxM2ForCausalLM to `out` (the Hub's layout: block_sparse_moe, w1/w2/w3 per
    expert, the correction bias beside the router); returns the model."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.MiniMaxM2ForCausalLM(minimax_config(**overrides)).eval()
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("mlp.gate.weight"):
                t.normal_(0, 0.5)  # decisive routing
            elif name.endswith("e_score_correction_bias"):
                t.normal_(0, 0.5)  # the size of the scores' spread: it reorders the choice
            elif "norm" in name and t.dim() == 1:
                t.add_(torch.randn_like(t) * 0.2)
            elif "mlp.experts." in name:
                t.normal_(0, 0.1)  # experts large enough that choosing others shows in the logits
    model.save_pretrained(out)
    return model


class MiniMaxTiny(Tiny):
    def build(self, ckpt):
        return build_tiny_minimax(ckpt)


@pytest.fixture(scope="module")
def minimax(tmp_path_factory):
    return tiny_cache(tmp_path_factory, MiniMaxTiny)("minimax_m2")


# -- exact against transformers ------------------------------------------------------------------


def test_the_tiny_checkpoint_has_the_hub_layout_and_no_trivial_tensor(minimax):
    from safetensors import safe_open

    with safe_open(minimax.ckpt / "model.safetensors", "pt") as f:
        names = set(f.keys())
        bias = f.get_tensor("model.layers.0.block_sparse_moe.e_score_correction_bias")
        q_norm = f.get_tensor("model.layers.0.self_attn.q_norm.weight")
    assert "model.layers.0.block_sparse_moe.experts.15.w3.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert bias.abs().min() > 0 and q_norm.shape == (4 * 16,) and not torch.equal(q_norm, torch.ones(64))


def test_imported_spec_carries_the_quirks(minimax):
    m = load_spec(minimax.spec).model
    assert m.family == "minimax_m2" and m.attention.qk_norm == "full" and m.attention.head_dim == 16
    assert m.rope.partial_rotary_factor == 0.75 and m.rope.theta == 5e6
    moe = m.moe
    assert (moe.scoring, moe.correction_bias, moe.n_group, moe.norm_topk_prob) == ("sigmoid", True, 1, True)
    assert moe.routed_scaling_factor == 1.0 and moe.dense_layers == [] and m.intermediate_size == 0


def test_logits_and_greedy_match_transformers(minimax):
    logits_match(lambda _: minimax, "minimax_m2")
    greedy_matches_generate(lambda _: minimax, "minimax_m2")


def test_32_greedy_tokens_match_generate(minimax):
    engine = mobile.Engine.load(minimax.graph)
    try:
        ours = engine.generate(PROMPT, max_new_tokens=32, stop_ids=[])
    finally:
        engine.close()
    with torch.no_grad():
        ref = minimax.model.generate(PROMPT[None], max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, PROMPT.numel():].tolist()
    assert ours == ref and len(set(ours)) > 3  # and decoding did not settle on one token


def test_router_matches_transformers_and_orders_by_corrected_score():
    """mobile.moe.router.route against transformers' MiniMaxM2TopKRouter: the same experts with the
    same renormalized weights; ours in corrected-score order, which the bias changes."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = minimax_config(hidden_size=32, num_local_experts=16, num_experts_per_tok=8)
    gate = tf.models.minimax_m2.modeling_minimax_m2.MiniMaxM2TopKRouter(cfg)
    with torch.no_grad():
        gate.weight.normal_(0, 0.5)
    bias = torch.randn(16) * 0.5
    x = torch.randn(64, 32)
    with torch.no_grad():
        _, ref_w, ref_ids = gate(x, bias)
    w, ids = routing.route(x, gate.weight, 8, True, 1.0, "sigmoid", bias)
    order = ref_ids.argsort(dim=-1)
    assert torch.equal(ids.sort(dim=-1).values, ref_ids.gather(1, order))
    torch.testing.assert_close(w.gather(1, ids.argsort(dim=-1)), ref_w.gather(1, order), atol=1e-6, rtol=1e-6)
    corrected = torch.sigmoid(x @ gate.weight.T) + bias
    assert (corrected.gather(1, ids).diff(dim=-1) <= 0).all()
    _, unbiased = routing.route(x, gate.weight, 8, True, 1.0, "sigmoid", None)
    assert not torch.equal(unbiased.sort(dim=-1).values, ids.sort(dim=-1).values)


# -- every policy --------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", OFFLOAD)
def test_offloading_gives_residents_tokens(minimax, policy):
    offloading_matches_resident(minimax, policy, PROMPT)


def test_mobile_at_the_tau_extremes_is_big_and_little(minimax, tmp_path):
    tau_extremes_are_big_and_little(minimax, tmp_path, PROMPT)


# -- FP8, as MiniMax publishes its weights -------------------------------------------------------


def test_fp8_checkpoint_loads_exactly(minimax, tmp_path):
    """The published layout: every Linear (attention's *_proj, the experts' w1/w2/w3) FP8 with block
    scales, the router, the correction bias, the norms and lm_head not. Dequantized as it loads, it
    is transformers' model on the reference dequantization; packed to int4, it runs."""
    import shutil

    import transformers as tf
    from safetensors.torch import load_file, save_file
    from test_fp8 import dequantize_fp8, quantize_fp8

    block = [16, 16]
    fp8, ref = {}, {}
    for name, w in load_file(minimax.ckpt / "model.safetensors").items():
        if name.endswith(("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")):
            q, scale = quantize_fp8(w, block)
            fp8[name], fp8[f"{name}_scale_inv"], ref[name] = q, scale, dequantize_fp8(q, scale, block)
        else:
            fp8[name] = ref[name] = w
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "float8_e4m3fn",
             "weight_block_size": block, "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}
    for folder, weights in (("fp8", fp8), ("ref", ref)):
        shutil.copytree(minimax.ckpt, tmp_path / folder)
        save_file(weights, tmp_path / folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((minimax.ckpt / "config.json").read_text())
    (tmp_path / "fp8" / "config.json").write_text(json.dumps({**cfg, "quantization_config": quant}))
    assert run_cli("import-hf", tmp_path / "fp8", "-o", tmp_path / "s.yaml") == 0
    assert run_cli("compile", tmp_path / "s.yaml", "-o", tmp_path / "g") == 0
    assert run_cli("compile", tmp_path / "s.yaml", "-o", tmp_path / "g4", "--expert-format", "int4",
                   "--expert-group-size", "16") == 0
    model = tf.MiniMaxM2ForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(PROMPT[None]).logits[0]
    for graph, bound in (("g", 1e-4), ("g4", 0.5)):
        engine = mobile.Engine.load(tmp_path / graph)
        try:
            assert (engine.logits(PROMPT) - expected).abs().max() < bound
        finally:
            engine.close()


# -- the published spec --------------------------------------------------------------------------


def test_published_spec_is_reproduced(tmp_path):
    out = tmp_path / "minimax-m2.yaml"
    assert run_cli("import-hf", "specs/hf/minimax-m2", "--no-checkpoint", "--name", "minimax-m2", "-o", out) == 0
    strip = lambda text: [ln for ln in text.split("\npolicy:")[0].splitlines() if not ln.startswith("#")]  # noqa: E731
    assert strip(out.read_text()) == strip(open("specs/minimax-m2.yaml").read())


def test_published_quirks():
    m = spec_from_dict(spec_from_hf_config("specs/hf/minimax-m2")).model
    assert (m.num_layers, m.hidden_size, m.vocab_size, m.intermediate_size) == (62, 3072, 200064, 0)
    a = m.attention
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.qkv_bias) == (48, 8, 128, "full", False)
    assert m.rope.partial_rotary_factor == 0.5 and m.rope.theta == 5e6  # rotary_dim 64 of 128
    assert (m.moe.num_experts, m.moe.top_k, m.moe.intermediate_size) == (256, 8, 1536)
    assert m.moe.scoring == "sigmoid" and m.moe.correction_bias and m.moe.n_group == 1
    assert m.moe.norm_topk_prob and m.moe.routed_scaling_factor == 1.0 and not m.moe.shared_expert.intermediate_size


def test_rope_defaults_are_transformers(tmp_path):
    """Without rope_theta, MiniMaxM2Config's 5e6 (not 10000); rope_parameters' factor wins over rotary_dim."""
    cfg = json.loads(open("specs/hf/minimax-m2/config.json").read())
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "default", "partial_rotary_factor": 0.25}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rope = spec_from_dict(spec_from_hf_config(tmp_path)).model.rope
    assert rope.theta == 5e6 and rope.partial_rotary_factor == 0.25


def test_published_spec_compiles_weight_free_and_fits_a_24gb_card(tmp_path, capsys):
    assert run_cli("compile", "specs/minimax-m2.yaml", "-o", tmp_path / "g", "--device-memory", "24GiB",
                   "--strict") == 0
    out = capsys.readouterr().out
    assert "routed experts (int4" in out and "device memory: 19.5GiB of weights" in out


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, expected", [
    ("scoring_func", "softmax", 'scoring_func: only "sigmoid" is supported for minimax_m2'),
    ("use_routing_bias", False, "use_routing_bias: only true is supported"),
    ("use_qk_norm", False, "use_qk_norm: only true is supported"),
    ("qk_norm_type", "per_head", 'qk_norm_type: only "per_layer" is supported'),
    ("shared_intermediate_size", 1536, "shared_intermediate_size: only 0 is supported"),
    ("sliding_window", 4096, "sliding_window: only null is supported"),
    ("routed_scaling_factor", 2.0, "routed_scaling_factor: only 1.0 is supported"),
    ("attn_type_list", [0, 1] * 31, "attn_type_list: only softmax-attention layers (1) are supported"),
    ("num_local_experts", None, "num_local_experts: config.json has no value for this key"),
])
def test_configs_mobile_would_run_differently_are_refused(tmp_path, capsys, key, value, expected):
    cfg = json.loads(open("specs/hf/minimax-m2/config.json").read())
    assert expected in import_error(tmp_path, capsys, {**cfg, key: value})


def test_refusal_is_a_spec_error_naming_the_key(tmp_path):
    cfg = json.loads(open("specs/hf/minimax-m2/config.json").read())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "qk_norm_type": "per_head"}))
    with pytest.raises(SpecError) as info:
        spec_from_hf_config(tmp_path)
    assert info.value.key == "qk_norm_type"
