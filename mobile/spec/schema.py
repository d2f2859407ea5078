"""The model spec: what a YAML file under specs/ declares, loaded into typed dataclasses.

Loading is strict. Unknown keys, wrong types and inconsistent shapes are errors that name the
file, the YAML key path (`model.moe.top_k`) and what was expected. The dataclasses below are the
schema: field types drive the checks, so adding a field here is all it takes to accept it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mobile import policy as policies
from mobile.moe import formats

Family = Literal["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss",
                 "minimax_m2", "sarvam_moe", "gemma4", "qwen3_next", "qwen3_5_moe"]
LayerType = Literal["full_attention", "linear_attention"]
DType = Literal["float32", "bfloat16", "float16"]
PolicyName = Literal[policies.NAMES]  # type: ignore[valid-type]  # the registry's names (mobile.policy)


@dataclass(frozen=True)
class AttentionSpec:
    kind: Literal["gqa", "mla"] = "gqa"  # gqa covers MHA (num_kv_heads == num_heads)
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    qkv_bias: bool = False
    # none; full: RMSNorm over all heads' q (k) projection at once, one weight of n * head_dim (OLMoE,
    # MiniMax-M2); per_head: over head_dim, one weight shared by the heads (Qwen3)
    qk_norm: Literal["none", "full", "per_head"] = "none"
    clip_qkv: float | None = None
    o_bias: bool = False  # o_proj has a bias (gpt-oss)
    # a learned logit per head that joins each query's softmax as one more key with no value (gpt-oss's
    # attention sinks): it takes a share of the attention mass and adds nothing to the output
    sinks: bool = False
    # these layers attend over only the last sliding_window positions (the query's own included)
    sliding_layers: list[int] = field(default_factory=list)
    sliding_window: int = 0
    # the softmax scale; None: head_dim ** -0.5 (Gemma 4: 1.0, its q and k are RMS-normed)
    scale: float | None = None
    # v RMS-normed over head_dim, without a weight (Gemma 4)
    v_norm: bool = False
    # the full-attention (not sliding) layers' own shapes, where they differ (Gemma 4's global
    # layers): head_dim and kv heads (0: as above); k_eq_v: no v_proj, v is k's projection before
    # k_norm and rope
    full_head_dim: int = 0
    full_num_kv_heads: int = 0
    full_k_eq_v: bool = False
    # q_proj also gives each head a gate, interleaved per head (q_h, then gate_h): the attention's
    # output is times sigmoid(gate) before o_proj (Qwen3-Next, Qwen3.5)
    output_gate: bool = False
    # MLA (DeepSeek-V2 and V3) only
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0


@dataclass(frozen=True)
class LinearAttentionSpec:
    """The linear-attention layers (model.layer_types): Gated DeltaNet (Qwen3-Next, Qwen3.5). Each
    carries a recurrent state instead of a KV cache: the last conv_kernel - 1 inputs of its causal
    conv (conv window) and a [value heads, key_head_dim, value_head_dim] delta-rule matrix."""

    kind: Literal["gated_deltanet"] = "gated_deltanet"
    num_key_heads: int = 0
    num_value_heads: int = 0  # a multiple of num_key_heads: each q/k head serves that many v heads
    key_head_dim: int = 0
    value_head_dim: int = 0
    conv_kernel: int = 4
    # a prompt runs the delta rule in chunks of this many positions (transformers' and
    # flash-linear-attention's 64), a decoded token one step of the recurrence
    chunk_size: int = 64


@dataclass(frozen=True)
class RopeSpec:
    theta: float = 10000.0
    # proportional (Gemma 4): the first int(partial_rotary_factor * D / 2) of a head's D / 2
    # frequency pairs rotate, at frequencies over the whole D; the others pass through
    type: Literal["default", "linear", "yarn", "dynamic", "llama3", "longrope", "proportional"] = "default"
    # DeepSeek rotates adjacent pairs (complex form); the others rotate halves.
    interleaved: bool = False
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # GLM-4.5 and MiniMax-M2 rotate only the first int(head_dim * factor) dims of each head; the rest
    # pass through
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
    # GLM-4.5, MiniMax-M2): the top-k of sigmoid(logits), chosen by the corrected score and group-limited below.
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
    # geglu (Gemma 4): down(gelu_tanh(gate) * up)
    activation: Literal["swiglu", "clamped_swiglu", "geglu"] = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    shared_expert: SharedExpertSpec = field(default_factory=SharedExpertSpec)
    # Gemma 4's router: it reads the residual stream RMS-normed without a weight, times its own
    # `router_scale` [H] and H ** -0.5; its renormalized top-k weights are then scaled by a learned
    # per-expert scale [E] (per_expert_scale)
    router_norm: bool = False
    per_expert_scale: bool = False
    # Gemma 4: every MoE layer also runs the dense MLP (intermediate_size) beside its experts, each
    # with its own pre- and post-norms, the two summed (mobile.compiler.lower)
    parallel_mlp: bool = False
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
    hidden_act: Literal["silu", "gelu_pytorch_tanh"] = "silu"  # the dense MLP's
    norm_eps: float = 1e-5
    # Gemma 4: embeddings times sqrt(hidden_size) (rounded to the dtype); the attention and MLP outputs
    # RMS-normed before their residual adds (sandwich norms); each layer's output times a learned
    # scalar (layer_scalar); the logits soft-capped, cap * tanh(logits / cap)
    scale_embeddings: bool = False
    sandwich_norms: bool = False
    layer_scalar: bool = False
    final_logit_softcap: float | None = None
    # RMSNorm weights stored zero-centred: the scale is 1 + weight, applied in float32 (Qwen3-Next,
    # Qwen3.5; their linear attention's gated norm excepted)
    zero_centered_norms: bool = False
    # each layer's token mixer, as the config's layer_types: full_attention (the attention below) or
    # linear_attention (linear_attention below); empty: every layer full attention
    layer_types: list[LayerType] = field(default_factory=list)
    linear_attention: LinearAttentionSpec = field(default_factory=LinearAttentionSpec)
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    rope: RopeSpec = field(default_factory=RopeSpec)
    # the full-attention layers' rope, where it differs from the sliding ones' (Gemma 4); None: rope
    full_rope: RopeSpec | None = None
    moe: MoESpec = field(default_factory=MoESpec)


@dataclass(frozen=True)
class CheckpointSpec:
    path: str | None = None  # relative paths resolve against the spec file's folder
    # canonical name -> tensor name template with {layer} and {expert}; merged over the
    # family's defaults (mobile.models.families), so a spec lists only what differs.
    tensor_names: dict[str, str] = field(default_factory=dict)


def knob(default: Any, help: str, lo: float | None = None, hi: float | None = None) -> Any:
    """A policy field a user sets: a key under `policy:` in a spec, and the same-named flag of every
    command that takes a policy (mobile.cli: --little-k for little_k), with this help. lo, hi: its
    range, checked when a spec loads (mobile.spec.checks) and when the flag is parsed."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi})


@dataclass(frozen=True)
class PolicySpec:
    """The policy and its knobs, each declared once, here (knob). Their "auto" values are resolved
    here too (the effective_* properties)."""

    name: PolicyName = policies.DEFAULT
    # Defaults: with the little pass taking the dropped experts that are already cached
    # (cached_complement), the per-layer rule (prefix) meets the quality targets by itself, and the
    # confidence gate (tau 0.05: 2-7% fallbacks, each a second pass) bought at most +0.003 agreement
    # for up to 13% of decode speed on the demo's held-out text, so it is off (tau 0) by default.
    # layer_tau was chosen on one text and is reported on others (docs/quantized-experts.md):
    # on Python from outside the demo's training data (benchmarks/texts.py), the smallest layer_tau
    # with agreement >= 0.965 (a margin over the 0.95 target for texts it was not chosen on) and
    # perplexity within +0.5% was 0.85 (0.75: 0.960, +0.4%). Raw weights matched or beat rescaled ones.
    tau: float = knob(0.0, "importance threshold in [0, 1] (mobile: a token falls back below this confidence, "
                      "--signal; default 0: never, the per-layer rule decides; 1: always) or little-mass share "
                      "(layer-mass)", lo=0, hi=1)
    little_k: int | None = knob(None, "experts in the little set (default ceil(top_k / 2))", lo=1)
    layer_tau: float | None = knob(0.85, "mobile: a layer uses more than the little set in the little pass when the "
                                   "little set carries less than this share of the big set's router mass (default "
                                   "0.85; 0 turns the rule off)", lo=0, hi=1)
    # prefix measured 6-8% fewer bytes than switch at the same quality under mobile
    # (docs/big-little-quality.md); switch is layer-mass as DESIGN.md defines that policy
    layer_rule: Literal["auto", "switch", "prefix"] = knob(
        "auto", "how the per-layer rule picks a token's experts: switch, the little set or the whole big set; prefix, "
        "the fewest top experts (at least little_k) that carry layer_tau of the big set's mass; auto (default): "
        "prefix for mobile, switch for layer-mass")
    mass_tau: float | None = knob(None, "mobile: a token also falls back (and its little pass ends there) when, at "
                                  "any layer, its little set carries less than this share of the big set's router "
                                  "mass (default: off)", lo=0, hi=1)
    kv_refresh: int = knob(0, "mobile: a fallback's big pass also recomputes up to N accepted little tokens before "
                           "it, so their KV entries become big ones (default 0: off)", lo=0)
    cached_complement: bool = knob(True, "mobile and layer-mass: the little pass also uses a token's dropped experts "
                                   "that are already in the device cache (no transfer, only compute; default on)")
    # lfu measured fewer misses and faster decoding for the big-little policies (docs/eviction.md)
    eviction: Literal["auto", "lru", "lfu"] = knob(
        "auto", "which cached expert a miss evicts: lru, or lfu (fewest recent uses, decayed); auto (default): lru "
        "for ondemand, lru and lru-prefetch, lfu for the big-little policies")
    signal: Literal["max_prob", "entropy", "margin"] = knob(
        "max_prob", "mobile: the confidence the gate reads, each in [0, 1]: the top probability, its margin over the "
        "second, or one minus the normalized entropy (default max_prob); a token below --tau falls back")
    # measured on the demo model (docs/big-little-quality.md): once the little pass takes what the
    # cache holds, speculative copies cost more link time and cache room than they save
    prefetch: Literal["auto", "both", "predicted", "complement", "none"] = knob(
        "auto", "speculative copies, each on the link once the demand copies issued with it have landed: next-layer "
        "prediction, mobile's complement sets, both, or none; auto (default): none where the little pass takes what "
        "the cache holds, else both")
    little_weights: Literal["rescale", "raw"] = knob("raw", "little-set weights: the router's own (raw, default), or "
                                                     "rescaled to the big set's total")
    little_select: Literal["top", "random"] = knob("top", "the little set: the top little_k (default), or a random "
                                                   "little_k of the big set (a baseline)")
    prefill: Literal["big", "little"] = knob("big", "mobile: the pass a prompt runs (default big)")
    placement: Literal["auto", "move", "choose", "adaptive"] = knob(
        "auto", "where a missed expert runs: move (into a cache slot over the link); choose (per expert, moved or "
        "computed on the host, whichever finishes the layer sooner; a hot one also copied in behind: "
        "mobile.moe.placement); adaptive (choose where the costs weighed at load let the host finish a miss "
        "before a move would, else move; on a CPU-only machine they are measured, on CUDA the host's and the "
        "link's are the plan's); auto (default): the policy's own")
    profile: str | None = knob(None, "hybrid-static: the routing profile (a JSON file written by `mobile profile` "
                               "or `mobile bench --profile-text`) whose most-used experts of each layer stay on the "
                               "device")
    host_threads: int | None = knob(None, "host placement: threads of the host expert kernel (default: the "
                                    "physical cores less one, at least one)", lo=1, hi=1024)
    # an RTX 4090's HBM (about 1 TB/s) over dual-channel DDR5 (about 60 GB/s), as R = 40 is its link
    host_ratio: float = knob(16.0, "host placement, on a CPU-only machine: the emulated host computes an expert "
                             "this many times slower than the device (default 16); on CUDA the host is this "
                             "machine's CPU",
                             lo=1e-3, hi=1e4)

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
    def effective_placement(self) -> policies.Placement:
        """Where a missed expert runs: the policy's own (host, both: its definition), or as asked."""
        if self.placement == "auto" or self.traits.placement in ("host", "both", "static") or not self.traits.offloads:
            return self.traits.placement
        return self.placement

    @property
    def effective_layer_rule(self) -> Literal["switch", "prefix"]:
        if self.layer_rule != "auto":
            return self.layer_rule
        return self.traits.layer_rule or "switch"

    @property
    def effective_prefetch(self) -> Literal["both", "predicted", "complement", "none"]:
        """Which speculative copies the graph may issue, as the user asked or by `auto`; the policy
        decides which of them it has at all (mobile.policy: Policy.prefetch)."""
        if self.prefetch != "auto":
            return self.prefetch
        return "none" if self.cache_aware else "both"

    @classmethod
    def knobs(cls) -> list[dataclasses.Field]:
        """The fields a user sets (knob): every one but the policy's name."""
        return [f for f in dataclasses.fields(cls) if "help" in f.metadata]

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
    host_gbps: float = 60.0  # the host's DRAM read bandwidth (dual-channel DDR5): experts computed there


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

    def attention_shape(self, layer: int) -> tuple[int, int]:
        """(kv heads, head dim) of a GQA layer: a full-attention layer's own where the spec gives them."""
        a = self.model.attention
        if layer in a.sliding_layers:
            return a.num_kv_heads, a.head_dim
        return a.full_num_kv_heads or a.num_kv_heads, a.full_head_dim or a.head_dim

    def layer_rope(self, layer: int) -> RopeSpec:
        m = self.model
        return m.full_rope if m.full_rope is not None and layer not in m.attention.sliding_layers else m.rope

    def is_linear_layer(self, layer: int) -> bool:
        """`layer` mixes tokens with linear attention (a recurrent state), not full attention (a KV cache)."""
        types = self.model.layer_types
        return bool(types) and types[layer] == "linear_attention"

    @property
    def linear_layers(self) -> list[int]:
        return [i for i in range(self.model.num_layers) if self.is_linear_layer(i)]

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
