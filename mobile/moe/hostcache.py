"""Every routed expert on the host, computed there (placement `host`: llama.cpp's --n-cpu-moe over
all layers): the ExpertCache of a policy that keeps no expert on the device and never uses the link.

A layer's host_experts node reads the router's choice and the layer's hidden rows from the device
in its one host read; `compute` keeps the pairs its keep rule keeps, runs them with the host
expert kernel (mobile.moe.host) on the host worker (mobile.moe.hostwork), and hands the output
back. On a CPU-only machine the device and the host are the same CPU, so the host's speed is
emulated: the kernel's time is padded to --host-ratio times the device's measured time for the
same expert (mobile.moe.hostwork.HostModel). On CUDA nothing is emulated.
"""

from __future__ import annotations

import torch

from mobile.models.weights import WeightStore
from mobile.moe.cache import FetchHandle
from mobile.moe.hoststore import load_host_store
from mobile.moe.hostwork import HostWorker, host_job
from mobile.moe.rule import KeepRule
from mobile.runtime.stats import Stats
from mobile.spec.schema import Spec


class HostCache:
    """The host store, the host expert kernel and its worker; nothing on the device."""

    link = "none"
    tracks_routes = False

    def __init__(self, spec: Spec, store: WeightStore, device: torch.device, dtype: torch.dtype, stats: Stats,
                 worker: HostWorker, progress=None):
        """worker: the host worker with the kernel for this spec's experts (mobile.runtime.load.host_worker)."""
        self.spec, self.stats, self.device, self.worker = spec, stats, device, worker
        self.store, self.rows = load_host_store(spec, store, dtype, pin=device.type == "cuda", progress=progress)
        self.experts = 0
        if self.store is not None:
            stats.extra["host_expert_bytes"] = self.store.nbytes

    def compute(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, rule: KeepRule,
                tag: str = "") -> torch.Tensor:
        """x [T, H] float32, weights [T, K] float32, ids [T, K] (host tensors, as the layer's read
        brought them) -> the layer's routed-expert output [T, H] float32, on the host: every pair the
        rule keeps, computed from the host store."""
        job = host_job(self.rows[layer], x, weights, ids, rule, tag=tag)
        self.experts += int(job.rows.unique().numel())  # each expert once per step, as the caches count
        out, blocked = self.worker.submit(job).wait()
        self.stats.stall_s += blocked  # the device waited for the host
        return out

    # -- the ExpertCache protocol: nothing is on the device, nothing moves --------------------------
    def slot_map(self, layer: int) -> torch.Tensor:
        return torch.full((self.spec.model.moe.num_experts,), -1, dtype=torch.long, device=self.device)

    def fetch(self, layer: int, entries: list[int], routes=None, tag: str = "") -> FetchHandle:
        raise AssertionError("a host placement's graph has no fetch nodes")

    def wait(self, handle: FetchHandle) -> torch.Tensor:
        raise AssertionError("a host placement's graph has no wait nodes")

    def prefetch(self, layer: int, ids: list[int], kind: str = "predicted", tag: str = "") -> None:
        """Nothing to stage: no expert lives on the device."""

    def arena(self, layer: int) -> torch.Tensor:
        return self.rows[layer]

    def expert_rows(self, layer: int) -> torch.Tensor | None:
        return self.rows.get(layer)

    def begin_forward(self) -> None:
        """Nothing to prepare: each layer's job is waited for inside its node."""

    def end_forward(self, refreshed: int = 0) -> None:
        """Nothing to settle."""

    def settle(self) -> None:
        """Every job has been waited for by its node."""

    def collect_stats(self) -> None:
        self.stats.extra.update(self.worker.stats(), experts_on_host=self.experts)

    def reset_counters(self) -> None:
        self.worker.busy_s = 0.0
        self.experts = 0

    @property
    def failure(self) -> BaseException | None:
        return self.worker.failure

    def close(self) -> None:
        self.worker.close()
        if self.store is not None:
            self.store.close()
