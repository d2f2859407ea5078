"""gpt-oss (`gpt_oss`) against transformers on tiny checkpoints, and its MXFP4 experts.

The tiny model (tests/tiny.py: build_tiny_gpt_oss) has every tensor that init leaves at zero filled
with random values (q/k/v/o, router and expert biases, the sinks), sliding and full layers with a
window of 5 under 24-token prompts, expert weights large enough that the clamped SwiGLU clamps
(about a quarter of the gates, half of the ups), and the family's YaRN rope (truncate false).
MXFP4 experts are checked against a table-based decoder written here and against what
transformers' own dequantizer (integrations/mxfp4.py) makes of the same blocks.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import Tiny, run_cli
from safetensors.torch import load_file, save_file
from tiny import build_tiny_gpt_oss, gpt_oss_config

import mobile
from mobile.errors import CheckpointError, SpecError
from mobile.models import mxfp4
from mobile.models.ops import rope_inv_freq
from mobile.moe import native, quant
from mobile.moe.layout import ExpertMLP, arena_views, bias_views
from mobile.moe.op import ExpertKind
from mobile.moe.reference import reference
from mobile.moe.rule import KeepRule
from mobile.spec.hf import spec_from_hf_config
from mobile.spec.load import load_spec, spec_from_dict
from mobile.spec.schema import RopeSpec

PROMPT = torch.randint(3, 97, (24,), generator=torch.Generator().manual_seed(1))
EXPERTS = ("gate_up_proj", "down_proj")


class TinyGptOss(Tiny):
    """conftest.Tiny for gpt-oss: its checkpoint, imported spec, compiled graph and transformers model.
    mxfp4: the expert matrices are MXFP4 blocks and scales (random codes and scales), and the model's
    experts are what transformers' dequantizer makes of them."""

    def __init__(self, root: Path, mxfp4_experts: bool = False):
        self.mxfp4_experts = mxfp4_experts
        super().__init__(root, "gpt_oss")

    def build(self, ckpt: Path):
        model = build_tiny_gpt_oss(ckpt)
        if self.mxfp4_experts:
            to_mxfp4(ckpt, model)
        return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return TinyGptOss(tmp_path_factory.mktemp("gpt_oss"))


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


# -- exact against transformers ---------------------------------------------------------------


def test_logits_match(tiny):
    diff = (mobile.Engine.load(tiny.graph).logits(PROMPT) - reference_logits(tiny.model, PROMPT)).abs().max().item()
    print(f"gpt_oss: max |logits - transformers| = {diff:.3g}")
    assert diff < 1e-4


def test_greedy_matches_generate(tiny):
    """Decoding through the KV cache past the sliding window, 16 tokens as transformers generates them."""
    ours = mobile.Engine.load(tiny.graph).generate(PROMPT, max_new_tokens=16, stop_ids=[])
    with torch.no_grad():
        ref = tiny.model.generate(PROMPT[None], max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, PROMPT.numel():].tolist()
    assert ours == ref and len(set(ref)) > 4


def test_decode_steps_match_transformers(tiny):
    """Each decode step's logits (one token through the KV cache, the window sliding past the prompt)
    equal transformers' forward over the whole sequence, position by position."""
    ids = torch.cat((PROMPT, torch.randint(3, 97, (16,), generator=torch.Generator().manual_seed(2))))
    ref = reference_logits(tiny.model, ids)
    engine = mobile.Engine.load(tiny.graph)
    engine.logits(PROMPT)
    steps = torch.cat([engine._forward(ids[i:i + 1], i) for i in range(PROMPT.numel(), ids.numel())])
    assert (steps - ref[PROMPT.numel():]).abs().max() < 1e-4


@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_rope_matches_transformers(truncate):
    """The published configs' YaRN (head_dim 64, factor 32, beta 32 / 1) with and without truncate: its
    effect on the tiny model's logits is about 1e-5, too small for the logits test to see."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": truncate,
            "original_max_position_embeddings": 4096, "rope_theta": 150000.0}
    cfg = gpt_oss_config(head_dim=64, hidden_size=64 * 4, max_position_embeddings=131072, rope_parameters=rope)
    inv, scale = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    spec = RopeSpec(theta=150000.0, type="yarn", factor=32.0, original_max_position_embeddings=4096, truncate=truncate)
    ours, our_scale = rope_inv_freq(spec, 64, 131072)
    torch.testing.assert_close(ours, inv, rtol=0, atol=0)
    assert our_scale == pytest.approx(scale, rel=1e-12)


# -- offloading and the big-little policies ---------------------------------------------------


def policy_engine(t, tmp_path: Path, policy: str, slots: int | None = None, **policy_fields) -> mobile.Engine:
    """The tiny spec under `policy` (with slots: a bounded cache of that many slots per layer)."""
    data = yaml.safe_load(t.spec.read_text())
    data["checkpoint"]["path"] = str(t.ckpt)
    data["policy"] = {"name": policy, **policy_fields}
    if slots is not None:
        data["runtime"]["expert_cache"] = {"slots_per_layer": slots}
    path = tmp_path / f"{policy}-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(data))
    assert run_cli("compile", path, "-o", path.with_suffix("")) == 0
    return mobile.Engine.load(path.with_suffix(""), link_gbps=50.0)


@pytest.mark.parametrize("policy", ["ondemand", "lru", "lru-prefetch", "mobile"])
def test_offloading_policies_give_resident_tokens(tiny, tmp_path, policy):
    """With 3 slots per layer (top_k, the minimum) every token evicts; the biases travel with their
    experts. mobile falls back on every token here (tau above any probability), so it decodes big."""
    resident = mobile.Engine.load(tiny.graph).generate(PROMPT, 16, stop_ids=[])
    fields = {"tau": 1.0} if policy == "mobile" else {}
    engine = policy_engine(tiny, tmp_path, policy, slots=3, **fields)
    try:
        assert engine.generate(PROMPT, 16, stop_ids=[]) == resident
        assert engine.stats["expert_misses"] > 3 * 3  # more than the 3 layers' caches hold: it evicted
    finally:
        engine.close()


def test_bfloat16_prefetching_matches_resident(tiny, tmp_path):
    """In bfloat16 (the published dtype; the router's bias in it too, its logits in float32), with
    next-layer prediction, offloading gives the resident model's tokens."""
    spec = tmp_path / "bf16.yaml"
    spec.write_text(tiny.spec.read_text().replace("dtype: float32", "dtype: bfloat16").replace(
        "path: ckpt", f"path: {tiny.ckpt}"))
    bf16 = SimpleNamespace(spec=spec, ckpt=tiny.ckpt)
    resident = policy_engine(bf16, tmp_path, "resident")
    engine = policy_engine(bf16, tmp_path, "lru-prefetch", slots=3)
    assert engine.kernels.w[("router_bias", 0)].dtype == torch.bfloat16
    assert engine.generate(PROMPT, 16, stop_ids=[]) == resident.generate(PROMPT, 16, stop_ids=[])
    assert engine.stats["prefetch_issued"] > 0
    engine.close()


def test_mobile_at_the_tau_extremes(tiny, tmp_path):
    """Every token falling back equals big decoding; none falling back (a little prompt too) equals
    `little`. Resident, so cached_complement is off (it would make every little pass big), and no
    per-layer rule (at top-3 its default keeps all three experts for most tokens)."""
    opts = {"cached_complement": False, "layer_tau": None}
    big = policy_engine(tiny, tmp_path, "lru-prefetch").generate(PROMPT, 16, stop_ids=[])
    always = policy_engine(tiny, tmp_path, "mobile", tau=1, **opts)
    assert always.generate(PROMPT, 16, stop_ids=[]) == big and always.stats["fallback_tokens"] == 15
    little = policy_engine(tiny, tmp_path, "little", **opts).generate(PROMPT, 16, stop_ids=[])
    never = policy_engine(tiny, tmp_path, "mobile", tau=0.0, prefill="little", **opts)
    assert never.generate(PROMPT, 16, stop_ids=[]) == little and never.stats["fallback_tokens"] == 0
    assert little != big  # the little set changes this model's tokens, so the two checks differ


# -- MXFP4 ------------------------------------------------------------------------------------

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def table_decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The reference decoder: byte by byte, low nibble first, sign bit 8, scale 2 ** (s - 127)."""
    *lead, R, G, B = blocks.shape
    flat_b, flat_s = blocks.reshape(-1, G, B).tolist(), scales.reshape(-1, G).tolist()
    out = []
    for row_b, row_s in zip(flat_b, flat_s, strict=True):
        values = []
        for block, s in zip(row_b, row_s, strict=True):
            for byte in block:
                for code in (byte & 0xF, byte >> 4):
                    sign = -1.0 if code & 8 else 1.0
                    values.append(sign * E2M1[code & 7] * 2.0 ** (s - 127))
        out.append(values)
    return torch.tensor(out, dtype=torch.float32).reshape(*lead, R, G * 2 * B)


def random_mxfp4(shape_out_in: tuple[int, int, int], seed: int, lo: int = 121, hi: int = 125):
    """Random blocks and scales of an [E, out, in] matrix (scales 2^-6..2^-2: weights of about 0.1)."""
    g = torch.Generator().manual_seed(seed)
    blocks_shape, scales_shape = mxfp4.shapes(shape_out_in[1], shape_out_in[2], shape_out_in[:1])
    return (torch.randint(0, 256, blocks_shape, generator=g, dtype=torch.uint8),
            torch.randint(lo, hi, scales_shape, generator=g).to(torch.uint8))


def test_mxfp4_decoding_matches_the_reference_decoders():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_mxfp4((3, 5, 64), seed=0, lo=100, hi=150)  # every code, scales 2^-27..2^22
    ours = mxfp4.decode(blocks, scales)
    assert ours.shape == (3, 5, 64)
    torch.testing.assert_close(ours, table_decode(blocks, scales), rtol=0, atol=0)
    # transformers returns the matrix input-major, as its GptOssExperts applies it
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    torch.testing.assert_close(ours.transpose(1, 2), theirs, rtol=0, atol=0)
    assert set(torch.unique(ours.abs() / 2.0 ** (scales.float() - 127).repeat_interleave(32, -1)).tolist()) == set(E2M1)
    assert mxfp4.decode(blocks, scales, torch.bfloat16).dtype == torch.bfloat16


def test_mxfp4_nan_scale_is_refused():
    blocks, scales = random_mxfp4((1, 2, 32), seed=1)
    scales[0, 1, 0] = 255
    with pytest.raises(CheckpointError, match="E8M0 defines as NaN"):
        mxfp4.decode(blocks, scales, name="w")


def to_mxfp4(ckpt: Path, model) -> None:
    """Rewrite a tiny gpt-oss checkpoint's expert matrices as MXFP4 blocks and scales, as the
    published checkpoints store them (and config.json's quant_method mxfp4); the transformers
    model's experts become what transformers' dequantizer makes of them."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    tensors = load_file(ckpt / "model.safetensors")
    params = dict(model.named_parameters())
    for i, name in enumerate(sorted(n for n in tensors if n.endswith(EXPERTS))):
        E, n_in, n_out = tensors.pop(name).shape
        blocks, scales = random_mxfp4((E, n_out, n_in), seed=10 + i)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        with torch.no_grad():
            params[name].copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def tiny_mxfp4(tmp_path_factory):
    return TinyGptOss(tmp_path_factory.mktemp("gpt_oss_mxfp4"), mxfp4_experts=True)


def test_mxfp4_checkpoint_end_to_end(tiny_mxfp4, tmp_path):
    """A checkpoint in the published layout runs as transformers runs its dequantized weights, also
    offloaded (the decoded experts are ordinary expert rows from the load on)."""
    t = tiny_mxfp4
    assert "_blocks" in " ".join(load_file(t.ckpt / "model.safetensors"))
    ref = reference_logits(t.model, PROMPT)
    diff = (mobile.Engine.load(t.graph).logits(PROMPT) - ref).abs().max().item()
    print(f"gpt_oss MXFP4: max |logits - transformers on the dequantized weights| = {diff:.3g}")
    assert diff < 1e-4
    engine = policy_engine(t, tmp_path, "lru", slots=3)
    assert (engine.logits(PROMPT) - ref).abs().max() < 1e-4
    engine.close()


def test_mxfp4_experts_repack_as_int4(tiny_mxfp4, tmp_path):
    """--expert-format int4 on MXFP4 experts packs what they decode to: the same bytes, so the same
    logits, as int4 from a native checkpoint of the decoded weights."""
    t = tiny_mxfp4
    native = tmp_path / "native"
    t.model.save_pretrained(native)  # its experts: the decoded MXFP4 values
    from_mxfp4 = mobile.Engine.load(t.graph, expert_format="int4", expert_group_size=16)
    from_native = mobile.Engine.load(t.graph, weights=native, expert_format="int4", expert_group_size=16)
    assert from_mxfp4.spec.runtime.expert_format == "int4"
    rows = from_mxfp4.experts.arena(0)
    assert rows.dtype == torch.uint8 and torch.equal(rows, from_native.experts.arena(0))
    torch.testing.assert_close(from_mxfp4.logits(PROMPT), from_native.logits(PROMPT), rtol=0, atol=0)


# -- the expert op with biases and the clamped SwiGLU, on the CPU paths -----------------------


def biased_layer(T: int, K: int, fmt: str = "native", H: int = 40, inter: int = 24, seed: int = 0):
    """A layer of 6 slots of experts with biases and the clamped SwiGLU (limit 0.5: it clamps)."""
    g = torch.Generator().manual_seed(seed)
    mlp = ExpertMLP(H, inter, bias=True, act="clamped_swiglu", alpha=1.702, limit=0.5)
    S, E = 6, 8
    arena = torch.randn(S, quant.native_row_elems(H, inter, True), generator=g) * 0.3
    x = torch.randn(T, H, generator=g)
    weights, ids = torch.topk(torch.rand(T, E, generator=g).softmax(-1), K, dim=-1)
    slot_map = torch.tensor([0, 1, -1, 2, 3, -1, 4, 5])
    return x, weights, ids, slot_map, arena, mlp


@pytest.mark.parametrize("T,K", [(1, 3), (5, 2), (17, 4)])
def test_native_paths_with_biases_match_the_reference(T, K):
    x, weights, ids, slot_map, arena, mlp = biased_layer(T, K)
    rule = KeepRule("prefix", 2, 0.6, cached=True)
    w, slots = rule.pairs(weights, ids, slot_map)
    assert (slots < 0).any()
    ref = reference(x, w, slots, arena, mlp)
    for path in (native._gathered, native.native):
        torch.testing.assert_close(path(x, w, slots, arena, mlp), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(native._grouped(x, w, slots, arena, mlp.inter, True, mlp.act, mlp.alpha, mlp.limit), ref,
                               rtol=1e-5, atol=1e-5)
    if T == 1:
        torch.testing.assert_close(native._bagged(x, w, slots, arena, mlp), ref, rtol=1e-5, atol=1e-5)
    # the op itself, from the route
    out = torch.ops.mobile.moe_experts(x, weights, ids, slot_map, arena, rule.text, ExpertKind("native", 0, mlp).text)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    plain = reference(x, w, slots, arena, ExpertMLP(mlp.hidden, mlp.inter, bias=True))
    assert (plain - ref).abs().max() > 1e-2  # the activation made a difference


@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 8)])
@pytest.mark.parametrize("T", [1, 9])
def test_packed_experts_keep_their_biases(fmt, group, T):
    """int8 / int4 rows carry the biases as float16, unquantized; the op matches dequantize-then-reference."""
    x, weights, ids, slot_map, arena, mlp = biased_layer(T, 3)
    layout = quant.Layout(fmt, group, mlp.hidden, mlp.inter, bias=True)
    gate_up, down = arena_views(arena, mlp.hidden, mlp.inter)
    gu_bias, down_bias = bias_views(arena, mlp)
    rows = torch.stack([quant.quantize_matrices(layout, gate_up[s], down[s], (gu_bias[s], down_bias[s]))
                        for s in range(arena.shape[0])])
    dense = layout.dequantize_rows(rows, torch.float32)
    torch.testing.assert_close(bias_views(dense, mlp)[0], gu_bias.half().float())
    torch.testing.assert_close(bias_views(dense, mlp)[1], down_bias.half().float())
    out = torch.ops.mobile.moe_experts(x, weights, ids, slot_map, rows, KeepRule.big(3).text,
                                       ExpertKind(fmt, group, mlp).text)
    w, slots = KeepRule.big(3).pairs(weights, ids, slot_map)
    torch.testing.assert_close(out, reference(x, w, slots, dense, mlp), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="biases are packed exactly when"):
        layout.pack(quant.quantize(gate_up[0], fmt, group), quant.quantize(down[0], fmt, group))


def test_int4_rows_hold_the_checkpoints_experts(tiny):
    """--expert-format int4 on a gpt-oss checkpoint: each row holds its expert's de-interleaved
    matrices within int4's rounding and its biases as float16, and the model runs on them."""
    engine = mobile.Engine.load(tiny.graph, expert_format="int4", expert_group_size=16)
    native = mobile.Engine.load(tiny.graph)
    mlp = ExpertMLP(32, 32, bias=True)
    dense = quant.Layout("int4", 16, 32, 32, bias=True).dequantize_rows(engine.experts.arena(1), torch.float32)
    ref = native.experts.arena(1)
    for ours, theirs in zip(bias_views(dense, mlp), bias_views(ref, mlp), strict=True):
        torch.testing.assert_close(ours, theirs.half().float(), rtol=0, atol=0)
    for ours, theirs in zip(arena_views(dense, 32, 32), arena_views(ref, 32, 32), strict=True):
        step = theirs.abs().amax() / 15  # an int4 step at most (a group's range over 15)
        assert (ours - theirs).abs().max() <= step
    assert torch.isfinite(engine.logits(PROMPT)).all()


# -- import-hf, the published specs, bad input ------------------------------------------------

PUBLISHED = ["gpt-oss-20b", "gpt-oss-120b"]


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_spec_compiles_within_16_gb(tmp_path, capsys, name):
    """(tests/test_import_hf.py checks that import-hf reproduces it.)"""
    capsys.readouterr()
    assert run_cli("compile", f"specs/{name}.yaml", "-o", tmp_path / "g", "--device-memory", "16GiB", "--strict") == 0
    text = capsys.readouterr()
    assert "warning" not in text.err and "host RAM for experts" in text.out


def test_published_configs_import_the_family():
    small = spec_from_dict(spec_from_hf_config("specs/hf/gpt-oss-20b"))
    big = spec_from_dict(spec_from_hf_config("specs/hf/gpt-oss-120b"))
    for spec, layers, experts in ((small, 24, 32), (big, 36, 128)):
        m = spec.model
        assert (m.num_layers, m.moe.num_experts, m.moe.top_k, m.moe.intermediate_size) == (layers, experts, 4, 2880)
        assert m.attention.sliding_layers == list(range(0, layers, 2)) and m.attention.sliding_window == 128
        assert m.attention.sinks and m.attention.o_bias and m.attention.qkv_bias
        assert (m.moe.scoring, m.moe.activation, m.moe.swiglu_limit, m.moe.swiglu_alpha) == \
            ("softmax_topk", "clamped_swiglu", 7.0, 1.702)
        assert (m.rope.type, m.rope.factor, m.rope.truncate, m.rope.theta) == ("yarn", 32.0, False, 150000.0)


def config_variant(tmp_path: Path, **changes) -> Path:
    cfg = json.loads(open("specs/hf/gpt-oss-20b/config.json").read())
    cfg.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("changes,key,message", [
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types", "expected a list of 24 layer types"),
    ({"layer_types": ["sliding_attention"] * 23 + ["chunked_attention"]}, "layer_types[23]",
     "expected 'sliding_attention' or 'full_attention', got 'chunked_attention'"),
    ({"swiglu_limit": None}, "swiglu_limit", "config.json has no value for this key"),
])
def test_bad_configs_name_their_key(tmp_path, changes, key, message):
    with pytest.raises(SpecError) as info:
        spec_from_hf_config(config_variant(tmp_path, **changes))
    assert f"config.json: {key}: {message}" in info.value.one_line()


@pytest.mark.parametrize("edit,key,message", [
    (lambda a, m: a.update(sliding_layers=[24]), "model.attention.sliding_layers[0]",
     "expected a layer index in [0, 24)"),
    (lambda a, m: a.update(sliding_window=0), "model.attention.sliding_window", "expected an integer >= 1"),
    (lambda a, m: m.update(swiglu_limit=0), "model.moe.swiglu_limit", "expected a number > 0, got 0"),
    (lambda a, m: m.update(scoring="sigmoid_topk"), "model.moe.scoring",
     "expected one of 'softmax', 'sigmoid', 'softmax_topk'"),
    (lambda a, m: a.update(sinks="yes"), "model.attention.sinks", "expected true or false"),
])
def test_bad_specs_name_their_key_path(tmp_path, edit, key, message):
    data = yaml.safe_load(open("specs/gpt-oss-20b.yaml"))
    edit(data["model"]["attention"], data["model"]["moe"])
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "s.yaml")
    assert f"{key}: {message}" in info.value.one_line()


def test_bad_checkpoints_end_in_one_line(tiny_mxfp4, tmp_path, capsys):
    """A NaN MXFP4 scale, and MXFP4 blocks of the wrong shape: one line naming the tensor, exit 2."""
    import shutil

    for case, edit, message in [
        ("nan", lambda t, n: t[n + "_scales"].view(-1)[3].fill_(255), "E8M0 defines as NaN"),
        ("shape", lambda t, n: t.update({n + "_blocks": t[n + "_blocks"][:, :-1].contiguous()}), "has shape"),
    ]:
        ckpt = tmp_path / case
        shutil.copytree(tiny_mxfp4.ckpt, ckpt)
        tensors = load_file(ckpt / "model.safetensors")
        name = "model.layers.1.mlp.experts.gate_up_proj"
        edit(tensors, name)
        save_file(tensors, ckpt / "model.safetensors")
        capsys.readouterr()
        assert run_cli("run", "--graph", tiny_mxfp4.graph, "--weights", ckpt, "--prompt-ids", "5,6") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and name in err and message in err, err


def test_mxfp4_is_refused_for_other_families(tmp_path, capsys):
    from tiny import build_tiny

    build_tiny("olmoe", tmp_path / "ckpt")
    assert run_cli("import-hf", tmp_path / "ckpt", "-o", tmp_path / "s.yaml") == 0
    assert run_cli("compile", tmp_path / "s.yaml", "-o", tmp_path / "g") == 0
    config = tmp_path / "ckpt" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "quantization_config": {"quant_method": "mxfp4"}}))
    capsys.readouterr()
    assert run_cli("run", "--graph", tmp_path / "g", "--prompt-ids", "5,6") == 2
    err = capsys.readouterr().err
    assert "quantization_config.quant_method: the checkpoint's experts are MXFP4, which mobile reads for gpt_oss " \
        "only, not for olmoe" in err


def test_quantize_refuses_fused_experts(tiny, tmp_path, capsys):
    capsys.readouterr()
    assert run_cli("quantize", tiny.ckpt, "-o", tmp_path / "q", "--format", "int8") == 2
    err = capsys.readouterr().err
    assert "stores a layer's routed experts fused" in err and "--expert-format int4" in err
    assert not (tmp_path / "q").exists()
