"""How a decode token moves through mobile's own code: the Python calls it makes inside mobile/
(and kernels/), the files it enters, and how often it switches from one file to another.

    python benchmarks/call_trace.py [--graph graphs/demo] [--tokens 8] [--traced 16] [--top 12] [--sampled]

It traces two paths of the same token, each on an engine of its own:
- eager: the CPU's default (`runtime.cuda_graphs` auto is off there). Every compute segment runs
  its generated Python, which calls the model's math (mobile.models.ops) and the MoE op.
- CUDA graphs: the GPU's default (auto is on there). Here on the CPU the graphs are emulated
  (mobile.runtime.graphs): an emulated replay runs the segment's Python again, where a GPU's
  `graph.replay()` is one call into CUDA that runs none. The emulated replay
  (GraphRunner._run_static) is therefore left out of the count, and the count is what a GPU's
  Python runs: the executor, the sync steps, the graph runner's bookkeeping. The next token's
  pick is replayed too, greedy or sampled (--sampled).

After a prompt and a few warm-up tokens, one more decode step (the forward and the sampled
token's read) runs under sys.setprofile. Each call into a function defined in mobile/ or kernels/,
and each return to one, names the file now running; a switch is two consecutive such events in
different files. The code the executor generates for its compute segments counts as a file of its
own, `<segments>` (--segments-as-executor: as the executor's). Calls into torch or the standard
library are not counted, and a return through them lands on the mobile file below.

It also counts the torch ops that the same token's sync steps run themselves (tests/opcount.py:
views and ops on host tensors included): on a GPU, device work there is launched op by op between
two CUDA graphs, where work in a segment is inside its graph.

Both counts are a GPU's: the keep rule runs as its torch ops, as it does there (on a CPU device its
C kernel, mobile.moe.rule_kernel, would take their place).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from calltrace import SEGMENTS, measure  # noqa: E402

SAMPLED = {"greedy": False, "temperature": 0.8, "top_p": 0.9, "seed": 0}  # --sampled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", default=str(ROOT / "graphs" / "demo"))
    p.add_argument("--tokens", type=int, default=8, help="warm-up decode tokens before the traced ones")
    p.add_argument("--traced", type=int, default=16, help="decode tokens traced, each on its own")
    p.add_argument("--top", type=int, default=12, help="functions and file pairs to list")
    p.add_argument("--policy", help="override the graph's policy")
    p.add_argument("--placement", choices=["move", "choose", "adaptive"], help="the policy's placement of a miss")
    p.add_argument("--segments-as-executor", action="store_true", help="count the generated segment code as the "
                   "executor's file, which writes it")
    p.add_argument("--sampled", action="store_true", help="draw the traced tokens at temperature 0.8 and top-p "
                   "0.9 (seed 0), not greedily")
    args = p.parse_args()
    segments = SEGMENTS
    if args.segments_as_executor:
        segments = next(str(f.relative_to(ROOT)) for f in (ROOT / "mobile").rglob("executor.py"))

    from mobile.moe import rule_kernel

    rule_kernel.enabled = False  # the rule as on a GPU: its torch ops

    options = {"placement": args.placement} if args.placement else None
    for path, cuda_graphs in (("eager (the CPU's default)", "off"),
                              ("CUDA graphs (a GPU's default; emulated here, the replay not counted)", "on")):
        m = measure(args.graph, cuda_graphs, args.tokens, args.traced, segments, SAMPLED if args.sampled else None,
                    policy=args.policy, policy_options=options)
        traces, sync_ops = m.traces, m.sync_ops
        drawn = "sampled at temperature 0.8, top-p 0.9" if args.sampled else "greedy"
        print(f"{len(traces)} decode tokens ({drawn}), {Path(args.graph).name}, policy {m.policy}, {path}:")
        for moved, label in ((False, "tokens that moved no expert"), (True, "tokens that moved experts")):
            some = [t for t in traces if t["copies"] == moved]
            if some:
                print(f"  {len(some):2d} {label}: {spread(some, 'calls')} Python calls inside mobile/, "
                      f"{spread(some, 'files')} files entered, {spread(some, 'switches')} file switches")
        moved = "moved experts" if m.sync_ops_moved else "moved no expert"
        print(f"  torch ops one more token's sync steps ran themselves ({moved}): {sum(sync_ops.values())} "
              f"({', '.join(f'{name} {n}' for name, n in sync_ops.most_common(args.top))})")
        t = max(traces, key=lambda t: t["switches"])
        print(f"  the token with the most switches ({t['switches']})" + (f": {t['graphs']}" if "graphs" in t else ""))
        print("    files:", ", ".join(t["files"]))
        print("    busiest file pairs (switches either way):")
        for (a, b), n in t["pairs"].most_common(args.top):
            print(f"      {n:4d}  {a} <-> {b}")
        print("    most called functions:")
        for name, n in t["by_function"].most_common(args.top):
            print(f"      {n:4d}  {name}")
        print()


def spread(traces: list[dict], key: str) -> str:
    """min-max of a count over traces (one number when they agree)."""
    values = [len(t[key]) if key == "files" else t[key] for t in traces]
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


if __name__ == "__main__":
    main()
