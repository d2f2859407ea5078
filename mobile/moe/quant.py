"""Packed expert formats: int8 and int4 routed experts, stored, moved and read as one row of bytes.

The packed layout, version 1 (mobile.moe.formats.LAYOUT_VERSION). One routed expert is one contiguous uint8 row, in
host memory, in a device cache slot and on the link alike. Its sections, in this order, each
starting at a multiple of 16 bytes (ALIGN):

    gate_up.q      the expert's gate_up matrix, input-major [H, 2I]: gate columns, then up columns
    gate_up.scale  float16 [H/G, 2I]: one scale per group of G input rows and output column
    gate_up.zero   float16 [H/G, 2I]  (int4 only)
    down.q         the down matrix, input-major [I, H]
    down.scale     float16 [I/G, H]
    down.zero      float16 [I/G, H]   (int4 only)
    gate_up.bias   float16 [1, 2I]    (experts with biases only: gpt-oss)
    down.bias      float16 [1, H]     (likewise)

H = hidden size, I = expert intermediate size, G = the group size along the input dimension.
Biases are not quantized: they are few, and a bias error shifts every output alike.
- int8: q is int8 [in, out]; w = q * scale (symmetric, q in [-127, 127]). G = 0 means one group of
  all input rows: one scale per output column.
- int4: q is uint8 [in/2, out]; byte r holds input rows 2r (low nibble) and 2r + 1 (high nibble),
  each an unsigned value in [0, 15]; w = (q - zero) * scale, with a float16 zero (so a group's
  minimum maps exactly, as in HQQ).

A quantized checkpoint (`mobile quantize`) stores these sections per expert and projection, as
tensors named after the native weight: `...gate_proj.qweight` (q), `.scales`, `.zeros`, each
input-major, so that loading only concatenates the gate and up columns. Quantizing at load
(`--expert-format int4` on a native checkpoint) runs the same `quantize`, byte for byte.

A native row (the spec's dtype, `native_row_elems`) is gate_up [H, 2I] then down [I, H]; with
biases, gate_up's [2I] and down's [H] follow, and the row is padded to a whole number of 2I-wide
and of H-wide rows, so that the decode path can still read the arena as such tables
(mobile.moe.native._bagged).

Rounding is round-to-nearest with the scale and zero rounded to float16 first, so that the stored
numbers are the ones the values were rounded against. Non-expert weights and shared experts stay
in the spec's dtype: they live on the device and never cross the link.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

ALIGN = 16
INT8_MAX, INT4_MAX = 127, 15


@dataclass(frozen=True)
class Packed:
    """One quantized matrix, input-major: q [in, out] (int4: [in/2, out]), scale and zero [in/G, out]."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None


def _groups(rows: int, group: int) -> int:
    return group or rows


def _scale16(scale: torch.Tensor) -> torch.Tensor:
    """float32 scales -> float16, rounded up: no value then lands past the largest code (which would
    clip it), even where float16 is coarse (subnormal scales of tiny weights)."""
    s16 = scale.half()
    return torch.where(s16.float() < scale, torch.nextafter(s16, torch.full_like(s16, math.inf)), s16)


def quantize(w: torch.Tensor, fmt: str, group: int) -> Packed:
    """w [in, out] (input-major, any float dtype) -> its packed form; group 0 (int8): one group.
    Round-to-nearest against the stored (float16) scale and zero, so every value lands within half
    a step of its scale (int4: plus the float16 rounding of the zero)."""
    rows, cols = w.shape
    g = _groups(rows, group)
    wg = w.float().reshape(rows // g, g, cols)  # [groups, G, out]
    if fmt == "int8":
        scale = _scale16(wg.abs().amax(dim=1) / INT8_MAX)
        s = torch.where(scale > 0, scale, 1).float()[:, None, :]
        q = torch.round(wg / s).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return Packed(q.reshape(rows, cols), scale)
    if fmt == "int4":
        lo, hi = wg.amin(dim=1), wg.amax(dim=1)
        # a constant group (hi == lo) keeps its value: scale |lo| and zero -sign(lo) give q = 0
        spread = torch.where(hi > lo, (hi - lo) / INT4_MAX, torch.where(lo != 0, lo.abs(), 1))
        scale = _scale16(spread)
        s = scale.float()
        zero = (-lo / s).half()
        q = torch.round(wg / s[:, None, :] + zero.float()[:, None, :]).clamp(0, INT4_MAX).to(torch.uint8)
        q = q.reshape(rows // 2, 2, cols)
        return Packed(q[:, 0] | (q[:, 1] << 4), scale, zero)
    raise ValueError(f"unknown expert format {fmt!r}")


def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """[..., in/2, out] uint8 -> [..., in, out] uint8 values in [0, 15] (row 2r low nibble, 2r + 1 high)."""
    pair = torch.stack((q & 0xF, q >> 4), dim=-2)  # [..., in/2, 2, out]
    return pair.reshape(*q.shape[:-2], 2 * q.shape[-2], q.shape[-1])


def dequantize(p: Packed, fmt: str, group: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference dequantizer: packed -> [..., in, out] in `dtype` (leading dims batch experts)."""
    q = unpack_int4(p.q) if fmt == "int4" else p.q
    rows, cols = q.shape[-2:]
    g = _groups(rows, group)
    lead = q.shape[:-2]
    qg = q.reshape(*lead, rows // g, g, cols).float()
    scale = p.scale.float()[..., None, :]
    if fmt == "int4":
        assert p.zero is not None
        qg = qg - p.zero.float()[..., None, :]
    return (qg * scale).reshape(*lead, rows, cols).to(dtype)


# -- the packed row ---------------------------------------------------------------------------

MATRICES = ("gate_up", "down")


@dataclass(frozen=True)
class Section:
    offset: int  # bytes from the row's start
    dtype: torch.dtype
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize


def _align(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def part_shapes(fmt: str, group: int, rows: int, cols: int) -> dict[str, tuple[torch.dtype, tuple[int, int]]]:
    """The packed parts of one input-major [rows, cols] matrix: part -> (dtype, shape)."""
    groups = rows // _groups(rows, group)
    q = (torch.uint8, (rows // 2, cols)) if fmt == "int4" else (torch.int8, (rows, cols))
    parts = {"q": q, "scale": (torch.float16, (groups, cols))}
    if fmt == "int4":
        parts["zero"] = (torch.float16, (groups, cols))
    return parts


def native_row_elems(hidden: int, inter: int, bias: bool = False) -> int:
    """Elements of one native expert row (see the module docstring)."""
    n = 3 * hidden * inter
    if not bias:
        return n
    unit = math.lcm(2 * inter, hidden)
    return -(-(n + 2 * inter + hidden) // unit) * unit


def native_bias_offsets(hidden: int, inter: int) -> tuple[int, int]:
    """Where a native row's gate_up and down biases start, in elements."""
    return 3 * hidden * inter, 3 * hidden * inter + 2 * inter


@dataclass(frozen=True)
class Layout:
    """Where each section of one expert's packed row lies (see the module docstring)."""

    fmt: str
    group: int
    hidden: int
    inter: int
    bias: bool = False

    @functools.cached_property
    def sections(self) -> dict[str, Section]:
        shapes = {"gate_up": (self.hidden, 2 * self.inter), "down": (self.inter, self.hidden)}
        parts = [(f"{m}.{part}", dtype, shape) for m in MATRICES
                 for part, (dtype, shape) in part_shapes(self.fmt, self.group, *shapes[m]).items()]
        parts += [(f"{m}.bias", torch.float16, (1, shapes[m][1])) for m in MATRICES if self.bias]
        out: dict[str, Section] = {}
        offset = 0
        for name, dtype, shape in parts:
            out[name] = s = Section(offset, dtype, shape)
            offset = _align(offset + s.nbytes)
        return out

    @functools.cached_property
    def row_bytes(self) -> int:
        last = list(self.sections.values())[-1]
        return _align(last.offset + last.nbytes)

    def view(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        """rows [S, row_bytes] uint8 -> section `name` of every row, typed: [S, *shape] (no copy)."""
        s = self.sections[name]
        part = rows[:, s.offset:s.offset + s.nbytes]
        return part.view(s.dtype).view(rows.shape[0], *s.shape)

    def packed(self, rows: torch.Tensor, matrix: str) -> Packed:
        zero = self.view(rows, f"{matrix}.zero") if self.fmt == "int4" else None
        return Packed(self.view(rows, f"{matrix}.q"), self.view(rows, f"{matrix}.scale"), zero)

    def pack(self, gate_up: Packed, down: Packed, biases: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> torch.Tensor:
        """One expert's two packed matrices (and, with bias, gate_up's [2I] and down's [H] biases)
        -> its row [row_bytes] uint8."""
        if self.bias != (biases is not None):
            raise ValueError(f"biases are packed exactly when the layout has them (bias={self.bias})")
        row = torch.zeros(1, self.row_bytes, dtype=torch.uint8)
        for m, p in (("gate_up", gate_up), ("down", down)):
            for part in ("q", "scale", "zero"):
                value = getattr(p, part)
                if value is not None:
                    self.view(row, f"{m}.{part}")[0].copy_(value)
        for m, b in zip(MATRICES, biases or (), strict=False):
            self.view(row, f"{m}.bias")[0, 0].copy_(b)
        return row[0]

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """rows [P, row_bytes] -> the same experts as a native arena [P, native_row_elems] in `dtype`
        (mobile.moe.layout.arena_views's layout; biases as stored), into `out` when given. The same numbers
        as `dequantize`, written in place into the one output (each matrix is a view of it), in few
        passes: this runs on the CPU decode path."""
        P, H, I = rows.shape[0], self.hidden, self.inter
        if out is None:
            out = torch.empty(P, native_row_elems(H, I, self.bias), dtype=dtype, device=rows.device)
        if self.bias:
            for m, start, n in zip(MATRICES, native_bias_offsets(H, I), (2 * I, H), strict=True):
                out[:, start:start + n].copy_(self.view(rows, f"{m}.bias")[:, 0])
        for m, (start, n_in, n_out) in (("gate_up", (0, H, 2 * I)), ("down", (2 * H * I, I, H))):
            g = _groups(n_in, self.group)
            dest = out[:, start:start + n_in * n_out].view(P, n_in // g, g, n_out)  # [P, groups, G, out]
            p = self.packed(rows, m)
            scale = p.scale.to(dtype)[:, :, None, :]  # [P, groups, 1, out]
            # each step same-dtype and in place: a mixed-dtype op with broadcasting (uint8 - half
            # into float) takes torch's slow casting loops, 3-8x slower here
            if self.fmt == "int8":
                dest.copy_(p.q.view(P, n_in // g, g, n_out)).mul_(scale)
                continue
            assert p.zero is not None
            q = p.q.view(P, n_in // g, g // 2, n_out)  # byte rows, by group
            pairs = dest.view(P, n_in // g, g // 2, 2, n_out)  # input row 2r + b -> [..., r, b, :]
            zero = p.zero.to(dtype)[:, :, None, :]
            for b, nibble in ((0, q & 0xF), (1, q >> 4)):
                pairs[:, :, :, b].copy_(nibble).sub_(zero).mul_(scale)
        return out


def quantize_matrices(layout: Layout, gate_up: torch.Tensor, down: torch.Tensor,
                      biases: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One expert as input-major matrices (gate_up [H, 2I]: gate columns, then up; down [I, H])
    and, with layout.bias, its biases ([2I], [H]) -> its packed row. Groups run along the input
    dimension, so gate_up packs as gate and up packed apart would, side by side (`concat`)."""
    return layout.pack(quantize(gate_up, layout.fmt, layout.group), quantize(down, layout.fmt, layout.group), biases)


def quantize_expert(layout: Layout, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert's checkpoint tensors (gate, up [I, H], down [H, I]: [out, in]) -> its packed row."""
    return quantize_matrices(layout, torch.cat((gate.T, up.T), dim=1), down.T)


def concat(gate: Packed, up: Packed) -> Packed:
    """Gate and up columns side by side: the gate_up matrix's packed form."""
    zero = None if gate.zero is None or up.zero is None else torch.cat((gate.zero, up.zero), dim=1)
    return Packed(torch.cat((gate.q, up.q), dim=1), torch.cat((gate.scale, up.scale), dim=1), zero)


def row_bytes(fmt: str, group: int, hidden: int, inter: int, dtype_bytes: int, bias: bool = False) -> int:
    """Bytes one routed expert takes in host memory, in a cache slot and on the link."""
    if fmt == "native":
        return native_row_elems(hidden, inter, bias) * dtype_bytes
    return Layout(fmt, group, hidden, inter, bias).row_bytes
