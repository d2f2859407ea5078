"""Offloading never changes results; the cache keeps its invariants; budgets are checked at compile."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

import mobile
from mobile.errors import SpecError
from mobile.slots import CacheFull, SlotTable

PROMPT = torch.randint(3, 97, (20,), generator=torch.Generator().manual_seed(3))
OFFLOAD = ["ondemand", "lru", "lru-prefetch"]


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
@pytest.mark.parametrize("policy", OFFLOAD)
def test_offloading_never_changes_results(tiny, family, policy):
    t = tiny(family)
    resident = mobile.Engine.load(t.graph)
    engine = mobile.Engine.load(t.graph, policy=policy, link_gbps=50.0)
    try:
        torch.testing.assert_close(engine.logits(PROMPT), resident.logits(PROMPT), atol=1e-5, rtol=1e-5)
        assert engine.generate(PROMPT, 16, stop_ids=[]) == resident.generate(PROMPT, 16, stop_ids=[])
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
    text = t.spec.read_text().replace("runtime:\n", "runtime:\n  expert_cache:\n    slots_per_layer: 4\n")
    (tmp_path / "s.yaml").write_text(text.replace("path: ckpt", f"path: {t.ckpt}"))
    assert run_cli("compile", tmp_path / "s.yaml", "-o", tmp_path / "g", "--policy", policy) == 0
    return mobile.Engine.load(tmp_path / "g", weights=t.ckpt, link_gbps=50.0)


def test_small_cache_evicts_and_stays_exact(tiny, tmp_path):
    """A cache of top_k slots per layer (the minimum) forces evictions on almost every token."""
    t = tiny("olmoe")
    engine, ref = minimum_cache_engine(t, tmp_path, "lru-prefetch"), mobile.Engine.load(t.graph)
    assert engine.experts.plan.main == 4 and engine.experts.plan.staging == 4
    assert engine.generate(PROMPT, 24, stop_ids=[]) == ref.generate(PROMPT, 24, stop_ids=[])
    assert engine.stats["expert_misses"] > 24
    engine.close()


def test_budget_below_working_set_fails_at_compile(tmp_path, capsys):
    text = open("specs/olmoe-1b-7b.yaml").read().replace(
        "runtime:\n", "runtime:\n  expert_cache:\n    budget: 1GiB\n").replace("name: resident", "name: lru")
    (tmp_path / "s.yaml").write_text(text)
    capsys.readouterr()
    assert run_cli("compile", tmp_path / "s.yaml", "-o", tmp_path / "g") == 2
    err = capsys.readouterr().err
    assert "runtime.expert_cache.budget: the expert cache is below the minimum working set" in err
    assert "the minimum is 8 slots per layer = 1.5GiB" in err
    assert not (tmp_path / "g").exists()


def test_prefetch_nodes_and_planned_overlap(tmp_path):
    from mobile.compiler import compile_to_dir
    from mobile.ir import Op

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


# -- the cache's bookkeeping, as properties -------------------------------------------------------

ops = st.lists(st.tuples(st.sampled_from(["step", "access", "stage"]), st.integers(0, 15)), max_size=200)


@settings(max_examples=200, deadline=None)
@given(main=st.integers(1, 6), staging=st.integers(0, 4), ops=ops)
def test_slot_table_invariants(main, staging, ops):
    table = SlotTable(main, staging)
    lookups = 0
    for op, expert in ops:
        if op == "step":
            table.begin_step()
        elif op == "access":
            pinned_before = {s: table.expert_in[s] for s in table.pinned}
            try:
                slot, _ = table.access(expert)
            except CacheFull:
                assert len(table.pinned & set(table.lru)) == main  # only when every main slot is in use
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
        assert len(table.lru) == main and len(table.staging) == staging
        assert set(table.lru).isdisjoint(table.staging)
    c = table.counters
    assert c.hits + c.misses == lookups  # the stats add up
    assert c.prefetch_used + c.prefetch_wasted <= c.prefetch_issued


def test_staging_never_evicts_hot_experts():
    table = SlotTable(main=2, staging=1)
    table.access(0)
    table.access(1)
    table.begin_step()
    for e in range(2, 10):
        table.stage(e)
    assert {table.expert_in[s] for s in range(2)} == {0, 1}  # the hot main slots are untouched
    assert table.counters.prefetch_wasted == 7


def test_prefetch_hit_promotes_without_copy():
    table = SlotTable(main=2, staging=1)
    table.access(0)
    table.access(1)
    table.begin_step()
    staged = table.stage(5)
    slot, hit = table.access(5)
    assert hit and slot == staged and slot in table.lru and table.counters.prefetch_used == 1
    assert table.slot_of.get(0) is not None  # the demoted expert is still resident, now in staging


def test_budget_error_names_the_key(tmp_path):
    from mobile.lower import lower
    from mobile.spec import load_spec, with_policy

    spec = with_policy(load_spec("specs/qwen1.5-moe-a2.7b.yaml"), name="lru")
    small = spec.__class__(**{**spec.__dict__, "runtime": spec.runtime.__class__(
        expert_cache=spec.runtime.expert_cache.__class__(slots_per_layer=2))})
    with pytest.raises(SpecError, match="runtime.expert_cache.slots_per_layer: the expert cache is below"):
        lower(small)


def test_prefill_loads_each_needed_expert_once_per_layer(tiny, tmp_path):
    """A prompt needing more experts than a layer's cache runs in rounds, not in token chunks."""
    t = tiny("olmoe")
    engine, ref = minimum_cache_engine(t, tmp_path, "lru"), mobile.Engine.load(t.graph)
    torch.testing.assert_close(engine.logits(PROMPT), ref.logits(PROMPT), atol=1e-5, rtol=1e-5)
    s = engine.stats
    assert s["expert_misses"] == sum(len(v) for v in ref.experts.step_sets.values())  # once per (layer, expert)
    assert s["expert_misses"] > 3 * 4  # more than the 4-slot caches of 3 layers could hold at once
    engine.close()
