"""GPU only: the routed-expert op's Triton kernels against the native torch paths, at real layer shapes.

    python benchmarks/moe_kernels.py [--dtype bfloat16] [--repeats 50]

For OLMoE-1B-7B (H 2048, I 1024, 64 experts, top-8) and Qwen3-30B-A3B (H 2048, I 768, 128
experts, top-8), one layer with every expert in the arena: microseconds per layer call (CUDA
events, median), and the HBM bandwidth that reaches (the expert bytes the call must read: each
distinct expert it uses, once). Rows: the Triton decode and grouped variants, and the native path
(gathered weights for one token, one slot at a time for a prompt). T = 1, 8 and 512 tokens. The
ratios decide the op's defaults (kernels/moe.py DECODE_MAX_PAIRS; which path a prompt takes).
Asserts nothing; checks each result against the reference first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial

import torch

from mobile import moe

SHAPES = {"olmoe-1b-7b": (2048, 1024, 64, 8), "qwen3-30b-a3b": (2048, 768, 128, 8)}


def time_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/moe_kernels.py needs a CUDA GPU")
    from mobile.kernels import moe as kernels

    dtype = getattr(torch, args.dtype)
    print(f"{'model':<15} {'T':>4} {'path':<16} {'us/layer':>10} {'GB/s':>8} {'vs native':>10}")
    for name, (H, inter, E, K) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        arena = (torch.randn(E, 3 * H * inter, device="cuda", generator=g) / H ** 0.5).to(dtype)
        for T in (1, 8, 512):
            x = torch.randn(T, H, device="cuda", generator=g).to(dtype)
            weights, ids = torch.topk(torch.rand(T, E, device="cuda", generator=g).softmax(-1), K, dim=-1)
            slots = ids  # every expert resident, slot = expert
            used = torch.unique(ids).numel() * 3 * H * inter * arena.element_size()
            ref = moe.reference(x, weights, slots, arena)
            layer = (x, weights, slots, arena)
            paths = {"native": partial(moe.native, *layer),
                     "triton decode": partial(kernels.experts, *layer, "decode"),
                     "triton grouped": partial(kernels.experts, *layer, "grouped")}
            base = None
            for label, fn in paths.items():
                err = float((fn().float() - ref.float()).abs().max() / ref.float().abs().max())
                us = time_us(fn, args.repeats)
                base = base or us
                print(f"{name:<15} {T:>4} {label:<16} {us:>10.1f} {used / us / 1e3:>8.0f} {base / us:>9.2f}x"
                      f"  (max rel err {err:.1e})")


if __name__ == "__main__":
    main()
