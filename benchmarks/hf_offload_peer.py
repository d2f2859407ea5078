"""A peer row for the offloading policies: transformers with accelerate's CPU offload, on the same
weights as mobile, in one run.

    python benchmarks/hf_offload_peer.py --device cuda --layers 8 --gpu-memory 6GiB

Builds a random model of OLMoE-1B-7B's shapes (its published config.json, cut to --layers layers)
with transformers' config class and `save_pretrained`, in bf16. transformers loads it back with
device_map "auto" and the GPU capped at --gpu-memory, so that accelerate keeps what does not fit on
the host and moves it in for every forward; mobile imports the same folder and decodes it with its
expert cache at the same device memory. Both decode the same prompt greedily; tokens/s and the
ratio are printed. Random routers route differently from trained ones. Needs `accelerate`; without
it, one line says so and the script exits 0. `--device cpu --layers 2 --hidden 256` is a smoke run
of the plumbing (no offload, nothing measured worth reporting).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import mobile
from mobile.cli import main as cli
from mobile.compiler.compile import memory_plan
from mobile.spec.load import load_spec
from mobile.spec.validate import parse_bytes


def build(out: Path, layers: int, hidden: int | None) -> None:
    import transformers as tf

    cfg = json.loads(Path("specs/hf/olmoe-1b-7b/config.json").read_text())
    cfg.update(num_hidden_layers=layers)
    if hidden:  # a smoke run: small enough for a CPU
        cfg.update(hidden_size=hidden, intermediate_size=hidden // 2, num_attention_heads=8, num_key_value_heads=8)
    config = tf.OlmoeConfig(**{k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"})
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = tf.OlmoeForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(out)


def tokens_per_s(fn, tokens: int) -> float:
    t0 = time.perf_counter()
    fn()
    return tokens / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, help="a smaller hidden size (smoke runs)")
    p.add_argument("--gpu-memory", default="6GiB", help="device memory both engines may use")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--policies", default="lru-prefetch,mobile")
    args = p.parse_args()
    try:
        import accelerate  # noqa: F401  (transformers' device_map offload needs it)
    except ImportError:
        print("accelerate is not installed: no transformers offload row (pip install accelerate)")
        return 0
    import transformers as tf

    root = Path(tempfile.mkdtemp())
    build(root / "ckpt", args.layers, args.hidden)
    prompt = torch.randint(3, 50000, (32,), generator=torch.Generator().manual_seed(0))
    rows = []

    # transformers + accelerate: the GPU capped, the rest offloaded to the host
    offload = args.device != "cpu"
    kwargs = {"device_map": "auto", "max_memory": {0: args.gpu_memory, "cpu": "200GiB"}} if offload else {}
    hf = {"model": tf.OlmoeForCausalLM.from_pretrained(root / "ckpt", dtype=torch.bfloat16, **kwargs).eval()}
    ids = prompt[None].to(args.device if offload else "cpu")

    def run_hf():
        with torch.no_grad():
            hf["model"].generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
        if offload:
            torch.cuda.synchronize()

    run_hf()  # warm-up
    rows.append(("transformers + accelerate offload" if offload else "transformers (no offload)",
                 tokens_per_s(run_hf, args.tokens)))
    hf.clear()  # its device memory back before mobile loads
    if offload:
        torch.cuda.empty_cache()

    # mobile: the same folder, its expert cache sized so that the device holds what transformers' may
    assert cli(["import-hf", str(root / "ckpt"), "-o", str(root / "spec.yaml")]) == 0
    text = (root / "spec.yaml").read_text()
    # the device memory less mobile's always-resident weights is its expert cache
    budget = parse_bytes(args.gpu_memory) - memory_plan(load_spec(root / "spec.yaml")).non_expert
    if budget <= 0:
        print(f"--gpu-memory {args.gpu_memory} does not hold the non-expert weights; give more")
        return 2
    (root / "spec.yaml").write_text(text.replace("runtime:\n", f"runtime:\n  expert_cache:\n    budget: {budget}B\n"))
    for policy in args.policies.split(","):
        graph = root / f"graph-{policy}"
        assert cli(["compile", str(root / "spec.yaml"), "-o", str(graph), "--policy", policy]) == 0
        engine = mobile.Engine.load(graph, device=args.device)
        engine.generate(prompt, args.tokens, stop_ids=[])  # warm-up
        engine.reset_stats()
        engine.generate(prompt, args.tokens, stop_ids=[])
        rows.append((f"mobile {policy} (link {engine.stats['link']})", engine.stats["decode_tokens_per_s"]))
        engine.close()
    base = rows[0][1]
    print(f"\nOLMoE-1B-7B shapes, {args.layers} layers, random bf16 weights, device {args.device}, "
          f"device memory {args.gpu_memory}, {args.tokens} greedy tokens")
    print(f"{'engine':<44} {'tok/s':>8} {'vs transformers':>16}")
    for name, value in rows:
        print(f"{name:<44} {value:>8.2f} {value / base:>15.2f}x")
    print("note: transformers' figure includes its prefill of the 32-token prompt; mobile's decode figure does not")
    return 0


if __name__ == "__main__":
    sys.exit(main())
