"""MXFP4, the format published gpt-oss checkpoints store their routed experts in: decoded here, at
load, to the compute dtype (mobile.moe.rows), so that from then on they are native experts.

An OCP microscaling (MX) format: blocks of 32 values share one scale.
- `P_blocks`: uint8 [..., R, G, 16], for a matrix stored [R, G * 32] (gpt-oss: [E, out, in]):
  each row's G blocks of 32 values, two FP4 (E2M1) codes a byte; value 2j of a block is byte j's low
  nibble, value 2j + 1 its high nibble.
- `P_scales`: uint8 [..., R, G], E8M0: the block's scale is 2 ** (s - 127); 255 is NaN.
- An E2M1 code is a sign bit (8) and three bits indexing 0, 0.5, 1, 1.5, 2, 3, 4, 6.
This is the layout transformers' integrations/mxfp4.py decodes (convert_moe_packed_tensors); the
tests check this decoder against a table-based one and that function.
"""

from __future__ import annotations

import torch

from mobile.errors import CheckpointError

BLOCK = 32  # values per scale
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS, SCALE_NAN = 127, 255


def parts(name: str) -> tuple[str, str]:
    """A matrix's tensor name -> the names of its blocks and scales."""
    return f"{name}_blocks", f"{name}_scales"


def shapes(rows: int, cols: int, lead: tuple[int, ...] = ()) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The blocks' and scales' shapes of a [*lead, rows, cols] matrix stored as MXFP4."""
    return (*lead, rows, cols // BLOCK, BLOCK // 2), (*lead, rows, cols // BLOCK)


def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
           where: object | None = None, name: str | None = None) -> torch.Tensor:
    """blocks uint8 [..., R, G, 16], scales uint8 [..., R, G] -> values [..., R, G * 32] in `dtype`.
    Decoded exactly in float32 (each value is a 2-bit mantissa times a power of two; only the
    largest scales overflow it, as they would bf16), then rounded once to `dtype`. where, name: the
    file and matrix, for the error a NaN scale raises."""
    if bool((scales == SCALE_NAN).any()):
        raise CheckpointError("an MXFP4 scale is 255, which E8M0 defines as NaN: a corrupt checkpoint",
                              where=where, key=None if name is None else parts(name)[1])
    table = torch.tensor(E2M1, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0xF, blocks >> 4), dim=-1).flatten(-2)  # [..., R, G, 32]: low nibble first
    values = torch.ldexp(table[codes.long()], scales.to(torch.int32)[..., None] - SCALE_BIAS)
    return values.flatten(-2).to(dtype)
