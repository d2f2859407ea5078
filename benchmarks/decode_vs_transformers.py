"""CPU decode speed of mobile's `resident` policy next to transformers' own `generate`, same model, same run.

    python benchmarks/decode_vs_transformers.py [--family olmoe] [--tokens 64] [--threads 1]

Builds a small random checkpoint of the family (transformers config class + save_pretrained),
compiles it with mobile, then times greedy decoding of the same prompt in both, alternating
repeats so that machine noise hits both alike. Prints tokens/s and the ratio; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny import build_tiny  # noqa: E402

import mobile  # noqa: E402
from mobile.cli import main as cli  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="olmoe")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time mobile with --compile")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp())
    # larger than the test models, so per-token work is not all Python overhead
    hf = build_tiny(args.family, root / "ckpt", hidden_size=256, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=4)
    cli(["import-hf", str(root / "ckpt"), "-o", str(root / "spec.yaml")])
    cli(["compile", str(root / "spec.yaml"), "-o", str(root / "graph")])
    prompt = torch.randint(3, 97, (32,), generator=torch.Generator().manual_seed(0))
    engines = {"mobile resident (eager)": mobile.Engine.load(root / "graph")}
    if args.compile:
        engines["mobile resident (--compile)"] = mobile.Engine.load(root / "graph", compile=True)

    def run_hf() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(prompt[None], max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
        return args.tokens / (time.perf_counter() - t0)

    def run_mobile(engine) -> float:
        engine.reset_stats()
        engine.generate(prompt, args.tokens, stop_ids=[])
        return engine.stats["decode_tokens_per_s"]

    results: dict[str, list[float]] = {"transformers generate": []} | {k: [] for k in engines}
    run_hf()
    for e in engines.values():
        run_mobile(e)  # warm-up (and compile)
    for _ in range(args.repeats):
        results["transformers generate"].append(run_hf())
        for name, e in engines.items():
            results[name].append(run_mobile(e))
    base = statistics.median(results["transformers generate"])
    print(f"\n{args.family}, hidden 256, 4 layers, {args.tokens} new tokens, {args.threads} thread(s), CPU, "
          f"median of {args.repeats}")
    print(f"{'engine':<30} {'decode tok/s':>12} {'ratio':>7}")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"{name:<30} {med:>12.1f} {med / base:>6.2f}x")
    print("note: transformers' figure includes its prefill of the 32-token prompt; mobile's decode figure does not")


if __name__ == "__main__":
    main()
