"""Quantized checkpoints: `mobile quantize` (mobile.moe.rows reads them back).

A quantized checkpoint is a Hugging Face folder whose routed experts are packed (mobile.moe.quant).
Its config.json records the format:

    "quantization_config": {"quant_method": "mobile", "format": "int4", "group_size": 64,
                            "layout_version": 1, "modules": "routed experts"}

Each routed expert projection `P.weight` becomes `P.qweight`, `P.scales` and (int4) `P.zeros`,
input-major (mobile.moe.quant). Every other tensor is copied as it was; the tokenizer and generation
files are copied too. An FP8 checkpoint (mobile.models.fp8) is read as well: its experts are packed
from their dequantized values, its other FP8 weights are written dequantized to the config's dtype,
and their scales are dropped, so that the output is a `mobile quantize` checkpoint like any other.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from mobile.errors import CheckpointError, MobileError
from mobile.models import fp8
from mobile.models.weights import QUANT_METHOD, TORCH_DTYPES, WeightStore, expert_tensor_names
from mobile.moe import formats, quant
from mobile.moe.rows import dtype_name, input_major, packed_names
from mobile.outputs import check_folder, new_folder
from mobile.spec.hf import spec_from_hf_config
from mobile.spec.load import load_spec, spec_from_dict

# -- writing ----------------------------------------------------------------------------------


def quantize_checkpoint(src: str | Path, out: str | Path, fmt: str, group: int | None = None,
                        spec_path: str | Path | None = None, progress: bool = True, force: bool = False) -> Path:
    """Write `out`: the checkpoint at `src` with its routed experts packed. Streams one layer at a
    time (the source is memory-mapped), into a temporary sibling folder renamed into place; `out`
    may hold an earlier quantize's output only, unless force (mobile.outputs)."""
    src, out = Path(src), Path(out)
    store = WeightStore(src)
    if out.resolve() == src.resolve():
        raise MobileError("the output folder is the checkpoint itself; write the quantized copy elsewhere", key="-o")
    check_folder(out, "quantize", force)
    if store.expert_format is not None:
        raise MobileError("this checkpoint is quantized already; quantize its native original", where=src)
    if spec_path is not None:
        spec = load_spec(spec_path)
    else:
        spec = spec_from_dict(spec_from_hf_config(src), source=str(src / "config.json"))
    m = spec.model
    if not m.moe.num_experts:
        raise MobileError("the model has no routed experts to quantize", where=src)
    group = formats.default_group(fmt, group)
    problem = formats.group_error(fmt, group, {"hidden_size": m.hidden_size, "moe intermediate_size":
                                             m.moe.intermediate_size})
    if problem:
        raise MobileError(problem, key="--group-size")
    experts = {layer: expert_tensor_names(spec, layer) for layer in spec.moe_layers}
    expert_names = {n for per_layer in experts.values() for per_e in per_layer for n in per_e.values()}
    for name in sorted(expert_names):
        if name not in store:
            raise CheckpointError(f"tensor {name!r} not found (a routed expert the config implies)", where=src,
                                  key=name)
    # the header lists every tensor up front; the data follows in the same order, layer by layer
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    dropped = fp8_companions(store)
    copied = [n for n in store.index if n not in expert_names and n not in dropped]
    dense_dtype = TORCH_DTYPES[spec.dtype]  # what an FP8 weight is written as, dequantized
    for name in copied:
        info = store.info(name)
        entries.append((name, dense_dtype if info.dtype in fp8.FLOAT8 else info.dtype, info.shape))
    for layer_experts in experts.values():
        for per_e in layer_experts:
            for proj, name in per_e.items():
                shapes = quant.part_shapes(fmt, group, *input_major(spec, proj))
                entries += [(packed_names(name)[part], dtype, shape) for part, (dtype, shape) in shapes.items()]

    def tensors() -> Iterator[torch.Tensor]:
        for name in copied:
            yield store.get(name, dtype=dense_dtype if store.info(name).dtype in fp8.FLOAT8 else None)
        with tqdm(total=len(experts), desc=f"quantizing experts to {fmt}", unit="layer",
                  disable=None if progress else True) as bar:
            for layer_experts in experts.values():
                for per_e in layer_experts:
                    for name in per_e.values():
                        p = quant.quantize(store.get(name).T, fmt, group)
                        yield from (t for t in (p.q, p.scale, p.zero) if t is not None)
                bar.update(1)

    with new_folder(out, "quantize") as tmp:
        write_safetensors(tmp / "model.safetensors", entries, tensors())
        for f in src.iterdir():  # tokenizer, generation config, notes: everything but the weights
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json",
                                                                              "model.safetensors.index.json"):
                shutil.copy2(f, tmp / f.name)
        cfg = json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else {}
        cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "format": fmt, "group_size": group,
                                      "layout_version": formats.LAYOUT_VERSION, "modules": "routed experts"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def fp8_companions(store: WeightStore) -> set[str]:
    """The tensors of an FP8 checkpoint that only serve its float8 weights, which are written
    dequantized: their scales, and a static activation scheme's input scales (unused by mobile)."""
    out: set[str] = set()
    for name, (_, info) in store.index.items():
        if info.dtype in fp8.FLOAT8:
            out.add(fp8.scale_name(name))
            if name.endswith(".weight"):
                out.add(f"{name[: -len('.weight')]}.activation_scale")
    return out & set(store.index)


def write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterator[torch.Tensor]) -> None:
    """A safetensors file written as a stream: the header from `entries` (name, dtype, shape),
    then each tensor's bytes as `tensors` yields them, in the same order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for (name, dtype, shape), t in zip(entries, tensors, strict=True):
            assert t.dtype == dtype and tuple(t.shape) == tuple(shape), name  # the header's promise
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
