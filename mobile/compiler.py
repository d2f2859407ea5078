"""`mobile compile`: spec file -> verified, scheduled graph -> graphs/NAME/."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from mobile.budget import cache_plan
from mobile.costs import DTYPE_BYTES, attention_params, expert_bytes
from mobile.emit import human_bytes, write_graph_dir
from mobile.ir import Graph
from mobile.passes import compile_spec, spec_of
from mobile.spec import Spec, load_spec, with_policy


def compile_to_dir(spec_path: str | Path, out_dir: str | Path | None = None,
                   policy: str | None = None, policy_options: dict | None = None) -> tuple[Path, Graph]:
    """policy_options: other policy fields to override (tau, little_k, layer_tau, ...)."""
    spec = load_spec(spec_path)
    changes = dict(policy_options or {})
    if policy is not None:
        changes["name"] = policy
    if changes:
        spec = with_policy(spec, **changes)
    out = Path(out_dir) if out_dir is not None else Path("graphs") / spec.name
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


def memory_plan(g: Graph) -> list[str]:
    """What the device must hold, in the spec's dtype; shown by `mobile compile`."""
    spec = spec_of(g)
    m = spec.model
    dt = DTYPE_BYTES[spec.dtype]
    h = m.hidden_size
    moe_layers = spec.moe_layers
    dense_layers = [i for i in range(m.num_layers) if i not in moe_layers]
    shared = 3 * h * m.moe.shared_expert.intermediate_size
    non_expert = (m.vocab_size * h * (1 if m.tie_word_embeddings else 2) + m.num_layers * attention_params(spec)
                  + len(dense_layers) * 3 * h * m.intermediate_size + len(moe_layers) * (shared + h * 2)) * dt
    non_expert += len(moe_layers) * m.moe.num_experts * h * 4  # float32 routers
    per_expert = expert_bytes(spec)
    all_experts = per_expert * m.moe.num_experts * len(moe_layers)
    plan = cache_plan(spec)
    where = "all experts resident on the device" if plan is None else (
        f"experts stream from host memory into a device cache of {plan.main + plan.staging} slots per layer "
        f"(at most {plan.staging} of them prefetched, not yet used) = {human_bytes(plan.total_bytes)}")
    return [f"non-expert weights (always on device): {human_bytes(non_expert)}",
            f"routed experts: {len(moe_layers)} layers x {m.moe.num_experts} x {human_bytes(per_expert)} "
            f"= {human_bytes(all_experts)}",
            f"policy {spec.policy.name}: {where}"]
