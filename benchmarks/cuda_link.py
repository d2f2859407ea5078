"""On a GPU: the host link as mobile uses it. The measured pinned H2D bandwidth (one registered
buffer, timed with CUDA events), then per policy on a compiled graph: decode tokens/s, the link's
busy share and the stall share of decode time (CUDA events), host reads per token, and pinned
against needed host bytes.

    python benchmarks/cuda_link.py --graph /tmp/synth8/graph --policies lru,lru-prefetch,mobile
"""

from __future__ import annotations

import argparse

import torch

import mobile
from mobile.moe.hoststore import HostStore


def pinned_h2d_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    store = HostStore(1, 1, nbytes, torch.uint8, pin=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src = store.views[0][0]
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    store.close()
    return nbytes / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", required=True)
    p.add_argument("--policies", default="lru,lru-prefetch,mobile")
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    print(f"pinned H2D: {pinned_h2d_gbps():.1f} GB/s (256 MiB, best of 5)")
    prompt = torch.randint(3, 1000, (32,), generator=torch.Generator().manual_seed(0))
    print(f"{'policy':<14} {'tok/s':>8} {'link busy':>10} {'stall':>7} {'reads/tok':>10} {'pinned/needed':>14}")
    for policy in args.policies.split(","):
        engine = mobile.Engine.load(args.graph, device="cuda", policy=policy)
        engine.generate(prompt, args.tokens, stop_ids=[])
        s = engine.stats
        decode = s["decode_s"]
        busy = s.get("link_busy_s", 0.0) / decode if decode else 0.0
        stall = s["decode_stall_s"] / decode if decode else 0.0
        pinned = s.get("pinned_host_bytes", 0) / max(1, s.get("host_expert_bytes", 0))
        print(f"{policy:<14} {s['decode_tokens_per_s']:>8.1f} {busy:>9.1%} {stall:>6.1%} "
              f"{s['host_syncs_per_token'] or 0:>10.2f} {pinned:>14.4f}")
        engine.close()


if __name__ == "__main__":
    main()
