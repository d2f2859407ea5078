"""DeepSeek-V3 (and Kimi-K2) and GLM-4.5: sigmoid routers with a correction bias and groups, MLA,
partial rotary, exact against transformers under every policy; their specs and their refusals.

The tiny checkpoints (tests/tiny.py, SIGMOID_VARIANTS) come from transformers' config classes with
every bias, correction bias and norm filled with random values, so none of them is a no-op.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import Tiny, run_cli, tiny_cache
from test_offload import offloading_matches_resident
from test_vs_transformers import test_greedy_matches_generate as greedy_matches_generate
from test_vs_transformers import test_logits_match as logits_match
from tiny import SIGMOID_VARIANTS, build_tiny_sigmoid

import mobile
from mobile.errors import SpecError
from mobile.moe import router as routing
from mobile.spec.hf import MODEL_TYPES, spec_from_hf_config
from mobile.spec.load import load_spec, spec_from_dict

PROMPT = torch.randint(3, 97, (24,), generator=torch.Generator().manual_seed(1))
OFFLOAD = ["ondemand", "lru", "lru-prefetch"]
PUBLISHED = ["deepseek-v3", "kimi-k2-instruct", "glm-4.5-air"]


class SigmoidTiny(Tiny):
    """conftest's Tiny, built from a SIGMOID_VARIANTS variant (its `family`)."""

    def build(self, ckpt):
        return build_tiny_sigmoid(self.family, ckpt)


@pytest.fixture(scope="module")
def sigmoid_tiny(tmp_path_factory):
    return tiny_cache(tmp_path_factory, SigmoidTiny)


# -- exact against transformers ------------------------------------------------------------------


@pytest.mark.parametrize("variant", SIGMOID_VARIANTS)
def test_logits_and_greedy_match_transformers(sigmoid_tiny, variant):
    logits_match(sigmoid_tiny, variant)
    greedy_matches_generate(sigmoid_tiny, variant)


def test_imported_variants_carry_their_quirks(sigmoid_tiny):
    v3, kimi = load_spec(sigmoid_tiny("deepseek_v3").spec), load_spec(sigmoid_tiny("kimi_k2").spec)
    assert v3.model.family == kimi.model.family == "deepseek_v3"  # kimi_k2's config.json imports as V3
    assert v3.model.attention.q_lora_rank == 12 and kimi.model.attention.q_lora_rank is None
    assert (v3.model.moe.n_group, v3.model.moe.topk_group, v3.model.moe.dense_layers) == (4, 2, [0])
    assert kimi.model.rope.type == "yarn" and not kimi.model.moe.norm_topk_prob
    glm, air = load_spec(sigmoid_tiny("glm4_moe").spec), load_spec(sigmoid_tiny("glm4_moe_air").spec)
    assert glm.model.attention.qk_norm == "per_head" and air.model.attention.qk_norm == "none"
    assert glm.model.attention.qkv_bias and glm.model.rope.partial_rotary_factor == 0.5
    assert air.model.moe.dense_layers == [] and air.model.intermediate_size == 0


# -- the router ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_group, topk_group", [(4, 2), (1, 1)])
def test_router_matches_transformers_and_orders_by_corrected_score(n_group, topk_group):
    """mobile.moe.router.route against transformers' DeepseekV3TopkRouter: the same experts with the same weights
    (transformers leaves them unordered); ours are ordered by corrected score, which the weights
    need not follow, and the bias does change the choice."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.DeepseekV3Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=n_group,
                              topk_group=topk_group, norm_topk_prob=True, routed_scaling_factor=2.5)
    router = tf.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.e_score_correction_bias.normal_(0, 0.5)
    x = torch.randn(64, 32)
    with torch.no_grad():
        _, ref_w, ref_ids = router(x)
    bias = router.e_score_correction_bias
    w, ids = routing.route(x, router.weight, 4, True, 2.5, "sigmoid", bias, n_group, topk_group)
    order = ref_ids.argsort(dim=-1)
    assert torch.equal(ids.sort(dim=-1).values, ref_ids.gather(1, order))
    torch.testing.assert_close(w.gather(1, ids.argsort(dim=-1)), ref_w.gather(1, order), atol=1e-6, rtol=1e-6)
    corrected = torch.sigmoid(x @ router.weight.T) + router.e_score_correction_bias
    assert (corrected.gather(1, ids).diff(dim=-1) <= 0).all()  # best corrected score first
    assert (w.diff(dim=-1) > 0).any()  # ... which is not always the heaviest first
    _, unbiased = routing.route(x, router.weight, 4, True, 2.5, "sigmoid", None, n_group, topk_group)
    assert not torch.equal(unbiased.sort(dim=-1).values, ids.sort(dim=-1).values)


def test_little_set_follows_the_corrected_order(sigmoid_tiny, tmp_path):
    """The little policy uses the first ceil(K/2) experts of the corrected order, with the model's own
    weights: rescaled to the big set's total, that is transformers' model at top_k = ceil(K/2) (whose
    groups and corrected choice do not depend on top_k). Taking the heaviest half would not be."""
    t = sigmoid_tiny("deepseek_v3")
    text = t.spec.read_text().replace("policy:\n  name: resident", "policy:\n  name: little\n  little_weights: rescale")
    (tmp_path / "s.yaml").write_text(text.replace("path: ckpt", f"path: {t.ckpt}"))
    assert run_cli("compile", tmp_path / "s.yaml", "-o", tmp_path / "g") == 0
    engine = mobile.Engine.load(tmp_path / "g", weights=t.ckpt, link_gbps=50.0)
    K = engine.spec.model.moe.top_k
    half = build_tiny_sigmoid("deepseek_v3", tmp_path / "half", num_experts_per_tok=math.ceil(K / 2))
    try:
        ours = engine.logits(PROMPT)
        with torch.no_grad():
            ref, big = half(PROMPT[None]).logits[0], t.model(PROMPT[None]).logits[0]
        assert (ours - ref).abs().max() < 1e-4
        assert (ours - big).abs().max() > 1e-3  # and it is not the big model
        assert engine.stats["little_tokens"] == PROMPT.numel()
    finally:
        engine.close()


# -- every policy --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["deepseek_v3", "glm4_moe"])
@pytest.mark.parametrize("policy", OFFLOAD)
def test_offloading_gives_residents_tokens(sigmoid_tiny, variant, policy):
    offloading_matches_resident(sigmoid_tiny(variant), policy, PROMPT)


def policy_engine(t, tmp_path, policy: str, **fields) -> mobile.Engine:
    """t's spec under `policy` with these policy fields (cached_complement off: resident, it would
    make every little pass big)."""
    fields = {"cached_complement": "false", **fields}
    lines = [f"policy:\n  name: {policy}"] + [f"  {k}: {v}" for k, v in fields.items()]
    path = tmp_path / f"{policy}-{len(fields)}.yaml"
    text = t.spec.read_text().replace("policy:\n  name: resident", "\n".join(lines))
    path.write_text(text.replace("path: ckpt", f"path: {t.ckpt}"))
    assert run_cli("compile", path, "-o", tmp_path / path.stem) == 0
    return mobile.Engine.load(tmp_path / path.stem, weights=t.ckpt, link_gbps=50.0)


def tau_extremes_are_big_and_little(t, tmp_path, prompt: torch.Tensor = PROMPT) -> None:
    """`mobile` at tau 1 decodes as big (every token falls back), and at tau 0 with the per-layer
    rule off as `little` (also for the newer families' tests). The rule is off because its default
    layer_tau keeps more than the little set wherever that carries under 0.85 of the big set's
    mass, which the tiny sigmoid routers' half does almost everywhere (a mean share of 0.6-0.66)."""
    always = policy_engine(t, tmp_path, "mobile", tau=1)
    big = mobile.Engine.load(t.graph, policy="lru-prefetch", link_gbps=50.0)
    never = policy_engine(t, tmp_path, "mobile", tau=0.0, prefill="little", layer_tau="null")
    little = policy_engine(t, tmp_path, "little")
    try:
        n = 16
        assert always.generate(prompt, n, stop_ids=[]) == big.generate(prompt, n, stop_ids=[])
        assert always.stats["fallback_tokens"] == n - 1
        assert never.generate(prompt, n, stop_ids=[]) == little.generate(prompt, n, stop_ids=[])
        assert never.stats["fallback_tokens"] == 0 and never.stats["little_tokens"] == prompt.numel() + n - 1
    finally:
        for e in (always, big, never, little):
            e.close()


@pytest.mark.parametrize("variant", ["deepseek_v3", "glm4_moe"])
def test_mobile_at_the_tau_extremes_is_big_and_little(sigmoid_tiny, tmp_path, variant):
    tau_extremes_are_big_and_little(sigmoid_tiny(variant), tmp_path)


# -- published specs -----------------------------------------------------------------------------


def test_published_quirks():
    v3 = spec_from_dict(spec_from_hf_config("specs/hf/deepseek-v3")).model
    assert (v3.moe.num_experts, v3.moe.top_k, v3.moe.n_group, v3.moe.topk_group) == (256, 8, 8, 4)
    assert v3.moe.scoring == "sigmoid" and v3.moe.correction_bias and v3.moe.routed_scaling_factor == 2.5
    assert v3.moe.dense_layers == [0, 1, 2] and v3.attention.q_lora_rank == 1536 and v3.rope.factor == 40
    kimi = spec_from_dict(spec_from_hf_config("specs/hf/kimi-k2-instruct")).model
    assert kimi.family == "deepseek_v3" and (kimi.moe.num_experts, kimi.moe.n_group) == (384, 1)
    assert kimi.rope.theta == 50000 and kimi.rope.beta_fast == 1.0
    air = spec_from_dict(spec_from_hf_config("specs/hf/glm-4.5-air")).model
    assert air.rope.partial_rotary_factor == 0.5 and air.attention.qkv_bias and air.attention.qk_norm == "none"
    assert (air.attention.head_dim, air.moe.shared_expert.intermediate_size, air.moe.dense_layers) == (128, 1408, [0])


@pytest.mark.parametrize("name, device", [("deepseek-v3", "80GiB"), ("kimi-k2-instruct", "80GiB"),
                                          ("glm-4.5-air", "24GiB")])
def test_published_specs_compile_weight_free_and_say_where_they_fit(tmp_path, capsys, name, device):
    """None fits a 16 GB card (the memory plan says so); each fits the card its spec plans for."""
    assert run_cli("compile", f"specs/{name}.yaml", "-o", tmp_path / "g", "--device-memory", device, "--strict") == 0
    assert "device memory:" in capsys.readouterr().out
    assert run_cli("compile", f"specs/{name}.yaml", "-o", tmp_path / "g16", "--device-memory", "16GiB") == 0
    assert "more than --device-memory (16.0GiB)" in capsys.readouterr().err


# -- bad input -----------------------------------------------------------------------------------


def write_variant(tmp_path, edit):
    data = yaml.safe_load(open("specs/glm-4.5-air.yaml"))
    edit(data["model"])
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("edit, key, expected", [
    (lambda m: m["moe"].update(scoring="tanh"), "model.moe.scoring", "expected one of 'softmax', 'sigmoid'"),
    (lambda m: m["moe"].update(n_group=3), "model.moe.n_group", "divisor of num_experts=128"),
    (lambda m: m["moe"].update(n_group=128), "model.moe.n_group", "groups of at least 2 experts"),
    (lambda m: m["moe"].update(n_group=8, topk_group=9), "model.moe.topk_group", "topk_group <= n_group=8"),
    (lambda m: m["moe"].update(n_group=32, topk_group=1), "model.moe.top_k", "at most topk_group * experts"),
    (lambda m: m["moe"].update(scoring="softmax"), "model.moe.correction_bias", "needs model.moe.scoring sigmoid"),
    (lambda m: m["moe"].update(correction_bias="yes"), "model.moe.correction_bias", "expected true or false"),
    (lambda m: m["rope"].update(partial_rotary_factor=0), "model.rope.partial_rotary_factor", "(0, 1]"),
    (lambda m: m["rope"].update(partial_rotary_factor=0.01), "model.rope.partial_rotary_factor", "even integer"),
])
def test_spec_errors_name_the_key(tmp_path, edit, key, expected):
    with pytest.raises(SpecError) as info:
        load_spec(write_variant(tmp_path, edit))
    assert info.value.key == key and expected in info.value.message


def test_partial_rotary_is_refused_with_mla(tmp_path):
    data = yaml.safe_load(open("specs/deepseek-v3.yaml"))
    data["model"]["rope"]["partial_rotary_factor"] = 0.5
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match="expected 1 for mla attention") as info:
        load_spec(tmp_path / "s.yaml")
    assert info.value.key == "model.rope.partial_rotary_factor"


def import_error(tmp_path, capsys, cfg: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert run_cli("import-hf", tmp_path, "-o", tmp_path / "s.yaml") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and not (tmp_path / "s.yaml").exists()
    return err


@pytest.mark.parametrize("cfg", [
    {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32},
    {"model_type": "jamba", "attn_layer_period": 8, "num_experts": 16},  # Mamba layers between attention ones
])
def test_unsupported_family_is_one_line_naming_it_and_the_supported(tmp_path, capsys, cfg):
    err = import_error(tmp_path, capsys, cfg)
    assert f"unsupported model_type {cfg['model_type']!r}" in err
    supported = "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, kimi_k2, glm4_moe, gpt_oss"
    assert f"(supported: {supported}" in err and "minimax_m2" in err
    assert f"(supported: {', '.join(MODEL_TYPES)})" in err  # every one, the aliases too, in one list


@pytest.mark.parametrize("key, value, expected", [
    ("scoring_func", "softmax", "scoring_func: only 'sigmoid' is supported for deepseek_v3, got 'softmax'"),
    ("topk_method", "greedy", "topk_method: only 'noaux_tc' is supported for deepseek_v3"),
    ("moe_layer_freq", 2, "moe_layer_freq: only 1 is supported for deepseek_v3, got 2"),
    ("rope_interleave", False, "rope_interleave: only true is supported"),
    ("attention_bias", True, "attention_bias: attention biases are not supported with MLA"),
    ("n_group", None, "n_group: config.json has no value for this key"),
])
def test_deepseek_v3_configs_mobile_would_run_differently_are_refused(tmp_path, capsys, key, value, expected):
    cfg = json.loads(open("specs/hf/deepseek-v3/config.json").read())
    assert expected in import_error(tmp_path, capsys, {**cfg, key: value})


def test_fp8_checkpoint_imports_compiles_and_runs(tmp_path, capsys):
    """A published FP8 checkpoint (float8 blocks with scales, tests/test_fp8.py) imports with its
    experts native, compiles, and runs as the reference dequantization of it does."""
    from test_fp8 import write_fp8_checkpoint

    build_tiny_sigmoid("kimi_k2", tmp_path / "src")
    ckpt, ref = tmp_path / "ckpt", tmp_path / "ref"
    write_fp8_checkpoint(tmp_path / "src", ckpt, ref, [16, 16])
    assert run_cli("import-hf", ckpt, "-o", tmp_path / "s.yaml") == 0
    assert yaml.safe_load((tmp_path / "s.yaml").read_text())["runtime"]["expert_format"] == "native"
    assert run_cli("compile", tmp_path / "s.yaml", "-o", tmp_path / "g") == 0
    capsys.readouterr()
    ids = ",".join(map(str, PROMPT.tolist()))
    assert run_cli("run", "--graph", tmp_path / "g", "--prompt-ids", ids, "--max-new-tokens", "4", "--json") == 0
    out = json.loads(capsys.readouterr().out)["ids"]
    assert out == mobile.Engine.load(tmp_path / "g", weights=ref).generate(PROMPT, 4)


def test_the_selection_bias_stays_float32_in_a_bfloat16_model(sigmoid_tiny, tmp_path):
    """transformers keeps e_score_correction_bias in float32 whatever the model's dtype: rounded to
    bfloat16, near-tie expert choices could flip."""
    t = sigmoid_tiny("deepseek_v3")
    text = t.spec.read_text().replace("dtype: float32", "dtype: bfloat16").replace("path: ckpt", f"path: {t.ckpt}")
    assert "dtype: bfloat16" in text
    (tmp_path / "spec.yaml").write_text(text)
    assert run_cli("compile", tmp_path / "spec.yaml", "-o", tmp_path / "g") == 0
    engine = mobile.Engine.load(tmp_path / "g")
    biases = [w for (key, _), w in engine.kernels.w.items() if key == "router_correction"]
    assert biases and all(b.dtype == torch.float32 for b in biases)
    assert engine.kernels.w[("embed", None)].dtype == torch.bfloat16
