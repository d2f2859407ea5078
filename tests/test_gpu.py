"""CUDA-only checks: pinned host store, copy stream and events. Skipped cleanly without a GPU
(run with `pytest -m gpu` on a machine that has one)."""

from __future__ import annotations

import pytest
import torch

import mobile

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT = torch.randint(3, 97, (20,), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("policy", ["resident", "ondemand", "lru", "lru-prefetch", "little", "mobile", "layer-mass"])
def test_cuda_policies_match_cpu(tiny, policy):
    t = tiny("qwen2_moe")
    cpu = mobile.Engine.load(t.graph, policy=policy)
    gpu, again = (mobile.Engine.load(t.graph, device="cuda", policy=policy) for _ in range(2))
    try:
        torch.testing.assert_close(gpu.logits(PROMPT), cpu.logits(PROMPT), atol=1e-4, rtol=1e-4)
        again.logits(PROMPT)  # the same history as gpu's
        # the same tokens on two runs with the same history: the copy streams' timing must not change
        # what is computed (the cache-aware little pass takes only experts a wait has covered)
        first = gpu.generate(PROMPT, 16, stop_ids=[])
        assert again.generate(PROMPT, 16, stop_ids=[]) == first
        if policy in ("resident", "ondemand", "lru", "lru-prefetch"):  # big decoding: the CPU's tokens
            assert first == cpu.generate(PROMPT, 16, stop_ids=[])
        if policy != "resident":
            assert gpu.stats["link"] == "real" and gpu.stats["bytes_h2d"] > 0
            assert all(h.is_pinned() for h in gpu.experts.host.values())
    finally:
        gpu.close()
        again.close()


def offloaded(t, tmp_path, device="cuda", trace=False):
    graph = t.compile(tmp_path, "--policy", "lru", slots_per_layer=4)  # too few slots: copies every step
    return mobile.Engine.load(graph, device=device, trace=trace)


def test_pinned_bytes_equal_needed_bytes(tiny, tmp_path):
    t = tiny("olmoe")
    engine = offloaded(t, tmp_path)
    try:
        s = engine.stats
        needed = sum(h.numel() * h.element_size() for h in engine.experts.host.values())
        assert s["pinned_host_bytes"] == s["host_expert_bytes"] == needed  # one registered allocation
        assert all(h.is_pinned() for h in engine.experts.host.values())
    finally:
        engine.close()


def test_cuda_events_measure_stall_link_and_trace(tiny, tmp_path):
    t = tiny("olmoe")
    engine = offloaded(t, tmp_path, trace=True)
    try:
        engine.generate(PROMPT, 16, stop_ids=[])
        s = engine.stats
        assert s["link"] == "real" and s["bytes_h2d"] > 0
        assert s["link_busy_s"] > 0 and s["stall_s"] > 0
        engine.write_trace(tmp_path / "t.json")
        copies = [e for e in engine.trace if e[2] == "copy"]
        computes = [e for e in engine.trace if e[2] == "compute"]
        assert copies and all(end > start for _, _, _, start, end, _ in copies)
        assert computes and all(isinstance(e[3], float) or e[3].query() for e in computes)
    finally:
        engine.close()


def test_emulated_link_is_refused_on_cuda(tiny, tmp_path, capsys):
    from conftest import run_cli

    t = tiny("olmoe")
    graph = t.compile(tmp_path, "--policy", "lru", slots_per_layer=4)
    assert run_cli("run", "--graph", graph, "--device", "cuda", "--prompt-ids", "5,6", "--link-gbps", "8") == 2
    assert "--link-gbps: an emulated link runs only on the CPU" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_waits_for_its_own_copies(tiny, tmp_path):
    """On cuda:1 while cuda:0 is current: compute must wait on cuda:1's streams, not cuda:0's."""
    t = tiny("olmoe")
    ref = mobile.Engine.load(t.graph).generate(PROMPT, 16, stop_ids=[])
    engine = offloaded(t, tmp_path, device="cuda:1")
    try:
        assert torch.cuda.current_device() == 0
        assert engine.generate(PROMPT, 16, stop_ids=[]) == ref
    finally:
        engine.close()
