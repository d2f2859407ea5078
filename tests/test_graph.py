"""The IR, the pass pipeline and its verifier, the scheduler, and the emitted dumps."""

from __future__ import annotations

import json

import pytest

from mobile.compiler import passes
from mobile.compiler.compile import compile_to_dir
from mobile.compiler.emit import load_graph, summarize, write_graph_dir
from mobile.compiler.ir import Graph, Node, Op
from mobile.compiler.lower import lower
from mobile.compiler.verify import verify
from mobile.errors import GraphError
from mobile.spec.load import load_spec, with_policy

SPECS = ["mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "deepseek-v2-lite", "olmoe-1b-7b"]


def offloaded(name: str, policy: str = "lru"):
    """A published spec under a given offloading policy (lru by default), whatever policy it ships with."""
    return with_policy(load_spec(f"specs/{name}.yaml"), name=policy)


@pytest.fixture(scope="module")
def qwen_graph():
    return passes.compile_spec(offloaded("qwen1.5-moe-a2.7b"))


def test_node_is_immutable_and_round_trips():
    n = Node.make("L0.router", Op.ROUTER, ["L0.ffn_norm"], layer=0, top_k=4, dims=[1, 2])
    with pytest.raises(AttributeError):
        n.name = "x"  # type: ignore[misc]
    assert Node.from_json(json.loads(json.dumps(n.to_json()))) == n
    assert n.with_attrs(top_k=2).attr("top_k") == 2 and n.attr("top_k") == 4


@pytest.mark.parametrize("name", SPECS)
def test_published_specs_compile_without_weights(tmp_path, name):
    out, g = compile_to_dir(f"specs/{name}.yaml", tmp_path / name, policy="lru-prefetch")
    assert sorted(p.name for p in out.iterdir()) == sorted(["graph.json", "schedule.txt", "schedule.trace.json",
                                                            "graph.dot", ".mobile-output.json"])
    assert verify(load_graph(out)) == []
    assert load_graph(out) == g
    trace = json.loads((out / "schedule.trace.json").read_text())
    tids = {e["tid"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert tids == {1, 2}  # both streams appear
    lines = (out / "schedule.txt").read_text().splitlines()
    assert len([ln for ln in lines if not ln.startswith("#")]) == len(g.nodes) + 1  # header + one per node


def test_lowering_structure(qwen_graph):
    spec = load_spec("specs/qwen1.5-moe-a2.7b.yaml")
    g = qwen_graph
    assert len(g.by_op(Op.ROUTER)) == len(spec.moe_layers) == 24
    assert len(g.by_op(Op.FETCH)) == len(g.by_op(Op.WAIT)) == 24
    assert {n.attr("variant") for n in g.by_op(Op.EXPERT)} == {"big", "shared"}
    assert g.passes == ("lower", "fold_dead_gates", "assign_streams", "schedule", "plan_segments", "plan_timeline")
    ds = passes.compile_spec(load_spec("specs/deepseek-v2-lite.yaml"))
    assert [n.attr("layer") for n in ds.by_op(Op.MLP)] == [0]  # first_k_dense_replace = 1


def test_scheduler_overlaps_shared_expert_with_fetch(qwen_graph):
    """The shared expert does not need the fetched experts, so it runs between fetch and wait."""
    names = [n.name for n in qwen_graph.nodes]
    assert names.index("L3.fetch") < names.index("L3.shared") < names.index("L3.wait") < names.index("L3.experts")
    assert qwen_graph.node("L3.fetch").attr("stream") == "copy"
    assert "L3.router" in qwen_graph.node("L3.fetch").attr("hoist_limit")


def test_planned_overlap_when_experts_stream(tmp_path):
    _, g = compile_to_dir("specs/qwen1.5-moe-a2.7b.yaml", tmp_path / "g", policy="ondemand")
    fetch, shared = g.node("L3.fetch"), g.node("L3.shared")
    assert fetch.attr("h2d_bytes") == 4 * 3 * 2048 * 1408 * 2  # top-4 experts in bf16
    # the shared expert runs on the compute stream while the fetch is in flight
    assert fetch.attr("start_us") <= shared.attr("start_us") < fetch.attr("end_us")
    assert g.node("L3.experts").attr("start_us") >= fetch.attr("end_us")


def test_segments_are_runs_between_sync_points(qwen_graph):
    for n in qwen_graph.nodes:
        assert (n.attr("seg") is None) == (n.op in (Op.FETCH, Op.WAIT))


def test_verifier_names_the_broken_pass():
    spec = offloaded("olmoe-1b-7b")

    def drop_waits(g: Graph) -> Graph:
        return g.with_nodes([n for n in g.nodes if n.op is not Op.WAIT], "drop_waits")

    pipeline = [*passes.PIPELINE[:3], ("drop_waits", drop_waits), *passes.PIPELINE[3:]]
    with pytest.raises(GraphError, match=r"pass 'drop_waits' \(after lower, fold_dead_gates, assign_streams, "
                                         r"schedule\)"):
        passes.run_pipeline(lower(spec), pipeline)


def test_verifier_rules():
    g = lower(offloaded("olmoe-1b-7b"))
    assert verify(g) == []
    # an expert whose fetch is for another layer
    bad = [n if n.name != "L1.experts" else Node.make(n.name, n.op, [n.inputs[0], n.inputs[1], "L0.wait"],
                                                      **n.attr_dict) for n in g.nodes]
    assert any("fetch for layer 0" in e for e in verify(g.with_nodes(bad)))
    # a copy op on the compute stream
    bad = [n.with_attrs(stream="compute") if n.op is Op.FETCH else n for n in g.nodes]
    assert any("copy stream" in e for e in verify(g.with_nodes(bad)))
    # an input used before it is computed
    nodes = list(g.nodes)
    nodes[2], nodes[3] = nodes[3], nodes[2]
    assert any("used before it is computed" in e for e in verify(g.with_nodes(nodes)))


def test_scheduler_detects_cycles():
    a = Node.make("a", Op.ADD, ["tokens", "b"])
    b = Node.make("b", Op.ADD, ["tokens", "a"])
    with pytest.raises(GraphError, match="cycle detected"):
        passes.schedule(Graph("cyclic", (a, b)))


def test_compile_is_atomic(tmp_path, monkeypatch):
    out, g = compile_to_dir("specs/olmoe-1b-7b.yaml", tmp_path / "g")
    before = (out / "graph.json").read_text()

    def crash(graph):
        raise KeyboardInterrupt

    monkeypatch.setattr("mobile.compiler.emit.render_dot", crash)
    with pytest.raises(KeyboardInterrupt):
        write_graph_dir(g.with_nodes(g.nodes[:-1]), out)
    assert (out / "graph.json").read_text() == before  # the old graph is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no temp leftovers
    with pytest.raises(KeyboardInterrupt):
        write_graph_dir(g, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_debug_dumps_after_every_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILE_DEBUG", "1")
    monkeypatch.setenv("MOBILE_DEBUG_DIR", str(tmp_path))
    passes.compile_spec(load_spec("specs/olmoe-1b-7b.yaml"))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["olmoe-1b-7b.01.lower.txt", "olmoe-1b-7b.02.fold_dead_gates.txt",
                     "olmoe-1b-7b.03.assign_streams.txt", "olmoe-1b-7b.04.schedule.txt",
                     "olmoe-1b-7b.05.plan_segments.txt", "olmoe-1b-7b.06.plan_timeline.txt"]


def test_lowering_is_naive_and_the_scheduler_hoists():
    """Lowering puts each transfer right before its use; the scheduler moves the next layer's
    prefetch into this layer's sync step (one host read for both) and the shared expert between
    fetch and wait, where it overlaps the copy."""
    spec = offloaded("qwen1.5-moe-a2.7b", "lru-prefetch")
    lowered = [n.name for n in lower(spec).nodes]
    g = passes.compile_spec(spec)
    scheduled = [n.name for n in g.nodes]
    assert lowered != scheduled and sorted(lowered) == sorted(scheduled)
    # lowered: L4's prediction sits in layer 4, right before its fetch; the shared expert after the experts
    assert lowered.index("L3.experts") < lowered.index("L4.predict") < lowered.index("L4.prefetch") < \
        lowered.index("L4.fetch")
    assert lowered.index("L3.experts") < lowered.index("L3.shared")
    # scheduled: L4's prefetch is issued with L3's fetch, and the shared expert runs during the copy
    assert scheduled.index("L3.fetch") + 1 == scheduled.index("L4.prefetch") < scheduled.index("L3.wait")
    assert scheduled.index("L3.fetch") < scheduled.index("L3.shared") < scheduled.index("L3.wait")
    assert g.node("L4.prefetch").attr("hoisted") > 0 and g.node("L3.shared").attr("hoisted") > 0


def test_debug_dumps_show_what_the_scheduler_moved(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILE_DEBUG", "1")
    monkeypatch.setenv("MOBILE_DEBUG_DIR", str(tmp_path))
    passes.compile_spec(offloaded("olmoe-1b-7b", "lru-prefetch"))
    before = (tmp_path / "olmoe-1b-7b.01.lower.txt").read_text()
    after = (tmp_path / "olmoe-1b-7b.04.schedule.txt").read_text()
    row = next(line for line in after.splitlines() if " L5.prefetch " in line)
    assert "hoisted" in row and "hoisted" not in before
    assert before.index(" L5.prefetch ") > before.index(" L4.wait ")  # lowering: after layer 4's wait
    assert after.index(" L5.prefetch ") < after.index(" L4.wait ")  # scheduled: before it


def test_summary_counts_only_time_both_streams_are_busy():
    def node(name, stream, start, end):
        return Node.make(name, Op.FETCH if stream == "copy" else Op.ADD, [], stream=stream, start_us=start,
                         end_us=end)

    serial = Graph("g", (node("a", "compute", 0, 10), node("f", "copy", 10, 30), node("b", "compute", 30, 40)))
    s = summarize(serial)
    assert (s["overlap_us"], s["stall_us"], s["step_us"], s["copy_us"]) == (0, 20, 40, 20)
    overlapped = Graph("g", (node("a", "compute", 0, 10), node("f", "copy", 5, 25), node("b", "compute", 25, 35)))
    s = summarize(overlapped)
    assert (s["overlap_us"], s["stall_us"]) == (5, 15)


def test_summary_stall_is_measured_from_computes_first_start():
    """A step may open with a copy: compute waiting for work before it first starts is not a stall
    inside its span, and a copy across two compute runs overlaps each only where both are busy."""
    def node(name, stream, start, end):
        return Node.make(name, Op.FETCH if stream == "copy" else Op.ADD, [], stream=stream, start_us=start,
                         end_us=end)

    copy_first = Graph("g", (node("f0", "copy", 0, 10), node("a", "compute", 10, 20), node("f1", "copy", 20, 30),
                             node("b", "compute", 30, 40)))
    s = summarize(copy_first)
    assert (s["step_us"], s["compute_us"], s["copy_us"], s["overlap_us"], s["stall_us"]) == (40, 20, 20, 0, 10)
    straddle = Graph("g", (node("a", "compute", 0, 10), node("f0", "copy", 5, 25), node("f1", "copy", 8, 12),
                           node("b", "compute", 20, 30)))
    s = summarize(straddle)
    assert (s["step_us"], s["copy_us"], s["overlap_us"], s["stall_us"]) == (30, 20, 10, 10)
    assert summarize(Graph("g", (node("f", "copy", 0, 5),)))["stall_us"] == 0


def test_a_graph_without_gates_is_one_copy_planned_as_the_decode_pass(tmp_path):
    """At tau 0 the gate is folded away: no fallback can run the region again, so the region mark
    goes, and the big pass runs over the same nodes for prompts only. The plan of a decode step
    times every node, under the little pass's rule, and the dump says which pass runs when."""
    out, g = compile_to_dir("specs/demo.yaml", tmp_path / "demo")
    assert not g.by_op(Op.IMPORTANCE_GATE) and not any(n.attr("region") for n in g.nodes)
    assert len({n.name for n in g.nodes}) == len(g.nodes) and not any(n.name.startswith("B.") for n in g.nodes)
    assert all(n.attr("start_us") is not None for n in g.nodes)
    assert summarize(g)["step_us"] == max(n.attr("end_us") for n in g.nodes)
    trace = json.loads((out / "schedule.trace.json").read_text())
    assert {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"} == {n.name for n in g.nodes}
    fetches = g.by_op(Op.FETCH)
    assert fetches and all(n.attr("rule").startswith("prefix n=2") and n.attr("big_rule") == "top n=4"
                           for n in fetches)
    dump = (out / "schedule.txt").read_text()
    assert "decoded tokens run the little pass (no gate can fire, so no fallback); prompts run the big pass" in dump
    assert "big pass: top n=4" in dump
