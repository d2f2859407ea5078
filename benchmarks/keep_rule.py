"""The keep rule on a CPU, side by side in one run: its torch ops (mobile.moe.rule, the definition)
against its C kernel (kernels/keep_rule.c, mobile.moe.rule_kernel), per call of KeepRule.status
(the plan's) and KeepRule.pairs (the op's), on one decoded token's routes.

    python benchmarks/keep_rule.py [--rule "prefix n=2 tau=0.85 cached"] [--experts 16] [--top-k 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from mobile.moe import rule_kernel
from mobile.moe.rule import KeepRule


def us_per_call(fn, calls: int) -> float:
    for _ in range(calls // 10):  # warm-up
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rule", default="prefix n=2 tau=0.85 cached", help="the rule's text (the demo's mobile rule)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=5, help="rounds, alternating the two; the median is reported")
    args = p.parse_args()
    torch.set_num_threads(1)
    if rule_kernel.library() is None:
        raise SystemExit("no C compiler: the kernel cannot be built here")
    g = torch.Generator().manual_seed(0)
    rule = KeepRule.parse(args.rule)
    weights, ids = torch.topk(torch.randn(args.tokens, args.experts, generator=g).softmax(-1), args.top_k, dim=-1)
    slot_map = torch.where(torch.rand(args.experts, generator=g) < 0.5, torch.arange(args.experts), -1)
    kernel_takes = rule_kernel.takes
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for path in ("torch ops", "C kernel"):
            rule_kernel.takes = kernel_takes if path == "C kernel" else (lambda *tensors: False)
            for name, fn in (("status", lambda: rule.status(weights, ids, slot_map)),
                             ("pairs", lambda: rule.pairs(weights, ids, slot_map))):
                times.setdefault((name, path), []).append(us_per_call(fn, args.calls))
    rule_kernel.takes = kernel_takes
    print(f"rule {args.rule!r}, {args.tokens} token(s), top {args.top_k} of {args.experts}; median of "
          f"{args.repeats}, this CPU, 1 torch thread")
    for name in ("status", "pairs"):
        ops, c = (sorted(times[(name, path)])[args.repeats // 2] for path in ("torch ops", "C kernel"))
        print(f"  {name:7s} torch ops {ops:6.1f} us   C kernel {c:5.1f} us   {ops / c:4.1f}x")


if __name__ == "__main__":
    main()
