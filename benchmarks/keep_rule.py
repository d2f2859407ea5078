"""The keep rule's cost per call of KeepRule.status (the plan's) and KeepRule.pairs (the op's), on
one step's routes, side by side in one run:
- on the CPU: its torch ops (mobile.moe.rule, the definition) against its C kernel
  (kernels/keep_rule.c, mobile.moe.rule_kernel), which eager CPU runs use;
- on CUDA (--device cuda): the torch ops launched one by one against the same ops replayed from a
  CUDA graph, as a segment's graph holds them, and what that comes to per token over a model's MoE
  layers (--layers; 48 is Qwen3-30B-A3B).

    python benchmarks/keep_rule.py [--rule "prefix n=2 tau=0.85 cached"] [--experts 16] [--top-k 4]
    python benchmarks/keep_rule.py --device cuda --experts 128 --top-k 8 --layers 48
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from mobile.moe import rule_kernel
from mobile.moe.rule import KeepRule


def us_per_call(fn: Callable[[], object], calls: int, cuda: bool = False) -> float:
    for _ in range(max(1, calls // 10)):  # warm-up
        fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def replayed(fn: Callable[[], object]) -> Callable[[], None]:
    """fn's ops captured in a CUDA graph (after a warm-up on a side stream, as capture asks): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rule", default="prefix n=2 tau=0.85 cached", help="the rule's text (the demo's mobile rule)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--layers", type=int, default=48, help="CUDA: MoE layers a token crosses (the per-token line)")
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=5, help="rounds, alternating the two ways; the median is reported")
    args = p.parse_args()
    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if not cuda and rule_kernel.library() is None:
        raise SystemExit("no C compiler: the kernel cannot be built here")
    g = torch.Generator().manual_seed(0)
    rule = KeepRule.parse(args.rule)
    weights, ids = torch.topk(torch.randn(args.tokens, args.experts, generator=g).softmax(-1), args.top_k, dim=-1)
    slot_map = torch.where(torch.rand(args.experts, generator=g) < 0.5, torch.arange(args.experts), -1)
    weights, ids, slot_map = (t.to(args.device) for t in (weights, ids, slot_map))
    calls = {"status": lambda: rule.status(weights, ids, slot_map), "pairs": lambda: rule.pairs(weights, ids, slot_map)}
    if cuda:  # the kernel is the CPU's: on CUDA the torch ops run either way
        ways = {"launched": dict(calls), "graph replay": {name: replayed(fn) for name, fn in calls.items()}}
    else:
        def on_path(fn, kernel: bool):
            def call():
                rule_kernel.enabled = kernel
                return fn()
            return call

        ways = {"torch ops": {n: on_path(fn, False) for n, fn in calls.items()},
                "C kernel": {n: on_path(fn, True) for n, fn in calls.items()}}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for way, fns in ways.items():
            for name, fn in fns.items():
                times.setdefault((name, way), []).append(us_per_call(fn, args.calls, cuda))
    rule_kernel.enabled = True
    first, second = ways
    print(f"rule {args.rule!r}, {args.tokens} token(s), top {args.top_k} of {args.experts}; median of "
          f"{args.repeats}, {torch.cuda.get_device_name() if cuda else 'this CPU, 1 torch thread'}")
    median = {key: sorted(v)[args.repeats // 2] for key, v in times.items()}
    for name in calls:
        a, b = median[(name, first)], median[(name, second)]
        print(f"  {name:7s} {first} {a:7.1f} us   {second} {b:7.1f} us   {a / b:4.1f}x")
    if cuda:
        per_token = {way: sum(median[(name, way)] for name in calls) * args.layers / 1e3 for way in ways}
        print(f"  per token over {args.layers} MoE layers (status + pairs): "
              + ", ".join(f"{way} {ms:.2f} ms" for way, ms in per_token.items()))


if __name__ == "__main__":
    main()
