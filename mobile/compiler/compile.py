"""`mobile compile`: spec file -> verified, scheduled graph -> graphs/NAME/."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from mobile.compiler.budget import CachePlan, cache_plan
from mobile.compiler.costs import (
    DTYPE_BYTES,
    attention_params,
    expert_bytes,
    kept_state_copies,
    kv_bytes_per_position,
    linear_attention_params,
    recurrent_state_bytes,
)
from mobile.compiler.emit import GRAPH_FILES, human_bytes, write_graph_dir
from mobile.compiler.ir import Graph
from mobile.compiler.passes import compile_spec
from mobile.outputs import check_folder
from mobile.spec.load import load_spec, with_policy, with_runtime
from mobile.spec.schema import Spec


def compile_to_dir(spec_path: str | Path, out_dir: str | Path | None = None,
                   policy: str | None = None, policy_options: dict | None = None,
                   runtime: dict | None = None, check=None, force: bool = False) -> tuple[Path, Graph]:
    """policy_options: other policy fields to override (tau, little_k, layer_tau, ...); runtime:
    runtime fields (expert_format, expert_group_size); check(spec): may refuse before anything is
    written; force: replace the output folder even when an earlier compile did not write it."""
    spec = load_spec(spec_path)
    changes = dict(policy_options or {})
    if policy is not None:
        changes["name"] = policy
    if changes:
        spec = with_policy(spec, **changes)
    if runtime:
        spec = with_runtime(spec, **runtime)
    if check is not None:
        check(spec)
    out = Path(out_dir) if out_dir is not None else Path("graphs") / spec.name
    check_folder(out, "compile", force, known=GRAPH_FILES)
    spec = _relocate_checkpoint(spec, out)
    graph = compile_spec(spec)
    return write_graph_dir(graph, out), graph


def _relocate_checkpoint(spec: Spec, out: Path) -> Spec:
    """Relative checkpoint paths in a spec are relative to the spec file; in graph.json they are
    relative to the graph folder, so the pair (graph, checkpoint) can move together."""
    ckpt = spec.checkpoint_dir()
    if ckpt is None or Path(spec.checkpoint.path or "").is_absolute():
        return spec
    rel = os.path.relpath(ckpt.resolve(), out.resolve())
    return dataclasses.replace(spec, checkpoint=dataclasses.replace(spec.checkpoint, path=rel))


# the device memory of the plan devices mobile knows (runtime.plan.device), for the fit check
KNOWN_DEVICE_MEMORY = {"rtx3060": 12 * 2**30, "rtx3080": 10 * 2**30, "rtx3090": 24 * 2**30, "rtx4060": 8 * 2**30,
                       "rtx4070": 12 * 2**30, "rtx4080": 16 * 2**30, "rtx4090": 24 * 2**30, "rtx5090": 32 * 2**30,
                       "a100": 80 * 2**30, "h100": 80 * 2**30, "h200": 141 * 10**9}


@dataclass(frozen=True)
class MemoryPlan:
    """Weight bytes where they live, in the spec's dtype and expert format; for a model with
    linear-attention layers, what a sequence keeps on the device too (`state`, `kv`). The KV cache
    (of other models, or where runtime.max_seq_len is not set) and activations come on top of `device`."""

    non_expert: int  # on the device always (embeddings, attention, routers, dense MLPs, shared experts)
    per_expert: int  # one routed expert, packed when the format is int8 / int4
    all_experts: int
    plan: CachePlan | None  # the device expert cache; None: every expert resident on the device, or on the host
    on_host: bool = False  # every routed expert lives, and is computed, on the host (placement: host)
    # linear-attention layers only: their recurrent state, the live copy and those kept for fallbacks
    # (costs.kept_state_copies), and the full-attention layers' KV cache at runtime.max_seq_len (0
    # when not set). A hybrid model's state is a fixed size whatever the sequence's length, and its
    # KV cache a fraction of a full-attention model's, so the plan can count both; a model without
    # such layers keeps its weights-only plan
    state: int = 0
    kv: int = 0

    @property
    def cache(self) -> int | None:
        return None if self.plan is None else self.plan.total_bytes

    @property
    def weights(self) -> int:
        """The weights on the device: the non-expert ones and the experts' cache (or all of them)."""
        if self.on_host:
            return self.non_expert
        return self.non_expert + (self.all_experts if self.cache is None else self.cache)

    @property
    def device(self) -> int:
        return self.weights + self.state + self.kv

    @property
    def host(self) -> int:
        """Host RAM the expert store takes (none when every expert is resident on the device)."""
        return self.all_experts if self.on_host or self.cache is not None else 0


def memory_plan(spec: Spec) -> MemoryPlan:
    m = spec.model
    dt = DTYPE_BYTES[spec.dtype]
    h = m.hidden_size
    moe_layers = spec.moe_layers
    dense_layers = [i for i in range(m.num_layers) if i not in moe_layers]
    shared = 3 * h * m.moe.shared_expert.intermediate_size
    # Gemma 4 runs the dense MLP in every MoE layer too (model.moe.parallel_mlp)
    mlp_layers = m.num_layers if m.moe.parallel_mlp else len(dense_layers)
    # a linear-attention layer's token mixer is its Gated DeltaNet, not the attention
    mixers = sum(linear_attention_params(spec) if spec.is_linear_layer(i) else attention_params(spec, i)
                 for i in range(m.num_layers))
    non_expert = (m.vocab_size * h * (1 if m.tie_word_embeddings else 2) + mixers
                  + mlp_layers * 3 * h * m.intermediate_size + len(moe_layers) * (shared + h * 2)) * dt
    non_expert += len(moe_layers) * m.moe.num_experts * h * 4  # float32 routers
    per_expert = expert_bytes(spec)
    state = kv = 0
    if spec.linear_layers:
        state = recurrent_state_bytes(spec) * (1 + kept_state_copies(spec))
        kv = kv_bytes_per_position(spec) * (spec.runtime.max_seq_len or 0)
    return MemoryPlan(non_expert, per_expert, per_expert * m.moe.num_experts * len(moe_layers), cache_plan(spec),
                      on_host=spec.policy.traits.placement == "host" and bool(moe_layers), state=state, kv=kv)


def state_line(spec: Spec) -> str:
    """A hybrid model's KV cache (its full-attention layers only) and recurrent state (its
    linear-attention layers), as `mobile compile` prints them."""
    m, n = spec.model, spec.runtime.max_seq_len
    full = m.num_layers - len(spec.linear_layers)
    per_position = kv_bytes_per_position(spec)
    kv = f"KV cache {human_bytes(per_position)} a position over {full} full-attention layers"
    kv += f" x {n} positions (runtime.max_seq_len) = {human_bytes(per_position * n)}" if n else \
        " (runtime.max_seq_len not set: counted per position, not in the total)"
    one, kept = recurrent_state_bytes(spec), kept_state_copies(spec)
    state = f"recurrent state {human_bytes(one)} over {len(spec.linear_layers)} linear-attention layers"
    if kept:
        state += (f" x {1 + kept} (the live copy and {kept} kept for a fallback to restore, policy.kv_refresh "
                  f"{spec.policy.kv_refresh} + 1) = {human_bytes(one * (1 + kept))}")
    return f"{kv}; {state}"


def memory_lines(spec: Spec) -> list[str]:
    """The memory plan as `mobile compile` prints it."""
    m, mp = spec.model, memory_plan(spec)
    plan = mp.plan
    fmt = spec.runtime.expert_format
    fmt_text = spec.dtype if fmt == "native" else f"{fmt}, group size {spec.expert_group or 'per output column'}"
    where = "every routed expert computed on the host, from host memory (none on the device)" if mp.on_host else \
        "all experts resident on the device" if plan is None else (
        f"experts stream from host memory into a device cache of {plan.main + plan.staging} slots per layer "
        f"(at most {plan.staging} of them prefetched, not yet used) = {human_bytes(plan.total_bytes)}")
    placement = spec.policy.effective_placement
    if plan is not None and placement == "static":
        where = (f"each layer's {plan.main} most-used experts (policy.profile, a routing profile) loaded once into a "
                 f"device cache of {plan.main} slots per layer = {human_bytes(plan.total_bytes)}; every other expert "
                 "computed on the host, nothing moved after loading")
    elif plan is not None and placement != "move":
        where += ("; a decoded token's misses are computed on the host and copied in behind" if placement == "both"
                  else "; each miss of a decoded token is moved or computed on the host, whichever finishes the "
                       "layer sooner (mobile.moe.placement)" + (", where the costs weighed at load let the host "
                                                                "win one (adaptive), else moved"
                                                                if placement == "adaptive" else ""))
    lines = [f"non-expert weights (always on device, {spec.dtype}): {human_bytes(mp.non_expert)}",
             f"routed experts ({fmt_text}): {len(spec.moe_layers)} layers x {m.moe.num_experts} x "
             f"{human_bytes(mp.per_expert)} = {human_bytes(mp.all_experts)}",
             f"policy {spec.policy.name}: {where}"]
    if plan is not None and plan.clamped:
        lines.append(f"the cache budget holds more than the model's {m.moe.num_experts} experts per layer: "
                     f"{plan.main} main slots per layer are used, the rest of the budget is not")
    host = f"host RAM for experts: {human_bytes(mp.host) if mp.host else 'none'}"
    if not spec.linear_layers:
        lines.append(f"device memory: {human_bytes(mp.device)} of weights (+ KV cache and activations); {host}")
        return lines
    lines.append(state_line(spec))
    kept = "KV cache and recurrent state" if mp.kv else "recurrent state"
    rest = "activations" if mp.kv else "KV cache and activations"
    lines.append(f"device memory: {human_bytes(mp.device)} = {human_bytes(mp.weights)} of weights + "
                 f"{human_bytes(mp.state + mp.kv)} of {kept} (+ {rest}); {host}")
    return lines


def memory_problems(spec: Spec, device_memory: int | None = None, host_ram: int | None = None) -> list[str]:
    """Where the plan does not fit: the device's memory (given, or known for runtime.plan.device)
    and the host RAM (when given)."""
    mp, out = memory_plan(spec), []
    device = spec.runtime.plan.device
    limit = device_memory if device_memory is not None else KNOWN_DEVICE_MEMORY.get(device.lower())
    source = "--device-memory" if device_memory is not None else f"{device}'s memory"
    if limit is not None and mp.weights > limit:
        hint = "" if spec.policy.traits.offloads else \
            "; an offloading policy (e.g. --policy mobile) keeps experts in host RAM"
        out.append(f"the device needs {human_bytes(mp.weights)} of weights, more than {source} "
                   f"({human_bytes(limit)}){hint}")
    elif limit is not None and mp.device > limit:
        out.append(state_problem(spec, mp, f"{source} ({human_bytes(limit)})"))
    if host_ram is not None and mp.host > host_ram:
        out.append(f"the host expert store needs {human_bytes(mp.host)}, more than --host-ram ({human_bytes(host_ram)})"
                   + ("" if spec.runtime.expert_format == "int4" else "; --expert-format int4 packs experts ~4x "
                      "smaller than bf16"))
    return out


def state_problem(spec: Spec, mp: MemoryPlan, limit: str) -> str:
    """The weights fit the device, but not with a hybrid model's KV cache and recurrent state: what
    to lower, the sequence's length first (the KV cache grows with it)."""
    levers = []
    if mp.kv:
        levers.append(f"runtime.max_seq_len ({spec.runtime.max_seq_len} positions: {human_bytes(mp.kv)} of KV cache)")
    if kept := kept_state_copies(spec):
        levers.append(f"policy.kv_refresh ({kept} kept copies of the recurrent state: "
                      f"{human_bytes(kept * recurrent_state_bytes(spec))})")
    if mp.plan is not None:
        levers.append(f"runtime.expert_cache.budget ({human_bytes(mp.plan.total_bytes)})")
    lower = f"; lower {' or '.join(levers)}" if levers else ""
    return (f"the device needs {human_bytes(mp.device)}, more than {limit}: {human_bytes(mp.weights)} of weights fit, "
            f"but not with {human_bytes(mp.state + mp.kv)} of KV cache and recurrent state{lower}")
