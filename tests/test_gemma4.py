"""Gemma 4 with its MoE block (26B-A4B): exact against transformers under every policy, its
published spec, and the configs it refuses.

What sets it apart (mobile.spec.hf_gemma4): sliding and global layers, the global ones with their
own head size and kv heads, v equal to k's projection and proportional rope; q, k and v norms and a
softmax scale of 1; sandwich norms; a dense GeGLU MLP beside the MoE block, each with its own
norms; fused GeGLU experts; a router that norms its input and scales each expert's weight; scaled
embeddings, a learned scalar per layer and soft-capped logits. The tiny checkpoints below have
every one of them, with each tensor that init leaves at one (norms, scales, layer scalars) random,
a sliding window (5) shorter than the prompt, and the multimodal wrapper's prefix (gemma4).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import Tiny, run_cli, tiny_cache
from test_families_v3 import import_error, tau_extremes_are_big_and_little
from test_offload import offloading_matches_resident
from test_vs_transformers import test_logits_match as logits_match

import mobile
from mobile.errors import SpecError
from mobile.moe import router as routing
from mobile.spec.hf import spec_from_hf_config
from mobile.spec.load import load_spec, spec_from_dict

PROMPT = torch.randint(3, 97, (24,), generator=torch.Generator().manual_seed(1))
OFFLOAD = ["ondemand", "lru", "lru-prefetch"]
VARIANTS = ("gemma4_text", "gemma4")  # the text model as it saves itself; the multimodal checkpoint
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def gemma4_text_config(**overrides):
    """A tiny Gemma4TextConfig with the 26B-A4B's features: MoE block on, no per-layer input
    embeddings, global layers with their own head size (16) and one kv head shared by k and v."""
    import transformers as tf

    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
              attention_k_eq_v=True, enable_moe_block=True, num_experts=8, top_k_experts=4, moe_intermediate_size=16,
              hidden_size_per_layer_input=0, sliding_window=5, layer_types=LAYER_TYPES,
              # a cap the logits reach, so the tanh bends them
              final_logit_softcapping=1.0, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, tie_word_embeddings=True)
    return tf.Gemma4TextConfig(**{**kw, **overrides})


def build_tiny_gemma4(out: Path, multimodal: bool = False, seed: int = 0, **overrides):
    """Save a tiny Gemma 4 (the text model, or the multimodal one without towers) to `out`, with every
    norm, router scale, per-expert scale and layer scalar random; returns the transformers model."""
    import transformers as tf

    torch.manual_seed(seed)
    text = gemma4_text_config(**overrides)
    if multimodal:
        cfg = tf.Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None)
        model = tf.Gemma4ForConditionalGeneration(cfg).eval()
    else:
        model = tf.Gemma4ForCausalLM(text).eval()
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("router.proj.weight"):
                t.normal_(0, 0.5)  # decisive routing
            elif t.dim() == 1:  # norms, router.scale, per_expert_scale
                t.copy_(1 + torch.randn_like(t) * 0.3)
            elif "embed_tokens" in name:
                t.normal_(0, 0.05)  # times sqrt(H): small enough that the layers' outputs steer greedy decoding
            else:
                t.normal_(0, 0.3)
        for name, t in model.named_buffers():
            if name.endswith("layer_scalar"):
                t.copy_(1 + torch.randn_like(t) * 0.3)
    model.save_pretrained(out)
    return model


class Gemma4Tiny(Tiny):
    def build(self, ckpt):
        return build_tiny_gemma4(ckpt, multimodal=self.family == "gemma4")


@pytest.fixture(scope="module")
def gemma4_tiny(tmp_path_factory):
    return tiny_cache(tmp_path_factory, Gemma4Tiny)


# -- exact against transformers ------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_32_greedy_tokens_match_transformers(gemma4_tiny, variant):
    t = gemma4_tiny(variant)
    logits_match(gemma4_tiny, variant)
    engine = mobile.Engine.load(t.graph)
    try:
        ours = engine.generate(PROMPT, max_new_tokens=32, stop_ids=[])
    finally:
        engine.close()
    with torch.no_grad():
        ref = t.model.generate(PROMPT[None], max_new_tokens=32, min_new_tokens=32, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, PROMPT.numel():].tolist()
    assert ours == ref
    assert len(set(ref)) > 8  # the tiny model does not settle on one token


def test_static_decode_state_gives_the_same_tokens(gemma4_tiny):
    """The CUDA-graph runner's static buffers (emulated on the CPU): the global layers make their
    rope rows from the static positions, and their KV rows have shapes of their own."""
    t = gemma4_tiny("gemma4_text")
    eager, static = mobile.Engine.load(t.graph), mobile.Engine.load(t.graph, cuda_graphs="on")
    try:
        assert static.generate(PROMPT, 16, stop_ids=[]) == eager.generate(PROMPT, 16, stop_ids=[])
        assert [tuple(layer.v.shape[1:]) for layer in static.kv.layers] == [(2, 8), (1, 16), (2, 8), (1, 16)]
    finally:
        eager.close()
        static.close()


def test_imported_spec_carries_every_quirk(gemma4_tiny):
    text, full = load_spec(gemma4_tiny("gemma4_text").spec), load_spec(gemma4_tiny("gemma4").spec)
    m, a = text.model, text.model.attention
    assert m.family == "gemma4" and m.scale_embeddings and m.sandwich_norms and m.layer_scalar
    assert m.final_logit_softcap == 1.0 and m.hidden_act == "gelu_pytorch_tanh" and m.intermediate_size == 24
    assert (a.sliding_layers, a.sliding_window, a.head_dim, a.num_kv_heads) == ([0, 2], 5, 8, 2)
    assert (a.full_head_dim, a.full_num_kv_heads, a.full_k_eq_v, a.scale, a.v_norm) == (16, 1, True, 1.0, True)
    assert m.full_rope is not None and m.full_rope.type == "proportional" and m.full_rope.partial_rotary_factor == 0.25
    assert (m.rope.type, m.rope.theta, m.full_rope.theta) == ("default", 10000.0, 1e6)
    assert (m.moe.activation, m.moe.router_norm, m.moe.per_expert_scale, m.moe.parallel_mlp) == ("geglu", True,
                                                                                                True, True)
    assert full.checkpoint.tensor_names["experts_down"] == "model.language_model.layers.{layer}.experts.down_proj"
    assert text.model == full.model


def test_router_matches_transformers():
    """mobile.moe.router with Gemma 4's input norm and scales against Gemma4TextRouter: the same
    experts, in the same order, with the same weights."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

    torch.manual_seed(0)
    router = Gemma4TextRouter(gemma4_text_config())
    with torch.no_grad():
        router.proj.weight.normal_(0, 0.5)
        router.scale.copy_(1 + torch.randn(32) * 0.3)
        router.per_expert_scale.copy_(1 + torch.randn(8) * 0.3)
        x = torch.randn(64, 32) * 3
        _, ref_w, ref_ids = router(x)
    ours = routing.Router(router.proj.weight, 4, norm_topk_prob=True,
                          gemma=(router.scale, router.per_expert_scale, 1e-6))
    w, ids = ours(x)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-6)
    assert torch.equal(ours.with_top_k(2).predict(x), ref_ids[:, :2])


# -- every policy --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("policy", OFFLOAD)
def test_offloading_gives_residents_tokens(gemma4_tiny, policy, variant):
    offloading_matches_resident(gemma4_tiny(variant), policy, PROMPT)


def test_mobile_at_the_tau_extremes_is_big_and_little(gemma4_tiny, tmp_path):
    tau_extremes_are_big_and_little(gemma4_tiny("gemma4_text"), tmp_path, PROMPT)


# -- GeGLU experts in the Triton kernels ----------------------------------------------------------


@pytest.mark.parametrize("fmt, variant, dtype", [("native", "decode", torch.float32),
                                                 ("native", "grouped", torch.bfloat16),
                                                 ("int4", "grouped", torch.float32),
                                                 ("int8", "decode", torch.float16)])
def test_triton_kernels_run_geglu(fmt, variant, dtype):
    """ACT 2 (kernels/experts.py) against the reference's gelu_tanh(gate) * up, on the same experts."""
    pytest.importorskip("triton")
    from mobile.kernels import experts as kernels
    from test_kernels import BLOCK, assert_close, layer, slots_of

    from mobile.moe import quant
    from mobile.moe.layout import ExpertMLP, arena_views
    from mobile.moe.reference import reference

    H, inter = 48, 32
    x, weights, ids, slot_map, arena = layer(3, 2, 8, dtype, seed=5, hidden=H, inter=inter)
    mlp = ExpertMLP(H, inter, act="geglu")
    w, slots = slots_of(weights, ids, slot_map)
    if fmt == "native":
        out, dense = kernels.experts(x, w, slots, arena, variant=variant, block=BLOCK, mlp=mlp), arena
    else:
        layout = quant.Layout(fmt, 16 if fmt == "int4" else 0, H, inter)
        gate_up, down = arena_views(arena, H, inter)
        rows = torch.stack([quant.quantize_matrices(layout, gate_up[s], down[s]) for s in range(arena.shape[0])])
        out = kernels.experts(x, w, slots, rows, variant=variant, block=BLOCK, layout=layout, mlp=mlp)
        dense = layout.dequantize_rows(rows, torch.float32)
    ref = reference(x, w, slots, dense, mlp)
    assert_close(out, ref, dtype)
    silu = reference(x, w, slots, dense, ExpertMLP(H, inter))
    assert (silu.float() - ref.float()).abs().max() > 0.02 * ref.float().abs().max()  # not silu's


# -- the published config ------------------------------------------------------------------------

PUBLISHED = "specs/hf/gemma-4-26b-a4b"


def test_published_spec_is_reproduced(tmp_path):
    """specs/gemma-4-26b-a4b.yaml is `mobile import-hf specs/hf/gemma-4-26b-a4b --no-checkpoint --name
    gemma-4-26b-a4b` up to its policy and runtime (specs/hf/README.md)."""
    from test_import_hf import test_published_spec_is_reproduced as reproduced

    reproduced(tmp_path, "gemma-4-26b-a4b")


def test_published_spec_is_the_import_of_its_config():
    """specs/gemma-4-26b-a4b.yaml is `mobile import-hf` of the config, with the runtime the spec plans for."""
    imported = spec_from_dict(spec_from_hf_config(PUBLISHED)).model
    written = load_spec("specs/gemma-4-26b-a4b.yaml")
    assert written.model == imported
    assert (imported.moe.num_experts, imported.moe.top_k, imported.moe.intermediate_size) == (128, 8, 704)
    assert imported.num_layers == 30 and imported.attention.sliding_layers == [i for i in range(30) if (i + 1) % 6]
    assert (imported.attention.full_head_dim, imported.attention.full_num_kv_heads) == (512, 2)


def test_published_spec_compiles_weight_free_and_fits_a_16gb_card(tmp_path, capsys):
    assert run_cli("compile", "specs/gemma-4-26b-a4b.yaml", "-o", tmp_path / "g", "--device-memory", "16GiB",
                   "--strict") == 0
    out = capsys.readouterr().out
    assert "device memory:" in out and "int4" in out


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, expected", [
    ("hidden_size_per_layer_input", 256, "per-layer input embeddings"),
    ("num_kv_shared_layers", 10, "reuse another layer's KV"),
    ("enable_moe_block", False, "has no routed experts"),
    ("use_bidirectional_attention", "all", "bidirectional attention"),
    ("attention_bias", True, "attention biases"),
    ("hidden_activation", "gelu", "gelu_pytorch_tanh"),
])
def test_configs_mobile_would_run_differently_are_refused(tmp_path, capsys, key, value, expected):
    cfg = json.loads(open(f"{PUBLISHED}/config.json").read())
    cfg["text_config"][key] = value
    err = import_error(tmp_path, capsys, cfg)
    assert expected in err and f"{key}:" in err


def test_a_spec_error_names_the_key(tmp_path):
    data = yaml.safe_load(open("specs/gemma-4-26b-a4b.yaml"))
    data["model"]["moe"]["activation"] = "gelu"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "s.yaml")
    assert info.value.key == "model.moe.activation"
