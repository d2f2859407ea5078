"""The host expert kernel (kernels/host_experts.c through mobile.moe.host) against the plain-torch
reference (mobile.moe.reference) over the same rows: every expert format, biases and gpt-oss's
activation, ragged sizes, several tokens and pairs, and any thread count giving the same bits."""

from __future__ import annotations

import pytest
import torch

from mobile.errors import MobileError
from mobile.moe import cbuild, host, quant
from mobile.moe.layout import ExpertMLP, arena_views, bias_views
from mobile.moe.reference import reference

pytestmark = pytest.mark.skipif(host.unavailable() is not None, reason=str(host.unavailable()))


def expert_rows(fmt: str, mlp: ExpertMLP, experts: int, group: int, dtype=torch.float32, seed: int = 0):
    """`experts` random experts as host-store rows of `fmt`, and the same as a float32 arena."""
    g = torch.Generator().manual_seed(seed)
    H, inter = mlp.hidden, mlp.inter
    gate_up = torch.randn(experts, H, 2 * inter, generator=g) / H**0.5
    down = torch.randn(experts, inter, H, generator=g) / inter**0.5
    biases = [(torch.randn(2 * inter, generator=g), torch.randn(H, generator=g)) for _ in range(experts)]
    if fmt == "native":
        rows = torch.zeros(experts, quant.native_row_elems(H, inter, mlp.bias), dtype=dtype)
        gu, dn = arena_views(rows, H, inter)
        gu.copy_(gate_up)
        dn.copy_(down)
        if mlp.bias:
            bgu, bdn = bias_views(rows, mlp)
            bgu.copy_(torch.stack([b[0] for b in biases]))
            bdn.copy_(torch.stack([b[1] for b in biases]))
        return rows, None, rows.float()
    layout = quant.Layout(fmt, group, H, inter, mlp.bias)
    rows = torch.stack([layout.pack(quant.quantize(gate_up[e], fmt, group), quant.quantize(down[e], fmt, group),
                                    biases[e] if mlp.bias else None) for e in range(experts)])
    return rows, layout, layout.dequantize_rows(rows, torch.float32)


def run_kernel(rows, layout, mlp, dtype, x, ids, weights, threads=2, isa="native"):
    kernel = host.HostExperts(mlp, dtype, layout, threads, isa)
    out = torch.zeros_like(x)
    tokens = torch.arange(ids.shape[0]).repeat_interleave(ids.shape[1])
    addresses = torch.tensor([rows[e].data_ptr() for e in ids.flatten().tolist()])
    return kernel(x, out, tokens, addresses, weights.flatten())


CASES = [  # fmt, dtype, H, I, group, bias, activation
    ("native", torch.float32, 64, 48, 0, False, "swiglu"),
    ("native", torch.bfloat16, 64, 48, 0, False, "swiglu"),
    ("int8", torch.float32, 64, 48, 0, False, "swiglu"),
    ("int8", torch.float32, 64, 48, 16, False, "swiglu"),
    ("int4", torch.float32, 64, 48, 16, False, "swiglu"),
    ("int4", torch.float32, 64, 32, 32, True, "clamped_swiglu"),
    ("native", torch.float32, 64, 48, 0, True, "clamped_swiglu"),
    ("int4", torch.float32, 64, 48, 16, False, "geglu"),  # Gemma 4's
    ("native", torch.bfloat16, 64, 48, 0, False, "geglu"),
    ("int4", torch.float32, 44, 30, 2, False, "swiglu"),  # widths not a multiple of 8; one byte row per group
    ("int8", torch.float32, 36, 21, 3, False, "swiglu"),  # odd groups and an odd I
    ("int4", torch.float32, 600, 300, 300, False, "swiglu"),  # groups longer than a chunk of rows
    ("int8", torch.float32, 600, 300, 0, False, "swiglu"),  # one group, cut into chunks of rows
]


@pytest.mark.parametrize("isa", sorted(host.ISAS))
@pytest.mark.parametrize("fmt,dtype,H,inter,group,bias,act", CASES)
def test_kernel_matches_reference(fmt, dtype, H, inter, group, bias, act, isa):
    mlp = ExpertMLP(H, inter, bias, act, alpha=1.702, limit=0.5 if act == "clamped_swiglu" else 7.0)
    rows, layout, arena = expert_rows(fmt, mlp, experts=6, group=group, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, H, generator=g)
    ids = torch.stack([torch.randperm(6, generator=g)[:4] for _ in range(3)])
    weights = torch.rand(3, 4, generator=g)
    expected = reference(x, weights, ids, arena, mlp)
    got = run_kernel(rows, layout, mlp, dtype, x, ids, weights, isa=isa)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_kernel_adds_into_out_and_reads_rows_in_place():
    """out is accumulated into (the device adds the host's share), and rows are read where they lie:
    a row changed after building the kernel changes the result."""
    mlp = ExpertMLP(32, 16)
    rows, layout, arena = expert_rows("int4", mlp, experts=2, group=8)
    x, ids, weights = torch.randn(1, 32), torch.tensor([[1]]), torch.ones(1, 1)
    kernel, addresses = host.HostExperts(mlp, torch.float32, layout, 1), torch.tensor([rows[1].data_ptr()])
    start = torch.full((1, 32), 3.0)
    got = kernel(x, start.clone(), torch.zeros(1, dtype=torch.int32), addresses, weights.flatten())
    torch.testing.assert_close(got, 3.0 + reference(x, weights, ids, arena, mlp), rtol=1e-5, atol=1e-5)
    rows[1].copy_(rows[0])
    again = kernel(x, torch.zeros(1, 32), torch.zeros(1, dtype=torch.int32), addresses, weights.flatten())
    torch.testing.assert_close(again, reference(x, weights, torch.tensor([[0]]), arena, mlp), rtol=1e-5, atol=1e-5)


def test_thread_count_does_not_change_a_bit():
    """Rows are cut into chunks by a fixed size, not by the thread count, and summed in order."""
    mlp = ExpertMLP(1024, 256)
    rows, layout, _ = expert_rows("int4", mlp, experts=4, group=64)
    x, ids, weights = torch.randn(2, 1024), torch.tensor([[0, 3], [2, 1]]), torch.rand(2, 2)
    one, two = (run_kernel(rows, layout, mlp, torch.float32, x, ids, weights, threads=t) for t in (1, 2))
    assert torch.equal(one, two)


def test_unreadable_formats_are_refused_in_words():
    with pytest.raises(MobileError, match="float32, bfloat16, int8 or int4"):
        host.HostExperts(ExpertMLP(32, 16), torch.float16, None, 1)
    with pytest.raises(MobileError, match="activation"):
        host.HostExperts(ExpertMLP(32, 16, act="gelu"), torch.float32, None, 1)


def test_no_compiler_is_one_reason(monkeypatch):
    monkeypatch.setattr(cbuild.shutil, "which", lambda name: None)
    host.unavailable.cache_clear()
    try:
        assert "no C compiler" in str(host.unavailable())
    finally:
        host.unavailable.cache_clear()
