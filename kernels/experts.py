"""Triton kernels of the routed-expert MLP, each expert read through its cache slot.

    experts(x [T, H], weights [T, K], slots [T, K], arena [S, 3*H*I]) -> [T, H]
    experts(x, weights, slots, arena [S, row_bytes] uint8, layout=Layout("int4" | "int8", ...))

out[t] = sum over k with slots[t, k] >= 0 of weights[t, k] * down(silu(x gate) * (x up)), where
the slot's arena row holds gate_up [H, 2I] then down [I, H], input-major (mobile.moe.layout.arena_views).
mobile.moe.reference is the plain-torch reference they are tested against (tests/test_kernels.py).
An ExpertMLP (`mlp`) may add what gpt-oss's experts compute: biases from the row (BIAS: gate_up's
added to x gate_up, down's to the down product, both in float32) and the clamped SwiGLU (ACT 1).

Packed experts (a mobile.moe.quant.Layout: its q, scale and zero sections in one uint8 row per slot,
see mobile/moe/quant.py) are read as they are stored: `_weights` loads a tile's int8 values or int4
nibbles with their group's float16 scale (and zero) and dequantizes it in registers, so no
dequantized copy of an expert is ever written and the kernels stream about half (int8) or a
quarter (int4) of bf16's bytes. The decode variant dequantizes to float32, the grouped one to the
activations' dtype for tl.dot. The reference is dequantize-then-matmul (Layout.dequantize_rows).

Two variants, as in vLLM's fused_moe:
- decode (few pairs): GEMV-like. `_decode_up` runs one program per (pair, block of I columns):
  gate and up, then the activation, into act [P, I]. `_decode_down` runs one program per (token,
  block of H columns) and walks the token's K pairs, so the weighted combine needs no atomics and
  is deterministic. A dropped pair (slot -1) reads no weights at all.
- grouped (a prompt): pairs sorted by slot and padded to BLOCK_M-row blocks that each belong to
  one slot (`align`, on the device, no host sync); tiles of tl.dot, weights read once per block.
  Per-pair outputs are summed per token in torch.
`_weights` is the one place a kernel reads expert weights, native or packed (FMT, a constexpr: the
native path compiles to the plain load it always was).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mobile.moe.layout import ExpertMLP, sort_by_slot
from mobile.moe.quant import Layout, native_bias_offsets

DECODE_MAX_PAIRS = 64  # up to this many (token, expert) pairs the decode variant runs, beyond it the grouped one
# Triton's CPU interpreter computes bf16 tl.dot wrongly (a 16x16 product is off by 1e10): there the
# grouped kernels take their bf16 tiles to float32 first. On a GPU the tiles stay bf16.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
NATIVE, INT8, INT4 = 0, 1, 2  # the kernels' FMT
FMT = {"int8": INT8, "int4": INT4}
ACT = {"swiglu": 0, "clamped_swiglu": 1, "geglu": 2}  # the kernels' ACT
TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _matrix(arena_ptr, slot, stride_slot, q_off, scale_off, zero_off, FMT: tl.constexpr):
    """Slot `slot`'s pointers to one matrix: (its weights, native, or its q section as uint8; its
    float16 scale and zero sections, packed; q again where a format has none). Offsets are in the
    arena's elements (packed: bytes); the slot's row offset is int64: an arena can pass 2^31 elements."""
    row = arena_ptr + slot.to(tl.int64) * stride_slot
    if FMT == 0:
        return row + q_off, row + q_off, row + q_off
    else:
        f16 = tl.pointer_type(tl.float16)
        return row + q_off, (row + scale_off).to(f16), (row + zero_off).to(f16)


@triton.jit
def _bias(arena_ptr, slot, stride_slot, off, idx, mask, FMT: tl.constexpr):
    """Entries idx of a bias vector at `off` in slot `slot`'s row, as float32: native, in the
    arena's dtype (off in its elements); packed, float16 (off in bytes)."""
    row = arena_ptr + slot.to(tl.int64) * stride_slot + off
    if FMT != 0:
        row = row.to(tl.pointer_type(tl.float16))
    return tl.load(row + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _activate(gate, up, alpha, limit, ACT: tl.constexpr):
    """float32 gate and up -> the activations: silu(gate) * up, (ACT 1) gpt-oss's clamped SwiGLU, or
    (ACT 2) Gemma's GeGLU, gelu_tanh(gate) * up, with 0.5 * (1 + tanh(z)) written as sigmoid(2z)."""
    if ACT == 1:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return gate * tl.sigmoid(gate * alpha) * (up + 1.0)
    elif ACT == 2:
        z = 1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)  # 2 * sqrt(2 / pi) * (...)
        return gate * tl.sigmoid(z) * up
    else:
        return gate / (1.0 + tl.exp(-gate)) * up


@triton.jit
def _weights(base, scale, zero, rows, cols, row_stride, mask, FMT: tl.constexpr, GROUP: tl.constexpr):
    """A [rows, cols] tile of one input-major matrix of row_stride output columns: native, as stored
    (the compute dtype); packed (FMT 1 int8, 2 int4), dequantized in registers to float32 from
    base (its q section), scale and zero (float16 [in/G, out]; GROUP 0: one group of all rows).
    Column offsets (the up columns) apply to the three pointers alike, as their rows are equally long."""
    if FMT == 0:
        return tl.load(base + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)
    else:
        if GROUP == 0:
            group = rows * 0
        else:
            group = rows // GROUP
        at = group[:, None] * row_stride + cols[None, :]
        s = tl.load(scale + at, mask=mask, other=0.0).to(tl.float32)
        if FMT == 1:  # int8 [in, out]: w = q * scale
            q = tl.load(base.to(tl.pointer_type(tl.int8)) + rows[:, None] * row_stride + cols[None, :],
                        mask=mask, other=0)
            return q.to(tl.float32) * s
        else:  # int4 [in/2, out]: row r in byte r // 2, low nibble when even; w = (nib - zero) * scale
            byte = tl.load(base + (rows // 2)[:, None] * row_stride + cols[None, :], mask=mask, other=0)
            nib = (byte.to(tl.int32) >> ((rows % 2) * 4)[:, None]) & 0xF
            z = tl.load(zero + at, mask=mask, other=0.0).to(tl.float32)
            return (nib.to(tl.float32) - z) * s


@triton.jit
def _decode_up(x_ptr, slots_ptr, arena_ptr, act_ptr, H, I, K, stride_x, stride_slot, q_off, scale_off, zero_off,
               bias_off, alpha, limit,
               BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr,
               BIAS: tl.constexpr, ACT: tl.constexpr):
    pair = tl.program_id(0)
    slot = tl.load(slots_ptr + pair)
    if slot >= 0:
        t = pair // K
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        cmask = cols < I
        q, s, z = _matrix(arena_ptr, slot, stride_slot, q_off, scale_off, zero_off, FMT)  # gate_up [H, 2I]
        gate = tl.zeros([BLOCK_I], dtype=tl.float32)
        up = tl.zeros([BLOCK_I], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            rows = h0 + tl.arange(0, BLOCK_H)
            rmask = rows < H
            xv = tl.load(x_ptr + t * stride_x + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
            m = rmask[:, None] & cmask[None, :]
            gate += tl.sum(_weights(q, s, z, rows, cols, 2 * I, m, FMT, GROUP).to(tl.float32) * xv, axis=0)
            up += tl.sum(_weights(q + I, s + I, z + I, rows, cols, 2 * I, m, FMT, GROUP).to(tl.float32) * xv,
                         axis=0)
        if BIAS:
            gate += _bias(arena_ptr, slot, stride_slot, bias_off, cols, cmask, FMT)
            up += _bias(arena_ptr, slot, stride_slot, bias_off, cols + I, cmask, FMT)
        act = _activate(gate, up, alpha, limit, ACT)
        tl.store(act_ptr + pair * I + cols, act, mask=cmask)


@triton.jit
def _decode_down(act_ptr, slots_ptr, weights_ptr, arena_ptr, out_ptr, H, I, K, stride_slot, stride_out,
                 q_off, scale_off, zero_off, bias_off,
                 BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr,
                 BIAS: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in range(0, K):
        pair = t * K + k
        slot = tl.load(slots_ptr + pair)
        if slot >= 0:
            q, s, z = _matrix(arena_ptr, slot, stride_slot, q_off, scale_off, zero_off, FMT)  # down [I, H]
            part = tl.zeros([BLOCK_H], dtype=tl.float32)
            for i0 in range(0, I, BLOCK_I):
                rows = i0 + tl.arange(0, BLOCK_I)
                rmask = rows < I
                a = tl.load(act_ptr + pair * I + rows, mask=rmask, other=0.0)[:, None]
                w = _weights(q, s, z, rows, cols, H, rmask[:, None] & cmask[None, :], FMT, GROUP)
                part += tl.sum(w.to(tl.float32) * a, axis=0)
            if BIAS:
                part += _bias(arena_ptr, slot, stride_slot, bias_off, cols, cmask, FMT)
            acc += tl.load(weights_ptr + pair).to(tl.float32) * part
    tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _grouped_up(x_ptr, pairs_ptr, block_slot_ptr, arena_ptr, act_ptr, P, H, I, K, stride_x, stride_slot,
                q_off, scale_off, zero_off, bias_off, alpha, limit,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                DOT: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr, BIAS: tl.constexpr, ACT: tl.constexpr):
    block = tl.program_id(0)
    slot = tl.load(block_slot_ptr + block)
    if slot >= 0:
        pair = tl.load(pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))  # P marks padding
        pmask = pair < P
        tok = pair // K
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < I
        q, s, z = _matrix(arena_ptr, slot, stride_slot, q_off, scale_off, zero_off, FMT)  # gate_up [H, 2I]
        gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < H
            m = kmask[:, None] & cmask[None, :]
            wg = _weights(q, s, z, kk, cols, 2 * I, m, FMT, GROUP).to(DOT)
            wu = _weights(q + I, s + I, z + I, kk, cols, 2 * I, m, FMT, GROUP).to(DOT)
            a = tl.load(x_ptr + tok[:, None] * stride_x + kk[None, :], mask=pmask[:, None] & kmask[None, :],
                        other=0.0).to(DOT)
            gate = tl.dot(a, wg, gate, input_precision=PRECISION)
            up = tl.dot(a, wu, up, input_precision=PRECISION)
        if BIAS:
            gate += _bias(arena_ptr, slot, stride_slot, bias_off, cols, cmask, FMT)[None, :]
            up += _bias(arena_ptr, slot, stride_slot, bias_off, cols + I, cmask, FMT)[None, :]
        act = _activate(gate, up, alpha, limit, ACT)
        tl.store(act_ptr + pair[:, None] * I + cols[None, :], act, mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _grouped_down(act_ptr, pairs_ptr, block_slot_ptr, weights_ptr, arena_ptr, y_ptr, P, H, I, stride_slot,
                  q_off, scale_off, zero_off, bias_off,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                  DOT: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr, BIAS: tl.constexpr):
    block = tl.program_id(0)
    slot = tl.load(block_slot_ptr + block)
    if slot >= 0:
        pair = tl.load(pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
        pmask = pair < P
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < H
        q, s, z = _matrix(arena_ptr, slot, stride_slot, q_off, scale_off, zero_off, FMT)  # down [I, H]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < I
            wd = _weights(q, s, z, kk, cols, H, kmask[:, None] & cmask[None, :], FMT, GROUP).to(DOT)
            a = tl.load(act_ptr + pair[:, None] * I + kk[None, :], mask=pmask[:, None] & kmask[None, :],
                        other=0.0).to(DOT)
            acc = tl.dot(a, wd, acc, input_precision=PRECISION)
        if BIAS:
            acc += _bias(arena_ptr, slot, stride_slot, bias_off, cols, cmask, FMT)[None, :]
        w = tl.load(weights_ptr + pair, mask=pmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + pair[:, None] * H + cols[None, :], acc * w[:, None], mask=pmask[:, None] & cmask[None, :])


def align(slots: torch.Tensor, num_slots: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """slots [T, K] -> (pair ids sorted by slot, each slot's run padded to whole blocks of block_m,
    padding = T*K: [B * block_m] int32; the slot of each block, -1 past the last: [B] int32).

    B is an upper bound, so every shape is static and nothing is read on the host."""
    P, S = slots.numel(), num_slots
    order, counts = sort_by_slot(slots, S)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    slot = slots.flatten()[order].long()  # slot of each sorted pair; dropped ones (-1) last
    sk = slot.clamp(0, S - 1)
    rank = torch.arange(P, device=slots.device) - (counts.cumsum(0) - counts)[sk]  # place within its slot
    blocks = triton.cdiv(P, block_m) + min(S, P)
    dump = blocks * block_m  # one extra entry, cut off below, where dropped pairs land
    dest = torch.where(slot >= 0, ends[sk] - padded[sk] + rank, dump)
    sorted_pairs = torch.full((dump + 1,), P, dtype=torch.int32, device=slots.device)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(blocks, device=slots.device) * block_m
    block_slot = torch.searchsorted(ends, starts, right=True)
    return sorted_pairs[:dump], torch.where(block_slot < S, block_slot, -1).to(torch.int32)


def _sections(H: int, inter: int, layout: Layout | None, bias: bool) -> tuple[tuple[int, int, int, int], ...]:
    """(q, scale, zero, bias) offsets of gate_up and of down within a slot's row: native, in the
    arena's elements (scale and zero unused); packed, in bytes (zero = q where the format has none);
    bias 0 (unused) without biases."""
    if layout is None:
        gu_bias, d_bias = native_bias_offsets(H, inter) if bias else (0, 0)
        return (0, 0, 0, gu_bias), (2 * H * inter,) * 3 + (d_bias,)
    sec = layout.sections
    return tuple((sec[f"{m}.q"].offset, sec[f"{m}.scale"].offset, sec.get(f"{m}.zero", sec[f"{m}.q"]).offset,
                  sec[f"{m}.bias"].offset if bias else 0) for m in ("gate_up", "down"))


def experts(x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, arena: torch.Tensor,
            variant: str | None = None, block: int | None = None, layout: Layout | None = None,
            mlp: ExpertMLP | None = None) -> torch.Tensor:
    """variant: "decode" or "grouped" (default: by the number of pairs). block: the main block
    size (tests shrink it to exercise the masks). layout: None, arena is native [S, row]; a
    packed Layout (int8, int4), arena is its rows [S, layout.row_bytes] uint8. mlp: what an expert
    computes (default: SwiGLU without biases; a native arena's I then follows from its rows)."""
    T, K = slots.shape
    H = x.shape[1]
    if layout is None:
        mlp = mlp or ExpertMLP.of_arena(arena, H)
        fmt, group = NATIVE, 0
    else:
        assert layout.hidden == H and arena.dtype == torch.uint8 and arena.shape[1] == layout.row_bytes, \
            f"a packed arena is [S, {layout.row_bytes}] uint8 for {layout}, got {list(arena.shape)} {arena.dtype}"
        mlp = mlp or ExpertMLP(H, layout.inter, layout.bias)
        fmt, group = FMT[layout.fmt], layout.group
        assert layout.bias == mlp.bias, "the layout and the expert MLP disagree on biases"
    inter, bias, act_kind, alpha, limit = mlp.inter, mlp.bias, ACT[mlp.act], mlp.alpha, mlp.limit
    (up_q, up_s, up_z, up_b), (down_q, down_s, down_z, down_b) = _sections(H, inter, layout, bias)
    x, weights, arena = x.contiguous(), weights.contiguous(), arena.contiguous()
    slots = slots.to(torch.int32).contiguous()
    variant = variant or ("decode" if T * K <= DECODE_MAX_PAIRS else "grouped")
    if variant == "decode":
        act = torch.empty(T * K, inter, dtype=torch.float32, device=x.device)
        out = torch.empty_like(x)
        b = block or 64
        _decode_up[(T * K, triton.cdiv(inter, b))](x, slots, arena, act, H, inter, K, x.stride(0), arena.stride(0),
                                                   up_q, up_s, up_z, up_b, alpha, limit, BLOCK_H=b, BLOCK_I=b,
                                                   FMT=fmt, GROUP=group, BIAS=bias, ACT=act_kind)
        _decode_down[(T, triton.cdiv(H, b))](act, slots, weights, arena, out, H, inter, K, arena.stride(0),
                                             out.stride(0), down_q, down_s, down_z, down_b, BLOCK_H=b, BLOCK_I=b,
                                             FMT=fmt, GROUP=group, BIAS=bias)
        return out
    bm, bn, bk = 16, block or 64, block or 64
    pairs, block_slot = align(slots, arena.shape[0], bm)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 stays exact; 16-bit dots ignore it
    # the tiles' dtype: the weights' own (native) or the activations' (packed ones dequantize to it)
    dot = x.dtype if layout is not None else arena.dtype
    dot = tl.float32 if INTERPRETED and dot == torch.bfloat16 else TL_DTYPE[dot]
    act = torch.empty(T * K, inter, dtype=torch.float32, device=x.device)
    _grouped_up[(block_slot.numel(), triton.cdiv(inter, bn))](
        x, pairs, block_slot, arena, act, T * K, H, inter, K, x.stride(0), arena.stride(0), up_q, up_s, up_z, up_b,
        alpha, limit, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision, DOT=dot, FMT=fmt, GROUP=group,
        BIAS=bias, ACT=act_kind)
    y = torch.zeros(T * K, H, dtype=torch.float32, device=x.device)
    _grouped_down[(block_slot.numel(), triton.cdiv(H, bn))](
        act, pairs, block_slot, weights, arena, y, T * K, H, inter, arena.stride(0), down_q, down_s, down_z, down_b,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision, DOT=dot, FMT=fmt, GROUP=group, BIAS=bias)
    return y.view(T, K, H).sum(dim=1).to(x.dtype)
