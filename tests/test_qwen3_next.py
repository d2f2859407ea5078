"""Qwen3-Next and Qwen3.5-MoE: Gated DeltaNet layers with a recurrent state, three to every gated
full-attention layer. Exact against transformers, and the state under big-little.

The tiny checkpoints have every feature of the published models at small shapes: three linear
layers then one full (as full_attention_interval 4), two key heads serving four value heads, a
conv window of three, the sigmoid-gated shared expert, partial rotary (a quarter of each head),
and the multimodal wrapper's prefix (qwen3_5_moe). Every tensor that init leaves at zero or one is
filled first: the zero-centred norms, the gated norm's weight, dt_bias. The projections are
wider than init's so that the linear layers steer the logits (a flatter model would agree with
anything), and lm_head wide enough that a confidence gate can fire on some tokens and not others.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import Tiny, tiny_cache
from test_families_v3 import policy_engine, tau_extremes_are_big_and_little
from test_offload import offloading_matches_resident

import mobile
from mobile.compiler.costs import recurrent_state_bytes
from mobile.models import linear_kernels
from mobile.spec.load import load_spec

VARIANTS = ("qwen3_next", "qwen3_5_moe_text", "qwen3_5_moe")
LONG = torch.randint(3, 97, (150,), generator=torch.Generator().manual_seed(1))  # over two 64-position chunks
PROMPT = LONG[:50]  # 32 new tokens from here cross the chunk boundary at 64
SHAPES = dict(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=512, tie_word_embeddings=False, linear_conv_kernel_dim=4,
              linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
              moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=4,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_tiny_qwen3_next(out: Path, variant: str, seed: int = 0):
    """Save a tiny model of `variant` to `out`; returns the transformers model."""
    import transformers as tf

    torch.manual_seed(seed)
    if variant == "qwen3_next":
        model = tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**SHAPES, intermediate_size=40))
    elif variant == "qwen3_5_moe_text":
        model = tf.Qwen3_5MoeForCausalLM(tf.Qwen3_5MoeTextConfig(**SHAPES))
    else:  # the multimodal checkpoint, with the smallest vision tower its config takes (never read)
        vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32)
        model = tf.Qwen3_5MoeForConditionalGeneration(tf.Qwen3_5MoeConfig(text_config=SHAPES, vision_config=vision))
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual" in name:
                continue
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)  # decisive routing
            elif name.endswith("linear_attn.norm.weight"):
                p.copy_(1 + torch.randn_like(p) * 0.3)  # the gated norm's plain weight (init: ones)
            elif name.endswith("norm.weight") or name.endswith("dt_bias"):
                p.normal_(0, 0.3)  # zero-centred norms (init: zeros) and the decay's bias (init: ones)
            elif name.endswith("lm_head.weight"):
                p.normal_(0, 0.5)
            elif p.dim() >= 2 and "embed" not in name and "conv1d" not in name:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    return model


class Qwen3NextTiny(Tiny):
    def build(self, ckpt):
        return build_tiny_qwen3_next(ckpt, self.family)


@pytest.fixture(scope="module")
def hybrid_tiny(tmp_path_factory):
    return tiny_cache(tmp_path_factory, Qwen3NextTiny)


def reference_generate(t, prompt: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        return t.model.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, prompt.numel():].tolist()


# -- exact against transformers ------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_32_greedy_tokens_match_transformers(hybrid_tiny, variant):
    """A prompt of 150 positions runs the chunked delta rule over three chunks; 32 tokens decoded
    after 50 run the recurrent form across the chunk boundary at 64."""
    t = hybrid_tiny(variant)
    engine = mobile.Engine.load(t.graph)
    try:
        ours = engine.logits(LONG)
        with torch.no_grad():
            ref = t.model(LONG[None]).logits[0].float()
        diff = (ours - ref).abs().max().item()
        print(f"{variant}: max |logits - transformers| = {diff:.2g} (logits up to {ref.abs().max().item():.1f})")
        assert diff < 1e-4
        tokens = engine.generate(PROMPT, max_new_tokens=32, stop_ids=[])
        assert engine.stats["linear_attention_kernels"] == "torch"
    finally:
        engine.close()
    ref_tokens = reference_generate(t, PROMPT, 32)
    assert tokens == ref_tokens
    assert len(set(ref_tokens)) > 8  # the tiny model does not settle on one token


def test_decode_equals_prefill_across_chunks(hybrid_tiny):
    """Each position decoded one at a time (the recurrent form, from position 60 across 64) gives
    the logits of one prefill over all of them (the chunked form)."""
    engine = mobile.Engine.load(hybrid_tiny("qwen3_5_moe_text").graph)
    try:
        whole = engine.logits(LONG[:72])
        engine._forward(LONG[:60], 0)
        steps = torch.cat([engine._forward(LONG[i:i + 1], i) for i in range(60, 72)])
    finally:
        engine.close()
    assert (steps - whole[60:72]).abs().max().item() < 1e-4  # two float orders of one sum: the bound vs transformers


def test_the_graph_shows_linear_attention_layers_as_their_own_nodes(hybrid_tiny):
    t = hybrid_tiny("qwen3_next")
    nodes = json.loads((t.graph / "graph.json").read_text())["nodes"]
    ops = {n["name"]: n["op"] for n in nodes}
    assert [ops.get(f"L{i}.linear_attn") for i in range(4)] == ["linear_attention"] * 3 + [None]
    assert ops["L3.attn"] == "attention"
    assert "linear_attention" in (t.graph / "schedule.txt").read_text()


def test_imported_variants_carry_the_same_model(hybrid_tiny):
    specs = [load_spec(hybrid_tiny(v).spec) for v in VARIANTS]
    next_, text, full = (s.model for s in specs)
    assert text == full and text.family == "qwen3_5_moe" and next_.family == "qwen3_next"
    assert next_.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert next_.attention.output_gate and next_.zero_centered_norms and next_.rope.partial_rotary_factor == 0.25
    assert specs[2].checkpoint.tensor_names["la_qkv"].startswith("model.language_model.layers.")


# -- the state under big-little ------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["qwen3_next", "qwen3_5_moe"])
def test_mobile_at_the_tau_extremes_is_big_and_little(hybrid_tiny, tmp_path, variant):
    """At tau 1 every decoded token's little pass advances the state, which the fallback restores
    before the big pass: anything else would count the token twice and leave big decoding."""
    tau_extremes_are_big_and_little(hybrid_tiny(variant), tmp_path, PROMPT)


def test_little_and_big_decode_differently_here(hybrid_tiny, tmp_path):
    """What makes the tau-extreme test above mean something on this checkpoint."""
    t = hybrid_tiny("qwen3_5_moe_text")
    little, big = policy_engine(t, tmp_path, "little"), mobile.Engine.load(t.graph)
    try:
        assert little.generate(PROMPT, 16, stop_ids=[]) != big.generate(PROMPT, 16, stop_ids=[])
    finally:
        little.close()
        big.close()


@pytest.mark.parametrize("variant", ["qwen3_next", "qwen3_5_moe"])
def test_a_kv_refresh_recomputes_from_the_kept_state(hybrid_tiny, tmp_path, variant):
    """With kv_refresh longer than the run, a fallback recomputes every little token since the last
    big pass from the state kept before the first of them: after it, the model is exactly where
    big decoding of the same tokens is, so each fallen-back token's logits are big decoding's (a
    state restored wrong, or not at all, is off by whole units)."""
    t = hybrid_tiny(variant)
    engine = policy_engine(t, tmp_path, "mobile", tau=0.3, kv_refresh=1000)
    big = mobile.Engine.load(t.graph)
    forced = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(3))
    try:
        assert len(engine.state.kept) == 1001
        engine._forward(PROMPT, 0)
        big._forward(PROMPT, 0)
        fell = []
        for i, token in enumerate(forced):
            before = engine.stats_.fallback_tokens
            ours = engine._forward(token[None], PROMPT.numel() + i)
            ref = big._forward(token[None], PROMPT.numel() + i)
            if engine.stats_.fallback_tokens > before:
                fell.append(i)
                # the refresh runs the chunked form over its tokens, big decoding the recurrent one
                assert (ours - ref).abs().max().item() < 1e-4
        assert 5 < len(fell) < 35  # some tokens fall back, not all
        assert engine.stats["refreshed_tokens"] > 0
    finally:
        engine.close()
        big.close()


@pytest.mark.parametrize("policy", ["ondemand", "lru", "lru-prefetch"])
def test_offloading_gives_residents_tokens(hybrid_tiny, policy):
    offloading_matches_resident(hybrid_tiny("qwen3_5_moe"), policy, PROMPT)


@pytest.mark.parametrize("policy", ["host", "lru-host"])
def test_host_placements_give_residents_tokens(hybrid_tiny, tmp_path, policy):
    """Experts computed on the host, with the cache at its minimum (top_k slots) so that decoding misses."""
    t = hybrid_tiny("qwen3_next")
    resident = mobile.Engine.load(t.graph)
    graph = t.compile(tmp_path / policy, "--policy", policy, slots_per_layer=4)
    engine = mobile.Engine.load(graph, weights=t.ckpt, link_gbps=50.0)
    try:
        assert engine.generate(PROMPT, 16, stop_ids=[]) == resident.generate(PROMPT, 16, stop_ids=[])
        assert engine.stats["host_busy_s"] > 0  # the host computed some experts
    finally:
        engine.close()
        resident.close()


def test_static_state_decodes_as_eager_over_300_tokens(hybrid_tiny):
    """With CUDA graphs on (emulated here) the state is read and written in place: its buffers
    never move, and 300 decoded tokens equal eager decoding's."""
    t = hybrid_tiny("qwen3_5_moe_text")
    eager, static = mobile.Engine.load(t.graph), mobile.Engine.load(t.graph, cuda_graphs="on")
    try:
        assert static.state is not None
        where = [(s.conv.data_ptr(), s.ssm.data_ptr()) for s in static.state.layers.values()]
        assert static.generate(PROMPT, 300, stop_ids=[]) == eager.generate(PROMPT, 300, stop_ids=[])
        assert [(s.conv.data_ptr(), s.ssm.data_ptr()) for s in static.state.layers.values()] == where
        stats = static.stats
        assert stats["cuda_graphs"] == "emulated" and stats["graph_replays"] > 0
        # a prompt short enough for the runner (GRAPH_MAX_TOKENS) runs the chunked form through it
        assert static.generate(PROMPT[:5], 16, stop_ids=[]) == eager.generate(PROMPT[:5], 16, stop_ids=[])
    finally:
        eager.close()
        static.close()


def test_stats_say_the_kernel_path_and_the_state_bytes(hybrid_tiny, tmp_path):
    t = hybrid_tiny("qwen3_5_moe_text")
    engine = policy_engine(t, tmp_path, "mobile", tau=0.3, kv_refresh=4)
    try:
        spec = engine.spec
        assert engine.stats["recurrent_state_bytes"] == recurrent_state_bytes(spec) * (1 + 5)
        assert engine.stats["linear_attention_kernels"] == "torch"
        engine.reset_stats()  # what describes the setup outlives a reset (bench, eval and serve reset)
        assert engine.stats["linear_attention_kernels"] == "torch" and "recurrent_state_bytes" in engine.stats
    finally:
        engine.close()
    assert str(linear_kernels.choose(torch.device("cpu"), torch.bfloat16, "auto")) == "torch"
    assert str(linear_kernels.choose(torch.device("cuda"), torch.bfloat16, "torch")) == "torch"
    assert linear_kernels.choose(torch.device("cuda"), torch.float32, "auto").rule == "torch"  # fla takes no float32
    assert str(linear_kernels.LinearKernels("fla", "causal-conv1d")) == "delta rule fla, conv causal-conv1d"


# -- on CUDA (benchmarks/gpu_check.sh; skipped without a GPU) -----------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("path", ["auto", "torch"])
@pytest.mark.parametrize("variant", ["qwen3_next", "qwen3_5_moe"])
def test_cuda_matches_the_cpu_with_either_delta_rule(hybrid_tiny, monkeypatch, variant, path):
    """float32 (torch's delta rule: flash-linear-attention takes no float32; causal-conv1d's conv step
    where installed): the CPU's logits and tokens. The stats say which kernels ran."""
    monkeypatch.setenv("MOBILE_LINEAR_KERNELS", path)
    t = hybrid_tiny(variant)
    cpu, gpu = mobile.Engine.load(t.graph), mobile.Engine.load(t.graph, device="cuda")
    try:
        torch.testing.assert_close(gpu.logits(LONG), cpu.logits(LONG), atol=2e-4, rtol=1e-4)
        expected = str(linear_kernels.choose(torch.device("cuda"), torch.float32, path))
        assert gpu.stats["linear_attention_kernels"] == expected
        print(f"{variant} float32: linear attention kernels: {expected}")
        assert gpu.generate(PROMPT, 32, stop_ids=[]) == cpu.generate(PROMPT, 32, stop_ids=[])
    finally:
        cpu.close()
        gpu.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["qwen3_next", "qwen3_5_moe"])
def test_cuda_bfloat16_libraries_match_torchs_path(hybrid_tiny, tmp_path, monkeypatch, variant):
    """bfloat16, where flash-linear-attention's delta rule runs (if installed): against torch's
    path on the same GPU, within bfloat16's resolution (a tenth of the logits' range), most
    positions agreeing on the top token."""
    t = hybrid_tiny(variant)
    spec = tmp_path / "bf16.yaml"
    spec.write_text(t.spec.read_text().replace("dtype: float32", "dtype: bfloat16").replace("path: ckpt",
                                                                                            f"path: {t.ckpt}"))
    from conftest import run_cli

    assert run_cli("compile", spec, "-o", tmp_path / "g") == 0
    engines = {}
    for path in ("auto", "torch"):
        monkeypatch.setenv("MOBILE_LINEAR_KERNELS", path)
        engines[path] = mobile.Engine.load(tmp_path / "g", device="cuda")
    try:
        print(f"{variant} bfloat16: linear attention kernels: {engines['auto'].stats['linear_attention_kernels']}")
        ours, ref = engines["auto"].logits(LONG), engines["torch"].logits(LONG)
        assert (ours - ref).abs().max().item() < 0.1 * ref.abs().max().item()
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9
    finally:
        for e in engines.values():
            e.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_capture_the_state_and_decode_as_eager(hybrid_tiny):
    """Captured and replayed segments (not emulated) read and advance the state in place."""
    t = hybrid_tiny("qwen3_5_moe_text")
    eager, graphs = (mobile.Engine.load(t.graph, device="cuda", cuda_graphs=m) for m in ("off", "on"))
    try:
        assert graphs.generate(PROMPT, 300, stop_ids=[]) == eager.generate(PROMPT, 300, stop_ids=[])
        stats = graphs.stats
        assert stats["cuda_graphs"] == "on" and stats["graph_replays"] > 0, stats
    finally:
        eager.close()
        graphs.close()


def test_the_library_paths_are_wired_as_the_torch_path(hybrid_tiny, monkeypatch):
    """The CUDA libraries' calls, stood in for by torch functions of the same contract (the rule
    l2-norms and scales q and k itself; the conv step shifts its window in place), give the torch
    path's logits and tokens: what is handed to them and taken back is right. The libraries
    themselves run in the GPU tests above."""
    import torch.nn.functional as F

    from mobile.models import deltanet

    def rule(q, k, v, g, beta, state):  # flash-linear-attention's contract
        q, k = deltanet.l2norm(q.float()), deltanet.l2norm(k.float())
        if q.shape[0] == 1:
            return deltanet.recurrent(q / q.shape[-1] ** 0.5, k, v.float(), g, beta.float(), state)
        return deltanet.chunked(q * q.shape[-1] ** -0.5, k, v.float(), g, beta.float(), state, 64)

    def conv_step(x, window, weight):  # causal-conv1d's update: [1, C] in, the window shifted in place
        both = torch.cat((window, x.t().to(window.dtype)), dim=-1)
        window.copy_(both[:, 1:])
        return F.silu(F.conv1d(both[None], weight, groups=both.shape[0])[0]).t().to(x.dtype)

    calls = {"rule": 0, "conv": 0}

    def counted(name, fn):
        def call(*args):
            calls[name] += 1
            return fn(*args)
        return call

    monkeypatch.setattr(linear_kernels, "delta_rule", counted("rule", rule))
    monkeypatch.setattr(linear_kernels, "conv_step", counted("conv", conv_step))
    t = hybrid_tiny("qwen3_next")
    torch_path = mobile.Engine.load(t.graph)
    both = linear_kernels.LinearKernels("fla", "causal-conv1d")
    monkeypatch.setattr(linear_kernels, "choose", lambda device, dtype, asked: both)
    libraries = mobile.Engine.load(t.graph)
    try:
        assert libraries.stats["linear_attention_kernels"] == "delta rule fla, conv causal-conv1d"
        assert (libraries.logits(LONG) - torch_path.logits(LONG)).abs().max().item() < 1e-5
        assert libraries.generate(PROMPT, 16, stop_ids=[]) == torch_path.generate(PROMPT, 16, stop_ids=[])
        assert calls["rule"] > 0 and calls["conv"] > 0
    finally:
        torch_path.close()
        libraries.close()


def test_each_sequence_starts_from_a_zero_state(hybrid_tiny):
    """A new prompt starts from nothing: the state an earlier sequence folded in is gone (a KV cache
    forgets by position, a recurrent state only by being reset)."""
    engine = mobile.Engine.load(hybrid_tiny("qwen3_5_moe_text").graph)
    try:
        first = engine.generate(PROMPT, 16, stop_ids=[])
        engine.generate(LONG[:30], 16, stop_ids=[])  # another sequence in between
        assert engine.generate(PROMPT, 16, stop_ids=[]) == first
        assert all(not s.ssm.eq(0).all() for s in engine.state.layers.values())  # it did fold something in
    finally:
        engine.close()


def test_a_captured_segment_set_up_advances_the_state_once(hybrid_tiny, monkeypatch):
    """On CUDA an entry's set-up runs its segment three times (the set-up run, the capture's warm-up,
    the first replay). A KV write repeated writes the same rows; the recurrent state would fold the
    token in three times, so the runner rewinds it between the runs. Here the CUDA protocol runs
    with a stand-in for the capture: a warm-up run, then a graph whose replay runs the segment into
    the entry's buffers."""
    from mobile.runtime import graphs

    class Replay:
        def __init__(self, body, out):
            self.body, self.out = body, out

        def replay(self):
            graphs.copy_into(graphs.flatten(self.out.values())[0], graphs.flatten(self.body().values())[0])

    def capture(runner, body):
        out = body()  # the warm-up; a real capture then runs nothing
        return Replay(body, out), out

    monkeypatch.setattr(graphs.GraphRunner, "_capture", capture)
    t = hybrid_tiny("qwen3_5_moe_text")
    eager, static = mobile.Engine.load(t.graph), mobile.Engine.load(t.graph, cuda_graphs="on")
    try:
        assert static.graphs is not None
        static.graphs.capture = True  # the CUDA protocol
        assert static.generate(PROMPT, 24, stop_ids=[]) == eager.generate(PROMPT, 24, stop_ids=[])
        # a prompt short enough for the runner: its entries are set up now too
        assert static.generate(PROMPT[:5], 8, stop_ids=[]) == eager.generate(PROMPT[:5], 8, stop_ids=[])
        assert static.graphs.captures > 0
    finally:
        eager.close()
        static.close()


def test_a_little_prompt_is_not_refreshed_on_a_hybrid_model(hybrid_tiny, tmp_path):
    """A little prompt keeps no state per position, so a KV refresh recomputes only the decoded
    little tokens after it (on other families it reaches into the prompt)."""
    t = hybrid_tiny("qwen3_5_moe_text")
    engine = policy_engine(t, tmp_path, "mobile", tau=0.3, kv_refresh=1000, prefill="little")
    try:
        engine.generate(PROMPT, 24, stop_ids=[])
        s = engine.stats
        assert s["fallback_tokens"] > 0 and s["refreshed_tokens"] > 0
        # each refresh reaches back at most to the first decoded position (24 tokens decode 23 steps)
        assert s["refreshed_tokens"] <= s["fallback_tokens"] * 23
    finally:
        engine.close()
