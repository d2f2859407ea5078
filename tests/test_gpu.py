"""CUDA-only checks: pinned host store, copy stream and events. Skipped cleanly without a GPU
(run with `pytest -m gpu` on a machine that has one)."""

from __future__ import annotations

import pytest
import torch

import mobile

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT = torch.randint(3, 97, (20,), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("policy", ["resident", "ondemand", "lru", "lru-prefetch"])
def test_cuda_policies_match_cpu(tiny, policy):
    t = tiny("qwen2_moe")
    cpu = mobile.Engine.load(t.graph)
    gpu = mobile.Engine.load(t.graph, device="cuda", policy=policy)
    try:
        torch.testing.assert_close(gpu.logits(PROMPT), cpu.logits(PROMPT), atol=1e-4, rtol=1e-4)
        assert gpu.generate(PROMPT, 16, stop_ids=[]) == cpu.generate(PROMPT, 16, stop_ids=[])
        if policy != "resident":
            assert gpu.stats["link"] == "real" and gpu.stats["bytes_h2d"] > 0
            assert all(h.is_pinned() for h in gpu.experts.host.values())
    finally:
        gpu.close()
