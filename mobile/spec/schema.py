"""The model spec: what a YAML file under specs/ declares, loaded into typed dataclasses.

Loading is strict. Unknown keys, wrong types and inconsistent shapes are errors that name the
file, the YAML key path (`model.moe.top_k`) and what was expected. The dataclasses below are the
schema: field types drive the checks, so adding a field here is all it takes to accept it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mobile import policy as policies
from mobile.errors import SpecError
from mobile.models import families
from mobile.moe import formats

Family = Literal["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss"]
DType = Literal["float32", "bfloat16", "float16"]
PolicyName = Literal[policies.NAMES]  # type: ignore[valid-type]  # the registry's names (mobile.policy)


@dataclass(frozen=True)
class AttentionSpec:
    kind: Literal["gqa", "mla"] = "gqa"  # gqa covers MHA (num_kv_heads == num_heads)
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    qkv_bias: bool = False
    # none; full: RMSNorm over all heads' q (k) projection (OLMoE); per_head: over head_dim (Qwen3)
    qk_norm: Literal["none", "full", "per_head"] = "none"
    clip_qkv: float | None = None
    o_bias: bool = False  # o_proj has a bias (gpt-oss)
    # a learned logit per head that joins each query's softmax as one more key with no value (gpt-oss's
    # attention sinks): it takes a share of the attention mass and adds nothing to the output
    sinks: bool = False
    # these layers attend over only the last sliding_window positions (the query's own included)
    sliding_layers: list[int] = field(default_factory=list)
    sliding_window: int = 0
    # MLA (DeepSeek-V2 and V3) only
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0


@dataclass(frozen=True)
class RopeSpec:
    theta: float = 10000.0
    type: Literal["default", "linear", "yarn", "dynamic", "llama3", "longrope"] = "default"
    # DeepSeek rotates adjacent pairs (complex form); the others rotate halves.
    interleaved: bool = False
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # GLM-4.5 rotates only the first int(head_dim * factor) dims of each head; the rest pass through
    partial_rotary_factor: float = 1.0
    # yarn: round the correction range to whole dimensions (transformers' default; gpt-oss sets false)
    truncate: bool = True


@dataclass(frozen=True)
class SharedExpertSpec:
    intermediate_size: int = 0  # 0: no shared expert
    gate: Literal["none", "sigmoid"] = "none"  # Qwen2-MoE scales the shared output by sigmoid(x @ g)


@dataclass(frozen=True)
class MoESpec:
    num_experts: int = 0
    top_k: int = 0
    intermediate_size: int = 0
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # softmax: the top-k of softmax(logits) (renormalized with norm_topk_prob). sigmoid (DeepSeek-V3,
    # GLM-4.5): the top-k of sigmoid(logits), chosen by the corrected score and group-limited below.
    # softmax_topk (gpt-oss): the top-k of the logits, then a softmax over those k only (mobile.moe.router)
    scoring: Literal["softmax", "sigmoid", "softmax_topk"] = "softmax"
    # the checkpoint's per-expert e_score_correction_bias, added to the scores for choosing experts
    # only: the weights stay the uncorrected scores (sigmoid scoring only)
    correction_bias: bool = False
    # group-limited top-k: the experts form n_group equal groups, a group scores the sum of its top 2
    # corrected scores, and only the best topk_group groups are chosen from (sigmoid scoring only)
    n_group: int = 1
    topk_group: int = 1
    router_bias: bool = False  # the router is a linear layer with a bias (gpt-oss)
    # each routed expert's gate_up and down projections have biases, which travel in its row (mobile.moe.quant)
    expert_bias: bool = False
    # the routed experts' activation. swiglu: down(silu(gate) * up); clamped_swiglu (gpt-oss): the
    # gate clamped above at swiglu_limit, up to [-swiglu_limit, swiglu_limit], then
    # down(gate * sigmoid(swiglu_alpha * gate) * (up + 1))
    activation: Literal["swiglu", "clamped_swiglu"] = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    shared_expert: SharedExpertSpec = field(default_factory=SharedExpertSpec)
    dense_layers: list[int] = field(default_factory=list)  # layers with a dense MLP instead of MoE


@dataclass(frozen=True)
class ModelSpec:
    family: Family = "olmoe"
    vocab_size: int = 0
    hidden_size: int = 0
    num_layers: int = 0
    intermediate_size: int = 0  # dense MLP width (dense layers only)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: Literal["silu"] = "silu"
    norm_eps: float = 1e-5
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    rope: RopeSpec = field(default_factory=RopeSpec)
    moe: MoESpec = field(default_factory=MoESpec)


@dataclass(frozen=True)
class CheckpointSpec:
    path: str | None = None  # relative paths resolve against the spec file's folder
    # canonical name -> tensor name template with {layer} and {expert}; merged over the
    # family's defaults (mobile.models.families), so a spec lists only what differs.
    tensor_names: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicySpec:
    name: PolicyName = policies.DEFAULT
    # Defaults: with the little pass taking the dropped experts that are already cached
    # (cached_complement), the per-layer rule (prefix) meets the quality targets by itself, and the
    # confidence gate (tau 0.05: 2-7% fallbacks, each a second pass) bought at most +0.003 agreement
    # for up to 13% of decode speed on the demo's held-out text, so it is off (tau 0) by default.
    # layer_tau was chosen on one text and is reported on others (docs/quantized-experts.md):
    # on Python from outside the demo's training data (benchmarks/texts.py), the smallest layer_tau
    # with agreement >= 0.965 (a margin over the 0.95 target for texts it was not chosen on) and
    # perplexity within +0.5% was 0.85 (0.75: 0.960, +0.4%). Raw weights matched or beat rescaled
    # ones. tau is the gate's threshold for `mobile` and the little-mass share for `layer-mass`.
    little_k: int | None = None  # default ceil(top_k / 2)
    little_weights: Literal["rescale", "raw"] = "raw"
    # the confidence the gate reads, each in [0, 1] (mobile.models.ops.confidence): the top probability, the
    # top probability minus the second, or one minus the normalized entropy; a token is important
    # when it is below tau, so tau 0 never falls back, whatever the signal, and tau 1 always does
    signal: Literal["max_prob", "entropy", "margin"] = "max_prob"
    tau: float = 0.0
    layer_tau: float | None = 0.85
    # how the per-layer rule picks a token's experts (mobile.moe.rule.KeepRule): switch, the little
    # set or the whole big set; prefix, the fewest top experts (at least little_k) that carry
    # layer_tau of the big set's mass. auto: prefix for mobile, where it measured 6-8% fewer bytes
    # at the same quality (docs/big-little-quality.md); switch for layer-mass, as DESIGN.md defines that policy
    layer_rule: Literal["auto", "switch", "prefix"] = "auto"
    # mobile: the gate also calls a token important (and aborts its little pass there) when, at any
    # MoE layer, the little set carries less than this share of the big set's router mass
    mass_tau: float | None = None
    # which speculative copies run (each once the demand copies issued with it have landed):
    # next-layer prediction, the complement S_K minus S_k for a possible fallback (mobile only),
    # both, or none. auto: none for a little pass that takes what the cache holds
    # (cached_complement), else both
    prefetch: Literal["auto", "both", "predicted", "complement", "none"] = "auto"
    prefill: Literal["big", "little"] = "big"
    # mobile: a fallback's big pass also recomputes up to this many accepted little tokens just
    # before it (since the last big pass), so that their KV entries become big ones; 0: off
    kv_refresh: int = 0
    # mobile and layer-mass: the little pass also uses those of a token's dropped experts (S_K minus
    # S_k) that are already in the device cache. They cost no transfer, only compute; quality then
    # depends on the cache. `little` stays the pure top-k/2 bound.
    cached_complement: bool = True
    # which cached expert a miss evicts (mobile.moe.slots): lru, or lfu (fewest recent uses, decayed).
    # auto: lru for the baselines named after it (ondemand, lru, lru-prefetch), lfu for the
    # big-little policies, where it measured fewer misses and faster decoding (docs/eviction.md)
    eviction: Literal["auto", "lru", "lfu"] = "auto"
    # top: the little set is the top little_k; random: a random little_k of the top-K (a baseline
    # that shows what choosing by router weight is worth)
    little_select: Literal["top", "random"] = "top"

    @property
    def traits(self) -> policies.Policy:
        return policies.get(self.name)

    @property
    def cache_aware(self) -> bool:
        """The little pass takes the dropped experts already cached (its results depend on the cache)."""
        return self.cached_complement and self.traits.cache_aware

    @property
    def effective_eviction(self) -> Literal["lru", "lfu"]:
        return self.traits.eviction if self.eviction == "auto" else self.eviction

    @property
    def effective_layer_rule(self) -> Literal["switch", "prefix"]:
        if self.layer_rule != "auto":
            return self.layer_rule
        return self.traits.layer_rule or "switch"

    @property
    def can_fall_back(self) -> bool:
        """A decoded token may be recomputed with big experts: the confidence gate can fire (every
        signal is a confidence in [0, 1], so tau 0 never fires) or the router-mass gate is on."""
        return self.traits.fallback and (self.tau > 0 or self.mass_tau is not None)


@dataclass(frozen=True)
class ExpertCacheSpec:
    budget: str | None = None  # bytes for the whole expert cache, e.g. "6GiB"
    slots_per_layer: int | None = None
    staging_slots: int = 0  # the speculation cap per layer (unused prefetched experts); 0: 1


@dataclass(frozen=True)
class LinkSpec:
    """The host link. The emulated one's settings are bounded by what a link can physically be:
    LINK_GBPS (1 MB/s, a typo below; 1 TB/s, above NVLink-C2C's 900 GB/s) and LINK_RATIO (R: an
    expert's transfer over its compute time, about 40 for an RTX 4090 on PCIe 4.0, 87 for an H200).
    Past them a copy's emulated time stops meaning anything, or overflows."""

    kind: Literal["none", "real", "emulated"] = "none"
    gbps: float | None = None  # emulated link bandwidth, GB/s
    latency_us: float = 10.0  # fixed cost per copy on the emulated link
    ratio: float | None = None  # calibrated mode: expert transfer time / expert compute time


@dataclass(frozen=True)
class PlanSpec:
    """The device the planned schedule (schedule.txt, schedule.trace.json) is costed for."""

    device: str = "rtx4090"
    compute_tflops: float = 82.0
    hbm_gbps: float = 1008.0
    link_gbps: float = 25.0


LINK_GBPS = (1e-3, 1e3)
LINK_RATIO = (1e-3, 1e4)
LINK_LATENCY_US = (0.0, 1e6)

ExpertFormat = Literal["native", "int8", "int4"]
CudaGraphs = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class RuntimeSpec:
    device: str = "cpu"
    # how routed experts are stored, moved and cached (mobile.moe.quant): native is the spec's dtype;
    # int8 and int4 are packed, and dequantized inside the expert op
    expert_format: ExpertFormat = "native"
    # groups of this many input rows share a scale (and an int4 zero); default: 64 for int4, one
    # scale per output column (0) for int8
    expert_group_size: int | None = None
    expert_cache: ExpertCacheSpec = field(default_factory=ExpertCacheSpec)
    link: LinkSpec = field(default_factory=LinkSpec)
    plan: PlanSpec = field(default_factory=PlanSpec)
    # the longest sequence (prompt and generated tokens) the KV cache holds. Default: the model's
    # context; where the cache is preallocated (CUDA graphs on), capped so that it fits in
    # mobile.runtime.kv.KV_BUDGET_BYTES (mobile.runtime.kv.max_seq_len)
    max_seq_len: int | None = None
    # decode compute segments captured as CUDA graphs and replayed (mobile.runtime.graphs); auto: on for
    # CUDA, off for the CPU; on, on the CPU: the same static-buffer runner, without capture
    cuda_graphs: CudaGraphs = "auto"


@dataclass(frozen=True)
class Spec:
    name: str
    model: ModelSpec
    dtype: DType = "bfloat16"
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    policy: PolicySpec = field(default_factory=PolicySpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    source: str | None = None  # the file this spec was read from; not a YAML key

    # -- derived facts, used by lowering and the loaders --------------------------------------
    def sliding_window(self, layer: int) -> int:
        """How many positions `layer` attends over (the query's own included); 0: all of them."""
        a = self.model.attention
        return a.sliding_window if layer in a.sliding_layers else 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.model.moe.num_experts > 0 and layer not in self.model.moe.dense_layers

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.model.num_layers) if self.is_moe_layer(i)]

    @property
    def expert_group(self) -> int:
        """The group size the expert format uses (its default when the spec gives none)."""
        return formats.default_group(self.runtime.expert_format, self.runtime.expert_group_size)

    @property
    def little_k(self) -> int:
        return self.policy.little_k or math.ceil(self.model.moe.top_k / 2)

    def checkpoint_dir(self) -> Path | None:
        if self.checkpoint.path is None:
            return None
        path = Path(self.checkpoint.path).expanduser()
        if not path.is_absolute() and self.source is not None:
            path = Path(self.source).parent / path
        return path

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data


# -- loading ---------------------------------------------------------------------------------


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("no such file", where=path) from None
    except UnicodeDecodeError as e:
        raise SpecError(f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start}", where=path) from None
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror}", where=path) from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKey as e:
        raise SpecError(str(e), where=path, key=e.key) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"malformed YAML: {at}{problem}", where=path) from None
    return spec_from_dict(data, source=str(path))


class DuplicateKey(Exception):
    def __init__(self, key: str, first: int, second: int):
        self.key = key
        super().__init__(f"duplicate key: first on line {first}, again on line {second} (YAML would keep the last)")


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error, not the last one winning."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKey(str(key), seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def spec_from_dict(data: Any, source: str | None = None) -> Spec:
    where = source or "<spec>"
    if not isinstance(data, dict):
        raise SpecError(f"expected a mapping at the top level, got {_kind(data)}", where=where)
    spec = _build(Spec, {k: v for k, v in data.items()}, "", where)
    spec = dataclasses.replace(spec, source=source)
    check_consistency(spec)
    return spec


def with_policy(spec: Spec, **changes: Any) -> Spec:
    """The spec with policy fields replaced (e.g. from --policy), validated again."""
    return _with(spec, "policy", changes)


def with_runtime(spec: Spec, **changes: Any) -> Spec:
    """The spec with runtime fields replaced (e.g. from --expert-format), validated again. A native
    format takes no group size, so switching to it drops the spec's."""
    if changes.get("expert_format") == "native":
        changes.setdefault("expert_group_size", None)
    return _with(spec, "runtime", changes)


def _with(spec: Spec, section: str, changes: dict[str, Any]) -> Spec:
    changed = dataclasses.replace(spec, **{section: dataclasses.replace(getattr(spec, section), **changes)})
    return spec_from_dict(changed.to_dict(), source=spec.source)


def format_changes(expert_format: str | None, expert_group_size: int | None) -> dict[str, Any]:
    """The runtime fields --expert-format / --expert-group-size override, for with_runtime."""
    return {k: v for k, v in (("expert_format", expert_format), ("expert_group_size", expert_group_size))
            if v is not None}


def dump_spec(spec: Spec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=None, width=100)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


# keys of older specs (and of graphs compiled from them) that now live elsewhere
MOVED_KEYS = {"runtime.expert_cache.eviction": "policy.eviction (auto, lru or lfu; auto picks by policy)"}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build(cls: type, data: dict, path: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = [k for k in data if k not in fields]
    for key in (_join(path, str(k)) for k in unknown):
        if key in MOVED_KEYS:
            raise SpecError(f"this key moved to {MOVED_KEYS[key]}", where=where, key=key)
    if unknown:
        raise SpecError(f"unknown key (expected one of: {', '.join(fields)})",
                        where=where, key=_join(path, str(unknown[0])))
    values = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name in data:
            values[name] = _convert(hints[name], data[name], key, where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError("required key is missing", where=where, key=key)
    return cls(**values)


def _convert(tp: Any, value: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key, where)
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 reads an unquoted on / off as true / false
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise SpecError(f"expected one of {choices}, got {value!r}", where=where, key=key)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"expected a list, got {_kind(value)}", where=where, key=key)
        return [_convert(args[0], v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"expected a mapping, got {_kind(value)}", where=where, key=key)
        return {str(k): _convert(args[1], v, _join(key, str(k)), where) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(f"expected a mapping, got {_kind(value)}", where=where, key=key)
        return _build(tp, value, key, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"expected true or false, got {_kind(value)}", where=where, key=key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"expected an integer, got {_kind(value)} {value!r}", where=where, key=key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"expected a number, got {_kind(value)} {value!r}", where=where, key=key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"expected a string, got {_kind(value)} {value!r}", where=where, key=key)
        return value
    raise TypeError(f"spec schema has an unsupported type {tp!r} at {key}")  # a bug in this file


def check_consistency(spec: Spec) -> None:
    """Shape rules the types alone cannot express. Each names the key that is wrong."""
    where = spec.source or "<spec>"
    m, a, moe = spec.model, spec.model.attention, spec.model.moe

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise SpecError(msg, where=where, key=key)

    need(bool(re.fullmatch(r"[A-Za-z0-9._-]+", spec.name)), "name",
         f"expected letters, digits, '.', '_' or '-' (it names the graph folder), got {spec.name!r}")
    for key, value in [("model.vocab_size", m.vocab_size), ("model.hidden_size", m.hidden_size),
                       ("model.num_layers", m.num_layers), ("model.attention.num_heads", a.num_heads),
                       ("model.max_position_embeddings", m.max_position_embeddings)]:
        need(value >= 1, key, f"expected an integer >= 1, got {value}")
    need(m.norm_eps > 0, "model.norm_eps", f"expected a number > 0, got {m.norm_eps}")
    if a.kind == "gqa":
        need(a.num_kv_heads >= 1, "model.attention.num_kv_heads", f"expected >= 1, got {a.num_kv_heads}")
        need(a.num_heads % a.num_kv_heads == 0, "model.attention.num_kv_heads",
             f"expected a divisor of num_heads={a.num_heads}, got {a.num_kv_heads}")
        need(a.head_dim >= 2 and a.head_dim % 2 == 0, "model.attention.head_dim",
             f"expected an even integer >= 2 (rope rotates pairs), got {a.head_dim}")
    else:
        need(a.kv_lora_rank >= 1, "model.attention.kv_lora_rank", f"expected >= 1 for mla, got {a.kv_lora_rank}")
        need(a.qk_rope_head_dim >= 2 and a.qk_rope_head_dim % 2 == 0, "model.attention.qk_rope_head_dim",
             f"expected an even integer >= 2 for mla, got {a.qk_rope_head_dim}")
        need(a.qk_nope_head_dim >= 1, "model.attention.qk_nope_head_dim", f"expected >= 1, got {a.qk_nope_head_dim}")
        need(a.v_head_dim >= 1, "model.attention.v_head_dim", f"expected >= 1, got {a.v_head_dim}")
        need(a.qk_norm == "none", "model.attention.qk_norm", "expected 'none' for mla attention")
        need(not a.qkv_bias, "model.attention.qkv_bias", "expected false for mla attention")
        for key in ("o_bias", "sinks"):
            need(not getattr(a, key), f"model.attention.{key}", "expected false for mla attention")
        need(not a.sliding_layers, "model.attention.sliding_layers", "expected none for mla attention")
    for i, layer in enumerate(a.sliding_layers):
        need(0 <= layer < m.num_layers, f"model.attention.sliding_layers[{i}]",
             f"expected a layer index in [0, {m.num_layers}), got {layer}")
    if a.sliding_layers:
        need(a.sliding_window >= 1, "model.attention.sliding_window",
             f"expected an integer >= 1 for the sliding layers, got {a.sliding_window}")
    need(m.rope.factor > 0, "model.rope.factor", f"expected a number > 0, got {m.rope.factor}")
    prf = m.rope.partial_rotary_factor
    need(0 < prf <= 1, "model.rope.partial_rotary_factor", f"expected a number in (0, 1], got {prf}")
    if a.kind == "mla":
        need(prf == 1, "model.rope.partial_rotary_factor", "expected 1 for mla attention (it has qk_rope_head_dim)")
    else:
        rotary = int(a.head_dim * prf)
        need(rotary >= 2 and rotary % 2 == 0, "model.rope.partial_rotary_factor",
             f"expected int(head_dim * factor) to be an even integer >= 2 (rope rotates pairs), got {rotary}")
    if moe.num_experts:
        need(1 <= moe.top_k <= moe.num_experts, "model.moe.top_k",
             f"expected 1 <= top_k <= num_experts={moe.num_experts}, got {moe.top_k}")
        need(moe.intermediate_size >= 1, "model.moe.intermediate_size",
             f"expected >= 1, got {moe.intermediate_size}")
        for i, layer in enumerate(moe.dense_layers):
            need(0 <= layer < m.num_layers, f"model.moe.dense_layers[{i}]",
                 f"expected a layer index in [0, {m.num_layers}), got {layer}")
        _check_routing(moe, need)
        fused = [f for f, storage in families.EXPERT_STORAGE.items() if storage != "per_expert"]
        # the bias part of an expert's row comes only from a fused checkpoint's bias tensors
        need(not moe.expert_bias or m.family in fused, "model.moe.expert_bias",
             f"family {m.family} has no expert biases (only {', '.join(fused)} do)")
        if moe.activation == "clamped_swiglu":
            for key in ("swiglu_alpha", "swiglu_limit"):
                need(getattr(moe, key) > 0, f"model.moe.{key}", f"expected a number > 0, got {getattr(moe, key)}")
        if moe.shared_expert.gate != "none":
            need(moe.shared_expert.intermediate_size > 0, "model.moe.shared_expert.gate",
                 "a shared-expert gate needs model.moe.shared_expert.intermediate_size > 0")
    else:
        need(moe.top_k == 0, "model.moe.top_k", "expected 0 when model.moe.num_experts is 0")
    if moe.dense_layers or not moe.num_experts:
        need(m.intermediate_size >= 1, "model.intermediate_size",
             "expected >= 1: the model has dense MLP layers")
    p = spec.policy
    if p.little_k is not None:
        need(1 <= p.little_k <= max(moe.top_k, 1), "policy.little_k",
             f"expected 1 <= little_k <= top_k={moe.top_k}, got {p.little_k}")
    for key in ("layer_tau", "mass_tau"):
        value = getattr(p, key)
        need(value is None or 0.0 <= value <= 1.0, f"policy.{key}", f"expected a number in [0, 1], got {value}")
    need(p.kv_refresh >= 0, "policy.kv_refresh", f"expected an integer >= 0, got {p.kv_refresh}")
    need(0.0 <= p.tau <= 1.0, "policy.tau", f"expected a number in [0, 1], got {p.tau}")
    c = spec.runtime.expert_cache
    if c.budget is not None:
        try:
            parse_bytes(c.budget)
        except ValueError as e:
            raise SpecError(str(e), where=where, key="runtime.expert_cache.budget") from None
    need(c.slots_per_layer is None or c.slots_per_layer >= 1, "runtime.expert_cache.slots_per_layer",
         f"expected an integer >= 1, got {c.slots_per_layer}")
    r = spec.runtime
    if r.expert_format == "native":
        need(r.expert_group_size is None, "runtime.expert_group_size",
             "a group size needs runtime.expert_format int8 or int4")
    elif moe.num_experts:
        dims = {"model.hidden_size": m.hidden_size, "model.moe.intermediate_size": moe.intermediate_size}
        problem = formats.group_error(r.expert_format, spec.expert_group, dims)
        need(problem is None, "runtime.expert_group_size", str(problem))
    need(c.staging_slots >= 0, "runtime.expert_cache.staging_slots", f"expected >= 0, got {c.staging_slots}")
    need(r.max_seq_len is None or 1 <= r.max_seq_len <= m.max_position_embeddings, "runtime.max_seq_len",
         f"expected 1 <= max_seq_len <= model.max_position_embeddings={m.max_position_embeddings}, "
         f"got {r.max_seq_len}")
    link = spec.runtime.link
    for key, (lo, hi) in (("gbps", LINK_GBPS), ("ratio", LINK_RATIO), ("latency_us", LINK_LATENCY_US)):
        value = getattr(link, key)
        need(value is None or lo <= value <= hi, f"runtime.link.{key}", f"expected a number in [{lo:g}, {hi:g}], "
             f"got {value}")


def _check_routing(moe: MoESpec, need: Callable[[bool, str, str], None]) -> None:
    """The sigmoid router's options: a correction bias and groups exist only with sigmoid scoring."""
    if moe.scoring != "sigmoid":
        need(not moe.correction_bias, "model.moe.correction_bias", "a correction bias needs model.moe.scoring sigmoid")
        need(moe.n_group == 1, "model.moe.n_group", "group-limited top-k needs model.moe.scoring sigmoid")
    need(moe.n_group >= 1 and moe.num_experts % moe.n_group == 0, "model.moe.n_group",
         f"expected a divisor of num_experts={moe.num_experts}, got {moe.n_group}")
    per_group = moe.num_experts // moe.n_group  # n_group >= 1: need raised otherwise
    if moe.n_group > 1:  # a group scores the sum of its top 2
        need(per_group >= 2, "model.moe.n_group", f"expected groups of at least 2 experts, got {per_group}")
    need(1 <= moe.topk_group <= moe.n_group, "model.moe.topk_group",
         f"expected 1 <= topk_group <= n_group={moe.n_group}, got {moe.topk_group}")
    need(moe.top_k <= moe.topk_group * per_group, "model.moe.top_k",
         f"expected at most topk_group * experts per group = {moe.topk_group * per_group}, got {moe.top_k}")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """'6GiB' -> 6442450944. Accepts B, kB/MB/GB/TB (powers of 10) and KiB/MiB/GiB/TiB."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a byte count such as '6GiB' or '512MB', got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
