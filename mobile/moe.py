"""The routed-expert layer as one registered op over device state: torch.ops.mobile.moe_experts.

    out [T, H] = moe_experts(x [T, H], weights [T, K], ids [T, K], slot_map [E], arena [S, row],
                             rule, n, tau, rescale, cached, fmt="native", group=0, inter=0,
                             bias=False, act="swiglu", alpha=1.702, limit=7.0)

T = tokens, H = hidden, K = experts per token (the router's big set, in its selection order:
ops.route), E = experts, S = cache slots, I = expert intermediate size. slot_map gives each
expert's slot in the arena, or -1 when it is not on the device. An arena row is one expert, stored
input-major so that it is applied as x @ W: gate_up [H, 2I] (gate columns, then up columns), then
down [I, H] (arena_views).
What an expert computes is an `ExpertMLP` (the op's last arguments, from the spec: `spec_args`):
act(x @ gate_up) @ down, act swiglu or gpt-oss's clamped_swiglu; with bias, the row also carries
gate_up's and down's biases after the matrices (bias_views; the row's length:
mobile.quant.native_row_elems), added after each product, so they travel with the expert and live
in its cache slot.

Which of a token's experts run is decided inside the op, from device tensors (`pairs`):
- rule "top": the first n (n = K: the big set; n = little_k: the little set);
- rule "switch" / "prefix": the per-layer rule at layer_tau = tau, never fewer than n (ops.rule_keep);
- cached: also every other expert of the big set that the slot map holds. It is on the device
  already, so it costs compute, never a transfer.
rescale: the kept experts carry the big set's total weight (else the router's own weights).
A kept expert must be in the slot map (the fetch before the op sees to it); a pair whose slot is -1
adds nothing.

With fmt int8 or int4 the arena is packed, uint8 [S, row_bytes] (mobile.quant: one row per expert,
weights plus scales and zeros), and the op dequantizes as it computes: the Triton kernels tile by
tile in registers; the CPU path (`dequantizing`) only the experts that can run, into a scratch
arena for the call.

Implementations: `native`, the CPU path (no host sync, no Python loop: one decoded token reads
small experts' rows in place by torch's embedding_bag; prompts and large experts are grouped by
slot for torch's grouped_mm), and Triton on CUDA (kernels/moe.py). `reference` is the plain
per-slot loop both are tested against (tests/test_kernels.py). Like vLLM's fused_moe with its
expert_map.

The same rule tells the host what to fetch: `fetch_status` sums a layer up in one small vector,
the one thing the host reads per MoE layer (mobile.experts).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mobile import quant
from mobile.ops import clamped_swiglu, kept_weights, rule_keep

# fetch_status codes, by priority: an expert one token needs and another could take for free is needed
UNUSED, FREE, CACHED, MISSING = 0, 1, 2, 3


def chosen(weights: torch.Tensor, rule: str, n: int, tau: float) -> torch.Tensor:
    """weights [T, K] in selection order -> [T, K] bool: the experts the policy's rule asks for."""
    if rule == "top":
        return torch.arange(weights.shape[1], device=weights.device)[None, :] < n
    return rule_keep(weights, n, tau, rule)


def pairs(weights: torch.Tensor, ids: torch.Tensor, slot_map: torch.Tensor, rule: str, n: int, tau: float,
          rescale: bool, cached: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, expert) pairs that run: (weights [T, K], 0 where dropped; slots [T, K], -1 where dropped)."""
    slots = slot_map[ids]  # [T, K]
    if rule == "top" and n >= weights.shape[1] and not cached:
        return weights, slots  # the big set: nothing dropped, nothing to re-weigh
    keep = chosen(weights, rule, n, tau)
    if cached:
        keep = keep | (slots >= 0)
    return kept_weights(weights, keep, rescale), torch.where(keep, slots, -1)


def fetch_status(weights: torch.Tensor, ids: torch.Tensor, slot_map: torch.Tensor, rule: str, n: int, tau: float,
                 cached: bool) -> torch.Tensor:
    """What a layer's fetch must do, as one small int32 vector for the host to read.

    Entry = code * E + expert, sorted descending, the first min(E, T*K) kept: MISSING (chosen, not
    on the device), CACHED (chosen, on the device), FREE (not chosen, on the device, taken by a
    cache-aware little pass), then UNUSED, where the host stops reading (decode_status)."""
    E = slot_map.shape[0]
    present = slot_map[ids] >= 0  # [T, K]
    pick = chosen(weights, rule, n, tau)
    free = present & cached
    code = torch.where(pick, torch.where(present, CACHED, MISSING), torch.where(free, FREE, UNUSED))
    per_expert = torch.zeros(E, dtype=torch.int32, device=ids.device)
    per_expert.scatter_reduce_(0, ids.flatten(), code.flatten().to(torch.int32), "amax")
    entries = per_expert * E + torch.arange(E, dtype=torch.int32, device=ids.device)
    return torch.topk(entries, min(E, ids.numel())).values


def decode_status(entries: list[int], num_experts: int) -> tuple[list[int], list[int], int]:
    """fetch_status as read by the host -> (experts already on the device that run, experts to
    fetch, how many of the first came free to a cache-aware little pass)."""
    cached: list[int] = []
    missing: list[int] = []
    free = 0
    for entry in entries:
        code, expert = divmod(entry, num_experts)
        if code == UNUSED:
            break
        (missing if code == MISSING else cached).append(expert)
        free += code == FREE
    return cached, missing, free


# -- the op -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertMLP:
    """What one routed expert computes besides its weights' values: H, I, whether its row carries
    biases, and its activation (swiglu, or clamped_swiglu at alpha and limit)."""

    hidden: int
    inter: int
    bias: bool = False
    act: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0

    @classmethod
    def of_arena(cls, arena: torch.Tensor, hidden: int) -> ExpertMLP:
        """A native arena of plain SwiGLU experts without biases: I follows from its rows."""
        return cls(hidden, arena.shape[1] // (3 * hidden))

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., 2I] (x @ gate_up, plus its bias) -> the activations [..., I]."""
        gate, up = h.chunk(2, dim=-1)
        if self.act == "clamped_swiglu":
            return clamped_swiglu(gate, up, self.alpha, self.limit)
        return F.silu(gate) * up


def spec_args(spec) -> tuple:
    """The op's trailing arguments for a spec's experts: fmt, group, inter, bias, act, alpha, limit."""
    moe = spec.model.moe
    return (spec.runtime.expert_format, spec.expert_group, moe.intermediate_size, moe.expert_bias, moe.activation,
            moe.swiglu_alpha, moe.swiglu_limit)


def arena_views(arena: torch.Tensor, hidden: int, inter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """arena [S, row] -> gate_up [S, H, 2I] and down [S, I, H], as views (no copy). inter: I, needed
    when rows carry biases (else it follows from the row length)."""
    S, n = arena.shape
    inter = n // (3 * hidden) if inter is None else inter
    row, start = arena.stride(0), arena.storage_offset()
    gate_up = arena.as_strided((S, hidden, 2 * inter), (row, 2 * inter, 1), start)
    down = arena.as_strided((S, inter, hidden), (row, hidden, 1), start + 2 * inter * hidden)
    return gate_up, down


def bias_views(arena: torch.Tensor, mlp: ExpertMLP) -> tuple[torch.Tensor, torch.Tensor]:
    """A native arena with biases -> gate_up's [S, 2I] and down's [S, H] biases, as views."""
    (gu, d), S = quant.native_bias_offsets(mlp.hidden, mlp.inter), arena.shape[0]
    row, start = arena.stride(0), arena.storage_offset()
    return (arena.as_strided((S, 2 * mlp.inter), (row, 1), start + gu),
            arena.as_strided((S, mlp.hidden), (row, 1), start + d))


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, slot_map: torch.Tensor,
                arena: torch.Tensor, rule: str, n: int, tau: float, rescale: bool, cached: bool,
                fmt: str = "native", group: int = 0, inter: int = 0, bias: bool = False, act: str = "swiglu",
                alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """The op's one kernel, for every device (CompositeImplicitAutograd): the keep rule and the native
    path are plain torch ops, which torch.compile traces and fuses; on CUDA the expert MLP is the
    Triton kernel, itself an opaque op with a fake (mobile::triton_experts). fmt, group: a packed
    arena's format (mobile.quant); inter: I, needed for a packed arena or one with biases; bias,
    act, alpha, limit: the ExpertMLP."""
    w, slots = pairs(weights, ids, slot_map, rule, n, tau, rescale, cached)
    H = x.shape[1]
    assert inter or (fmt == "native" and not bias), "a packed arena or one with biases needs inter"
    mlp = ExpertMLP(H, inter or arena.shape[1] // (3 * H), bias, act, alpha, limit)
    if x.is_cuda and _triton_kernels() is not None:
        return torch.ops.mobile.triton_experts(x, w, slots, arena, fmt, group, mlp.inter, bias, act, alpha, limit)
    if fmt != "native":
        return dequantizing(x, w, slots, arena, quant.Layout(fmt, group, H, mlp.inter, bias), mlp)
    return native(x, w, slots, arena, mlp)


# The ops are defined through torch.library.Library rather than the custom_op decorator: that one
# wraps every call in a lazy torch.compiler.disable, so the first call imports torch._dynamo (about a
# second at start-up) even in a run that never compiles. An op with a fake is opaque to torch.compile
# all the same.
_LIB = torch.library.Library("mobile", "DEF")
_LIB.define("moe_experts(Tensor x, Tensor weights, Tensor ids, Tensor slot_map, Tensor arena, str rule, int n, "
            "float tau, bool rescale, bool cached, str fmt=\"native\", int group=0, int inter=0, bool bias=False, "
            "str act=\"swiglu\", float alpha=1.702, float limit=7.0) -> Tensor")
_LIB.impl("moe_experts", moe_experts, "CompositeImplicitAutograd")
_LIB.define("triton_experts(Tensor x, Tensor weights, Tensor slots, Tensor arena, str fmt, int group, int inter, "
            "bool bias, str act, float alpha, float limit) -> Tensor")
_LIB.define("grouped_experts(Tensor x, Tensor weights, Tensor slots, Tensor arena, int inter=0, bool bias=False, "
            "str act=\"swiglu\", float alpha=1.702, float limit=7.0) -> Tensor")


def _same_as_x(x, *args, **kwargs):
    """The fake of the expert MLP ops: their output is shaped as their input."""
    return torch.empty_like(x)


def triton_experts(x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, arena: torch.Tensor,
                   fmt: str, group: int, inter: int, bias: bool, act: str, alpha: float, limit: float
                   ) -> torch.Tensor:
    layout = None if fmt == "native" else quant.Layout(fmt, group, x.shape[1], inter, bias)
    mlp = ExpertMLP(x.shape[1], inter, bias, act, alpha, limit)
    return _triton_kernels().experts(x, weights, slots, arena, layout=layout, mlp=mlp)


_LIB.impl("triton_experts", triton_experts, "CUDA")
torch.library.register_fake("mobile::triton_experts", _same_as_x, lib=_LIB)


@functools.cache
def _triton_kernels():
    """mobile.kernels.moe, or None without triton (the native path then runs on CUDA too)."""
    try:
        from mobile.kernels import moe as kernels
    except ImportError:
        return None
    return kernels


# -- native implementations -------------------------------------------------------------------

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
        _CACHE[key] = make()
    return _CACHE[key]


def sort_by_slot(slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """slots [T, K], -1 where dropped -> (the pairs in slot order, dropped ones last [T*K]; pairs per
    slot [S]). No bincount: on CUDA it reads its input's max on the host to size its output."""
    flat = slots.flatten().long()
    key = torch.where(flat >= 0, flat, num_slots)
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=slots.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return torch.argsort(key, stable=True), counts[:num_slots]


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
torch.library.register_fake("mobile::grouped_experts", _same_as_x, lib=_LIB)


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


def reference(x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, arena: torch.Tensor,
              mlp: ExpertMLP | None = None) -> torch.Tensor:
    """The plain-torch reference of `native` and the Triton kernels: one slot at a time, on all of
    its tokens, in float32. Reads the slots on the host (a sync on CUDA)."""
    mlp = mlp or ExpertMLP.of_arena(arena, x.shape[1])
    gate_up, down = arena_views(arena, x.shape[1], mlp.inter)
    gu_bias, down_bias = bias_views(arena, mlp) if mlp.bias else (None, None)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for slot in sorted(set(slots.flatten().tolist()) - {-1}):
        token, k = (slots == slot).nonzero(as_tuple=True)
        h = x[token].float() @ gate_up[slot].float()  # [n, 2I]
        if gu_bias is not None:
            h = h + gu_bias[slot].float()
        y = mlp.activate(h) @ down[slot].float()  # [n, H]
        if down_bias is not None:
            y = y + down_bias[slot].float()
        out.index_add_(0, token, y * weights[token, k, None].float())
    return out.to(x.dtype)


def warm_up(device: torch.device, dtype: torch.dtype, fmt: str = "native", group: int = 0) -> None:
    """The op's first call pays one-time costs (imports, kernel selection, Triton's compile of the
    format's kernels): engines pay them while loading, not inside the first prefill's timing."""
    n = max(16, group)  # a size the group divides
    x = torch.zeros(1, n, dtype=dtype, device=device)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    slot_map = torch.zeros(1, dtype=torch.long, device=device)
    if fmt == "native":
        arena = torch.zeros(1, 3 * n * n, dtype=dtype, device=device)
    else:
        arena = torch.zeros(1, quant.Layout(fmt, group, n, n).row_bytes, dtype=torch.uint8, device=device)
    torch.ops.mobile.moe_experts(x, torch.ones(1, 1, device=device), ids, slot_map, arena, "top", 1, 0.0, False, False,
                                 fmt, group, n)
