"""Offloading never changes results; the cache keeps its invariants; budgets are checked at compile."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

import mobile
from mobile.compiler.costs import expert_bytes
from mobile.compiler.ir import Op
from mobile.errors import SpecError
from mobile.moe.shadow import BigOnlyShadow
from mobile.moe.slots import CacheFull, SlotTable

PROMPT = torch.randint(3, 97, (20,), generator=torch.Generator().manual_seed(3))
OFFLOAD = ["ondemand", "lru", "lru-prefetch"]


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
@pytest.mark.parametrize("policy", OFFLOAD)
def test_offloading_never_changes_results(tiny, family, policy):
    offloading_matches_resident(tiny(family), policy)


def offloading_matches_resident(t, policy: str, prompt: torch.Tensor = PROMPT) -> None:
    """Logits and 16 greedy tokens of `policy` equal resident's (also for the newer families' tests)."""
    resident = mobile.Engine.load(t.graph)
    engine = mobile.Engine.load(t.graph, policy=policy, link_gbps=50.0)
    try:
        expected = resident.logits(prompt)
        # a prompt that needs more experts than a layer's cache holds runs in rounds (Rounds): each
        # round's experts are summed apart, then the rounds, an order of float32 additions of its own
        rounds = engine.experts.plan.main < engine.spec.model.moe.num_experts
        atol = 1e-5 * max(1.0, expected.abs().max().item()) if rounds else 1e-5
        torch.testing.assert_close(engine.logits(prompt), expected, atol=atol, rtol=1e-5)
        assert engine.generate(prompt, 16, stop_ids=[]) == resident.generate(prompt, 16, stop_ids=[])
        s = engine.stats
        assert s["link"] == "emulated" and s["bytes_h2d"] > 0 and s["expert_misses"] > 0
        if policy == "ondemand":
            assert s["expert_hits"] == 0
        if policy == "lru-prefetch":
            assert s["prefetch_issued"] > 0 and s["prefetch_used"] + s["prefetch_wasted"] <= s["prefetch_issued"]
    finally:
        engine.close()


def minimum_cache_engine(t, tmp_path, policy: str) -> mobile.Engine:
    """The tiny checkpoint compiled with 4 cache slots per layer: its top_k, the minimum."""
    graph = t.compile(tmp_path / policy, "--policy", policy, slots_per_layer=4)
    return mobile.Engine.load(graph, weights=t.ckpt, link_gbps=50.0)


def test_small_cache_evicts_and_stays_exact(tiny, tmp_path):
    """A cache of top_k slots per layer (the minimum) forces evictions on almost every token."""
    t = tiny("olmoe")
    ref = mobile.Engine.load(t.graph).generate(PROMPT, 24, stop_ids=[])
    engine = minimum_cache_engine(t, tmp_path, "lru")
    assert engine.experts.plan.main == 4 and engine.experts.plan.staging == 0
    assert engine.generate(PROMPT, 24, stop_ids=[]) == ref
    assert engine.stats["expert_misses"] > 24
    engine.close()
    engine = minimum_cache_engine(t, tmp_path, "lru-prefetch")  # 4 + 1 slots: speculation evicts too
    assert engine.experts.plan.main == 4 and engine.experts.plan.staging == 1
    assert engine.generate(PROMPT, 24, stop_ids=[]) == ref
    assert engine.stats["prefetch_wasted"] > 0
    engine.close()


def test_prefetch_nodes_and_planned_overlap(tmp_path):
    from mobile.compiler.compile import compile_to_dir
    from mobile.compiler.ir import Op

    out, g = compile_to_dir("specs/olmoe-1b-7b.yaml", tmp_path / "g", policy="lru-prefetch")
    names = [n.name for n in g.nodes]
    assert len(g.by_op(Op.PREFETCH)) == 15  # every MoE layer but the first
    pf = g.node("L5.prefetch")
    assert pf.attr("stream") == "copy" and names.index("L4.predict") < names.index("L5.prefetch") < \
        names.index("L4.experts")  # hoisted above layer 4's own expert compute
    assert pf.attr("start_us") < g.node("L5.attn").attr("end_us")  # overlaps compute
    text = (out / "schedule.txt").read_text()
    assert "copy" in text and "prefetch" in text and "L5.predict" in text


def test_measured_trace_has_both_streams(tiny, tmp_path, capsys):
    t = tiny("olmoe")
    capsys.readouterr()
    assert run_cli("run", "--graph", t.graph, "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--policy",
                   "lru-prefetch", "--link-gbps", "10", "--trace", tmp_path / "m.json", "--stats") == 0
    trace = json.loads((tmp_path / "m.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in spans} == {1, 2}
    assert {"attention", "fetch"} <= {e["cat"] for e in spans}
    assert "link: emulated" in capsys.readouterr().err


def test_measured_and_planned_traces_share_node_names(tiny, tmp_path):
    """Every span of a measured (eager) trace is named after a node of the graph that ran: compute
    spans after theirs, copies after the fetch or prefetch that asked for them, with the layer,
    expert and slot in their args. So the plan (schedule.trace.json) and the run line up."""
    t = tiny("olmoe")
    graph = t.compile(tmp_path / "g", "--policy", "lru-prefetch", slots_per_layer=4)
    engine = mobile.Engine.load(graph, weights=t.ckpt, link_gbps=10.0, trace=True)
    engine.generate(torch.tensor([5, 6, 7]), 6, stop_ids=[])
    engine.write_trace(tmp_path / "m.json")
    measured = [e for e in json.loads((tmp_path / "m.json").read_text())["traceEvents"] if e["ph"] == "X"]
    planned = {e["name"] for e in json.loads((graph / "schedule.trace.json").read_text())["traceEvents"]
               if e["ph"] == "X"}
    nodes = {n.name: n for n in engine.graph.nodes}
    assert {e["name"] for e in measured} <= planned == set(nodes)
    copies = [e for e in measured if e["tid"] == 2]
    assert copies and {nodes[e["name"]].op for e in copies} == {Op.FETCH, Op.PREFETCH}
    assert all({"layer", "expert", "slot", "bytes"} <= set(e["args"]) for e in copies)
    engine.close()


# -- the cache's bookkeeping, as properties -------------------------------------------------------

ops = st.lists(st.tuples(st.sampled_from(["step", "access", "stage"]), st.integers(0, 15)), max_size=200)


@settings(max_examples=200, deadline=None)
@given(main=st.integers(1, 6), staging=st.integers(0, 4), ops=ops, eviction=st.sampled_from(["lru", "lfu"]))
def test_slot_table_invariants(main, staging, ops, eviction):
    table = SlotTable(main, staging, eviction)
    lookups = 0
    for op, expert in ops:
        if op == "step":
            table.begin_step()
        elif op == "access":
            pinned_before = {s: table.expert_in[s] for s in table.pinned}
            try:
                slot, _ = table.access(expert)
            except CacheFull:
                assert len(table.pinned) == main + staging  # only when every slot is in use
                continue
            lookups += 1
            assert table.expert_in[slot] == expert
            for s, e in pinned_before.items():  # an expert in use is never evicted
                assert table.expert_in[s] == e
        else:
            pinned_before = {s: table.expert_in[s] for s in table.pinned}
            table.stage(expert)
            for s, e in pinned_before.items():
                assert table.expert_in[s] == e
        # no slot aliased; capacity respected; the maps agree
        residents = [e for e in table.expert_in if e is not None]
        assert len(residents) == len(set(residents)) <= main + staging
        assert all(table.expert_in[s] == e for e, s in table.slot_of.items())
        assert len(table.lru) == main + staging and len(table.speculative) <= staging  # speculation is capped
        assert all(table.expert_in[s] is not None for s in table.speculative)
    c = table.counters
    assert c.hits + c.misses == lookups  # the stats add up
    assert c.prefetch_used + c.prefetch_wasted <= c.prefetch_issued


def test_speculation_is_capped_and_never_evicts_experts_in_use():
    table = SlotTable(main=2, staging=1)
    table.access(0)
    table.access(1)  # both pinned: this step uses them
    for e in range(2, 10):
        table.stage(e)
    assert table.slot_of.keys() >= {0, 1} and len(table.speculative) == 1
    assert table.counters.prefetch_wasted == 7  # each new prefetch replaced the last unused one
    table.begin_step()
    table.access(0)  # expert 1 is now cold but resident; a prefetch at the cap still only replaces speculation
    table.stage(20)
    assert 1 in table.slot_of and 20 in table.slot_of


def test_unused_speculation_is_evicted_first_and_a_hit_needs_no_copy():
    table = SlotTable(main=3, staging=1)
    for e in (0, 1, 2, 3):  # all four slots: demand uses the staging share too
        table.access(e)
    table.begin_step()
    staged = table.stage(5)  # evicts the coldest expert (0), lands at the cold end
    assert 0 not in table.slot_of and table.slot_of[5] == staged
    table.begin_step()
    slot, hit = table.access(7)  # a demand miss evicts the unused speculation, not expert 1
    assert not hit and slot == staged and 1 in table.slot_of and table.counters.prefetch_wasted == 1
    table.begin_step()
    staged = table.stage(8)
    slot, hit = table.access(8)
    assert hit and slot == staged and table.counters.prefetch_used == 1 and not table.speculative
    assert next(reversed(table.lru)) == slot  # used speculation becomes the most recently used


def test_lfu_keeps_the_often_used_expert_that_lru_would_evict():
    def run(eviction):
        table = SlotTable(main=2, eviction=eviction)
        for e in (0, 0, 0, 1):  # expert 0 used three times, then 1
            table.begin_step()
            table.access(e)
        table.begin_step()
        table.access(2)  # a miss: lru evicts 0 (least recent), lfu evicts 1 (fewest uses)
        return table.residents()

    assert sorted(run("lru")) == [1, 2] and sorted(run("lfu")) == [0, 2]


def test_lfu_uses_decay_ties_go_to_the_least_recent_and_history_survives_eviction():
    from mobile.moe.slots import LFU_DECAY

    table = SlotTable(main=2, eviction="lfu")
    table.begin_step()
    table.access(0)
    for _ in range(40):  # a use 40 steps ago weighs LFU_DECAY**40 now
        table.begin_step()
    assert table.score(0) == pytest.approx(LFU_DECAY ** 40)
    table.access(1)
    table.begin_step()
    table.access(2)  # 0 (old use) has the lower score: evicted although 1 is also a single use
    assert sorted(table.residents()) == [1, 2]
    table.begin_step()
    table.access(3)  # 1 and 2: one use each, 1 is older so decayed more; evicted
    assert sorted(table.residents()) == [2, 3] and table.score(0) > 0  # 0's history is kept


def test_demand_copy_drops_speculation_and_keeps_the_history():
    table = SlotTable(main=2, staging=1, eviction="lfu")
    table.access(0)
    table.access(1)
    table.begin_step()
    table.stage(5)
    copy = table.demand_copy()
    assert sorted(copy.residents()) == [0, 1] and copy.staging == 0 and copy.size == 3
    assert copy.score(0) == table.score(0) and copy.eviction == "lfu"


def test_lookup_takes_hits_before_misses():
    table = SlotTable(main=2, staging=0)
    table.access(3)
    table.access(4)
    table.begin_step()
    # 3 is resident but the coldest; a miss for 1, looked up first, would evict it without hits-first
    result = table.lookup([1, 3])
    assert {e: hit for e, _, hit in result} == {1: False, 3: True} and 3 in table.slot_of


def test_budget_error_names_the_key(tmp_path):
    from mobile.compiler.lower import lower
    from mobile.spec.load import load_spec, with_policy

    spec = with_policy(load_spec("specs/qwen1.5-moe-a2.7b.yaml"), name="lru")
    small = spec.__class__(**{**spec.__dict__, "runtime": spec.runtime.__class__(
        expert_cache=spec.runtime.expert_cache.__class__(slots_per_layer=2))})
    with pytest.raises(SpecError, match="runtime.expert_cache.slots_per_layer: the expert cache is below"):
        lower(small)


def test_prefill_loads_each_needed_expert_once_per_layer(tiny, tmp_path):
    """A prompt needing more experts than a layer's cache runs in rounds, not in token chunks."""
    t = tiny("olmoe")
    engine, ref = minimum_cache_engine(t, tmp_path, "lru"), mobile.Engine.load(t.graph, track_use=True)
    torch.testing.assert_close(engine.logits(PROMPT), ref.logits(PROMPT), atol=1e-5, rtol=1e-5)
    s = engine.stats
    used = ref.stats["expert_bytes_used"] // expert_bytes(ref.spec)  # the (layer, expert) pairs the prompt uses
    assert s["expert_misses"] == used  # each loaded once
    assert s["expert_misses"] > 3 * 4  # more than the 4-slot caches of 3 layers could hold at once
    engine.close()


def test_big_only_estimate_equals_lru_and_sees_little_savings(tiny, tmp_path):
    """The bytes-vs-big-only stat replays each token's big set on an LRU of the same slots. Under
    `lru` (big-only, demand-only, no staging) it must match what really moved, byte for byte; under
    `little` the run moves less than that estimate."""
    t = tiny("olmoe")
    lru = minimum_cache_engine(t, tmp_path, "lru")
    lru.generate(PROMPT, 24, stop_ids=[])
    s = lru.stats
    assert s["decode_bytes_h2d"] > 0 and s["decode_big_only_bytes_h2d"] == s["decode_bytes_h2d"]
    assert s["decode_bytes_vs_big_only"] == 1.0
    lru.close()
    little = minimum_cache_engine(t, tmp_path, "little")
    little.generate(PROMPT, 24, stop_ids=[])
    assert little.stats["decode_bytes_vs_big_only"] < 0.8
    little.close()


@pytest.mark.parametrize("prefetch,sets", [("none", set()), ("predicted", {"predicted"}),
                                           ("complement", {"complement"}), ("both", {"predicted", "complement"})])
def test_prefetch_option_selects_the_speculative_copies(prefetch, sets):
    from mobile.compiler.lower import lower
    from mobile.spec.load import load_spec, with_policy

    spec = with_policy(load_spec("specs/demo.yaml"), name="mobile", prefetch=prefetch)
    g = lower(dataclasses.replace(spec, runtime=dataclasses.replace(
        spec.runtime, expert_cache=dataclasses.replace(spec.runtime.expert_cache, slots_per_layer=8))))
    assert {n.attr("set") for n in g.nodes if n.op is Op.PREFETCH} == sets


def test_big_only_estimate_counts_a_kv_refresh_once():
    """A KV refresh's big pass routes the recomputed positions again; big-only decoding ran them
    once already, so the estimate replays only the token's own row, and a refresh (more than one
    row) is not mistaken for a prompt, which would resync the estimate with the real cache."""
    shadow = BigOnlyShadow([0], slots=2, expert_bytes=10)
    real = SlotTable(main=2)
    real.access(7)  # the real cache holds another expert: a resync would show
    forwards = [({0: ([0, 1], 2)}, 0)]
    assert shadow.replay(forwards, {0: real}) == 20 and forwards == []  # replayed, and taken
    forwards = [({0: ([2, 3, 4, 5, 0, 1], 2)}, 2)]  # t-2, t-1 refreshed; t: [0, 1]
    assert shadow.replay(forwards, {0: real}) == 20 and shadow.tables[0].residents() == [0, 1]
    forwards = [({0: ([2, 3, 4, 5], 2)}, 0)]  # a prompt: replayed whole, then resynced
    assert shadow.replay(forwards, {0: real}) == 60 and shadow.tables[0].residents() == [7]


def test_big_only_estimate_is_replayed_in_batches(tiny, tmp_path):
    """The cache hands decoded tokens' big sets to the estimate in batches (no call per token), a
    prompt at once, and the rest when the stats are read: the same bytes as one by one."""
    t = tiny("olmoe")
    graph = t.compile(tmp_path / "lru", "--policy", "lru", slots_per_layer=4)
    engine = mobile.Engine.load(graph, weights=t.ckpt, link_gbps=50.0)
    cache = engine.experts
    with torch.inference_mode():
        engine._forward(PROMPT, 0)
        assert cache.unestimated == []  # a prompt's forward is replayed at once
        for token in (3, 5):
            engine._forward(torch.tensor([token]), engine.length)
    assert len(cache.unestimated) == 2  # decoded tokens wait for a batch
    queued = list(cache.unestimated)
    by_one = BigOnlyShadow(list(cache.shadow.tables), cache.plan.main + cache.plan.staging, cache.shadow.expert_bytes,
                           cache.eviction)
    by_one.tables = {layer: table.demand_copy() for layer, table in cache.shadow.tables.items()}
    before = cache.shadow.bytes
    for forward in queued:
        by_one.replay([forward])
    assert cache.shadow.replay(cache.unestimated) - before == by_one.bytes > 0
    engine.close()


@pytest.mark.slow
def test_torch_compile_runs_an_offloaded_prefill_in_rounds(tiny, tmp_path):
    """A compiled expert segment whose prompt needs more experts than the cache holds calls the
    cache's host code (load_round) eagerly; the result equals eager's."""
    t = tiny("olmoe")
    graph = t.compile(tmp_path / "mobile", "--policy", "mobile", slots_per_layer=4)
    eager = mobile.Engine.load(graph, weights=t.ckpt, link_gbps=50.0)
    compiled = mobile.Engine.load(graph, weights=t.ckpt, link_gbps=50.0, compile=True)
    assert compiled.generate(PROMPT, 6, stop_ids=[]) == eager.generate(PROMPT, 6, stop_ids=[])
    assert compiled.stats["expert_misses"] > 3 * 4  # the prompt ran in rounds
    eager.close()
    compiled.close()


def test_host_store_is_one_allocation_of_the_needed_bytes(tiny, tmp_path):
    """Every layer's expert rows in one buffer (on CUDA registered once, so pinned bytes are the
    needed bytes; tests/test_gpu.py checks that), each layer a view of it."""
    t = tiny("olmoe")
    engine = mobile.Engine.load(t.compile(tmp_path, "--policy", "lru", slots_per_layer=4))
    try:
        store, spec = engine.experts.store, engine.spec
        needed = len(spec.moe_layers) * spec.model.moe.num_experts * expert_bytes(spec)
        assert store.nbytes == needed == engine.stats["host_expert_bytes"]
        assert engine.stats["pinned_host_bytes"] == 0  # nothing is pinned on the CPU
        base = store.buffer.data_ptr()
        assert [h.data_ptr() - base for h in engine.experts.host.values()] == \
            [i * store.layer_bytes for i in range(len(spec.moe_layers))]
    finally:
        engine.close()


def test_an_emulated_link_is_refused_on_cuda(tiny):
    """On CUDA the copies cross the real link: a request to emulate one is an error naming the
    flag or key, before anything loads (the check needs no GPU)."""
    from mobile.errors import MobileError
    from mobile.runtime.load import refuse_emulated_link
    from mobile.spec.load import load_spec, with_runtime

    spec = load_spec(tiny("olmoe").spec)
    cuda = torch.device("cuda")
    refuse_emulated_link(cuda, spec, None, None)  # the real link: fine
    for gbps, ratio, key in [(8.0, None, "--link-gbps"), (None, 40.0, "--link-ratio")]:
        with pytest.raises(MobileError, match=f"{key}: an emulated link runs only on the CPU"):
            refuse_emulated_link(cuda, spec, gbps, ratio)
    emulated = with_runtime(spec, link=dataclasses.replace(spec.runtime.link, kind="emulated"))
    with pytest.raises(MobileError, match="runtime.link.kind: an emulated link"):
        refuse_emulated_link(cuda, emulated, None, None)


def test_union_of_copy_spans():
    from mobile.runtime.devclock import union_seconds

    assert union_seconds([]) == 0
    assert union_seconds([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0), (3.2, 3.5)]) == 3.0
