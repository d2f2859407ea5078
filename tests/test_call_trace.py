"""Issue 21's count of a decode token's Python (tests/calltrace.py). Under CUDA graphs, the path a
GPU runs, the model's math, the MoE op and the next token's pick (greedy or sampled) run inside
the replayed graphs: a token that moves no expert enters 7 of mobile's files, one that moves
experts also the transfer engine, and every token switches files at most 100 times."""

from __future__ import annotations

import pytest
from calltrace import SEGMENTS, measure

from mobile.moe import rule_kernel

GPU_FILES = {"mobile/runtime/engine.py", "mobile/runtime/executor.py", "mobile/runtime/graphs.py",
             "mobile/runtime/hostio.py", "mobile/moe/layer.py", "mobile/moe/cache.py", "mobile/moe/slots.py"}


@pytest.fixture
def graph(tiny, tmp_path):
    t = tiny("olmoe")
    return t.compile(tmp_path / "mobile", "--policy", "mobile", slots_per_layer=4), t.ckpt


@pytest.mark.parametrize("sampling", [None, {"greedy": False, "temperature": 0.8, "top_p": 0.9}])
def test_decode_tokens_under_cuda_graphs_stay_in_few_files(graph, monkeypatch, sampling):
    monkeypatch.setattr(rule_kernel, "enabled", False)  # the rule as a GPU runs it: its torch ops
    folder, ckpt = graph
    m = measure(folder, "on", tokens=3, traced=6, sampling=sampling, weights=ckpt, link_gbps=50.0)
    traces = m.traces
    assert m.policy == "mobile" and any(t["copies"] for t in traces)  # some tokens moved experts
    for t in traces:
        assert t["graphs"].endswith(", 0 run eagerly")
        moved = {"mobile/moe/transfer.py"} if t["copies"] else set()
        assert set(t["files"]) == GPU_FILES | moved and t["switches"] <= 100, (t["files"], t["switches"])


def test_eager_decode_tokens_run_their_segments_python(graph):
    """The count is not blind: eagerly the same tokens enter the segments, the math, the op and the
    sampler."""
    folder, ckpt = graph
    for t in measure(folder, "off", tokens=3, traced=2, weights=ckpt, link_gbps=50.0).traces:
        assert "graphs" not in t
        assert {SEGMENTS, "mobile/models/ops.py", "mobile/moe/op.py", "mobile/moe/rule.py",
                "mobile/runtime/sampling.py"} <= set(t["files"])
