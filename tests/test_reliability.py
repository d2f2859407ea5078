"""Long runs hold steady. Slow: run with `pytest -m slow`."""

from __future__ import annotations

import resource

import pytest
import torch
from conftest import run_cli
from tiny import build_tiny

import mobile


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.slow
def test_2000_tokens_under_lru_prefetch_hold_flat_memory(tmp_path):
    # 16 experts, top-4, a pool of 4 + 1 slots per layer (the minimum): most experts are out of the cache
    build_tiny("olmoe", tmp_path / "ckpt", max_position_embeddings=4096, num_experts=16)
    assert run_cli("import-hf", tmp_path / "ckpt", "-o", tmp_path / "s.yaml") == 0
    text = (tmp_path / "s.yaml").read_text()
    (tmp_path / "s.yaml").write_text(text.replace("runtime:\n", "runtime:\n  expert_cache:\n    slots_per_layer: 4\n"))
    assert run_cli("compile", tmp_path / "s.yaml", "-o", tmp_path / "g", "--policy", "lru-prefetch") == 0
    engine = mobile.Engine.load(tmp_path / "g", link_gbps=50.0)
    samples: dict[int, int] = {}

    def on_token(_: int) -> None:
        n = len(samples_tokens)
        samples_tokens.append(n)
        if n in (500, 1000, 1500, 1999):
            samples[n] = rss_bytes()

    samples_tokens: list[int] = []
    out = engine.generate(torch.arange(3, 11), 2000, stop_ids=[], on_token=on_token)
    engine.close()
    assert len(out) == 2000
    growth = samples[1999] - samples[500]
    print(f"RSS after 500 tokens {samples[500] / 2**20:.1f} MiB, after 2000 {samples[1999] / 2**20:.1f} MiB "
          f"(+{growth / 2**20:.2f} MiB); misses {engine.stats['expert_misses']}, "
          f"prefetch used {engine.stats['prefetch_used']}/{engine.stats['prefetch_issued']}")
    # the KV cache grows by design (3 layers x 2 x 2 heads x 8 dims x 4 B = 384 B per position: 0.6 MiB);
    # anything beyond a few MiB would be a leak in the cache, the copy engine or the executor
    assert growth < 4 * 2**20
