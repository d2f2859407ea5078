"""The weight store: memory-mapped safetensors, single-file or sharded, checked against the spec.

The safetensors library reads the files (`safe_open`: a validated header and a lazy, private memory
map), so a tensor is a zero-copy view until it is converted or moved and opening a checkpoint reads
no weights. What the library rejects, we explain: a truncated or corrupt file is caught up front
with an error that names the file and, where one is to blame, the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mobile.errors import CheckpointError
from mobile.models import fp8, mxfp4
from mobile.models.families import expert_storage, tensor_names
from mobile.moe.formats import FORMATS, LAYOUT_VERSION
from mobile.spec.schema import Spec

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool,
                      # FP8 checkpoints' weights and scales (mobile.models.fp8), dequantized as they load
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_METHOD = "mobile"  # config.json's quantization_config.quant_method for `mobile quantize` output
# gpt-oss's published checkpoints: routed experts as MXFP4 blocks and scales, decoded at load (mobile.models.mxfp4)
MXFP4_METHOD = "mxfp4"


def _quantization_config(ckpt_dir: Path) -> dict | None:
    path = Path(ckpt_dir) / "config.json"
    if not path.exists():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # the spec path reports a bad config.json where it needs one
    q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return q if isinstance(q, dict) else None


def checkpoint_format(ckpt_dir: Path) -> tuple[str, int] | None:
    """(format, group size) of a checkpoint quantized by `mobile quantize`, or None for a native one."""
    return expert_format_of(_quantization_config(ckpt_dir), Path(ckpt_dir) / "config.json")


def expert_format_of(q: dict | None, path: Path) -> tuple[str, int] | None:
    """checkpoint_format from config.json's quantization_config `q` (None: there is none); path: the
    config.json it is from, for the errors. MXFP4 experts and FP8 weights count as native: they are
    decoded at load (mobile.models.mxfp4, mobile.models.fp8), so the checkpoint runs at the spec's
    format, as a native one does. Any other format is refused, by name."""
    if q is None or q.get("quant_method") == MXFP4_METHOD:
        return None
    key = "quantization_config"
    if q.get("quant_method") == fp8.METHOD:
        fp8.read_config(q, path)  # refuses what it cannot read
        return None
    if q.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{quant_format_name(q)} weights are not supported (mobile reads unquantized "
                              f"checkpoints, FP8 block weights (quant_method {fp8.METHOD!r}), gpt-oss's "
                              f"{MXFP4_METHOD!r} experts and checkpoints written by `mobile quantize`)", where=path,
                              key=f"{key}.quant_method")
    fmt, group, version = q.get("format"), q.get("group_size"), q.get("layout_version")
    if fmt not in FORMATS or fmt == "native":
        raise CheckpointError(f"expected int8 or int4, got {fmt!r}", where=path, key=f"{key}.format")
    if not isinstance(group, int) or isinstance(group, bool):
        raise CheckpointError(f"expected an integer, got {group!r}", where=path, key=f"{key}.group_size")
    if version != LAYOUT_VERSION:
        raise CheckpointError(f"expected packed layout version {LAYOUT_VERSION}, got {version!r}", where=path,
                              key=f"{key}.layout_version")
    return fmt, group


def quant_format_name(q: dict) -> str:
    """What a quantization_config mobile does not read holds, for its refusal: NVFP4 (modelopt),
    compressed-tensors' INT4, 4-bit GPTQ, ...; the quant_method always named."""
    method = q.get("quant_method")
    groups = q.get("config_groups")
    group: Any = next(iter(groups.values()), None) if isinstance(groups, dict) else None
    weights = group.get("weights") if isinstance(group, dict) else None
    name = None
    if method == "modelopt":  # NVIDIA ModelOpt: NVFP4, FP8, W4A8_AWQ, ...
        inner = q.get("quantization")
        algo = q.get("quant_algo") or (inner.get("quant_algo") if isinstance(inner, dict) else None)
        name = algo and str(algo).upper()
    elif method == "compressed-tensors":
        fmt = str(q.get("format", ""))
        if "nvfp4" in fmt:
            name = "NVFP4"
        elif isinstance(weights, dict) and weights.get("num_bits"):
            name = f"{str(weights.get('type', 'int')).upper()}{weights['num_bits']}"
    elif q.get("bits"):  # GPTQ, AWQ, ...
        name = f"{q['bits']}-bit {str(method).upper()}"
    return f"{name} ({method!r})" if name else repr(method)


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


class SafetensorsFile:
    """One file through `safe_open`: the header is read and checked now, tensor data only on `view`."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = safe_open(path, framework="pt")
        except SafetensorError as e:
            raise _explain(path, e) from None
        except OSError as e:
            raise CheckpointError(f"cannot read safetensors file: {e}", where=path) from None
        self.tensors: dict[str, TensorInfo] = {}
        for name in self._file.keys():
            part = self._file.get_slice(name)
            dtype = SAFETENSORS_DTYPES.get(part.get_dtype())
            if dtype is None:
                raise CheckpointError(f"dtype {part.get_dtype()} is not supported (expected one of "
                                      f"{', '.join(SAFETENSORS_DTYPES)})", where=path, key=name)
            self.tensors[name] = TensorInfo(path, dtype, tuple(part.get_shape()))

    def view(self, name: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"cannot read tensor {name!r}: {e}", where=self.path, key=name) from None


_MAX_HEADER = 100_000_000  # safetensors' own limit on the header's size


def _explain(path: Path, error: Exception) -> CheckpointError:
    """The library's verdict on a bad file, restated with the sizes and the tensor that are to blame.
    Reads only the 8-byte header length and the JSON header, and only once the library has refused."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return CheckpointError(f"truncated safetensors file: {size} bytes, no header", where=path)
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return CheckpointError(f"truncated or corrupt safetensors file: header of {n} bytes, file "
                                       f"has {size}", where=path)
            header = json.loads(f.read(n)) if n <= _MAX_HEADER else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return CheckpointError(f"cannot read safetensors header: {e}", where=path)
    for name, meta in (header.items() if isinstance(header, dict) else ()):
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(o) for o in meta["data_offsets"])
            count = math.prod(int(d) for d in meta["shape"])
            dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
        except (KeyError, TypeError, ValueError):
            return CheckpointError(f"corrupt header entry {meta!r}", where=path, key=name)
        if 8 + n + end > size:
            return CheckpointError(f"truncated safetensors file: tensor data ends at byte {8 + n + end}, "
                                   f"the file has {size}", where=path, key=name)
        if dtype is not None and end - begin != count * dtype.itemsize:
            return CheckpointError(f"corrupt header entry {meta!r}: {count} {meta['dtype']} values need "
                                   f"{count * dtype.itemsize} bytes, the offsets give {end - begin}", where=path,
                                   key=name)
    return CheckpointError(f"corrupt safetensors file: {error}", where=path)


class WeightStore:
    """All tensors of a checkpoint folder, by their checkpoint names."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        if not self.dir.is_dir():
            raise CheckpointError("checkpoint folder does not exist", where=self.dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"malformed shard index: {e!r}", where=index, key="weight_map") from None
            shard_names = sorted(set(weight_map.values()))
        else:
            shard_names = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not shard_names:
                raise CheckpointError("no *.safetensors files in the checkpoint folder", where=self.dir)
        self.files: dict[str, SafetensorsFile] = {}
        self.index: dict[str, tuple[SafetensorsFile, TensorInfo]] = {}
        for shard in shard_names:
            path = self.dir / shard
            if not path.exists():
                raise CheckpointError("shard named in model.safetensors.index.json is missing", where=path)
            f = SafetensorsFile(path)
            self.files[shard] = f
            for name, info in f.tensors.items():
                self.index[name] = (f, info)
        q = _quantization_config(self.dir)
        # (format, group size) when `mobile quantize` packed the routed experts, else None
        self.expert_format = expert_format_of(q, self.dir / "config.json")
        # gpt-oss's routed experts as MXFP4 blocks and scales (a published checkpoint)
        self.mxfp4 = q is not None and q.get("quant_method") == MXFP4_METHOD
        # FP8 block weights (DeepSeek-V3's, Kimi-K2's, ...), dequantized as `get` reads them
        self.fp8 = fp8.read_config(q, self.dir / "config.json") if q is not None and \
            q.get("quant_method") == fp8.METHOD else None

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def info(self, name: str) -> TensorInfo:
        return self.index[name][1]

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """A tensor in `dtype` (None: as stored) on `device`. An FP8 weight is dequantized with its
        scales, on the host and one tensor at a time (mobile.models.fp8): None gives float32."""
        if name not in self.index:
            raise CheckpointError(f"tensor {name!r} not found", where=self.dir, key=name)
        t = self.index[name][0].view(name)
        if t.dtype in fp8.FLOAT8:
            fmt, sname = self.fp8_scales(name)
            scale = fp8.scale_values(self.index[sname][0].view(sname), where=self.info(sname).file, name=sname)
            t = fp8.dequantize(t, scale, fmt.block, dtype or torch.float32)
        return t.to(device=device, dtype=dtype or t.dtype)

    def fp8_scales(self, name: str) -> tuple[fp8.Fp8Format, str]:
        """The FP8 format and the scales' name of the float8 tensor `name`, both checked (headers only)."""
        info = self.info(name)
        if self.fp8 is None:
            raise CheckpointError(f"tensor {name!r} is {info.dtype}, but config.json has no FP8 quantization_config "
                                  f"(quant_method {fp8.METHOD!r}) to say how it is scaled", where=info.file, key=name)
        sname = fp8.scale_name(name)
        fp8.check_scale(name, info, self.info(sname) if sname in self else None, self.fp8)
        return self.fp8, sname


EXPERT_PROJECTIONS = ("expert_gate", "expert_up", "expert_down")
# a fused family's (mobile.models.families.EXPERT_STORAGE) tensors of all of a layer's routed experts
FUSED_MATRICES = ("experts_gate_up", "experts_down")
FUSED_BIASES = ("experts_gate_up_bias", "experts_down_bias")


def expert_tensor_names(spec: Spec, layer: int) -> list[dict[str, str]]:
    """Each routed expert of `layer`, in order: projection (EXPERT_PROJECTIONS) -> checkpoint name.
    Only for families that store one tensor per expert and projection."""
    if expert_storage(spec.model.family) != "per_expert":
        raise CheckpointError(f"the {spec.model.family} family stores a layer's routed experts fused, not one tensor "
                              "per expert: `mobile quantize` does not read it yet (quantize at load instead: "
                              "--expert-format int4)", where=spec.source, key="model.family")
    names = tensor_names(spec.model.family, spec.checkpoint.tensor_names)
    return [{p: names[p].format(layer=layer, expert=e) for p in EXPERT_PROJECTIONS}
            for e in range(spec.model.moe.num_experts)]


@dataclass(frozen=True)
class TensorNeed:
    key: str  # canonical name, e.g. "q_proj"
    name: str  # checkpoint name
    shape: tuple[int, ...]
    layer: int | None = None
    expert: int | None = None  # the routed expert it belongs to; ALL_EXPERTS: a fused tensor of every one
    dtype: torch.dtype | None = None  # an integer tensor of this dtype (MXFP4's parts); None: a float weight


ALL_EXPERTS = -1


def required_tensors(spec: Spec, native_experts: bool = True, mxfp4_experts: bool = False) -> list[TensorNeed]:
    """Every tensor the spec's model needs, with the shape the spec implies. native_experts=False:
    without the routed experts (a quantized checkpoint's are checked as they load). mxfp4_experts:
    a fused family's expert matrices as MXFP4 blocks and scales (mobile.models.mxfp4; check_checkpoint
    refuses MXFP4 for the other families)."""
    m, a, moe = spec.model, spec.model.attention, spec.model.moe
    names = tensor_names(m.family, spec.checkpoint.tensor_names)
    h = m.hidden_size
    out: list[TensorNeed] = []

    def need(key: str, shape: tuple[int, ...], layer: int | None = None, expert: int | None = None) -> None:
        out.append(TensorNeed(key, name_of(key, layer, expert), shape, layer, expert))

    def name_of(key: str, layer: int | None, expert: int | None = None) -> str:
        if key not in names:
            raise CheckpointError(f"no tensor-name template for {key!r} (add it under checkpoint.tensor_names)",
                                  where=spec.source, key=f"checkpoint.tensor_names.{key}")
        return names[key].format(layer=layer, expert=expert)

    fused = expert_storage(m.family) != "per_expert"

    need("embed", (m.vocab_size, h))
    need("final_norm", (h,))
    if not m.tie_word_embeddings:
        need("lm_head", (m.vocab_size, h))
    for i in range(m.num_layers):
        need("attn_norm", (h,), i)
        need("ffn_norm", (h,), i)
        if m.sandwich_norms:
            need("post_attn_norm", (h,), i)
            need("post_ffn_norm", (h,), i)
        if m.layer_scalar:
            need("layer_scalar", (1,), i)
        if spec.is_linear_layer(i):
            out.extend(linear_attention_tensors(spec, i, name_of))
        elif a.kind == "gqa":
            n_kv, d = spec.attention_shape(i)  # a full-attention layer's own (Gemma 4)
            q, kv = a.num_heads * d * (2 if a.output_gate else 1), n_kv * d  # with a gate: each head's q and gate
            # a family that stores q, k and v as one tensor (sarvam_moe) names it qkv_proj: the
            # runtime's own fused form (mobile.runtime.kernels.fuse_qkv), so it loads as it is
            fused_qkv = "qkv_proj" in names
            if fused_qkv:
                need("qkv_proj", (q + 2 * kv, h), i)
            else:
                k_eq_v = a.full_k_eq_v and i not in a.sliding_layers  # no v_proj: v is k's projection
                for key, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv))[: 2 if k_eq_v else 3]:
                    need(key, (rows, h), i)
            need("o_proj", (h, a.num_heads * d), i)
            if a.o_bias:
                need("o_bias", (h,), i)
            if a.sinks:
                need("sinks", (a.num_heads,), i)
            if a.qkv_bias and fused_qkv:
                need("qkv_bias", (q + 2 * kv,), i)
            elif a.qkv_bias:
                for key, rows in (("q_bias", q), ("k_bias", kv), ("v_bias", kv)):
                    need(key, (rows,), i)
            if a.qk_norm == "full":
                need("q_norm", (q,), i)
                need("k_norm", (kv,), i)
            elif a.qk_norm == "per_head":
                need("q_norm", (d,), i)
                need("k_norm", (d,), i)
        else:
            qk = a.qk_nope_head_dim + a.qk_rope_head_dim
            if a.q_lora_rank is None:
                need("q_proj", (a.num_heads * qk, h), i)
            else:
                need("q_a_proj", (a.q_lora_rank, h), i)
                need("q_a_norm", (a.q_lora_rank,), i)
                need("q_b_proj", (a.num_heads * qk, a.q_lora_rank), i)
            need("kv_a_proj", (a.kv_lora_rank + a.qk_rope_head_dim, h), i)
            need("kv_a_norm", (a.kv_lora_rank,), i)
            need("kv_b_proj", (a.num_heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank), i)
            need("o_proj", (h, a.num_heads * a.v_head_dim), i)
        if spec.is_moe_layer(i):
            need("router", (moe.num_experts, h), i)
            if moe.correction_bias:
                need("router_correction", (moe.num_experts,), i)
            if moe.router_bias:
                need("router_bias", (moe.num_experts,), i)
            if moe.router_norm:
                need("router_scale", (h,), i)
            if moe.per_expert_scale:
                need("per_expert_scale", (moe.num_experts,), i)
            if moe.parallel_mlp:  # Gemma 4's dense MLP beside the experts, each with its norms
                need("mlp_gate", (m.intermediate_size, h), i)
                need("mlp_up", (m.intermediate_size, h), i)
                need("mlp_down", (h, m.intermediate_size), i)
                for key in ("mlp_post_norm", "moe_norm", "moe_post_norm"):
                    need(key, (h,), i)
            if fused:
                out.extend(fused_expert_tensors(spec, i, name_of, mxfp4_experts))
            elif native_experts:
                for e in range(moe.num_experts):
                    need("expert_gate", (moe.intermediate_size, h), i, e)
                    need("expert_up", (moe.intermediate_size, h), i, e)
                    need("expert_down", (h, moe.intermediate_size), i, e)
            s = moe.shared_expert.intermediate_size
            if s:
                need("shared_gate", (s, h), i)
                need("shared_up", (s, h), i)
                need("shared_down", (h, s), i)
                if moe.shared_expert.gate == "sigmoid":
                    need("shared_expert_gate", (1, h), i)
        else:
            need("mlp_gate", (m.intermediate_size, h), i)
            need("mlp_up", (m.intermediate_size, h), i)
            need("mlp_down", (h, m.intermediate_size), i)
    return out


def linear_attention_tensors(spec: Spec, layer: int, name_of) -> list[TensorNeed]:
    """A linear-attention layer's tensors (Gated DeltaNet, mobile.models.deltanet): its input
    projection as the family stores it (mobile.models.families), the depthwise conv, the per-head
    decay parameters, the gated norm's weight and the output projection."""
    la, h = spec.model.linear_attention, spec.model.hidden_size
    key, value, nv = la.num_key_heads * la.key_head_dim, la.num_value_heads * la.value_head_dim, la.num_value_heads
    channels = 2 * key + value
    if spec.model.family == "qwen3_next":  # grouped by key head
        projections = {"la_qkvz": (channels + value, h), "la_ba": (2 * nv, h)}
    else:
        projections = {"la_qkv": (channels, h), "la_z": (value, h), "la_b": (nv, h), "la_a": (nv, h)}
    shapes = {**projections, "la_conv": (channels, 1, la.conv_kernel), "la_dt_bias": (nv,), "la_a_log": (nv,),
              "la_norm": (la.value_head_dim,), "la_out": (h, value)}
    return [TensorNeed(key, name_of(key, layer), shape, layer) for key, shape in shapes.items()]


def fused_expert_tensors(spec: Spec, layer: int, name_of, mxfp4_experts: bool) -> list[TensorNeed]:
    """A fused family's routed-expert tensors of one layer (mobile.models.families.EXPERT_STORAGE), all
    experts first and input-major: gate_up [E, H, 2I] and down [E, I, H], and their biases. As
    MXFP4 (mxfp4_experts), each matrix is its blocks and scales, stored [E, out, in] (mobile.models.mxfp4)."""
    moe, h = spec.model.moe, spec.model.hidden_size
    E, i2, i = moe.num_experts, 2 * moe.intermediate_size, moe.intermediate_size
    out = []
    # gate_up [E, H, 2I] and down [E, I, H]; Gemma 4's (fused) are output-major, [E, 2I, H] and [E, H, I]
    shapes = ((i2, h), (h, i)) if expert_storage(spec.model.family) == "fused" else ((h, i2), (i, h))
    for key, (rows, cols) in zip(FUSED_MATRICES, shapes, strict=True):
        name = name_of(key, layer)
        if mxfp4_experts:
            if rows % mxfp4.BLOCK:
                raise CheckpointError(f"MXFP4 blocks hold {mxfp4.BLOCK} input values, which do not divide {rows}",
                                      where=spec.source, key=name)
            blocks, scales = mxfp4.shapes(cols, rows, (E,))  # stored [E, out, in]
            out += [TensorNeed(f"{key}{n[len(name):]}", n, shape, layer, ALL_EXPERTS, torch.uint8)
                    for n, shape in zip(mxfp4.parts(name), (blocks, scales), strict=True)]
        else:
            out.append(TensorNeed(key, name, (E, rows, cols), layer, ALL_EXPERTS))
    if moe.expert_bias:
        out += [TensorNeed(key, name_of(key, layer), (E, n), layer, ALL_EXPERTS)
                for key, n in zip(FUSED_BIASES, (i2, h), strict=True)]
    return out


def check_checkpoint(spec: Spec, store: WeightStore) -> dict[tuple[str, int | None, int | None], TensorNeed]:
    """Every needed tensor exists with the expected shape; returns them keyed by (key, layer, expert)."""
    if store.mxfp4 and expert_storage(spec.model.family) == "per_expert":
        raise CheckpointError(f"the checkpoint's experts are MXFP4, which mobile reads for gpt_oss only, not for "
                              f"{spec.model.family}", where=store.dir / "config.json",
                              key="quantization_config.quant_method")
    needs = required_tensors(spec, native_experts=store.expert_format is None, mxfp4_experts=store.mxfp4)
    for t in needs:
        if t.name not in store:
            raise CheckpointError(f"tensor {t.name!r} not found (the spec needs it as {t.key}"
                                  f"{'' if t.layer is None else f' of layer {t.layer}'})", where=store.dir,
                                  key=t.name)
        info = store.info(t.name)
        if info.shape != t.shape:
            raise CheckpointError(f"tensor {t.name!r} has shape {list(info.shape)}, the spec implies "
                                  f"{list(t.shape)}", where=info.file, key=t.name)
        if t.dtype is not None:
            if info.dtype != t.dtype:
                raise CheckpointError(f"tensor {t.name!r} is {info.dtype}, where {t.dtype} is expected ({t.key} as "
                                      "MXFP4)", where=info.file, key=t.name)
        elif info.dtype in fp8.FLOAT8:
            store.fp8_scales(t.name)  # its scales are there, with the shape the block size needs
        elif not info.dtype.is_floating_point:
            # converting integers to the compute dtype would run, and compute nonsense; a quantized
            # format's integer tensors have names and checks of their own (mobile.tools.quantize)
            raise CheckpointError(f"tensor {t.name!r} is {info.dtype} where a float weight ({t.key}) is expected; "
                                  "quantized experts come from `mobile quantize`", where=info.file, key=t.name)
    return {(t.key, t.layer, t.expert): t for t in needs}
