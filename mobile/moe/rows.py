"""Checkpoint -> expert rows: every routed expert of a layer as one row of the host store, in the
spec's expert format (mobile.moe.layout, mobile.moe.quant).

Whatever a checkpoint's storage (one tensor per expert, or gpt-oss's fused, interleaved and possibly
MXFP4 tensors: mobile.models.families.EXPERT_STORAGE), `expert_matrices` hands the loader canonical
matrices; a quantized checkpoint's packed parts (`P.qweight`, `P.scales`, `P.zeros`, written by
`mobile quantize`) are read and checked as they are.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mobile.errors import CheckpointError
from mobile.models import mxfp4
from mobile.models.families import expert_storage, tensor_names
from mobile.models.weights import (
    EXPERT_PROJECTIONS,
    FUSED_BIASES,
    FUSED_MATRICES,
    SAFETENSORS_DTYPES,
    WeightStore,
    expert_tensor_names,
)
from mobile.moe import quant
from mobile.moe.layout import ExpertMLP, arena_views, bias_views, packed_layout
from mobile.spec.schema import Spec


def load_expert_rows(spec: Spec, store: WeightStore, layer: int, dtype: torch.dtype) -> torch.Tensor:
    """All experts of one layer in the spec's expert format, one row each, in host memory: native,
    [E, native_row_elems] in `dtype` (mobile.moe.layout.arena_views, biases after the matrices); int8 /
    int4, [E, row_bytes] uint8 (mobile.moe.quant), read packed from a quantized checkpoint or quantized
    now from a native (or MXFP4) one."""
    moe, h = spec.model.moe, spec.model.hidden_size
    i = moe.intermediate_size
    layout = packed_layout(spec)
    if layout is not None:
        rows = torch.empty(moe.num_experts, layout.row_bytes, dtype=torch.uint8)
        if store.expert_format is not None:
            for e, tensors in enumerate(expert_tensor_names(spec, layer)):
                rows[e] = load_packed_expert(spec, store, layout, tensors)
        else:
            for e, (gate_up, down, biases) in enumerate(expert_matrices(spec, store, layer)):
                rows[e] = quant.quantize_matrices(layout, gate_up, down, biases)
        return rows
    rows = torch.empty(moe.num_experts, quant.native_row_elems(h, i, moe.expert_bias), dtype=dtype)
    rows[:, 3 * h * i + (2 * i + h if moe.expert_bias else 0):].zero_()  # the padding (quant.native_row_elems)
    gate_up, down = arena_views(rows, h, i)
    bias_rows = bias_views(rows, ExpertMLP(h, i, bias=True)) if moe.expert_bias else ()
    for e, (gu, d, biases) in enumerate(expert_matrices(spec, store, layer)):
        gate_up[e].copy_(gu)
        down[e].copy_(d)
        if biases is not None:
            for view, b in zip(bias_rows, biases, strict=True):
                view[e].copy_(b)
    return rows


ExpertTensors = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]


def expert_matrices(spec: Spec, store: WeightStore, layer: int) -> Iterator[ExpertTensors]:
    """A layer's routed experts one at a time, whatever the checkpoint's storage
    (mobile.models.families.EXPERT_STORAGE), as mobile's canonical input-major matrices: (gate_up [H, 2I],
    gate columns then up columns; down [I, H]; with model.moe.expert_bias, (gate_up's [2I], down's
    [H]) biases, else None). Native tensors come as stored (views where they can be); MXFP4 ones
    decoded to float32 (mobile.models.mxfp4)."""
    if expert_storage(spec.model.family) == "per_expert":
        for t in expert_tensor_names(spec, layer):
            gate, up, down = (store.get(t[p]) for p in EXPERT_PROJECTIONS)  # [out, in], as nn.Linear
            yield torch.cat((gate.T, up.T), dim=1), down.T, None
        return
    names = tensor_names(spec.model.family, spec.checkpoint.tensor_names)
    fused = {key: names[key].format(layer=layer) for key in (*FUSED_MATRICES, *FUSED_BIASES) if key in names}
    # each tensor opened once (a memory-mapped view), each expert's slice read as it is needed
    if store.mxfp4:
        parts = {key: [store.get(n) for n in mxfp4.parts(fused[key])] for key in FUSED_MATRICES}

        def matrix(key: str, e: int) -> torch.Tensor:  # stored [E, out, in]
            blocks, scales = (t[e] for t in parts[key])
            return mxfp4.decode(blocks, scales, where=store.dir, name=fused[key]).T
    else:
        dense = {key: store.get(fused[key]) for key in FUSED_MATRICES}
        out_major = expert_storage(spec.model.family) == "fused"

        def matrix(key: str, e: int) -> torch.Tensor:  # stored [E, in, out]; fused (Gemma 4): [E, out, in]
            return dense[key][e].T if out_major else dense[key][e]

        if out_major:  # gate and up apart already, no biases
            for e in range(spec.model.moe.num_experts):
                yield matrix("experts_gate_up", e), matrix("experts_down", e), None
            return
    gu_bias, down_bias = (store.get(fused[k]) for k in FUSED_BIASES) if spec.model.moe.expert_bias else (None, None)
    for e in range(spec.model.moe.num_experts):
        gate_up = matrix("experts_gate_up", e)
        # the checkpoint interleaves gate and up columns (gate = 0::2, up = 1::2); mobile keeps them apart
        canonical = torch.cat((gate_up[:, 0::2], gate_up[:, 1::2]), dim=1)
        biases = None
        if gu_bias is not None and down_bias is not None:
            biases = torch.cat((gu_bias[e, 0::2], gu_bias[e, 1::2])), down_bias[e]
        yield canonical, matrix("experts_down", e), biases


def packed_names(name: str) -> dict[str, str]:
    """A native expert tensor's name -> the names of its packed parts (q, scale, zero)."""
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    return {"q": f"{base}.qweight", "scale": f"{base}.scales", "zero": f"{base}.zeros"}


def load_packed_expert(spec: Spec, store: WeightStore, layout: quant.Layout, names: dict[str, str]) -> torch.Tensor:
    """One expert's packed row from a quantized checkpoint; names: projection -> its native name.
    Every part is checked: present, the layout's dtype and shape, finite scales and zeros."""
    parts: dict[str, quant.Packed] = {}
    for proj, name in names.items():
        rows, cols = input_major(spec, proj)
        expect = quant.part_shapes(layout.fmt, layout.group, rows, cols)
        got = {}
        for part, pname in packed_names(name).items():
            if part not in expect:
                continue
            dtype, shape = expect[part]
            if pname not in store:
                raise CheckpointError(f"tensor {pname!r} not found: the checkpoint says it holds {layout.fmt} experts "
                                      f"(group size {layout.group}), which need it", where=store.dir, key=pname)
            info = store.info(pname)
            if info.dtype != dtype or info.shape != shape:
                raise CheckpointError(f"tensor {pname!r} is {dtype_name(info.dtype)} {list(info.shape)}, the "
                                      f"{layout.fmt} format with group size {layout.group} needs {dtype_name(dtype)} "
                                      f"{list(shape)}", where=info.file, key=pname)
            t = store.get(pname)
            if part != "q" and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"tensor {pname!r} holds NaN or infinite values: a corrupt "
                                      f"{'scale' if part == 'scale' else 'zero'} tensor", where=info.file, key=pname)
            got[part] = t
        parts[proj] = quant.Packed(got["q"], got["scale"], got.get("zero"))
    return layout.pack(quant.concat(parts["expert_gate"], parts["expert_up"]), parts["expert_down"])


def input_major(spec: Spec, proj: str) -> tuple[int, int]:
    """(in, out) of a routed expert projection."""
    h, i = spec.model.hidden_size, spec.model.moe.intermediate_size
    return (i, h) if proj == "expert_down" else (h, i)


def dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in SAFETENSORS_DTYPES.items() if v == dtype), str(dtype))
