"""Loading an engine: its graph and spec (recompiled for another policy or expert format), its
checkpoint, its dense weights and its expert cache, and the choices made once per engine (CUDA
graphs, the link)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mobile import policy as policies
from mobile.compiler.budget import CachePlan
from mobile.compiler.costs import expert_bytes
from mobile.compiler.emit import load_graph
from mobile.compiler.ir import Graph
from mobile.compiler.passes import compile_spec
from mobile.errors import CheckpointError, MobileError, SpecError
from mobile.models.weights import WeightStore
from mobile.moe.cache import ExpertCache, OffloadedCache, ResidentCache
from mobile.moe.host import HostExperts, default_threads
from mobile.moe.hostcache import HostCache
from mobile.moe.hostwork import HostModel, HostPlacement, HostWorker
from mobile.moe.layout import ExpertMLP, packed_layout
from mobile.moe.placement import Costs
from mobile.moe.profile import load_profile
from mobile.moe.transfer import LinkModel, calibrated_gbps, expert_compute_seconds
from mobile.runtime.hostio import HostReader
from mobile.runtime.stats import Stats
from mobile.spec.load import spec_from_dict, with_policy, with_runtime
from mobile.spec.schema import Spec


def load_dense(spec: Spec, store: WeightStore, needs: dict, device: torch.device, dtype: torch.dtype,
               bar) -> dict[tuple[str, int | None], torch.Tensor]:
    """Every weight but the routed experts', on the device, keyed (name, layer); needs: what the
    checkpoint was checked to hold (mobile.models.weights.check_checkpoint)."""
    weights = {}
    for (key, layer, expert), t in needs.items():
        if expert is not None:
            continue
        # routers (and DeepSeek-V3's selection bias) stay float32, as transformers keeps them:
        # routing decisions must not flip with the compute dtype
        weights[(key, layer)] = store.get(t.name, dtype=torch.float32 if t.key in ("router", "router_correction")
                                          else dtype, device=device)
        bar.update(1)
    return weights


def expert_cache(spec: Spec, store: WeightStore, device: torch.device, dtype: torch.dtype, stats: Stats,
                 reader: HostReader, plan: CachePlan | None, bar, track_use: bool, trace: list | None,
                 compile: bool, link_gbps: float | None, link_ratio: float | None,
                 host_units: dict[str, float] | None = None) -> ExpertCache:
    """Every expert on the device (no plan: a resident policy, or an eval that asks for it), or a
    bounded cache over the host link: the real one on a GPU, an emulated one on a CPU, whose
    bandwidth is given or calibrated (mobile.moe.transfer.calibrated_gbps). host_units: an emulated
    host's unit per expert format, where given (host_worker)."""
    host_pair_us = (host_units or {}).get(spec.runtime.expert_format)
    if spec.policy.traits.placement == "host":
        worker, _ = host_worker(spec, device, dtype, trace, host_pair_us)
        return HostCache(spec, store, device, dtype, stats, worker, progress=bar)
    if plan is None:
        return ResidentCache(spec, store, device, dtype, stats, reader, progress=bar, track_use=track_use)
    emulate = device.type != "cuda"  # a CPU has no real link to move experts over, so one is emulated
    link = LinkModel("emulated", latency_s=spec.runtime.link.latency_us * 1e-6) if emulate else LinkModel("real")
    if emulate:
        link.gbps, calibration = calibrated_gbps(spec, device, dtype, link_gbps, link_ratio)
        stats.extra.update(calibration, link_gbps=round(link.gbps, 4))
        if host_pair_us is None and spec.runtime.expert_format == "native":  # one measured unit for R and Hc
            host_pair_us = calibration.get("expert_compute_us")
    placement = spec.policy.effective_placement
    host = host_placement(spec, device, dtype, link, trace, stats, host_pair_us) \
        if placement in policies.PLACED else None
    cache = OffloadedCache(spec, store, device, dtype, stats, plan, link, trace=trace, progress=bar, compiled=compile,
                           host=host)
    if placement == "static":
        hot_set(cache, spec, plan)
    return cache


def hot_set(cache: OffloadedCache, spec: Spec, plan: CachePlan) -> None:
    """hybrid-static: each layer's plan.main most-used experts of its routing profile, loaded once
    (mobile.moe.profile); the stats say how much of the profiled routing they cover."""
    if spec.policy.profile is None:
        raise MobileError("hybrid-static keeps each layer's most-used experts on the device and needs a routing "
                          "profile to know them: `mobile profile --graph G --text FILE -o P`, then --profile P",
                          key="--profile")
    profile = load_profile(spec.policy.profile, spec, key="--profile")
    hot = {layer: profile.hot(layer, plan.main) for layer in spec.moe_layers}
    cache.load_static(hot)
    cover = sum(profile.coverage(layer, plan.main) for layer in spec.moe_layers) / len(spec.moe_layers)
    cache.stats.extra.update(static_experts_per_layer=plan.main, static_profile_coverage=round(cover, 4))


def host_placement(spec: Spec, device: torch.device, dtype: torch.dtype, link: LinkModel,
                   trace: list | None, stats: Stats, host_pair_us: float | None = None) -> HostPlacement:
    """The host as a second place for a cache's misses: its worker, and the costs the placement
    rule weighs (a move over the link; a pair on the device and on the host). adaptive: the rule
    where the host can win a miss at all, a one-pair miss with both queues idle (a pair on the host
    finishes before a move and a pair on the device), else every miss moved; the stats say which.
    On a CPU-only machine those costs are measured (and emulated); on CUDA the device's is measured
    and the host's and the link's are the plan's (host_gbps, link_gbps)."""
    worker, device_pair = host_worker(spec, device, dtype, trace, host_pair_us)
    # on CUDA the host and the link are real: their costs are first the plan's (bytes over the
    # host's read bandwidth, and over the link's)
    host_pair = worker.model.ratio * device_pair if worker.model.kind == "emulated" else \
        expert_bytes(spec) / (spec.runtime.plan.host_gbps * 1e9)
    move = link.duration(expert_bytes(spec)) if link.kind == "emulated" else \
        expert_bytes(spec) / (spec.runtime.plan.link_gbps * 1e9)
    placement = spec.policy.effective_placement
    rule: str = placement if placement in ("both", "static") else "choose"
    if placement == "adaptive":
        rule = "choose" if host_pair < move + device_pair else "move"
        stats.extra["placement_rule"] = rule
    return HostPlacement(rule, worker, Costs(move, device_pair, host_pair))


def host_worker(spec: Spec, device: torch.device, dtype: torch.dtype, trace: list | None,
                pair_us: float | None = None) -> tuple[HostWorker, float]:
    """The host expert kernel for the spec's experts on its worker, and the device's measured time
    for one of those experts and one token. The host is timed as it runs on CUDA (it is this
    machine's CPU); on a CPU-only machine it is emulated at --host-ratio times that time, or times
    pair_us where given (a bench measures it once for all its rows, as it calibrates the link once)."""
    emulated = device.type != "cuda"
    device_pair = pair_us * 1e-6 if emulated and pair_us is not None else \
        expert_compute_seconds(spec, device, dtype, packed=True)
    model = HostModel("emulated", spec.policy.host_ratio, device_pair) if emulated else HostModel("real")
    threads = spec.policy.host_threads or default_threads()
    kernel = HostExperts(ExpertMLP.of_spec(spec), dtype, packed_layout(spec), threads)
    return HostWorker(kernel, model, trace), device_pair


def graphs_enabled(setting: str | None, spec: Spec, device: torch.device) -> bool:
    """--cuda-graphs (else runtime.cuda_graphs): auto is on for CUDA and off for the CPU; on, on the
    CPU, runs the static-buffer runner without capture (mobile.runtime.graphs)."""
    setting = spec.runtime.cuda_graphs if setting is None else setting
    if setting not in ("auto", "on", "off"):
        raise MobileError(f"expected auto, on or off, got {setting!r}", key="--cuda-graphs")
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def refuse_emulated_link(device: torch.device, spec: Spec, link_gbps: float | None, link_ratio: float | None) -> None:
    """On CUDA the experts cross the real link: a request to emulate one there would not happen,
    and the stats would claim it did."""
    key = "--link-gbps" if link_gbps is not None else "--link-ratio" if link_ratio is not None else \
        "runtime.link.kind" if spec.runtime.link.kind == "emulated" else None
    if key is not None:
        raise MobileError(f"an emulated link runs only on the CPU; on {device} experts cross the real host link "
                          f"(leave {key} out)", key=key)


def resolve_policy(graph_dir: Path, policy: str | None = None, policy_options: dict | None = None,
                   runtime: dict | None = None) -> tuple[Graph, Spec]:
    """A compiled graph and its spec, recompiled when another policy (or policy option) or runtime
    field (the expert format) is asked for."""
    graph = load_graph(graph_dir)
    try:
        spec = spec_from_dict(graph.spec, source=str(graph_dir / "graph.json"))
    except SpecError as e:
        raise SpecError(f"the spec embedded in the graph is invalid: {e.message}", where=e.where,
                        key=e.key and f"spec.{e.key}") from None
    changes = {k: v for k, v in (policy_options or {}).items() if v is not None}
    if policy is not None and policy != spec.policy.name:
        changes["name"] = policy
    runtime = {k: v for k, v in (runtime or {}).items() if getattr(spec.runtime, k) != v}
    if changes or runtime:
        # another policy or format lowers to another graph (prefetch nodes, cache sizes): compile it
        # now, from the spec the graph was built from
        spec = with_runtime(with_policy(spec, **changes), **runtime)
        graph = compile_spec(spec)
    return graph, spec


def checkpoint_experts(graph: Graph, spec: Spec, store: WeightStore, requested: str | None) -> tuple[Graph, Spec]:
    """A quantized checkpoint carries its expert format, and runs with it whatever the spec says
    (recompiled: the cache holds more packed experts); an explicit other format is an error."""
    if store.expert_format is None:
        return graph, spec
    fmt, group = store.expert_format
    if requested is not None and requested != fmt:
        raise MobileError(f"the checkpoint {store.dir} holds {fmt} experts (group size {group}); --expert-format "
                          f"{requested} needs a native checkpoint or one quantized to {requested}",
                          key="--expert-format")
    if (spec.runtime.expert_format, spec.expert_group) != (fmt, group):
        spec = with_runtime(spec, expert_format=fmt, expert_group_size=group)
        graph = compile_spec(spec)
    return graph, spec


def resolve_checkpoint(graph: Graph, graph_dir: Path) -> Path:
    path = graph.spec.get("checkpoint", {}).get("path")
    if not path:
        raise CheckpointError("the graph names no checkpoint; pass --weights DIR",
                              where=graph_dir / "graph.json", key="spec.checkpoint.path")
    p = Path(os.path.expanduser(path))
    p = p if p.is_absolute() else (graph_dir / p)
    if not p.is_dir():
        # relative paths resolve against the graph folder: a graph moved without its checkpoint lands here
        raise CheckpointError(f"the graph's checkpoint folder {p} does not exist (was the graph or the checkpoint "
                              "moved?); pass --weights DIR", where=graph_dir / "graph.json", key="spec.checkpoint.path")
    return p


def read_eos_ids(ckpt_dir: Path) -> list[int]:

    for name in ("generation_config.json", "config.json"):
        f = ckpt_dir / name
        if f.exists():
            try:
                eos = json.loads(f.read_text()).get("eos_token_id")
            except json.JSONDecodeError:
                continue
            if eos is not None:
                return list(eos) if isinstance(eos, list) else [int(eos)]
    return []
