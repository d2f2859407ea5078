"""The routed-expert op and its kernels against the plain-torch reference (mobile.moe.reference).

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (conftest.py sets it), on the CPU.
Shapes are odd on purpose: H and I are not multiples of the block size, and the cases cover
T = 1, 3, 17, 64; K = 1, 2, 8; E = 8 and 60; absent experts (slot -1) and experts the keep rule
drops. The GPU variants run the same checks eager, compiled and replayed from a CUDA graph.
Packed experts (int8, int4: mobile.moe.quant) are checked against dequantize-then-matmul, at shapes
their group sizes divide.
"""

from __future__ import annotations

import pytest
import torch

from mobile.moe import native, quant
from mobile.moe.cache import decode_status
from mobile.moe.layout import ExpertMLP, arena_views, bias_views
from mobile.moe.op import ExpertKind
from mobile.moe.reference import reference
from mobile.moe.rule import KeepRule

triton = pytest.importorskip("triton")
from mobile.kernels import experts as kernels  # noqa: E402

H, INTER, BLOCK = 40, 24, 16  # neither a multiple of BLOCK
# (T, K, E, dtype); every value of T, K and E and every dtype appears
CASES = [(1, 1, 8, torch.float32), (1, 8, 60, torch.bfloat16), (3, 2, 8, torch.float16), (3, 8, 60, torch.float32),
         (17, 2, 60, torch.bfloat16), (17, 8, 8, torch.float32), (64, 1, 60, torch.float16), (64, 2, 8, torch.float32),
         (64, 8, 60, torch.bfloat16)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to the output's largest entry


def layer(T: int, K: int, E: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0,
          hidden: int = H, inter: int = INTER):
    """A routed-expert layer: x, sorted route (weights, ids), an arena with fewer slots than experts
    and a slot map in which about a quarter of the routed experts are absent."""
    g = torch.Generator().manual_seed(seed)
    S = max(2, (3 * E) // 4)
    arena = (torch.randn(S, 3 * hidden * inter, generator=g) / hidden ** 0.5).to(dtype)
    x = torch.randn(T, hidden, generator=g).to(dtype)
    probs = torch.rand(T, E, generator=g).softmax(-1)
    weights, ids = torch.topk(probs, K, dim=-1)
    slot_map = torch.full((E,), -1, dtype=torch.long)
    present = torch.randperm(E, generator=g)[:S]
    slot_map[present] = torch.randperm(S, generator=g)
    top = ids[0, 0]
    if slot_map[top] < 0:  # the first token's top expert is on the device: something always runs
        slot_map[top], slot_map[present[0]] = slot_map[present[0]].clone(), -1
    to = dict(device=device)
    return x.to(**to), weights.to(**to), ids.to(**to), slot_map.to(**to), arena.to(**to)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    scale = ref.float().abs().max().clamp_min(1e-6)
    err = float((out.float() - ref.float()).abs().max() / scale)
    assert err <= TOL[dtype], f"relative error {err:.2e} above {TOL[dtype]:.0e} ({dtype})"


def slots_of(weights, ids, slot_map, rule="prefix", cached=True):
    """The pairs the op runs (its own rule), so the kernels see absent and dropped experts."""
    return KeepRule(rule, max(1, ids.shape[1] // 2), 0.6, False, cached).pairs(weights, ids, slot_map)


def kind(hidden: int = H, inter: int = INTER) -> str:
    """The op's expert argument for native SwiGLU experts without biases."""
    return ExpertKind("native", 0, ExpertMLP(hidden, inter)).text


def kernel_cases():
    """Every case for both variants; the decode variant at 512 pairs takes the interpreter a while
    (one program per pair and block), so that one is a slow test."""
    for variant in ("decode", "grouped"):
        for T, K, E, dtype in CASES:
            slow = variant == "decode" and T * K > 150
            yield pytest.param(T, K, E, dtype, variant, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("T,K,E,dtype,variant", kernel_cases())
def test_triton_kernels_match_the_reference(T, K, E, dtype, variant):
    x, weights, ids, slot_map, arena = layer(T, K, E, dtype)
    w, slots = slots_of(weights, ids, slot_map)
    assert (slots >= 0).any() and ((slots < 0).any() or T * K < 4)  # some run; absent or dropped ones too
    out = kernels.experts(x, w, slots, arena, variant=variant, block=BLOCK)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, reference(x, w, slots, arena), dtype)


@pytest.mark.parametrize("T,K,E,dtype", CASES)
def test_native_paths_match_the_reference(T, K, E, dtype):
    x, weights, ids, slot_map, arena = layer(T, K, E, dtype)
    w, slots = slots_of(weights, ids, slot_map)
    ref = reference(x, w, slots, arena)
    assert_close(native.native(x, w, slots, arena), ref, dtype)
    assert_close(native._gathered(x, w, slots, arena), ref, dtype)
    if T == 1:
        assert_close(native._bagged(x, w, slots, arena), ref, dtype)
    assert_close(native._grouped(x, w, slots, arena), ref, dtype)


def packed(layout: quant.Layout, arena: torch.Tensor) -> torch.Tensor:
    """A native arena [S, 3*H*I] -> the same experts quantized, one packed row per slot [S, row_bytes]."""
    gate_up, down = arena_views(arena, layout.hidden)
    return torch.stack([quant.quantize_matrices(layout, gu, d) for gu, d in zip(gate_up, down, strict=True)])


# (fmt, group, H, I, block, T, K, dtype): the group divides H and I; blocks that do not divide H or
# I exercise the masks, groups above and below the block size the scale lookup; T = 1, 3, 17,
# K = 2 and 8, every dtype
PACKED_CASES = [("int8", 0, 40, 24, 16, 1, 8, torch.bfloat16), ("int8", 16, 48, 32, 32, 3, 2, torch.float32),
                ("int8", 16, 48, 32, 16, 17, 2, torch.float16), ("int4", 16, 48, 32, 32, 17, 2, torch.float32),
                ("int4", 16, 32, 48, 32, 3, 8, torch.bfloat16), ("int4", 32, 96, 64, 16, 3, 2, torch.float16),
                ("int4", 64, 128, 64, 32, 1, 8, torch.float32), ("int4", 32, 96, 64, 64, 17, 2, torch.bfloat16)]


def run_packed_test(fmt: str, group: int, hidden: int, inter: int, block: int, T: int, K: int, dtype: torch.dtype,
                    variant: str, device: str = "cpu") -> None:
    """The kernels dequantize int8 / int4 tiles in registers: the same layer as dequantizing the
    packed arena first and running the reference on it."""
    x, weights, ids, slot_map, arena = layer(T, K, 8, dtype, device, seed=T + K, hidden=hidden, inter=inter)
    layout = quant.Layout(fmt, group, hidden, inter)
    rows = packed(layout, arena).to(device)
    w, slots = slots_of(weights, ids, slot_map)
    slots[-1, -1] = -1  # a dropped pair whatever the route, its weight left as it was
    out = kernels.experts(x, w, slots, rows, variant=variant, block=block, layout=layout)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, reference(x, w, slots, layout.dequantize_rows(rows, torch.float32)), dtype)


@pytest.mark.parametrize("variant", ["decode", "grouped"])
@pytest.mark.parametrize("fmt,group,hidden,inter,block,T,K,dtype", PACKED_CASES)
def test_triton_kernels_read_packed_experts(fmt, group, hidden, inter, block, T, K, dtype, variant):
    run_packed_test(fmt, group, hidden, inter, block, T, K, dtype, variant)


def test_native_path_at_an_odd_hidden_size():
    """H = 33: no 2I-wide table of the arena exists, and grouped_mm wants aligned strides; the
    gathered path takes over."""
    g = torch.Generator().manual_seed(1)
    arena = torch.randn(6, 3 * 33 * 17, generator=g)
    x, w = torch.randn(3, 33, generator=g), torch.rand(3, 2, generator=g)
    slots = torch.tensor([[0, -1], [5, 2], [-1, -1]])
    torch.testing.assert_close(native.native(x, w, slots, arena), reference(x, w, slots, arena))
    out = kernels.experts(x, w, slots, arena, variant="decode", block=BLOCK)
    torch.testing.assert_close(out, reference(x, w, slots, arena), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule,cached", [("top", False), ("switch", False), ("prefix", False), ("prefix", True),
                                         ("top", True)])
def test_the_op_decides_which_experts_run(rule, cached):
    """The op's keep rule against one written token by token: the little set, the switch or the
    prefix rule, plus (cached) every other routed expert the slot map holds."""
    T, K, E = 9, 4, 16
    x, weights, ids, slot_map, arena = layer(T, K, E, torch.float32, seed=2)
    slot_map[ids[:, :2].flatten()] = torch.arange(2 * T) % arena.shape[0]  # what the rule asks for is present
    out = torch.ops.mobile.moe_experts(x, weights, ids, slot_map, arena, KeepRule(rule, 2, 0.7, False, cached).text,
                                       kind())
    keep = torch.zeros(T, K, dtype=torch.bool)
    for t in range(T):  # the first 2, then (switch) all or (prefix) as many as reach 0.7 of the mass
        share = (weights[t].cumsum(0) / weights[t].sum()).tolist()
        if rule == "top":
            n = 2
        elif rule == "switch":
            n = 2 if share[1] >= 0.7 else K
        else:
            n = max(2, next(i + 1 for i, v in enumerate(share) if v >= 0.7 or i == K - 1))
        keep[t, :n] = True
    if cached:
        keep = keep | (slot_map[ids] >= 0)
    slots = torch.where(keep, slot_map[ids], -1)
    torch.testing.assert_close(out, reference(x, weights.masked_fill(~keep, 0), slots, arena))


def test_align_places_every_pair_once_in_blocks_of_one_slot():
    g = torch.Generator().manual_seed(3)
    slots = torch.randint(-1, 7, (33, 4), generator=g)
    pairs, block_slot = kernels.align(slots, 7, 16)
    P = slots.numel()
    placed = pairs[pairs < P]
    assert sorted(placed.tolist()) == sorted((slots.flatten() >= 0).nonzero().flatten().tolist())
    for b, s in enumerate(block_slot.tolist()):
        members = pairs[b * 16:(b + 1) * 16]
        members = members[members < P]
        if s < 0:
            assert members.numel() == 0
        else:
            assert (slots.flatten()[members.long()] == s).all()


def test_the_status_is_what_the_op_runs():
    """The host learns from the rule's status exactly the experts the op will read: those it must fetch
    (chosen, absent), and those already there (chosen, or taken for free)."""
    x, weights, ids, slot_map, arena = layer(5, 4, 16, torch.float32, seed=4)
    rule = KeepRule("prefix", 2, 0.7, cached=True)
    cached, missing, free = decode_status(rule.status(weights, ids, slot_map).tolist(), 16)
    chosen = rule.keep(weights)
    assert set(missing) == {int(e) for e in ids[chosen] if slot_map[e] < 0}
    present = slot_map[ids] >= 0
    assert set(cached) == {int(e) for e in ids[present]} and free == len(set(cached) - set(ids[chosen].tolist()))


# -- on a GPU: eager, compiled and CUDA-graph replay, one numerics helper for the three ---------------

def run_moe_test(T: int, K: int, E: int, dtype: torch.dtype, mode: str) -> None:
    x, weights, ids, slot_map, arena = layer(T, K, E, dtype, device="cuda")
    op = torch.ops.mobile.moe_experts
    rule = KeepRule("prefix", max(1, K // 2), 0.6, False, True)
    args = (rule.text, kind())
    w, slots = rule.pairs(weights, ids, slot_map)
    ref = reference(x, w, slots, arena)
    if mode == "eager":
        out = op(x, weights, ids, slot_map, arena, *args)
    elif mode == "compiled":
        out = torch.compile(lambda *a: op(*a, *args), fullgraph=True)(x, weights, ids, slot_map, arena)
    else:  # captured once, replayed on new inputs copied into the captured buffers
        static = [t.clone() for t in (x, weights, ids, slot_map, arena)]
        op(*static, *args)  # warm-up: Triton compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = op(*static, *args)
        for dst, src in zip(static, (x, weights, ids, slot_map, arena), strict=True):
            dst.copy_(src)
        graph.replay()
        out = captured
    torch.cuda.synchronize()
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("mode", ["eager", "compiled", "cudagraph"])
@pytest.mark.parametrize("T,K,E,dtype", CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_op(T, K, E, dtype, mode):
    run_moe_test(T, K, E, dtype, mode)


@pytest.mark.parametrize("variant", ["decode", "grouped"])
@pytest.mark.parametrize("fmt,group,hidden,inter,block,T,K,dtype", PACKED_CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_packed_kernels(fmt, group, hidden, inter, block, T, K, dtype, variant):
    """On a GPU the grouped variant's 16-bit tiles are dequantized to bf16 / fp16 for tl.dot (the
    interpreter takes bf16 to float32), so this checks that rounding too."""
    run_packed_test(fmt, group, hidden, inter, block, T, K, dtype, variant, device="cuda")


@pytest.mark.parametrize("T", [1, 5])
def test_torch_compile_traces_the_op_without_a_graph_break(T):
    """fullgraph: a graph break would raise. One token: the op's torch ops are traced and fused; a
    prompt: the grouped path is an opaque op with a fake."""
    x, weights, ids, slot_map, arena = layer(T, 4, 16, torch.float32, seed=5)
    slot_map[ids.flatten()] = torch.arange(ids.numel()) % arena.shape[0]

    rule = KeepRule("prefix", 2, 0.7, cached=True).text

    def f(x, weights, ids, slot_map):
        return torch.ops.mobile.moe_experts(x, weights, ids, slot_map, arena, rule, kind())

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x, weights, ids, slot_map), f(x, weights, ids, slot_map))


# -- experts with biases and the clamped SwiGLU (gpt-oss) -------------------------------------

# (fmt, group, T, K, dtype, variant): native and both packed formats, both kernel variants, every dtype
BIASED_CASES = [("native", 0, 1, 2, torch.float32, "decode"), ("native", 0, 17, 2, torch.bfloat16, "grouped"),
                ("native", 0, 3, 8, torch.float16, "decode"), ("int8", 0, 3, 2, torch.float32, "grouped"),
                ("int8", 16, 1, 8, torch.bfloat16, "decode"), ("int4", 16, 17, 2, torch.float16, "grouped"),
                ("int4", 16, 3, 2, torch.float32, "decode")]


def biased_arena(arena: torch.Tensor, mlp: ExpertMLP, seed: int) -> torch.Tensor:
    """A native arena without biases -> the same experts in rows that carry random biases."""
    g = torch.Generator().manual_seed(seed)
    H, inter = mlp.hidden, mlp.inter
    rows = torch.zeros(arena.shape[0], quant.native_row_elems(H, inter, True), dtype=arena.dtype)
    rows[:, :3 * H * inter] = arena
    for view in bias_views(rows, mlp):
        view.copy_(torch.randn(view.shape, generator=g))
    return rows


@pytest.mark.parametrize("fmt,group,T,K,dtype,variant", BIASED_CASES)
def test_triton_kernels_add_biases_and_clamp(fmt, group, T, K, dtype, variant):
    """BIAS and ACT 1: gate_up's and down's biases from the row (native: the arena's dtype; packed:
    float16), the clamped SwiGLU at a limit the values cross, against the reference on the same experts."""
    H, inter = 48, 32
    x, weights, ids, slot_map, arena = layer(T, K, 8, dtype, seed=T * K, hidden=H, inter=inter)
    mlp = ExpertMLP(H, inter, bias=True, act="clamped_swiglu", alpha=1.702, limit=0.3)
    rows = biased_arena(arena, mlp, seed=T)
    w, slots = slots_of(weights, ids, slot_map)
    if fmt == "native":
        out = kernels.experts(x, w, slots, rows, variant=variant, block=BLOCK, mlp=mlp)
        dense = rows
    else:
        layout = quant.Layout(fmt, group, H, inter, bias=True)
        gate_up, down = arena_views(rows, H, inter)
        gu_bias, down_bias = bias_views(rows, mlp)
        rows = torch.stack([quant.quantize_matrices(layout, gate_up[s], down[s], (gu_bias[s], down_bias[s]))
                            for s in range(rows.shape[0])])
        out = kernels.experts(x, w, slots, rows, variant=variant, block=BLOCK, layout=layout, mlp=mlp)
        dense = layout.dequantize_rows(rows, torch.float32)
    assert out.dtype == dtype and out.shape == x.shape
    ref = reference(x, w, slots, dense, mlp)
    assert_close(out, ref, dtype)
    unclamped = reference(x, w, slots, dense, ExpertMLP(H, inter, bias=True))
    assert (unclamped.float() - ref.float()).abs().max() > 10 * TOL[dtype] * ref.float().abs().max()
