"""Quality of every big-little policy on the demo model's held-out text, side by side in one run.

    python benchmarks/eval_policies.py [--max-tokens 10000] [--out eval.json]

Rows: big, little (raw and rescaled weights), random halving, the per-layer rule alone
(layer-mass), mobile with confidence only, with the per-layer rule (layer_tau), with the
router-mass gate (mass_tau) as well, and with the KV refresh (kv_refresh). These count every expert
a token uses, as if nothing were cached (cached_complement off), and use the switch layer rule.
Then the "cache:" rows, which run with the demo's expert cache and report bytes moved against
big-only decoding with the same cache; there the little pass takes the dropped experts already
cached (cached_complement). Every position is a decode step (see
mobile/tools/evaluate.py). Asserts nothing; prints the table. `--only a,b` runs the rows whose labels
contain one of those strings.
"""

from __future__ import annotations

import argparse
import json

import torch

from mobile import policy as policies
from mobile.tools.evaluate import format_rows, run_eval

CONFIGS = [
    ("little raw", {"name": "little", "little_weights": "raw"}),
    ("little rescale", {"name": "little", "little_weights": "rescale"}),
    ("random half raw", {"name": "little", "little_weights": "raw", "little_select": "random"}),
    # the per-layer rule alone: in eval, mobile with tau 0 and layer_tau 0.8 decodes exactly like this
    ("layer-mass tau=0.8", {"name": "layer-mass", "tau": 0.8}),
    # confidence only (the rule off)
    ("mobile tau=0.2 lt=0", {"name": "mobile", "tau": 0.2, "layer_tau": 0.0}),
    ("mobile tau=0.3 lt=0", {"name": "mobile", "tau": 0.3, "layer_tau": 0.0}),
    ("mobile tau=0.4 lt=0", {"name": "mobile", "tau": 0.4, "layer_tau": 0.0}),
    # both signals
    ("mobile tau=0.3 lt=0.8", {"name": "mobile", "tau": 0.3, "layer_tau": 0.8}),
    ("mobile tau=0.25 lt=0.8", {"name": "mobile", "tau": 0.25, "layer_tau": 0.8}),
    ("mobile tau=0.3 lt=0.75", {"name": "mobile", "tau": 0.3, "layer_tau": 0.75}),
    ("mobile tau=0.25 lt=0.85", {"name": "mobile", "tau": 0.25, "layer_tau": 0.85}),
    ("mobile tau=0.25 lt=0.85 raw", {"name": "mobile", "tau": 0.25, "layer_tau": 0.85, "little_weights": "raw"}),
    ("mobile tau=0.35 lt=0.75", {"name": "mobile", "tau": 0.35, "layer_tau": 0.75}),
    # both, plus the router-mass gate
    ("mobile tau=0.15 lt=0.8 mt=0.6", {"name": "mobile", "tau": 0.15, "layer_tau": 0.8, "mass_tau": 0.6}),
    ("mobile tau=0.2 lt=0.8 mt=0.6", {"name": "mobile", "tau": 0.2, "layer_tau": 0.8, "mass_tau": 0.6}),
    ("mobile tau=0.2 lt=0.8 mt=0.55", {"name": "mobile", "tau": 0.2, "layer_tau": 0.8, "mass_tau": 0.55}),
    ("mobile tau=0.1 lt=0 mt=0.65", {"name": "mobile", "tau": 0.1, "layer_tau": 0.0, "mass_tau": 0.65}),
    ("mobile tau=0.15 lt=0 mt=0.65", {"name": "mobile", "tau": 0.15, "layer_tau": 0.0, "mass_tau": 0.65}),
    ("mobile tau=0.2 lt=0 mt=0.65", {"name": "mobile", "tau": 0.2, "layer_tau": 0.0, "mass_tau": 0.65}),
    ("mobile tau=0.15 lt=0 mt=0.6", {"name": "mobile", "tau": 0.15, "layer_tau": 0.0, "mass_tau": 0.6}),
    ("mobile tau=0.15 lt=0 mt=0.7", {"name": "mobile", "tau": 0.15, "layer_tau": 0.0, "mass_tau": 0.7}),
    ("mobile tau=0.05 lt=0.85", {"name": "mobile", "tau": 0.05, "layer_tau": 0.85}),
    ("mobile tau=0.1 lt=0.85", {"name": "mobile", "tau": 0.1, "layer_tau": 0.85}),
    ("mobile tau=0.05 lt=0.875", {"name": "mobile", "tau": 0.05, "layer_tau": 0.875}),
    ("mobile tau=0.1 lt=0.875", {"name": "mobile", "tau": 0.1, "layer_tau": 0.875}),
    ("mobile tau=0.05 lt=0.9", {"name": "mobile", "tau": 0.05, "layer_tau": 0.9}),
    ("mobile tau=0.1 lt=0.9", {"name": "mobile", "tau": 0.1, "layer_tau": 0.9}),
    ("mobile tau=0.15 lt=0.85", {"name": "mobile", "tau": 0.15, "layer_tau": 0.85}),
    # with the device's expert cache (8 of 16 per layer; no speculative copies, so the cache holds
    # what demand loaded): bytes are what moved, against big-only decoding with the same cache (slots
    # and eviction) on the same routes. cached: the little pass also uses dropped experts that are
    # already in the cache. Eviction is each policy's default (lru for lru, lfu for the big-little
    # policies) unless the row names one.
    ("cache: lru (big)", {"name": "lru", "offloaded": True}),
    ("cache: lru (big) eviction lfu", {"name": "lru", "eviction": "lfu", "offloaded": True}),
    ("cache: little", {"name": "little", "offloaded": True}),
    ("cache: mobile tau=0.1 lt=0.85 switch cached off", {"name": "mobile", "tau": 0.1, "layer_tau": 0.85,
                                                         "layer_rule": "switch", "cached_complement": False,
                                                         "offloaded": True}),
    ("cache: cached little (layer-mass 0)", {"name": "layer-mass", "tau": 0.0}),
    ("cache: cached layer-mass 0.7", {"name": "layer-mass", "tau": 0.7}),
    ("cache: cached tau=0 switch 0.7 lru", {"name": "mobile", "tau": 0.0, "layer_tau": 0.7, "layer_rule": "switch",
                                            "eviction": "lru"}),
    ("cache: cached tau=0 switch 0.7", {"name": "mobile", "tau": 0.0, "layer_tau": 0.7, "layer_rule": "switch"}),
    ("cache: cached tau=0 prefix 0.7", {"name": "mobile", "tau": 0.0, "layer_tau": 0.7, "layer_rule": "prefix"}),
    ("cache: cached tau=0 prefix 0.75 (default)", {"name": "mobile"}),
    ("cache: cached tau=0 prefix 0.8", {"name": "mobile", "tau": 0.0, "layer_tau": 0.8, "layer_rule": "prefix"}),
    ("cache: cached tau=0 prefix 0.85", {"name": "mobile", "tau": 0.0, "layer_tau": 0.85, "layer_rule": "prefix"}),
    ("cache: cached tau=0.05 prefix 0.75", {"name": "mobile", "tau": 0.05}),
    # both, with each fallback refreshing the KV entries of up to 16 accepted little tokens before it
    ("mobile tau=0.1 lt=0.85 kv=16", {"name": "mobile", "tau": 0.1, "layer_tau": 0.85, "kv_refresh": 16}),
    ("mobile tau=0.15 lt=0.85 kv=16", {"name": "mobile", "tau": 0.15, "layer_tau": 0.85, "kv_refresh": 16}),
    ("mobile tau=0.25 lt=0.85 kv=16", {"name": "mobile", "tau": 0.25, "layer_tau": 0.85, "kv_refresh": 16}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", default="graphs/demo")
    p.add_argument("--data", default="demo/data/heldout.txt")
    p.add_argument("--max-tokens", type=int, default=10000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", help="comma-separated label fragments: run only the matching rows")
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # the rows without the cache were measured with the switch layer rule, before prefix existed
    configs = [(label, options if label.startswith("cache:") or not policies.get(options["name"]).cache_aware
                else {"cached_complement": False, "layer_rule": "switch", **options}) for label, options in CONFIGS]
    if args.only:
        keep = [f.strip() for f in args.only.split(",") if f.strip()]
        configs = [c for c in configs if any(f in c[0] for f in keep)]
    rows = run_eval(args.graph, args.data, configs, max_tokens=args.max_tokens)
    print(f"{args.data}, first {args.max_tokens} tokens, windows of 256, every position a decode step")
    print(format_rows(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
