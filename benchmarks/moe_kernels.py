"""GPU only: the routed-expert op's Triton kernels against the native torch paths, at real layer shapes.

    python benchmarks/moe_kernels.py [--dtype bfloat16] [--repeats 50] [--formats int8,int4] [--group 64]

For OLMoE-1B-7B (H 2048, I 1024, 64 experts, top-8) and Qwen3-30B-A3B (H 2048, I 768, 128
experts, top-8), one layer with every expert in the arena: microseconds per layer call (CUDA
events, median), and the HBM bandwidth that reaches (the expert bytes the call must read: each
distinct expert it uses, once). Rows: the Triton decode and grouped variants, and the native path
(gathered weights for one token, one slot at a time for a prompt). T = 1, 8 and 512 tokens. The
ratios decide the op's defaults (kernels/experts.py DECODE_MAX_PAIRS; which path a prompt takes).
Then the same two Triton variants over packed experts (mobile.moe.quant: int8 with one scale per
output column, int4 with --group; dequantized in the kernel), with their ratio to the same variant
over the --dtype arena: what in-kernel dequantization costs or saves per layer.
Asserts nothing; checks each result against the reference first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial

import torch

from mobile.moe import formats, native, quant
from mobile.moe.layout import arena_views
from mobile.moe.reference import reference

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


def packed_arena(layout: quant.Layout, arena: torch.Tensor) -> torch.Tensor:
    """A native arena [E, 3*H*I] -> its experts quantized as the engine loads them, [E, row_bytes] uint8."""
    gate_up, down = arena_views(arena, layout.hidden)
    rows = [quant.quantize_matrices(layout, gu, d) for gu, d in zip(gate_up, down, strict=True)]
    return torch.stack(rows).to(arena.device)  # (packed rows are built in host memory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="activations, and the native arena the packed rows are compared with")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--formats", default="int8,int4", help="packed formats to time, comma-separated ('' for none)")
    p.add_argument("--group", type=int, default=64, help="int4 group size (int8: one group of all input rows)")
    args = p.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    if bad := set(args.formats) - {"int8", "int4"}:
        p.error(f"--formats: expected int8 and/or int4, got {', '.join(sorted(bad))}")
    for H, inter, _, _ in SHAPES.values():
        if "int4" in args.formats and (problem := formats.group_error("int4", args.group, {"H": H, "I": inter})):
            p.error(f"--group: {problem}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/moe_kernels.py needs a CUDA GPU")
    bench(args)


def bench(args: argparse.Namespace) -> None:
    from mobile.kernels import experts as kernels

    dtype = getattr(torch, args.dtype)
    print(f"{'model':<15} {'T':>4} {'path':<24} {'us/layer':>10} {'GB/s':>8} {'vs native':>10} "
          f"{'vs ' + args.dtype:>12}")
    for name, (H, inter, E, K) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        arena = (torch.randn(E, 3 * H * inter, device="cuda", generator=g) / H ** 0.5).to(dtype)
        native_bytes = 3 * H * inter * arena.element_size()
        layouts = {fmt: quant.Layout(fmt, args.group if fmt == "int4" else 0, H, inter) for fmt in args.formats}
        rows = {fmt: packed_arena(layout, arena) for fmt, layout in layouts.items()}
        dequantized = {fmt: layout.dequantize_rows(rows[fmt], torch.float32) for fmt, layout in layouts.items()}
        for T in (1, 8, 512):
            x = torch.randn(T, H, device="cuda", generator=g).to(dtype)
            weights, ids = torch.topk(torch.rand(T, E, device="cuda", generator=g).softmax(-1), K, dim=-1)
            slots = ids  # every expert resident, slot = expert
            experts_used = torch.unique(ids).numel()
            layer = (x, weights, slots, arena)
            # (label, fn, the reference's arena, bytes per expert, the row its "vs dtype" ratio is to)
            paths = [("native", partial(native.native, *layer), arena, native_bytes, None)]
            paths += [(f"triton {v}", partial(kernels.experts, *layer, v), arena, native_bytes, None)
                      for v in ("decode", "grouped")]
            for fmt, layout in layouts.items():
                for v in ("decode", "grouped"):
                    label = f"triton {v} {fmt}" + (f" g{layout.group}" if layout.group else "")
                    paths.append((label, partial(kernels.experts, x, weights, slots, rows[fmt], v, layout=layout),
                                  dequantized[fmt], layout.row_bytes, f"triton {v}"))
            times: dict[str, float] = {}
            for label, fn, ref_arena, expert_bytes, versus in paths:
                ref = reference(x, weights, slots, ref_arena)
                err = float((fn().float() - ref.float()).abs().max() / ref.float().abs().max())
                us = times[label] = time_us(fn, args.repeats)
                vs = f"{times[versus] / us:>11.2f}x" if versus else " " * 12
                print(f"{name:<15} {T:>4} {label:<24} {us:>10.1f} {experts_used * expert_bytes / us / 1e3:>8.0f} "
                      f"{times['native'] / us:>9.2f}x {vs}  (max rel err {err:.1e})")

if __name__ == "__main__":
    main()
