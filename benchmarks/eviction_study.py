"""Which eviction rule suits an expert cache: replay a model's real routes through one layer's slots.

    python benchmarks/eviction_study.py --text demo/data/train.txt --offset 1000000 [--tokens 2000]

Decodes `--tokens` tokens of the text (teacher-forced, every expert on the device) and records each
MoE layer's top-K route per token. Then, per layer, it replays the experts each token would ask
the cache for, under four request rules:
- big: all top-K;
- little: the top ceil(K/2);
- switch T: the little set, or all top-K where the little set carries less than T of the mass
  (mobile's per-layer rule, layer_rule switch);
- prefix T: the fewest top experts (at least the little set) that carry T (layer_rule prefix).
Each runs through mobile's own SlotTable with LRU, and with LFU at several decays, and through
Belady's optimal rule (evict the expert needed again furthest in the future: a bound no online
rule reaches). It prints misses summed over layers, and each as a share of big-only LRU's.

This is bookkeeping only: no free experts from the cache (cached_complement), no prefetch, no
timing. `mobile bench` measures those.
"""

from __future__ import annotations

import argparse
import math

import torch
from route_watch import watch_routes

from mobile.moe.rule import KeepRule
from mobile.moe.slots import LFU_DECAY, SlotTable
from mobile.runtime.engine import Engine


def record_routes(graph: str, text: str, offset: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids), each [layers, tokens, K]: the routes of teacher-forced decoding."""
    engine = Engine.load(graph, policy="lru-prefetch", all_resident=True)
    with open(text) as f:
        f.seek(offset)
        chunk = f.read(tokens * 16)  # far more characters than tokens
    ids = torch.tensor(engine.tokenizer.encode(chunk), dtype=torch.long)[:tokens]
    routes: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    watch_routes(engine, lambda layer, w, i: routes.setdefault(layer, []).append((w.clone(), i.clone())))
    engine.generate(ids[:1], ids.numel() - 1, stop_ids=[], forced=ids[1:].tolist())
    layers = sorted(routes)
    weights = torch.stack([torch.cat([w for w, _ in routes[layer]]) for layer in layers])
    experts = torch.stack([torch.cat([i for _, i in routes[layer]]) for layer in layers])
    return weights, experts


def requests(weights: torch.Tensor, ids: torch.Tensor, rule: str, tau: float) -> list[list[int]]:
    """One layer's experts asked for, per token. weights, ids [T, K], sorted by weight. switch and
    prefix are mobile's own rule (mobile.moe.rule.KeepRule)."""
    K = ids.shape[1]
    little = math.ceil(K / 2)
    if rule in ("big", "little"):
        n = K if rule == "big" else little
        return [row[:n] for row in ids.tolist()]
    keep = KeepRule(rule, little, tau).keep(weights)
    return [[e for e, kept in zip(row, kept_row, strict=True) if kept]
            for row, kept_row in zip(ids.tolist(), keep.tolist(), strict=True)]


def replay(stream: list[list[int]], slots: int, eviction: str, decay: float = LFU_DECAY) -> int:
    table = SlotTable(slots, eviction=eviction, decay=decay)
    for experts in stream:
        table.begin_step()
        table.lookup(experts)
    return table.counters.misses


def belady(stream: list[list[int]], slots: int) -> int:
    """Misses of the optimal offline rule: evict the resident expert needed again furthest ahead."""
    next_use: list[dict[int, int]] = [{} for _ in stream]
    later: dict[int, int] = {}
    for t in range(len(stream) - 1, -1, -1):
        next_use[t] = dict(later)
        for e in stream[t]:
            later[e] = t
    held: set[int] = set()
    misses = 0
    for t, experts in enumerate(stream):
        for e in experts:
            if e in held:
                continue
            misses += 1
            if len(held) >= slots:
                victim = max((x for x in held if x not in experts), key=lambda x: next_use[t].get(x, len(stream)))
                held.remove(victim)
            held.add(e)
    return misses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", default="graphs/demo")
    p.add_argument("--text", default="demo/data/train.txt")
    p.add_argument("--offset", type=int, default=0, help="start this many characters into the text")
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--slots", type=int, default=8, help="cache slots per layer (the demo's: 8)")
    p.add_argument("--tau", type=float, default=0.7, help="the switch and prefix rules' mass share")
    p.add_argument("--decays", default="0.5,0.8,0.9,0.95,0.98,0.995")
    args = p.parse_args()
    torch.set_num_threads(1)
    weights, ids = record_routes(args.graph, args.text, args.offset, args.tokens)
    decays = [float(d) for d in args.decays.split(",")]
    rules = [("big", "big"), ("little", "little"), (f"switch {args.tau:g}", "switch"),
             (f"prefix {args.tau:g}", "prefix")]
    streams = {label: [requests(w, i, rule, args.tau) for w, i in zip(weights, ids, strict=True)]
               for label, rule in rules}
    base = sum(replay(s, args.slots, "lru") for s in streams["big"])
    print(f"{args.text} from character {args.offset}: {ids.shape[1]} tokens, {ids.shape[0]} MoE layers, "
          f"{args.slots} slots per layer; misses (x big-only LRU)")
    cols = ["lru", *(f"lfu {d:g}" for d in decays), "belady"]
    print(f"{'requests':<14}" + "".join(f"{c:>16}" for c in cols))
    for label, layer_streams in streams.items():
        counts = [sum(replay(s, args.slots, "lru") for s in layer_streams)]
        counts += [sum(replay(s, args.slots, "lfu", d) for s in layer_streams) for d in decays]
        counts.append(sum(belady(s, args.slots) for s in layer_streams))
        print(f"{label:<14}" + "".join(f"{f'{c} ({c / base:.2f}x)':>16}" for c in counts))


if __name__ == "__main__":
    main()
