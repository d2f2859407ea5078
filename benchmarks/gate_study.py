"""Which importance signal predicts where little experts cost quality? An offline study.

    python benchmarks/gate_study.py [--data demo/data/heldout_kjv.txt] [--max-tokens 3000] [--layer-tau 0.8]

For every position of the text it records, side by side:
- the big model's log-probability of the next token (big decoding, exact);
- the little pass's log-probability at that position (with the per-layer rule `--layer-tau`);
- the signals a gate could read: the little pass's max probability, margin and entropy, and the
  smallest share of the big set's router mass that the little set keeps at any layer.

Then, for each signal, it lets the least confident fraction r of positions fall back (take the big
log-probability) and prints the perplexity change and greedy agreement with big. It also sweeps the
two-signal gate "share < a at some layer, or max probability < b", which is what
`mobile --mass-tau a --tau b` runs.

The approximation: every position's KV entries here are big ones (the little pass runs over big KV,
then the position is recomputed big). Real mobile decoding keeps little KV entries for accepted
tokens; on the first demo model that changed perplexity by 0.15%. `mobile eval` measures the real
thing; this study only ranks signals cheaply, since one run serves every threshold.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from route_watch import watch_routes

from mobile.compiler.ir import Pass
from mobile.runtime.engine import Engine
from mobile.tools.evaluate import load_ids, windows

FALLBACK_RATES = (0.2, 0.3, 0.4, 0.5, 0.6)


@torch.inference_mode()
def collect(graph: str, data: str, max_tokens: int, layer_tau: float) -> list[dict]:
    engine = Engine.load(graph, policy="mobile", policy_options={"layer_tau": layer_tau}, all_resident=True)
    shares: list[torch.Tensor] = []
    little_k = engine.spec.little_k
    watch_routes(engine, lambda layer, weights, ids: shares.append(
        (weights[:, :little_k].sum(-1) / weights.sum(-1).clamp_min(1e-30)).float()))
    rows = []
    for chunk in windows(load_ids(engine, data, max_tokens), 256):
        big = engine._forward(chunk, 0, only=Pass.BIG).float()
        for t in range(chunk.numel() - 1):
            shares.clear()
            little = engine._forward(chunk[t:t + 1], t, only=Pass.LITTLE)[-1].float()
            min_share = float(torch.cat(shares).min())
            engine._forward(chunk[t:t + 1], t, only=Pass.BIG)  # put the big KV entries back
            y = int(chunk[t + 1])
            logp_l, logp_b = F.log_softmax(little, -1), F.log_softmax(big[t], -1)
            p = logp_l.exp()
            top2 = torch.topk(p, 2).values
            rows.append({"nll_big": -float(logp_b[y]), "nll_little": -float(logp_l[y]),
                         "agree": int(little.argmax() == big[t].argmax()), "max_prob": float(top2[0]),
                         "margin": float(top2[0] - top2[1]), "entropy": float(-(p * logp_l).sum()),
                         "min_share": min_share, "kl": float((logp_b.exp() * (logp_b - logp_l)).sum())})
    return rows


def outcome(rows: list[dict], falls_back: list[bool]) -> tuple[float, float, float]:
    """(fallback rate, perplexity change vs big, greedy agreement with big)."""
    n = len(rows)
    nll = sum(r["nll_big"] if f else r["nll_little"] for r, f in zip(rows, falls_back, strict=True)) / n
    big = sum(r["nll_big"] for r in rows) / n
    agree = sum(1 if f else r["agree"] for r, f in zip(rows, falls_back, strict=True)) / n
    return sum(falls_back) / n, math.exp(nll - big) - 1, agree


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", default="graphs/demo")
    p.add_argument("--data", default="demo/data/heldout_kjv.txt")
    p.add_argument("--max-tokens", type=int, default=3000)
    p.add_argument("--layer-tau", type=float, default=0.8, help="the per-layer rule in the little pass (0: off)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = collect(args.graph, args.data, args.max_tokens, args.layer_tau)
    n = len(rows)
    r0 = outcome(rows, [False] * n)
    print(f"{args.data}: {n} positions, layer_tau {args.layer_tau}; little pass alone: ppl {r0[1]:+.2%}, "
          f"agreement {r0[2]:.3f}")
    # each signal, oriented so that a higher value means "confident: keep the little result"
    signals = {"max_prob": lambda r: r["max_prob"], "margin": lambda r: r["margin"],
               "entropy": lambda r: -r["entropy"], "router min share": lambda r: r["min_share"],
               "oracle: KL(big||little)": lambda r: -r["kl"]}
    print(f"{'signal':<24} " + " | ".join(f"r={rate:.1f}: ppl, agreement" for rate in FALLBACK_RATES))
    for name, key in signals.items():
        ranked = sorted(range(n), key=lambda i: key(rows[i]))  # least confident first
        cells = []
        for rate in FALLBACK_RATES:
            fall = set(ranked[:int(rate * n)])
            _, dppl, agree = outcome(rows, [i in fall for i in range(n)])
            cells.append(f"{dppl:+6.2%}, {agree:.3f}")
        print(f"{name:<24} " + " | ".join(f"{c:>24}" for c in cells))
    print("\ntwo-signal gate (mobile --mass-tau a --tau b): fall back when some layer keeps < a, or max_prob < b")
    print(f"{'a':>5} {'b':>5} {'fallback':>9} {'ppl':>8} {'agreement':>10}")
    for a in (0.0, 0.5, 0.55, 0.6, 0.65, 0.7):
        for b in (0.0, 0.1, 0.15, 0.2, 0.25, 0.3):
            rate, dppl, agree = outcome(rows, [r["min_share"] < a or r["max_prob"] < b for r in rows])
            print(f"{a:>5} {b:>5} {rate:>9.3f} {dppl:>+8.2%} {agree:>10.3f}")


if __name__ == "__main__":
    main()
