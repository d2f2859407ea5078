"""How a decode token moves through mobile's own code: the Python calls it makes inside mobile/
(and kernels/), the files it enters, and how often it switches from one file to another.

    python benchmarks/call_trace.py [--graph graphs/demo] [--tokens 8] [--top 12]

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
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from opcount import ops_in_sync_steps  # noqa: E402

SEGMENTS = "<segments>"
OURS = (str(ROOT / "mobile") + "/", str(ROOT / "kernels") + "/")


def file_of(code) -> str | None:
    """The repository file a code object belongs to, or None for code that is not mobile's."""
    name = code.co_filename
    if name.startswith("<mobile segment"):
        return SEGMENTS
    if name.startswith(OURS):
        return str(Path(name).relative_to(ROOT))
    return None


def trace(fn) -> dict:
    """Run fn() under a profiler; the calls, files and switches of mobile's code it made."""
    calls: collections.Counter[str] = collections.Counter()
    visits: list[str] = []

    def profile(frame, event, arg):
        if event == "call":
            f = file_of(frame.f_code)
            if f is not None:
                calls[f"{f}:{frame.f_code.co_name}"] += 1
                visits.append(f)
        elif event == "return":
            caller = frame.f_back
            while caller is not None and file_of(caller.f_code) is None:
                caller = caller.f_back
            if caller is not None and file_of(frame.f_code) != file_of(caller.f_code):
                visits.append(file_of(caller.f_code))  # type: ignore[arg-type]

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    switches = sum(1 for a, b in zip(visits, visits[1:], strict=False) if a != b)
    pairs = collections.Counter(tuple(sorted((a, b))) for a, b in zip(visits, visits[1:], strict=False) if a != b)
    return {"calls": sum(calls.values()), "files": sorted(set(visits)), "switches": switches, "by_function": calls,
            "pairs": pairs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", default=str(ROOT / "graphs" / "demo"))
    p.add_argument("--tokens", type=int, default=8, help="warm-up decode tokens before the traced one")
    p.add_argument("--top", type=int, default=12, help="functions and file pairs to list")
    p.add_argument("--policy", help="override the graph's policy")
    p.add_argument("--placement", choices=["move", "choose", "adaptive"], help="the policy's placement of a miss")
    p.add_argument("--segments-as-executor", action="store_true", help="count the generated segment code as the "
                   "executor's file, which writes it")
    args = p.parse_args()
    global SEGMENTS
    if args.segments_as_executor:
        SEGMENTS = next(str(f.relative_to(ROOT)) for f in (ROOT / "mobile").rglob("executor.py"))

    import mobile
    from mobile.moe import rule_kernel
    from mobile.runtime.sampling import Sampler

    rule_kernel.enabled = False  # the rule as on a GPU: its torch ops

    options = {"placement": args.placement} if args.placement else None
    engine = mobile.Engine.load(args.graph, policy=args.policy, policy_options=options)
    prompt = torch.tensor([5, 6, 7, 8])
    engine.generate(prompt, args.tokens, stop_ids=[])  # the prompt and warm-up tokens: the cache fills
    start, token, sampler = engine.length, torch.tensor([9]), Sampler()

    @torch.inference_mode()
    def one_token() -> None:  # what Engine.generate does for one decoded token
        sampler(engine._forward(token, start)[-1], engine.reader)

    t = trace(one_token)
    sync_ops = ops_in_sync_steps(one_token)
    engine.close()
    print(f"one decode token, {Path(args.graph).name}, policy {engine.spec.policy.name}: {t['calls']} Python calls "
          f"inside mobile/, {len(t['files'])} files entered, {t['switches']} file switches")
    print(f"torch ops the sync steps ran themselves: {sum(sync_ops.values())} "
          f"({', '.join(f'{name} {n}' for name, n in sync_ops.most_common(args.top))})")
    print("files:", ", ".join(t["files"]))
    print("busiest file pairs (switches either way):")
    for (a, b), n in t["pairs"].most_common(args.top):
        print(f"  {n:4d}  {a} <-> {b}")
    print("most called functions:")
    for name, n in t["by_function"].most_common(args.top):
        print(f"  {n:4d}  {name}")


if __name__ == "__main__":
    main()
