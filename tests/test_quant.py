"""Quantized experts: packing round trips, the packed op against dequantize-then-matmul, quantized
checkpoints, offloading at a format, memory plans and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

import mobile
from mobile.models.weights import WeightStore
from mobile.moe import native, quant
from mobile.moe.layout import ExpertMLP, arena_views
from mobile.moe.op import ExpertKind
from mobile.moe.reference import reference
from mobile.moe.rule import KeepRule

PROMPT = torch.randint(3, 97, (12,), generator=torch.Generator().manual_seed(5))
# the tiny checkpoints have hidden 32, expert intermediate 16: groups must divide both
TINY_GROUPS = {"int8": 0, "int4": 8}


def matrices(rows_pairs: int, cols: int, groups: int, seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * rows_pairs * groups
    return torch.randn(rows, cols, generator=g) * scale, rows // groups


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["int8", "int4"]), pairs=st.integers(1, 4), cols=st.integers(1, 9),
       groups=st.integers(1, 3), seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 0.05, 3.0]),
       whole=st.booleans())
def test_quantize_round_trips_within_half_a_step(fmt, pairs, cols, groups, seed, scale, whole):
    w, group = matrices(pairs, cols, groups, seed, scale)
    group = 0 if whole and fmt == "int8" else group
    p = quant.quantize(w, fmt, group)
    back = quant.dequantize(p, fmt, group)
    # each value lies within half a step of its group's (stored) scale; int4 adds the float16
    # rounding of its zero, at most half a unit in its last place, in steps
    g = group or w.shape[0]
    step = p.scale.float().repeat_interleave(g, dim=0)
    slack = 0.0 if p.zero is None else (p.zero.float().abs().clamp(min=2**-14) * 2**-11).repeat_interleave(g, dim=0)
    tol = step * (0.5 + slack) * (1 + 1e-5) + 1e-12
    assert bool(((back - w).abs() <= tol).all())
    assert p.q.dtype == (torch.uint8 if fmt == "int4" else torch.int8)
    assert p.q.shape == ((w.shape[0] // 2, cols) if fmt == "int4" else w.shape)


def test_constant_and_zero_groups_survive():
    """A group of one repeated value (no spread to scale by) keeps it, up to float16 rounding; zeros stay 0."""
    for value in (0.0, 0.37, -2.5):
        w = torch.full((8, 3), value)
        for fmt in ("int8", "int4"):
            torch.testing.assert_close(quant.dequantize(quant.quantize(w, fmt, 4), fmt, 4), w, rtol=2e-3, atol=0)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_int4_nibbles_round_trip(rows, cols, seed):
    values = torch.randint(0, 16, (2 * rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = values.view(rows, 2, cols)
    assert torch.equal(quant.unpack_int4(packed[:, 0] | (packed[:, 1] << 4)), values)


@settings(max_examples=20, deadline=None)
@given(fmt=st.sampled_from(["int8", "int4"]), hidden=st.sampled_from([8, 16, 24]), inter=st.sampled_from([8, 16]),
       seed=st.integers(0, 2**16))
def test_a_packed_row_holds_exactly_its_sections(fmt, hidden, inter, seed):
    layout = quant.Layout(fmt, 8 if fmt == "int4" else 0, hidden, inter)
    g = torch.Generator().manual_seed(seed)
    gate, up, down = torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g), \
        torch.randn(hidden, inter, generator=g)
    row = quant.quantize_expert(layout, gate, up, down)
    assert row.dtype == torch.uint8 and row.shape == (layout.row_bytes,) and layout.row_bytes % quant.ALIGN == 0
    offsets = [s.offset for s in layout.sections.values()]
    assert all(o % quant.ALIGN == 0 for o in offsets) and offsets == sorted(offsets)
    gu = quant.concat(quant.quantize(gate.T, fmt, layout.group), quant.quantize(up.T, fmt, layout.group))
    for part in ("q", "scale", "zero"):
        if getattr(gu, part) is not None:
            assert torch.equal(layout.view(row[None], f"gate_up.{part}")[0], getattr(gu, part))
    # the dequantized row is the native arena layout of the dequantized matrices
    gate_up, down_w = arena_views(layout.dequantize_rows(row[None], torch.float32), hidden)
    torch.testing.assert_close(gate_up[0], quant.dequantize(gu, fmt, layout.group))
    torch.testing.assert_close(down_w[0], quant.dequantize(quant.quantize(down.T, fmt, layout.group), fmt,
                                                          layout.group))


def packed_arena(layout: quant.Layout, slots: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, i = layout.hidden, layout.inter
    return torch.stack([quant.quantize_expert(layout, torch.randn(i, h, generator=g) * 0.1,
                                              torch.randn(i, h, generator=g) * 0.1,
                                              torch.randn(h, i, generator=g) * 0.1) for _ in range(slots)])


@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int8", 16), ("int4", 16), ("int4", 32)])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_op_equals_dequantize_then_matmul(fmt, group, T, dtype):
    """The CPU path of the op over a packed arena (dropped pairs, absent experts, more slots than one
    dequantization chunk) against the reference on the dequantized arena."""
    H, I, S, E, K = 64, 32, native.DEQUANT_SLOTS + 3, 14, 4
    layout = quant.Layout(fmt, group, H, I)
    arena = packed_arena(layout, S)
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, K, generator=g), -1).sort(-1, descending=True).values
    slot_map = torch.full((E,), -1)
    slot_map[torch.randperm(E, generator=g)[:S - 1]] = torch.randperm(S, generator=g)[:S - 1]
    rule = KeepRule("prefix", 2, 0.6, cached=True)
    out = torch.ops.mobile.moe_experts(x, weights, ids, slot_map, arena, rule.text,
                                       ExpertKind(fmt, group, ExpertMLP(H, I)).text)
    w, slots = rule.pairs(weights, ids, slot_map)
    ref = reference(x, w, slots, layout.dequantize_rows(arena, dtype))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert bool((slots < 0).any()) and bool((slots >= 0).any())  # the case covers both


@pytest.mark.parametrize("T", [1, 5])
def test_packed_op_compiles_whole(T):
    """torch.compile traces the packed path into one graph (no break at the dequantization)."""
    H, I, S, E, K = 32, 16, 6, 8, 2
    layout = quant.Layout("int4", 8, H, I)
    arena = packed_arena(layout, S)
    x = torch.randn(T, H)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    weights = torch.rand(T, K).sort(-1, descending=True).values
    slot_map = torch.tensor([0, 1, 2, -1, 3, 4, 5, -1])
    args = (KeepRule.big(K).text, ExpertKind("int4", 8, ExpertMLP(H, I)).text)
    eager = torch.ops.mobile.moe_experts(x, weights, ids, slot_map, arena, *args)
    compiled = torch.compile(lambda *a: torch.ops.mobile.moe_experts(*a, *args), fullgraph=True)
    torch.testing.assert_close(compiled(x, weights, ids, slot_map, arena), eager, atol=1e-5, rtol=1e-5)


def quantized(tiny_ckpt, tmp_path, fmt: str):
    out = tmp_path / f"q-{fmt}"
    assert run_cli("quantize", tiny_ckpt, "-o", out, "--format", fmt, "--group-size", TINY_GROUPS[fmt]) == 0
    return out


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_checkpoint_equals_quantizing_at_load(tiny, tmp_path, fmt):
    t = tiny("olmoe")
    q = quantized(t.ckpt, tmp_path, fmt)
    cfg = json.loads((q / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "mobile", "format": fmt, "group_size": TINY_GROUPS[fmt], "layout_version": 1,
                   "modules": "routed experts"}
    assert (q / "tokenizer.json").exists() and not list(q.parent.glob(".q-*"))  # no temporary left
    store = WeightStore(q)
    assert not any(n.endswith("experts.0.gate_proj.weight") for n in store.index)  # experts are stored packed
    native = mobile.Engine.load(t.graph)
    at_load = mobile.Engine.load(t.graph, expert_format=fmt, expert_group_size=TINY_GROUPS[fmt])
    written = mobile.Engine.load(t.graph, weights=q)  # the checkpoint brings its format
    assert written.spec.runtime.expert_format == fmt and written.spec.expert_group == TINY_GROUPS[fmt]
    layer = written.spec.moe_layers[0]
    assert torch.equal(written.experts.arena(layer), at_load.experts.arena(layer))  # byte for byte
    assert written.generate(PROMPT, 12, stop_ids=[]) == at_load.generate(PROMPT, 12, stop_ids=[])
    lq, ln = at_load.logits(PROMPT), native.logits(PROMPT)
    assert not torch.equal(lq, ln)  # it did quantize...
    assert (lq - ln).abs().max() < 0.1 * ln.abs().max()  # ...and stays close to the native model


@pytest.mark.parametrize("policy", ["ondemand", "lru", "lru-prefetch", "little", "layer-mass", "mobile"])
def test_offloading_at_a_format_gives_resident_tokens_at_that_format(tiny, tmp_path, policy):
    t = tiny("qwen2_moe")
    fmt, group = "int4", TINY_GROUPS["int4"]
    graph = t.compile(tmp_path / policy, "--policy", policy, slots_per_layer=4)
    resident = mobile.Engine.load(graph, weights=t.ckpt, policy="resident" if policy in
                                  ("ondemand", "lru", "lru-prefetch") else policy, expert_format=fmt,
                                  expert_group_size=group, all_resident=True)
    engine = mobile.Engine.load(graph, weights=t.ckpt, link_gbps=50.0, expert_format=fmt, expert_group_size=group)
    try:
        assert engine.generate(PROMPT, 12, stop_ids=[]) == resident.generate(PROMPT, 12, stop_ids=[])
        s = engine.stats
        assert s["expert_format"] == "int4" and s["bytes_h2d"] > 0
        assert s["bytes_h2d"] % s["expert_bytes"] == 0  # whole packed rows move
    finally:
        engine.close()


def test_the_same_budget_holds_more_packed_experts():
    from mobile.compiler.budget import cache_plan
    from mobile.compiler.costs import expert_bytes
    from mobile.spec.load import load_spec, with_policy, with_runtime

    spec = load_spec("specs/olmoe-1b-7b.yaml")  # bf16 experts of 2048 x 1024
    spec = with_policy(with_runtime(spec, expert_cache=dict(budget="2GiB", slots_per_layer=None, staging_slots=0)),
                       name="lru")
    at = {f: with_runtime(spec, expert_format=f) for f in ("native", "int8", "int4")}
    unit = {f: expert_bytes(s) for f, s in at.items()}
    assert unit["native"] / unit["int8"] == pytest.approx(2, rel=0.01)  # int8 + one scale per column
    assert unit["native"] / unit["int4"] == pytest.approx(3.56, rel=0.01)  # int4 + scale and zero per 64
    for f, s in at.items():  # the budget counts packed bytes
        assert cache_plan(s).main == 2 * 2**30 // (unit[f] * len(s.moe_layers))
    assert cache_plan(at["int4"]).main > 3.4 * cache_plan(at["native"]).main


def test_compile_prints_the_memory_plan_and_warns_when_it_does_not_fit(tmp_path, capsys):
    assert run_cli("compile", "specs/qwen3-30b-a3b.yaml", "-o", tmp_path / "g", "--policy", "resident") == 0
    out, err = capsys.readouterr()
    assert "routed experts (bfloat16): 48 layers x 128 x 9.0MiB = 54.0GiB" in out
    assert "warning: the device needs 56.9GiB of weights, more than rtx4090's memory (24.0GiB)" in err
    assert run_cli("compile", "specs/qwen3-30b-a3b.yaml", "-o", tmp_path / "s", "--policy", "resident",
                   "--strict") == 2
    assert "the memory plan does not fit" in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert run_cli("compile", "specs/qwen3-30b-a3b.yaml", "-o", tmp_path / "q", "--policy", "mobile",
                   "--expert-format", "int4", "--host-ram", "16GiB", "--strict") == 0
    out, err = capsys.readouterr()
    assert "routed experts (int4, group size 64): 48 layers x 128 x 2.5MiB = 15.2GiB" in out and not err
    assert run_cli("compile", "specs/qwen3-30b-a3b.yaml", "-o", tmp_path / "h", "--policy", "mobile",
                   "--host-ram", "32GiB") == 0
    assert "host expert store needs 54.0GiB, more than --host-ram (32.0GiB)" in capsys.readouterr().err
    # the demo's 12 MiB budget holds every int4 expert: the plan says so rather than clamping quietly
    assert run_cli("compile", "specs/demo.yaml", "-o", tmp_path / "d", "--expert-format", "int4") == 0
    assert "holds more than the model's 16 experts per layer: 16 main slots" in capsys.readouterr().out


def test_bench_and_eval_run_each_format(tiny, tmp_path, capsys):
    """bench: one row per policy and format, the ratio to the first, packed rows moving fewer bytes
    at the same budget; eval: a quantized checkpoint against native big decoding."""
    t = tiny("olmoe")
    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth.\n" * 4)
    spec = tmp_path / "spec.yaml"
    spec.write_text(t.spec.read_text().replace("path: ckpt", f"path: {t.ckpt}").replace(
        "runtime:\n", "runtime:\n  expert_cache:\n    budget: 96KiB\n"))  # 5 native slots per MoE layer
    assert run_cli("compile", spec, "-o", tmp_path / "g") == 0
    capsys.readouterr()
    assert run_cli("bench", "--graph", tmp_path / "g", "--policies", "lru", "--expert-format", "native,int8,int4",
                   "--expert-group-size", "8", "--tokens", "6", "--link-gbps", "20", "--json", tmp_path / "b.json") == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["lru native", "lru int8", "lru int4"]
    assert [r["expert_format"] for r in rows] == ["native", "int8", "int4"]
    native, int8, int4 = rows
    assert native["cache_slots_per_layer"] < int8["cache_slots_per_layer"] <= int4["cache_slots_per_layer"]
    assert int4["expert_bytes"] < int8["expert_bytes"] < native["expert_bytes"] and native["ratio"] == 1.0
    q = quantized(t.ckpt, tmp_path, "int4")
    assert run_cli("eval", "--graph", tmp_path / "g", "--weights", q, "--data", text, "--policy", "lru",
                   "--window", "32") == 0
    out = capsys.readouterr().out
    assert "big (int4 checkpoint)" in out  # no native experts to compare with: said so
    assert run_cli("eval", "--graph", tmp_path / "g", "--data", text, "--policy", "lru", "--window", "32",
                   "--expert-format", "int4", "--expert-group-size", "8", "--json") == 0
    row = json.loads(capsys.readouterr().out)
    assert row["label"] == "lru int4" and 0.5 < row["agreement"] <= 1.0
