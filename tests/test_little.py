"""The `little` policy: every token uses its top little_k experts (default ceil(K/2))."""

from __future__ import annotations

import pytest
import torch
from tiny import build_tiny

import mobile
from mobile.compiler.compile import compile_to_dir
from mobile.compiler.ir import Op
from mobile.moe.cache import decode_status

PROMPT = torch.randint(3, 97, (20,), generator=torch.Generator().manual_seed(4))


def little_engine(t, tmp_path, weights: str):
    policy = f"policy:\n  name: little\n  little_weights: {weights}"
    text = t.spec.read_text().replace("policy:\n  name: resident", policy)
    (tmp_path / "s.yaml").write_text(text.replace("path: ckpt", f"path: {t.ckpt}"))
    compile_to_dir(tmp_path / "s.yaml", tmp_path / "g")
    return mobile.Engine.load(tmp_path / "g", weights=t.ckpt, link_gbps=50.0)


@pytest.mark.parametrize("family, weights", [("olmoe", "raw"), ("mixtral", "rescale")])
def test_little_equals_the_model_with_half_the_experts(tiny, tmp_path, family, weights):
    """OLMoE keeps raw top-k weights, so raw little = transformers at top_k/2. Mixtral renormalizes
    the top-k, so rescaled little (which keeps the big set's total, 1) = transformers at top_k/2."""
    t = tiny(family)
    engine = little_engine(t, tmp_path, weights)
    k = engine.spec.model.moe.top_k
    half = build_tiny(family, tmp_path / "half", num_experts_per_tok=(k + 1) // 2)  # same seed, same weights
    with torch.no_grad():
        ref = half(PROMPT[None]).logits[0]
    try:
        assert (engine.logits(PROMPT) - ref).abs().max() < 1e-4
        assert engine.stats["little_tokens"] == PROMPT.numel()
        with torch.no_grad():
            big = t.model(PROMPT[None]).logits[0]
        assert (engine.logits(PROMPT) - big).abs().max() > 1e-3  # and it is not the big model
    finally:
        engine.close()


def test_little_graph_fetches_little_sets(tmp_path):
    _, g = compile_to_dir("specs/olmoe-1b-7b.yaml", tmp_path / "g", policy="little")
    experts = [n for n in g.by_op(Op.EXPERT)]
    assert {n.attr("variant") for n in experts} == {"little"} and {n.attr("k") for n in experts} == {4}
    assert {n.attr("k") for n in g.by_op(Op.FETCH)} == {4}
    assert {n.attr("h2d_bytes") for n in g.by_op(Op.FETCH)} == {4 * 3 * 2048 * 1024 * 2}


@pytest.mark.parametrize("weights", ["raw", "rescale"])
def test_cached_complement_with_every_expert_on_the_device_is_big(tiny, tmp_path, weights):
    """With all experts resident, every dropped expert is free: the little pass is the big model,
    with the router's own weights (rescaling the whole big set changes nothing)."""
    t = tiny("olmoe")
    # layer-mass with tau 0 never calls a layer big: the little set plus whatever is cached
    compile_dir = t.compile(tmp_path / "cc", "--policy", "layer-mass", "--tau", "0", "--cached-complement", "on",
                            "--little-weights", weights, slots_per_layer=4)
    engine = mobile.Engine.load(compile_dir, weights=t.ckpt, all_resident=True)
    with torch.no_grad():
        big = t.model(PROMPT[None]).logits[0]
    assert (engine.logits(PROMPT) - big).abs().max() < 1e-4


def test_cached_complement_never_moves_a_dropped_expert(tiny, tmp_path):
    """Under an offloaded cache the little pass adds only experts already on the device: every
    copy a decode step's fetch issues is for an expert of some token's little set, and some dropped
    experts do come along for free."""
    t = tiny("olmoe")
    graph = t.compile(tmp_path / "cc", "--policy", "layer-mass", "--tau", "0", "--cached-complement", "on",
                      slots_per_layer=6)
    engine = mobile.Engine.load(graph, weights=t.ckpt, link_gbps=50.0)
    experts, little_k = engine.experts, engine.spec.little_k
    fetch, violations = experts.fetch, []

    def checked_fetch(layer, entries, routes, tag=""):
        ids, k = routes  # the big set of each token, K at a time
        little = {e for i in range(0, len(ids), k) for e in ids[i:i + little_k]}
        table = experts.tables[layer]
        cached, missing, _ = decode_status(entries, experts.num_experts)
        copied = [e for e in cached + missing if e not in table.slot_of]
        violations.extend((layer, e) for e in copied if e not in little)
        return fetch(layer, entries, routes, tag=tag)

    experts.fetch = checked_fetch
    engine.generate(PROMPT, 24, stop_ids=[])
    assert not violations
    assert engine.stats["free_complement_experts"] > 0
    engine.close()
