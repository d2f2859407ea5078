"""The op's native implementations: plain torch, for the CPU (and CUDA without Triton).

`native` takes the pairs a keep rule left (weights [T, K], slots [T, K], -1 where dropped) over a
native arena; `dequantizing` does the same over a packed one. No host sync and no data-dependent
Python loop: one decoded token reads small experts' rows in place by torch's embedding_bag; prompts
and large experts are grouped by slot for torch's grouped_mm (an op of its own, opaque to
torch.compile); odd shapes (the tests' tiny layers) gather the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mobile.moe import quant
from mobile.moe.layout import ExpertMLP, arena_views, bias_views, sort_by_slot
from mobile.moe.reference import reference

_LIB = torch.library.Library("mobile", "FRAGMENT")
_LIB.define("grouped_experts(Tensor x, Tensor weights, Tensor slots, Tensor arena, int inter=0, bool bias=False, "
            "str act=\"swiglu\", float alpha=1.702, float limit=7.0) -> Tensor")


# Up to this many weights per expert, one token reads its experts by embedding_bag (fewer, cheaper
# calls); beyond, grouped_mm's matrix products stream big experts faster. Measured on this
# project's CPU machines, one thread, float32, top-8 of 24 slots: grouped/bagged time 1.9x at
# 0.4M weights, 1.3x at 1.6M, 0.69x at 3.1M, 0.91x at 4.7M (Qwen3-30B-A3B's expert).
BAG_MAX_EXPERT = 2 << 20


def native(x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, arena: torch.Tensor,
           mlp: ExpertMLP | None = None) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{slots[t, k]}(x[t]) over the pairs with slots >= 0.

    x [T, H], weights [T, K], slots [T, K], arena [S, row] -> [T, H]. mlp: what an expert
    computes (default: plain SwiGLU without biases, I from the row length).
    On the CPU, with no host sync and no Python loop: one decoded token with small experts reads
    them by embedding_bag; otherwise tokens are grouped by slot for grouped_mm (an opaque op to
    torch.compile); odd shapes (the tests' tiny layers) gather the weights. On CUDA without Triton:
    gathered weights for one token (capturable), one slot at a time for more (a prompt)."""
    T, H = x.shape
    mlp = mlp or ExpertMLP.of_arena(arena, H)
    if x.device.type == "cpu":
        if T == 1 and _bag_ok(x, arena, mlp):
            return _bagged(x, weights, slots, arena, mlp)
        if _grouped_mm_ok(x, arena, mlp):
            return torch.ops.mobile.grouped_experts(x, weights, slots, arena, mlp.inter, mlp.bias, mlp.act, mlp.alpha,
                                                    mlp.limit)
        return _gathered(x, weights, slots, arena, mlp)
    return _gathered(x, weights, slots, arena, mlp) if T == 1 else reference(x, weights, slots, arena, mlp)


def _bag_ok(x: torch.Tensor, arena: torch.Tensor, mlp: ExpertMLP) -> bool:
    # the arena is read as a table of 2I-wide rows and one of H-wide rows (quant.native_row_elems)
    n = arena.shape[1]
    return n <= BAG_MAX_EXPERT and arena.is_contiguous() and n % (2 * mlp.inter) == 0 and n % x.shape[1] == 0


def _masked(weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The pairs' weights, 0 where the slot is -1 (a kept expert that is not on the device adds nothing)."""
    return torch.where(slots >= 0, weights, 0)


def _down_bias(weights: torch.Tensor, slots: torch.Tensor, arena: torch.Tensor, mlp: ExpertMLP) -> torch.Tensor:
    """sum_k weights[t, k] * down bias of slot[t, k]: [T, H] (what the biases add after down)."""
    down_bias = bias_views(arena, mlp)[1][slots.clamp(min=0)]  # [T, K, H]
    return torch.einsum("tk,tkh->th", _masked(weights, slots).to(arena.dtype), down_bias)


def _bagged(x, weights, slots, arena, mlp: ExpertMLP | None = None):
    """Each (token, expert) pair's rows read in place: embedding_bag over the arena seen as a table
    of rows. gate_up: one bag per pair, H rows of 2I weighted by x[t]; down: one bag per token, the
    I rows of each of its K experts weighted by the activations and the router weights, so the
    combine over k is the bag's sum. A dropped pair's rows point at a padding row, which the sum
    skips: it reads nothing. Biases, where the rows carry them, are gathered and added."""
    T, K = slots.shape
    mlp = mlp or ExpertMLP.of_arena(arena, x.shape[1])
    H, inter = x.shape[1], mlp.inter
    rows13, rows2 = _bag_rows(arena, H, inter)
    h = torch.embedding_bag(arena.view(-1, 2 * inter), rows13[slots + 1].view(-1), _arange(0, T * K * H, x.device, H),
                            False, 0, False, x[:, None, :].expand(T, K, H).reshape(-1), False, H)[0]  # [T*K, 2I]
    if mlp.bias:
        h = h + bias_views(arena, mlp)[0][slots.clamp(min=0).view(-1)]
    act = mlp.activate(h) * weights.reshape(T * K, 1).to(x.dtype)  # [T*K, I]
    bags = _arange(0, T * K * inter, x.device, K * inter)
    out = torch.embedding_bag(arena.view(-1, H), rows2[slots + 1].view(-1), bags,
                              False, 0, False, act.view(-1), False, 0)[0]  # [T, H]
    return out + _down_bias(weights, slots, arena, mlp) if mlp.bias else out


def _bag_rows(arena: torch.Tensor, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding_bag row indices of each slot's weights, [S + 1, H] and [S + 1, I], row 0 for
    slot -1 (a dropped pair). Slot s's gate_up rows start at row s*n/2I of the arena seen as a
    2I-wide table (n: its row length), its down rows at s*n/H + 2I of it seen H-wide; row H of the
    first and row 0 of the second are other data, so they serve as the padding rows the bag sums
    skip."""
    S, n, device = arena.shape[0], arena.shape[1], arena.device

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        slot = torch.arange(-1, S, device=device)[:, None]
        rows13 = torch.where(slot >= 0, slot * (n // (2 * inter)) + torch.arange(hidden, device=device), hidden)
        rows2 = torch.where(slot >= 0, slot * (n // hidden) + torch.arange(2 * inter, 3 * inter, device=device), 0)
        return rows13, rows2

    return _cached(("rows", S, n, hidden, inter, device), make)


def _arange(start: int, end: int, device: torch.device, step: int = 1) -> torch.Tensor:
    return _cached(("arange", start, end, step, device), lambda: torch.arange(start, end, step, device=device))


_CACHE: dict[tuple, object] = {}


def _cached(key: tuple, make):
    """Index tensors eager decoding asks for on every call, made once; compiled code makes its own
    (a tensor made outside the trace would be a constant of it)."""
    if torch.compiler.is_compiling():
        return make()
    if key not in _CACHE:
        # a normal tensor even when first asked for under inference mode (an engine's generate): an
        # inference tensor could not be written in place by a later call outside it
        with torch.inference_mode(False):
            _CACHE[key] = make()
    return _CACHE[key]


def _grouped_mm_ok(x: torch.Tensor, arena: torch.Tensor, mlp: ExpertMLP) -> bool:
    # torch's grouped_mm wants 16-byte aligned strides
    row = 16 // x.element_size()
    return arena.is_contiguous() and x.shape[1] % row == 0 and mlp.inter % row == 0 and arena.shape[1] % row == 0


def _grouped(x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, arena: torch.Tensor, inter: int = 0,
             bias: bool = False, act: str = "swiglu", alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """Pairs sorted by slot, each slot's rows one group of torch's grouped_mm over the whole arena,
    so each expert's weights are read once for all of its tokens. (On the CPU grouped_mm visits
    every group, used or not: fine for a prompt, not for one token.) inter 0: I from the rows
    (no biases); the rest is the ExpertMLP, as plain arguments (a custom op's)."""
    K = slots.shape[1]
    inter = inter or arena.shape[1] // (3 * x.shape[1])
    mlp = ExpertMLP(x.shape[1], inter, bias, act, alpha, limit)
    gate_up, down = arena_views(arena, x.shape[1], inter)
    order, counts = sort_by_slot(slots, arena.shape[0])
    ends = counts.cumsum(0).to(torch.int32)  # [S] group ends; dropped pairs lie past the last one
    tok = order // K  # [P]: the token of each pair, grouped by slot
    slot = slots.flatten()[order]  # [P], -1 for the dropped pairs (masked below)
    safe = slot.clamp(min=0)
    h = F.grouped_mm(x[tok], gate_up, offs=ends)  # [P, 2I]
    if bias:
        gu_bias, down_bias = bias_views(arena, mlp)
        h = h + gu_bias[safe]
    y = F.grouped_mm(mlp.activate(h), down, offs=ends)  # [P, H]
    if bias:
        y = y + down_bias[safe]
    # rows past the last group are left unwritten by grouped_mm: select, never multiply, them away
    y = torch.where((slot >= 0)[:, None], y * weights.flatten()[order, None].to(y.dtype), 0)
    return torch.zeros_like(x).index_add_(0, tok, y)


# opaque to torch.compile: the group sizes are data, and grouped_mm's fake is 16-bit only
_LIB.impl("grouped_experts", _grouped, "CPU")
torch.library.register_fake("mobile::grouped_experts", lambda x, *args, **kwargs: torch.empty_like(x), lib=_LIB)


def _gathered(x, weights, slots, arena, mlp: ExpertMLP | None = None):
    """Each pair's weights gathered, then batched: any alignment, any device; for few pairs."""
    mlp = mlp or ExpertMLP.of_arena(arena, x.shape[1])
    gate_up, down = arena_views(arena, x.shape[1], mlp.inter)
    safe = slots.clamp(min=0)  # dropped pairs read slot 0 and are masked out below
    h = torch.einsum("th,tkhi->tki", x, gate_up[safe])  # [T, K, 2I]
    if mlp.bias:
        gu_bias, down_bias = bias_views(arena, mlp)
        h = h + gu_bias[safe]
    y = torch.einsum("tki,tkih->tkh", mlp.activate(h), down[safe])  # [T, K, H]
    if mlp.bias:
        y = y + down_bias[safe]
    y = torch.where((slots >= 0)[..., None], y * weights[..., None].to(y.dtype), 0)
    return y.sum(dim=1)


# A prompt over a packed arena dequantizes this many slots at a time, so that its scratch stays a
# few experts however large the cache (a resident 30B layer holds 128)
DEQUANT_SLOTS = 8


def dequantizing(x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, arena: torch.Tensor,
                 layout: quant.Layout, mlp: ExpertMLP) -> torch.Tensor:
    """`native` over a packed arena (uint8 [S, layout.row_bytes]), in plain torch, for the CPU (and
    CUDA without Triton). The experts are dequantized into a scratch arena reused call after call:
    one decoded token's K pairs gather their packed rows first (so only the experts that can run are
    dequantized, and the bytes read are packed ones); a prompt goes through every slot,
    DEQUANT_SLOTS at a time, each chunk's pairs through `native`. No host sync, no data-dependent
    Python loop."""
    T, K = slots.shape

    def dense(rows: torch.Tensor) -> torch.Tensor:
        # one scratch per shape, reused call after call: a fresh multi-MB tensor each call costs
        # more in page faults than the unpacking (measured: 27 against 8 ms for one OLMoE expert)
        shape = (rows.shape[0], quant.native_row_elems(layout.hidden, layout.inter, layout.bias))
        scratch = _cached(("scratch", shape, x.dtype, x.device), lambda: torch.empty(shape, dtype=x.dtype,
                                                                                       device=x.device))
        return layout.dequantize_rows(rows, x.dtype, out=scratch)

    if T == 1:
        # [K, row_bytes]: dropped pairs read slot 0, unused (index_select: ~20x faster than
        # advanced indexing on byte rows on the CPU)
        rows = arena.index_select(0, slots.clamp(min=0).flatten())
        pair_slots = torch.where(slots >= 0, _arange(0, K, slots.device)[None, :], -1)
        return native(x, weights, pair_slots, dense(rows), mlp)
    out = torch.zeros_like(x)
    for start in range(0, arena.shape[0], DEQUANT_SLOTS):
        chunk = arena[start:start + DEQUANT_SLOTS]
        inside = (slots >= start) & (slots < start + chunk.shape[0])
        out += native(x, weights, torch.where(inside, slots - start, -1), dense(chunk), mlp)
    return out
