"""FP8 block weights, the format DeepSeek-V3, Kimi-K2, MiniMax-M2 and MiMo publish their checkpoints in:
dequantized here, one tensor at a time as it loads, to the compute dtype (the weights on the device)
or to the expert rows' format (mobile.moe.rows), so that from then on the model is a native one.

The layout is transformers' finegrained FP8 (integrations/finegrained_fp8.py), announced in
config.json:

    "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128],
                            "activation_scheme": "dynamic", "fmt": "e4m3"}

- A quantized Linear weight `P.weight` [out, in] is float8_e4m3fn. Its companion `P.weight_scale_inv`
  is float32 [ceil(out / bo), ceil(in / bi)] for weight_block_size [bo, bi]: one scale per block,
  and the last block of a row or column may be partial (DeepSeek-V3's kv_a_proj_with_mqa has 576
  rows). A fused tensor `X` [..., out, in] has `X_scale_inv` [..., ceil(out / bo), ceil(in / bi)].
  weight_block_size null: one scale per matrix (shape [] or [..., 1, 1]).
- w = weight.float() * scale_inv, each scale over its block, in float32 (as DeepSeek's own
  weight_dequant does), then rounded once to the dtype asked for. transformers' dequantize-on-load
  (Fp8Dequantize) instead derives the block from the scale grid's shape, which is wrong where a
  block is partial; the configured block is used here.
- Which tensors are FP8 is read from their dtype, not from modules_to_not_convert: the embeddings,
  norms, routers, lm_head and whatever else a config skips stay in the checkpoint's float dtype
  and load as they are; a float8 tensor needs its scales.
- activation_scheme (dynamic or static) is how an FP8 kernel quantizes its inputs. mobile computes in
  the compute dtype with dequantized weights (as transformers does with dequantize=True), so a
  static scheme's `activation_scale` tensors go unused.
- scale_fmt ue8m0 (DeepSeek-V3.1's): the scales are powers of two, stored as float32, as
  float8_e8m0fnu, or as E8M0 bytes (uint8: 2 ** (b - 127)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mobile.errors import CheckpointError

if TYPE_CHECKING:
    from mobile.models.weights import TensorInfo

METHOD = "fp8"  # config.json's quantization_config.quant_method
KEY = "quantization_config"
FLOAT8 = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})
E8M0 = torch.float8_e8m0fnu
SCALE_FORMATS = ("float", "ue8m0")
ACTIVATION_SCHEMES = ("dynamic", "static")
E8M0_BIAS, E8M0_NAN = 127, 255


@dataclass(frozen=True)
class Fp8Format:
    """An FP8 checkpoint's quantization_config, checked: block (rows, columns) per scale, or None
    for one scale per matrix; scale_fmt, one of SCALE_FORMATS."""

    block: tuple[int, int] | None
    scale_fmt: str = "float"

    def describe(self) -> str:
        return "per-matrix scales" if self.block is None else f"weight_block_size {list(self.block)}"


def read_config(q: dict[str, Any], path: Path | str) -> Fp8Format:
    """quantization_config `q` (quant_method fp8) -> its Fp8Format; path: the config.json, for the
    errors. transformers' defaults where a key is absent: blocks of 128 x 128, float scales."""
    block = q.get("weight_block_size", [128, 128])
    if block is not None and not (isinstance(block, list | tuple) and len(block) == 2 and all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(f"FP8 blocks must be two positive integers [rows, columns] such as [128, 128] (or "
                              f"null: one scale per matrix), got {block!r}", where=path, key=f"{KEY}.weight_block_size")
    scale_fmt = q.get("scale_fmt", "float")
    if scale_fmt not in SCALE_FORMATS:
        raise CheckpointError(f"expected one of {', '.join(map(repr, SCALE_FORMATS))}, got {scale_fmt!r}", where=path,
                              key=f"{KEY}.scale_fmt")
    scheme = q.get("activation_scheme", "dynamic")
    if not isinstance(scheme, str) or scheme.lower() not in ACTIVATION_SCHEMES:
        raise CheckpointError(f"expected one of {', '.join(map(repr, ACTIVATION_SCHEMES))}, got {scheme!r}",
                              where=path, key=f"{KEY}.activation_scheme")
    if q.get("expert_dtype", "fp8") != "fp8":
        # DeepSeek-V4's experts: FP4 values packed two a byte, with their own scale grid
        raise CheckpointError(f"FP8 checkpoints with {q['expert_dtype']!r} experts are not supported (mobile reads FP8 "
                              "experts)", where=path, key=f"{KEY}.expert_dtype")
    return Fp8Format(None if block is None else (block[0], block[1]), scale_fmt)


def scale_name(name: str) -> str:
    """A weight's name -> its scales' (`P.weight` -> `P.weight_scale_inv`, as transformers names them)."""
    return f"{name}_scale_inv"


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[int, ...]:
    """The scales' shape of a [..., out, in] weight: one per block, partial blocks included."""
    if block is None:
        return (*shape[:-2], 1, 1)
    return (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))


def check_scale(name: str, weight: TensorInfo, scale: TensorInfo | None, fmt: Fp8Format) -> None:
    """The FP8 weight `name` has scales of the shape and a dtype its format needs (headers only)."""
    sname = scale_name(name)
    if len(weight.shape) < 2:
        raise CheckpointError(f"tensor {name!r} is {dtype_name(weight.dtype)} {list(weight.shape)}: FP8 weights are "
                              "matrices",
                              where=weight.file, key=name)
    if scale is None:
        raise CheckpointError(f"tensor {sname!r} not found: the FP8 weight {name!r} needs its block scales",
                              where=weight.file, key=sname)
    want = scale_shape(weight.shape, fmt.block)
    shape_ok = scale.shape == want or (fmt.block is None and scale.shape in ((), (1,)) and len(weight.shape) == 2)
    dtypes = (torch.float32, torch.bfloat16, torch.float16) + ((torch.uint8, E8M0) if fmt.scale_fmt == "ue8m0" else ())
    if not shape_ok or scale.dtype not in dtypes:
        needs = f"scales of shape {list(want)}" if not shape_ok else \
            f"{', '.join(dtype_name(d) for d in dtypes)} scales (scale_fmt {fmt.scale_fmt!r})"
        raise CheckpointError(f"tensor {sname!r} is {dtype_name(scale.dtype)} {list(scale.shape)}; the FP8 weight "
                              f"{name!r} {list(weight.shape)} with {fmt.describe()} needs {needs}", where=scale.file,
                              key=sname)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def scale_values(scale: torch.Tensor, where: object | None = None, name: str | None = None) -> torch.Tensor:
    """Stored scales -> float32, refusing NaN and infinite ones (a corrupt checkpoint); E8M0 bytes
    (uint8) are 2 ** (b - 127), with 255 NaN. where, name: the file and the scale tensor, for the error."""
    if scale.dtype == torch.uint8:
        powers = torch.ldexp(torch.ones(scale.shape), scale.to(torch.int32) - E8M0_BIAS)
        values = torch.where(scale == E8M0_NAN, math.nan, powers)
    else:
        values = scale.float()
    if not bool(torch.isfinite(values).all()):
        raise CheckpointError(f"tensor {name!r} holds NaN or infinite FP8 scales: a corrupt checkpoint", where=where,
                              key=name)
    return values


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight float8 [..., R, C], scale float32 [..., ceil(R / bo), ceil(C / bi)] (scale_values) ->
    weight * scale per block, in `dtype`. Computed in float32 in place in one weight-sized buffer:
    the scales are expanded over rows only, and broadcast over each row's blocks through a view."""
    R, C = weight.shape[-2:]
    if block is None:
        block = (R, C)
        scale = scale.reshape(*weight.shape[:-2], 1, 1)
    bo, bi = block
    out = weight.to(torch.float32)  # [..., R, C]
    s = scale.repeat_interleave(bo, dim=-2)[..., :R, :]  # [..., R, ceil(C / bi)]
    full, rest = divmod(C, bi)
    out[..., : full * bi].unflatten(-1, (full, bi)).mul_(s[..., :full, None])  # [..., R, full, bi]
    if rest:
        out[..., full * bi:].mul_(s[..., full:])  # the partial last block of each row: [..., R, rest]
    return out.to(dtype)
