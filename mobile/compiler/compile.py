"""`mobile compile`: spec file -> verified, scheduled graph -> graphs/NAME/."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from mobile.compiler.budget import CachePlan, cache_plan
from mobile.compiler.costs import DTYPE_BYTES, attention_params, expert_bytes
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
    """Weight bytes where they live, in the spec's dtype and expert format. The KV cache and
    activations come on top of `device`."""

    non_expert: int  # on the device always (embeddings, attention, routers, dense MLPs, shared experts)
    per_expert: int  # one routed expert, packed when the format is int8 / int4
    all_experts: int
    plan: CachePlan | None  # the device expert cache; None: every expert resident on the device, or on the host
    on_host: bool = False  # every routed expert lives, and is computed, on the host (placement: host)

    @property
    def cache(self) -> int | None:
        return None if self.plan is None else self.plan.total_bytes

    @property
    def device(self) -> int:
        if self.on_host:
            return self.non_expert
        return self.non_expert + (self.all_experts if self.cache is None else self.cache)

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
    non_expert = (m.vocab_size * h * (1 if m.tie_word_embeddings else 2)
                  + sum(attention_params(spec, i) for i in range(m.num_layers))
                  + mlp_layers * 3 * h * m.intermediate_size + len(moe_layers) * (shared + h * 2)) * dt
    non_expert += len(moe_layers) * m.moe.num_experts * h * 4  # float32 routers
    per_expert = expert_bytes(spec)
    return MemoryPlan(non_expert, per_expert, per_expert * m.moe.num_experts * len(moe_layers), cache_plan(spec),
                      on_host=spec.policy.traits.placement == "host" and bool(moe_layers))


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
    if plan is not None and placement != "move":
        where += ("; a decoded token's misses are computed on the host and copied in behind" if placement == "both"
                  else "; each miss of a decoded token is moved or computed on the host, whichever finishes the "
                       "layer sooner (mobile.moe.placement)")
    lines = [f"non-expert weights (always on device, {spec.dtype}): {human_bytes(mp.non_expert)}",
             f"routed experts ({fmt_text}): {len(spec.moe_layers)} layers x {m.moe.num_experts} x "
             f"{human_bytes(mp.per_expert)} = {human_bytes(mp.all_experts)}",
             f"policy {spec.policy.name}: {where}"]
    if plan is not None and plan.clamped:
        lines.append(f"the cache budget holds more than the model's {m.moe.num_experts} experts per layer: "
                     f"{plan.main} main slots per layer are used, the rest of the budget is not")
    lines.append(f"device memory: {human_bytes(mp.device)} of weights (+ KV cache and activations); host RAM for "
                 f"experts: {human_bytes(mp.host) if mp.host else 'none'}")
    return lines


def memory_problems(spec: Spec, device_memory: int | None = None, host_ram: int | None = None) -> list[str]:
    """Where the plan does not fit: the device's memory (given, or known for runtime.plan.device)
    and the host RAM (when given)."""
    mp, out = memory_plan(spec), []
    device = spec.runtime.plan.device
    limit = device_memory if device_memory is not None else KNOWN_DEVICE_MEMORY.get(device.lower())
    source = "--device-memory" if device_memory is not None else f"{device}'s memory"
    if limit is not None and mp.device > limit:
        hint = "" if spec.policy.traits.offloads else \
            "; an offloading policy (e.g. --policy mobile) keeps experts in host RAM"
        out.append(f"the device needs {human_bytes(mp.device)} of weights, more than {source} "
                   f"({human_bytes(limit)}){hint}")
    if host_ram is not None and mp.host > host_ram:
        out.append(f"the host expert store needs {human_bytes(mp.host)}, more than --host-ram ({human_bytes(host_ram)})"
                   + ("" if spec.runtime.expert_format == "int4" else "; --expert-format int4 packs experts ~4x "
                      "smaller than bf16"))
    return out
