"""Where a decode token's time goes on the CPU: waiting for the link, the weight-reading ops, other
torch ops, and the host's own Python.

    python benchmarks/decode_profile.py [--tokens 64] [--threads 1] [--compile]
    python benchmarks/decode_profile.py --graph graphs/demo --policy mobile --link-gbps 0.19 \
        --text demo/data/heldout_kjv.txt

Default: the random OLMoE-style model of benchmarks/decode_vs_transformers.py (hidden 256, 4
layers), `resident`, greedy decoding. With --graph: that graph under --policy, teacher-forced on
--text when given, over an emulated link of --link-gbps (fixed, so that two checkouts see the same
link). "Weight ops" read model weights (mm, addmm, bmm, grouped_mm, embedding_bag, SDPA); "other
ops" are the rest of torch's calls; "host" is what is left of the wall time: Python, the executor,
the expert cache. Uses only mobile's public Engine API, so the same script profiles an older
checkout (PYTHONPATH=that/checkout).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny import build_tiny  # noqa: E402

import mobile  # noqa: E402
from mobile.cli import main as cli  # noqa: E402

WEIGHT_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "aten::_embedding_bag_forward_only",
              "aten::_embedding_bag", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_attention_math")


def random_olmoe() -> Path:
    root = Path(tempfile.mkdtemp())
    build_tiny("olmoe", root / "ckpt", hidden_size=256, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=4)
    cli(["import-hf", str(root / "ckpt"), "-o", str(root / "spec.yaml")])
    cli(["compile", str(root / "spec.yaml"), "-o", str(root / "graph")])
    return root / "graph"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", help="a compiled graph (default: a random OLMoE-style model, resident)")
    p.add_argument("--policy", help="with --graph: the policy to profile (default: the graph's)")
    p.add_argument("--link-gbps", type=float, default=0.19, help="with --graph: the emulated link (default 0.19)")
    p.add_argument("--text", help="with --graph: teacher-forced decoding of this text")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    graph = Path(args.graph) if args.graph else random_olmoe()
    options = {"policy": args.policy, "link_gbps": args.link_gbps} if args.graph else {}
    engine = mobile.Engine.load(graph, compile=args.compile, **options)
    if args.text:
        ids = torch.tensor(engine.tokenizer.encode(Path(args.text).read_text())[:32 + args.tokens])
        prompt, forced = ids[:32], ids[32:].tolist()
    else:
        prompt, forced = torch.randint(3, 97, (32,), generator=torch.Generator().manual_seed(0)), None

    def decode(on_token=None) -> dict:
        engine.reset_stats()
        engine.generate(prompt, args.tokens, stop_ids=[], forced=forced, on_token=on_token)
        return engine.stats

    decode()  # warm-up (and compile)
    s = decode()
    n = s["decode_tokens"]
    plain = s["decode_s"] / n
    prof = profile(activities=[ProfilerActivity.CPU])

    def start_at_the_first_token(token: int) -> None:  # the prompt is done: profile decoding only
        if not prof.profiler:
            prof.start()

    s = decode(start_at_the_first_token)
    prof.stop()
    wall, stall = s["decode_s"] / n, s.get("decode_stall_s", 0.0) / n  # the profiled run's, to add up
    events = prof.key_averages()
    aten = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / n / 1e6
    weights = sum(e.self_cpu_time_total for e in events if e.key in WEIGHT_OPS) / n / 1e6
    calls = sum(e.count for e in events if e.key.startswith("aten::")) / n
    link = f", link {args.link_gbps} GB/s (emulated)" if args.graph else ""
    print(f"\nmobile {mobile.__file__}: {engine.spec.policy.name}, {n} decode tokens, {args.threads} thread(s)"
          + (", --compile" if args.compile else "") + link)
    print(f"per token: {plain * 1e6:.0f} us; profiled, {wall * 1e6:.0f} us = link stall {stall * 1e6:.0f} + "
          f"weight ops {weights * 1e6:.0f} + other torch ops {(aten - weights) * 1e6:.0f} + host "
          f"{(wall - stall - aten) * 1e6:.0f} ({calls:.0f} torch calls)")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"  {e.key:<50} {e.self_cpu_time_total / n:>8.1f} us/token  {e.count / n:>6.1f} calls")


if __name__ == "__main__":
    main()
