"""The semantic checks of a spec: shapes that must agree, values that must lie in range, policy
fields that must fit the model. Each failure names the key path and what was expected."""

from __future__ import annotations

import re
from collections.abc import Callable

from mobile.errors import SpecError
from mobile.models import families
from mobile.moe import formats
from mobile.spec.schema import LINK_GBPS, LINK_LATENCY_US, LINK_RATIO, MoESpec, PolicySpec, Spec
from mobile.spec.validate import parse_bytes


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
        # Gemma 4's full-attention layers' own shapes (0: as the others')
        need(a.full_head_dim == 0 or (a.full_head_dim >= 2 and a.full_head_dim % 2 == 0),
             "model.attention.full_head_dim", f"expected 0 or an even integer >= 2, got {a.full_head_dim}")
        need(a.full_num_kv_heads == 0 or (a.full_num_kv_heads >= 1 and a.num_heads % a.full_num_kv_heads == 0),
             "model.attention.full_num_kv_heads",
             f"expected 0 or a divisor of num_heads={a.num_heads}, got {a.full_num_kv_heads}")
        need(not a.full_k_eq_v or not a.qkv_bias, "model.attention.full_k_eq_v", "expected false with qkv_bias")
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
    need(not a.output_gate or a.kind == "gqa", "model.attention.output_gate", "expected false for mla attention")
    _check_layer_types(spec, need)
    need(m.rope.factor > 0, "model.rope.factor", f"expected a number > 0, got {m.rope.factor}")
    prf = m.rope.partial_rotary_factor
    need(0 < prf <= 1, "model.rope.partial_rotary_factor", f"expected a number in (0, 1], got {prf}")
    if a.kind == "mla":
        need(prf == 1, "model.rope.partial_rotary_factor", "expected 1 for mla attention (it has qk_rope_head_dim)")
    else:
        rotary = int(a.head_dim * prf)
        need(rotary >= 2 and rotary % 2 == 0, "model.rope.partial_rotary_factor",
             f"expected int(head_dim * factor) to be an even integer >= 2 (rope rotates pairs), got {rotary}")
    need(m.rope.type != "proportional", "model.rope.type", "proportional rope is for model.full_rope only (Gemma 4)")
    if m.full_rope is not None:  # Gemma 4's full-attention layers' (mobile.models.ops.Attention)
        need(a.kind == "gqa", "model.full_rope", "expected none for mla attention")
        need(m.full_rope.type in ("default", "proportional"), "model.full_rope.type",
             f"expected default or proportional, got {m.full_rope.type!r}")
        need(m.full_rope.factor > 0, "model.full_rope.factor", f"expected a number > 0, got {m.full_rope.factor}")
        need(0 < m.full_rope.partial_rotary_factor <= 1, "model.full_rope.partial_rotary_factor",
             f"expected a number in (0, 1], got {m.full_rope.partial_rotary_factor}")
        need(m.full_rope.type == "proportional" or m.full_rope.partial_rotary_factor == 1,
             "model.full_rope.partial_rotary_factor", "expected 1 for a default rope")
    if moe.num_experts:
        need(1 <= moe.top_k <= moe.num_experts, "model.moe.top_k",
             f"expected 1 <= top_k <= num_experts={moe.num_experts}, got {moe.top_k}")
        need(moe.intermediate_size >= 1, "model.moe.intermediate_size",
             f"expected >= 1, got {moe.intermediate_size}")
        for i, layer in enumerate(moe.dense_layers):
            need(0 <= layer < m.num_layers, f"model.moe.dense_layers[{i}]",
                 f"expected a layer index in [0, {m.num_layers}), got {layer}")
        _check_routing(moe, need)
        fused = [f for f, storage in families.EXPERT_STORAGE.items() if storage == "fused_interleaved"]
        # the bias part of an expert's row comes only from a fused checkpoint's bias tensors (gpt-oss's)
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
    need(not moe.per_expert_scale or moe.router_norm, "model.moe.per_expert_scale",
         "needs model.moe.router_norm (Gemma 4's router)")
    need(not moe.router_norm or moe.scoring == "softmax", "model.moe.router_norm", "needs model.moe.scoring softmax")
    need(m.final_logit_softcap is None or m.final_logit_softcap > 0, "model.final_logit_softcap",
         f"expected a number > 0 or null, got {m.final_logit_softcap}")
    if moe.dense_layers or not moe.num_experts or moe.parallel_mlp:
        need(m.intermediate_size >= 1, "model.intermediate_size",
             "expected >= 1: the model has dense MLP layers")
    p = spec.policy
    if p.little_k is not None:  # its upper bound is the model's
        need(1 <= p.little_k <= max(moe.top_k, 1), "policy.little_k",
             f"expected 1 <= little_k <= top_k={moe.top_k}, got {p.little_k}")
    for f in PolicySpec.knobs():  # the knobs' ranges, as declared
        value, lo, hi = getattr(p, f.name), f.metadata["lo"], f.metadata["hi"]
        if value is None or (lo is None and hi is None):
            continue
        kind = "an integer" if str(f.type).startswith("int") else "a number"
        expected = f"expected {kind} in [{lo:g}, {hi:g}]" if hi is not None else f"expected {kind} >= {lo:g}"
        inside = (lo is None or value >= lo) and (hi is None or value <= hi)
        need(inside, f"policy.{f.name}", f"{expected}, got {value}")
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


# the families whose runtime has linear-attention layers (mobile.models.deltanet)
LINEAR_FAMILIES = ("qwen3_next", "qwen3_5_moe")


def _check_layer_types(spec: Spec, need: Callable[[bool, str, str], None]) -> None:
    """One layer type per layer; linear-attention layers only where the family runs them, with
    shapes the Gated DeltaNet can take."""
    m, la = spec.model, spec.model.linear_attention
    if not m.layer_types:
        return
    need(len(m.layer_types) == m.num_layers, "model.layer_types",
         f"expected one layer type per layer (model.num_layers={m.num_layers}), got {len(m.layer_types)}")
    if not spec.linear_layers:
        return
    need(m.family in LINEAR_FAMILIES, "model.layer_types",
         f"linear_attention layers need family {' or '.join(LINEAR_FAMILIES)}, got {m.family}")
    need(m.attention.kind == "gqa", "model.layer_types", "linear_attention layers need model.attention.kind gqa")
    for key in ("num_key_heads", "num_value_heads", "key_head_dim", "value_head_dim"):
        value = getattr(la, key)
        need(value >= 1, f"model.linear_attention.{key}", f"expected an integer >= 1, got {value}")
    need(la.num_value_heads % la.num_key_heads == 0, "model.linear_attention.num_value_heads",
         f"expected a multiple of num_key_heads={la.num_key_heads} (each key head serves as many value heads), "
         f"got {la.num_value_heads}")
    need(la.conv_kernel >= 2, "model.linear_attention.conv_kernel",
         f"expected an integer >= 2 (the conv keeps the last conv_kernel - 1 inputs), got {la.conv_kernel}")
    need(la.chunk_size >= 1, "model.linear_attention.chunk_size", f"expected an integer >= 1, got {la.chunk_size}")


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


