"""The executor runs the emitted graph itself: editing graph.json changes the run or fails it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import mobile
from mobile.errors import GraphError

PROMPT = torch.arange(3, 23)


def edit_graph(src, dst, edit):
    shutil.copytree(src, dst)
    data = json.loads((dst / "graph.json").read_text())
    edit(data["nodes"])
    (dst / "graph.json").write_text(json.dumps(data))
    return dst


def names(nodes):
    return [n["name"] for n in nodes]


def offloaded(t, tmp_path):
    """The tiny checkpoint under `lru`: its graph has fetches and waits (a resident one has none)."""
    return t.compile(tmp_path / "lru", "--policy", "lru", slots_per_layer=8)


def test_executes_nodes_in_graph_order(tiny, tmp_path):
    t = tiny("qwen2_moe")
    graph = offloaded(t, tmp_path)
    base = mobile.Engine.load(graph, weights=t.ckpt)
    ref = base.logits(PROMPT)
    assert base.executor.executed == [n.name for n in base.graph.nodes]

    def swap(nodes):  # the shared expert and the wait are independent: swap them
        i, j = names(nodes).index("L0.shared"), names(nodes).index("L0.wait")
        nodes[i], nodes[j] = nodes[j], nodes[i]

    g = edit_graph(graph, tmp_path / "swapped", swap)
    engine = mobile.Engine.load(g, weights=t.ckpt)
    out = engine.logits(PROMPT)
    order = engine.executor.executed
    assert order.index("L0.wait") < order.index("L0.shared")  # the edited order is what ran
    assert order != base.executor.executed
    torch.testing.assert_close(out, ref)  # and, being independent, gives the same result


def test_dropping_a_node_fails_verification(tiny, tmp_path):
    t = tiny("olmoe")
    g = edit_graph(offloaded(t, tmp_path), tmp_path / "dropped", lambda nodes: nodes.pop(names(nodes).index("L1.wait")))
    with pytest.raises(GraphError, match="L1.experts: input L1.wait is not produced by any node"):
        mobile.Engine.load(g, weights=t.ckpt)


def test_reordering_dependent_nodes_fails_verification(tiny, tmp_path):
    t = tiny("olmoe")

    def swap(nodes):
        i, j = names(nodes).index("L0.router"), names(nodes).index("L0.fetch")
        nodes[i], nodes[j] = nodes[j], nodes[i]

    g = edit_graph(offloaded(t, tmp_path), tmp_path / "bad-order", swap)
    with pytest.raises(GraphError, match="L0.fetch: input L0.router is used before it is computed"):
        mobile.Engine.load(g, weights=t.ckpt)


def test_editing_attrs_changes_the_run(tiny, tmp_path):
    t = tiny("olmoe")
    ref = mobile.Engine.load(t.graph).logits(PROMPT)

    def fewer_experts(nodes):
        for n in nodes:
            if n["name"] == "L1.experts":
                n["attrs"]["rule"] = "top n=1"  # use only the top expert in layer 1

    out = mobile.Engine.load(edit_graph(t.graph, tmp_path / "k1", fewer_experts), weights=t.ckpt).logits(PROMPT)
    assert (out - ref).abs().max() > 1e-3

    def rewire_residual(nodes):
        for n in nodes:
            if n["name"] == "L2.out":
                n["inputs"] = ["L2.attn_res", "L2.attn_res"]  # drop the MoE branch of layer 2

    out = mobile.Engine.load(edit_graph(t.graph, tmp_path / "rewired", rewire_residual), weights=t.ckpt).logits(PROMPT)
    assert (out - ref).abs().max() > 1e-3


def test_torch_compile_matches_eager(tiny):
    t = tiny("qwen2_moe")
    eager = mobile.Engine.load(t.graph)
    compiled = mobile.Engine.load(t.graph, compile=True)
    torch.testing.assert_close(compiled.logits(PROMPT), eager.logits(PROMPT), atol=1e-5, rtol=1e-5)
    assert compiled.generate(PROMPT, 6, stop_ids=[]) == eager.generate(PROMPT, 6, stop_ids=[])


def test_torch_compile_does_not_recompile_as_the_kv_cache_grows(tiny):
    """Once the prompt (T > 1) and decode (T = 1) graphs exist, decoding past the KV cache's first
    capacity (256 positions: the buffers are reallocated, inside inference mode) and a second
    generate compile nothing new. Before, each growth recompiled every segment, and past torch's
    recompile limit the segments fell back to eager."""
    t = tiny("qwen2_moe")
    compiled = mobile.Engine.load(t.graph, compile=True)
    compiled.generate(PROMPT, 4, stop_ids=[])
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled.generate(PROMPT, 300, stop_ids=[])
        compiled.generate(PROMPT[:5], 4, stop_ids=[])
    assert compiled.kv.capacity > 256 and len(out) == 300


def test_a_traceback_inside_a_segment_shows_its_line(tiny, monkeypatch):
    """The generated segment code is registered with linecache: a traceback through a segment
    quotes the line that called the failing kernel, and names the node."""
    import traceback

    def broken(x, weight, eps):
        raise RuntimeError("injected fault")

    monkeypatch.setattr("mobile.models.ops.rms_norm", broken)
    engine = mobile.Engine.load(tiny("olmoe").graph)
    with pytest.raises(RuntimeError, match="injected fault") as e:
        engine.logits(PROMPT)
    text = "".join(traceback.format_exception(e.value))
    assert "<mobile segment embed.." in text and "# L0.attn_norm" in text


def test_the_interpreter_reports_the_passes_it_ran(tiny, tmp_path):
    """One forward, typed: what ran is the Outcome's (no fields set on the executor), and the big
    pass after a fallback starts again at the region, on the values the little pass left."""
    from mobile.compiler.ir import Pass
    from mobile.runtime.executor import Forward

    t = tiny("olmoe")
    graph = t.compile(tmp_path, "--policy", "mobile", "--tau", "1", slots_per_layer=6)
    engine = mobile.Engine.load(graph, weights=t.ckpt, link_gbps=50.0)
    engine.generate(PROMPT, 1, stop_ids=[])  # the prompt: the KV cache holds its positions
    ctx, tokens = engine._context(torch.tensor([5]), engine.length)
    executor = engine.executor
    assert executor.passes == (Pass.LITTLE, Pass.BIG) and executor.entry[Pass.BIG] > 0
    out = executor.run(ctx, tokens, Forward(Pass.LITTLE, gated=True))  # tau 1: the gate always fires
    assert out.passes == (Pass.LITTLE, Pass.BIG) and out.fell_back and out.refreshed == 0
    ran = executor.executed
    assert ran.count("L0.router") == 1 and ran.count("L1.router") == 2 and ran.count("importance_gate") == 1
    assert executor.run(ctx, tokens, Forward(Pass.LITTLE)).passes == (Pass.LITTLE,)  # ungated: read, not obeyed
    assert not hasattr(executor, "fell_back") and not hasattr(executor, "ran_little")


def test_a_sync_step_reads_what_the_segment_before_it_computed(tiny, tmp_path, monkeypatch):
    """What a sync step reads (a fetch's keep-rule status, a gate's confidence) is computed at the
    end of the segment before it, so that on a GPU the segment's CUDA graph holds that device work:
    the step runs none of the rule's ops itself. A step that a fallback's big pass starts at has no
    segment before it in that pass, so it computes its reads itself, and the tokens are the same."""
    from opcount import ops_in_sync_steps

    from mobile.moe import rule_kernel

    # the rule as its torch ops, as on a GPU (on a CPU its kernel makes them one C call: nothing to count)
    monkeypatch.setattr(rule_kernel, "enabled", False)
    t = tiny("olmoe")
    rule_ops = ("cumsum", "scatter_reduce", "topk")
    engine = mobile.Engine.load(t.compile(tmp_path / "little", "--policy", "mobile", slots_per_layer=6),
                                weights=t.ckpt, link_gbps=50.0)
    ops = ops_in_sync_steps(lambda: engine.generate(PROMPT, 8, stop_ids=[]))
    assert ops["cat"] > 0 and not any(ops[op] for op in rule_ops)  # reads packed, not computed
    falls_back = mobile.Engine.load(t.compile(tmp_path / "big", "--policy", "mobile", "--tau", "1",
                                              slots_per_layer=6), weights=t.ckpt, link_gbps=50.0)
    tokens: list[int] = []
    ops = ops_in_sync_steps(lambda: tokens.extend(falls_back.generate(PROMPT, 8, stop_ids=[])))
    assert ops["topk"] > 0  # the big pass's first fetch computed its status in its step
    assert tokens == mobile.Engine.load(t.graph).generate(PROMPT, 8, stop_ids=[])  # tau 1: every token big
    engine.close()
    falls_back.close()
