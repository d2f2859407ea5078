"""Triton kernels of the routed-expert MLP, each expert read through its cache slot.

    experts(x [T, H], weights [T, K], slots [T, K], arena [S, 3*H*I]) -> [T, H]

out[t] = sum over k with slots[t, k] >= 0 of weights[t, k] * down(silu(x gate) * (x up)), where
the slot's arena row holds gate_up [H, 2I] then down [I, H], input-major (mobile.moe.arena_views).
mobile.moe.reference is the plain-torch reference they are tested against (tests/test_kernels.py).

Two variants, as in vLLM's fused_moe:
- decode (few pairs): GEMV-like. `_decode_up` runs one program per (pair, block of I columns):
  gate and up, then the activation, into act [P, I]. `_decode_down` runs one program per (token,
  block of H columns) and walks the token's K pairs, so the weighted combine needs no atomics and
  is deterministic. A dropped pair (slot -1) reads no weights at all.
- grouped (a prompt): pairs sorted by slot and padded to BLOCK_M-row blocks that each belong to
  one slot (`align`, on the device, no host sync); tiles of tl.dot, weights read once per block.
  Per-pair outputs are summed per token in torch.
`_weights` is the one place a kernel reads expert weights: the packed int8/int4 formats of the
next issue dequantize there.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mobile.moe import sort_by_slot

DECODE_MAX_PAIRS = 64  # up to this many (token, expert) pairs the decode variant runs, beyond it the grouped one
# Triton's CPU interpreter computes bf16 tl.dot wrongly (a 16x16 product is off by 1e10): there the
# grouped kernels take their bf16 tiles to float32 first. On a GPU the tiles stay bf16.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _weights(base, rows, cols, row_stride, mask):
    """A [rows, cols] tile of one expert's weights, in the compute dtype."""
    return tl.load(base + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _decode_up(x_ptr, slots_ptr, arena_ptr, act_ptr, H, I, K, stride_x, stride_slot,
               BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr):
    pair = tl.program_id(0)
    slot = tl.load(slots_ptr + pair)
    if slot >= 0:
        t = pair // K
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        cmask = cols < I
        base = arena_ptr + slot.to(tl.int64) * stride_slot
        gate = tl.zeros([BLOCK_I], dtype=tl.float32)
        up = tl.zeros([BLOCK_I], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            rows = h0 + tl.arange(0, BLOCK_H)
            rmask = rows < H
            xv = tl.load(x_ptr + t * stride_x + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
            m = rmask[:, None] & cmask[None, :]
            gate += tl.sum(_weights(base, rows, cols, 2 * I, m).to(tl.float32) * xv, axis=0)
            up += tl.sum(_weights(base + I, rows, cols, 2 * I, m).to(tl.float32) * xv, axis=0)
        act = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(act_ptr + pair * I + cols, act, mask=cmask)


@triton.jit
def _decode_down(act_ptr, slots_ptr, weights_ptr, arena_ptr, out_ptr, H, I, K, stride_slot, stride_out,
                 BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in range(0, K):
        pair = t * K + k
        slot = tl.load(slots_ptr + pair)
        if slot >= 0:
            base = arena_ptr + slot.to(tl.int64) * stride_slot + 2 * H * I  # the down rows
            part = tl.zeros([BLOCK_H], dtype=tl.float32)
            for i0 in range(0, I, BLOCK_I):
                rows = i0 + tl.arange(0, BLOCK_I)
                rmask = rows < I
                a = tl.load(act_ptr + pair * I + rows, mask=rmask, other=0.0)[:, None]
                part += tl.sum(_weights(base, rows, cols, H, rmask[:, None] & cmask[None, :]).to(tl.float32) * a,
                               axis=0)
            acc += tl.load(weights_ptr + pair).to(tl.float32) * part
    tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _grouped_up(x_ptr, pairs_ptr, block_slot_ptr, arena_ptr, act_ptr, P, H, I, K, stride_x, stride_slot,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):
    block = tl.program_id(0)
    slot = tl.load(block_slot_ptr + block)
    if slot >= 0:
        pair = tl.load(pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))  # P marks padding
        pmask = pair < P
        tok = pair // K
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < I
        base = arena_ptr + slot.to(tl.int64) * stride_slot
        gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < H
            m = kmask[:, None] & cmask[None, :]
            wg, wu = _weights(base, kk, cols, 2 * I, m), _weights(base + I, kk, cols, 2 * I, m)
            if UPCAST:
                wg, wu = wg.to(tl.float32), wu.to(tl.float32)
            a = tl.load(x_ptr + tok[:, None] * stride_x + kk[None, :], mask=pmask[:, None] & kmask[None, :],
                        other=0.0).to(wg.dtype)
            gate = tl.dot(a, wg, gate, input_precision=PRECISION)
            up = tl.dot(a, wu, up, input_precision=PRECISION)
        act = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(act_ptr + pair[:, None] * I + cols[None, :], act, mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _grouped_down(act_ptr, pairs_ptr, block_slot_ptr, weights_ptr, arena_ptr, y_ptr, P, H, I, stride_slot,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr):
    block = tl.program_id(0)
    slot = tl.load(block_slot_ptr + block)
    if slot >= 0:
        pair = tl.load(pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
        pmask = pair < P
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < H
        base = arena_ptr + slot.to(tl.int64) * stride_slot + 2 * H * I
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < I
            wd = _weights(base, kk, cols, H, kmask[:, None] & cmask[None, :])
            if UPCAST:
                wd = wd.to(tl.float32)
            a = tl.load(act_ptr + pair[:, None] * I + kk[None, :], mask=pmask[:, None] & kmask[None, :],
                        other=0.0).to(wd.dtype)
            acc = tl.dot(a, wd, acc, input_precision=PRECISION)
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


def experts(x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, arena: torch.Tensor,
            variant: str | None = None, block: int | None = None) -> torch.Tensor:
    """variant: "decode" or "grouped" (default: by the number of pairs). block: the main block
    size (tests shrink it to exercise the masks)."""
    T, K = slots.shape
    H = x.shape[1]
    inter = arena.shape[1] // (3 * H)
    x, weights, arena = x.contiguous(), weights.contiguous(), arena.contiguous()
    slots = slots.to(torch.int32).contiguous()
    variant = variant or ("decode" if T * K <= DECODE_MAX_PAIRS else "grouped")
    if variant == "decode":
        act = torch.empty(T * K, inter, dtype=torch.float32, device=x.device)
        out = torch.empty_like(x)
        b = block or 64
        _decode_up[(T * K, triton.cdiv(inter, b))](x, slots, arena, act, H, inter, K, x.stride(0), arena.stride(0),
                                                   BLOCK_H=b, BLOCK_I=b)
        _decode_down[(T, triton.cdiv(H, b))](act, slots, weights, arena, out, H, inter, K, arena.stride(0),
                                             out.stride(0), BLOCK_H=b, BLOCK_I=b)
        return out
    bm, bn, bk = 16, block or 64, block or 64
    pairs, block_slot = align(slots, arena.shape[0], bm)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 stays exact; 16-bit dots ignore it
    upcast = INTERPRETED and x.dtype == torch.bfloat16
    act = torch.empty(T * K, inter, dtype=torch.float32, device=x.device)
    _grouped_up[(block_slot.numel(), triton.cdiv(inter, bn))](
        x, pairs, block_slot, arena, act, T * K, H, inter, K, x.stride(0), arena.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision, UPCAST=upcast)
    y = torch.zeros(T * K, H, dtype=torch.float32, device=x.device)
    _grouped_down[(block_slot.numel(), triton.cdiv(H, bn))](
        act, pairs, block_slot, weights, arena, y, T * K, H, inter, arena.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision, UPCAST=upcast)
    return y.view(T, K, H).sum(dim=1).to(x.dtype)
