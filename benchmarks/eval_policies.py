"""Quality of every big-little policy on the demo model's held-out text, side by side in one run.

    python benchmarks/eval_policies.py [--max-tokens 10000] [--out eval.json]

Rows: big, little (raw and rescaled weights), random halving, layer-mass, mobile at several taus
(confidence only), mobile with the per-layer rule (layer_tau), and the rule alone. Every position
is a decode step (see mobile/evaluate.py). Asserts nothing; prints the table.
"""

from __future__ import annotations

import argparse
import json

import torch

from mobile.evaluate import format_rows, run_eval

CONFIGS = [
    ("little raw", {"name": "little", "little_weights": "raw"}),
    ("little rescale", {"name": "little", "little_weights": "rescale"}),
    ("random half raw", {"name": "little", "little_weights": "raw", "little_select": "random"}),
    ("layer-mass tau=0.8 raw", {"name": "layer-mass", "tau": 0.8, "little_weights": "raw"}),
    ("mobile tau=0.2 raw", {"name": "mobile", "tau": 0.2, "little_weights": "raw"}),
    ("mobile tau=0.3 raw", {"name": "mobile", "tau": 0.3, "little_weights": "raw"}),
    ("mobile tau=0.4 raw", {"name": "mobile", "tau": 0.4, "little_weights": "raw"}),
    ("mobile tau=0.3 rescale", {"name": "mobile", "tau": 0.3, "little_weights": "rescale"}),
    ("mobile tau=0.15 lt=0.8 raw", {"name": "mobile", "tau": 0.15, "layer_tau": 0.8, "little_weights": "raw"}),
    ("mobile tau=0.2 lt=0.8 raw", {"name": "mobile", "tau": 0.2, "layer_tau": 0.8, "little_weights": "raw"}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", default="graphs/demo")
    p.add_argument("--data", default="demo/data/heldout.txt")
    p.add_argument("--max-tokens", type=int, default=10000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = run_eval(args.graph, args.data, CONFIGS, max_tokens=args.max_tokens)
    print(f"{args.data}, first {args.max_tokens} tokens, windows of 256, every position a decode step")
    print(format_rows(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
