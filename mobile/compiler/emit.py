"""Emit and load a compiled graph folder, graphs/NAME/:

    graph.json           the scheduled graph (versioned); this is what `mobile run` executes
    schedule.txt         one line per node: step, stream, segment, op, inputs, bytes, planned times
    schedule.trace.json  the planned timeline as a Chrome trace (open in Perfetto or chrome://tracing)
    graph.dot            Graphviz

The folder is written to a temporary sibling and renamed into place (mobile.outputs), so an
interrupted compile never leaves a half-written graph, and it replaces only an earlier compile's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mobile import policy as policies
from mobile.compiler.ir import COPY_OPS, GRAPH_FORMAT, GRAPH_VERSION, REGION, Graph, Node, Op
from mobile.errors import GraphError
from mobile.files import read_json
from mobile.outputs import new_folder, stamp, write_text

GRAPH_FILES = ("graph.json", "schedule.txt", "schedule.trace.json", "graph.dot")
STREAM_TIDS = {"compute": 1, "copy": 2, "host": 3}


def human_bytes(n: int) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def summarize(g: Graph) -> dict[str, float]:
    """The planned timeline's totals: busy time per stream, the time both streams are busy at once
    (overlap), and the time compute waits with nothing to do (stall)."""
    spans: dict[str, list[tuple[float, float]]] = {"compute": [], "copy": [], "host": []}
    for n in g.nodes:
        start, end = n.attr("start_us"), n.attr("end_us")
        if start is not None and end > start:
            spans[n.attr("stream", "compute")].append((start, end))
        if n.attr("host_start_us") is not None:  # a host_join's host share (passes.plan_timeline)
            spans["host"].append((n.attr("host_start_us"), n.attr("host_end_us")))
    busy = {stream: _union(s) for stream, s in spans.items()}
    last_end = max((e for s in busy.values() for _, e in s), default=0.0)
    compute_busy = sum(e - s for s, e in busy["compute"])
    # gaps inside compute's span, from its first start (not 0: a step may open with a copy) to its last end
    stall = busy["compute"][-1][1] - busy["compute"][0][0] - compute_busy if busy["compute"] else 0.0
    overlap = sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in busy["compute"] for s2, e2 in busy["copy"])
    return {"step_us": last_end, "compute_us": compute_busy, "copy_us": sum(e - s for s, e in busy["copy"]),
            "host_us": sum(e - s for s, e in busy["host"]), "stall_us": max(0.0, stall), "overlap_us": overlap}


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint, sorted intervals covering the same time as `spans`."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def render_schedule(g: Graph) -> str:
    spec = g.spec
    plan = spec.get("runtime", {}).get("plan", {})
    lines = [
        f"# mobile schedule: {g.name}   policy={spec.get('policy', {}).get('name')}   dtype={spec.get('dtype')}",
        f"# planned for {plan.get('device')}: {plan.get('compute_tflops')} TFLOP/s, "
        f"{plan.get('hbm_gbps')} GB/s HBM, {plan.get('link_gbps')} GB/s host link; one decode token",
        "# stream, start_us and end_us are that cost model's plan; `mobile run --trace FILE` writes what ran, "
        "its spans named after these nodes",
        f"# compiler passes: {', '.join(g.passes)}",
        f"# forward: {describe_passes(g)}",
    ]
    if any(n.attr("start_us") is not None for n in g.nodes):
        s = summarize(g)
        host = f", host {s['host_us']:.1f} us" if s["host_us"] else ""
        lines.append(f"# planned step {s['step_us']:.1f} us: compute {s['compute_us']:.1f} us, copy "
                     f"{s['copy_us']:.1f} us{host}, overlap {s['overlap_us']:.1f} us, compute stalled "
                     f"{s['stall_us']:.1f} us")
    lines.append(f"# schedule: {describe_moves(g)}")
    header = (f"{'step':>4} {'stream':<7} {'seg':>3} {'op':<15} {'name':<16} {'inputs':<36} {'bytes':>9} "
              f"{'h2d':>9} {'start_us':>10} {'end_us':>10}  note")
    lines.append(header)
    issued_at = prefetch_waits(g)
    for step, n in enumerate(g.nodes):
        seg = n.attr("seg")
        op = n.op.value + (f"[{n.attr('variant')}]" if n.op is Op.EXPERT else "")
        start, end = n.attr("start_us"), n.attr("end_us")
        fetch = n.op is Op.FETCH
        note = "; ".join(x for x in (f"rule {n.attr('rule')}" if fetch else "",
                                     f"big pass: {n.attr('big_rule')}" if fetch and n.attr("big_rule") else "",
                                     f"{n.attr('pass')} pass only" if n.attr("pass") else "",
                                     f"on the link at {issued_at[n.name]}" if n.name in issued_at else "",
                                     f"hoisted over {n.attr('hoisted')} nodes" if n.attr("hoisted") else "",
                                     n.attr("hoist_limit") or "",
                                     host_note(n)) if x)
        line = (
            f"{step:>4} {n.attr('stream', '-'):<7} {'-' if seg is None else seg:>3} {op:<15} {n.name:<16} "
            f"{','.join(n.inputs):<36} {human_bytes(n.attr('bytes', 0)):>9} "
            f"{human_bytes(n.attr('h2d_bytes', 0)):>9} "
            f"{'-' if start is None else f'{start:.3f}':>10} {'-' if end is None else f'{end:.3f}':>10}  {note}"
        )
        lines.append(line.rstrip())
    return "\n".join(lines) + "\n"


def host_note(n: Node) -> str:
    """A host_join's planned host share, beside the device's experts: where the host works."""
    if n.attr("host_start_us") is None:
        return ""
    return (f"host share {n.attr('host_start_us'):.3f}-{n.attr('host_end_us'):.3f} us beside the device's "
            "experts (planned as every miss on the host)")


def describe_moves(g: Graph) -> str:
    """What the scheduler moved, in words: how many nodes it hoisted, or why nothing could move."""
    hoisted = [n for n in g.nodes if n.attr("hoisted")]
    if hoisted:
        return (f"{len(hoisted)} nodes moved earlier than lowering put them (note: hoisted over N nodes), each "
                "transfer as early as its inputs allow (note: needs ...)")
    if not any(n.op in COPY_OPS for n in g.nodes):
        return "nothing moved: no transfers (every expert is on the device)"
    return ("nothing moved: each transfer already follows what it needs (note: needs ...), and no compute is free "
            "to slide between a fetch and its wait")


def prefetch_waits(g: Graph) -> dict[str, str]:
    """Each prefetch -> the wait whose copies it follows onto the link: the cache stages a
    prefetch at the next wait, once the demand copies issued with it have landed, so that
    speculation never delays a copy compute is about to wait for (mobile.moe.cache)."""
    out: dict[str, str] = {}
    pending: list[str] = []
    for n in g.nodes:
        if n.op is Op.PREFETCH:
            pending.append(n.name)
        elif n.op is Op.WAIT:
            out.update((p, f"{n.name}, after its demand copies") for p in pending)
            pending = []
    return out


def describe_passes(g: Graph) -> str:
    """How a forward runs the graph's passes (mobile.compiler.ir), in words for the schedule dump."""
    name = g.spec.get("policy", {}).get("name", policies.REFERENCE)
    passes = policies.get(name).passes
    if len(passes) == 1:
        return f"one pass, {passes[0]}: prompts and decoded tokens alike"
    prefill = g.spec.get("policy", {}).get("prefill", "big")
    entry = next((i for i, n in enumerate(g.nodes) if n.attr("region") == REGION), None)
    again = ("no gate can fire, so no fallback" if entry is None else
             f"a gate that fires ends it, and the big pass runs again from step {entry}")
    return f"decoded tokens run the little pass ({again}); prompts run the {prefill} pass"


def trace_events(spans: list[dict[str, Any]], process: str, command: str) -> dict[str, Any]:
    """Chrome-trace JSON from spans {name, cat, stream, ts_us, dur_us, args}; shared with measured traces.
    command: the mobile command that writes it (its stamp comes first: mobile.outputs)."""
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": process}}]
    for stream, tid in STREAM_TIDS.items():
        events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": stream}})
    for s in spans:
        events.append({"name": s["name"], "cat": s["cat"], "ph": "X", "pid": 1,
                       "tid": STREAM_TIDS.get(s["stream"], 3), "ts": s["ts_us"], "dur": s["dur_us"],
                       "args": s.get("args", {})})
    return {"otherData": {"written_by": stamp(command)}, "traceEvents": events, "displayTimeUnit": "ns"}


def render_trace(g: Graph) -> str:
    spans = [{"name": n.name, "cat": n.op.value, "stream": n.attr("stream", "compute"),
              "ts_us": n.attr("start_us", 0.0), "dur_us": n.attr("end_us", 0.0) - n.attr("start_us", 0.0),
              "args": {"step": i, "inputs": list(n.inputs), "bytes": n.attr("bytes", 0),
                       "h2d_bytes": n.attr("h2d_bytes", 0)}}
             for i, n in enumerate(g.nodes) if n.attr("start_us") is not None]
    spans += [{"name": f"{n.name} (host share)", "cat": "host", "stream": "host", "ts_us": n.attr("host_start_us"),
               "dur_us": n.attr("host_end_us") - n.attr("host_start_us"), "args": {"planned": "every miss on the host"}}
              for n in g.nodes if n.attr("host_start_us") is not None]
    return json.dumps(trace_events(spans, f"{g.name} (planned)", "compile"), indent=0)


_DOT_STYLE = {Op.FETCH: "shape=cds,color=blue", Op.PREFETCH: "shape=cds,style=dashed,color=blue",
              Op.WAIT: "shape=octagon,color=red", Op.ROUTER: "shape=diamond", Op.EXPERT: "shape=box3d",
              Op.IMPORTANCE_GATE: "shape=diamond,color=orange", Op.LINEAR_ATTENTION: "shape=box,color=purple"}


def render_dot(g: Graph) -> str:
    lines = [f'digraph "{g.name}" {{', "  rankdir=TB; node [shape=box, fontsize=10];",
             '  "tokens" [shape=ellipse];']
    for n in g.nodes:
        label = f"{n.name}\\n{n.op.value}" + (f" [{n.attr('variant')}]" if n.op is Op.EXPERT else "")
        style = _DOT_STYLE.get(n.op, "")
        lines.append(f'  "{n.name}" [label="{label}"{"," + style if style else ""}];')
        for i in n.inputs:
            lines.append(f'  "{i}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_graph_dir(g: Graph, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    with new_folder(out, "compile") as tmp:
        files = {"graph.json": g.dumps(), "schedule.txt": render_schedule(g),
                 "schedule.trace.json": render_trace(g), "graph.dot": render_dot(g)}
        for name, text in files.items():
            write_text(tmp / name, text)
    return out


def load_graph(graph_dir: str | Path) -> Graph:
    path = Path(graph_dir)
    path = path / "graph.json" if path.is_dir() or not path.suffix else path
    data = read_json(path, GraphError, missing="no compiled graph here (run `mobile compile SPEC.yaml` first)")
    if not isinstance(data, dict) or data.get("format") != GRAPH_FORMAT:
        raise GraphError(f"not a mobile graph (expected \"format\": \"{GRAPH_FORMAT}\")", where=path)
    if data.get("version") != GRAPH_VERSION:
        raise GraphError(f"graph format version {data.get('version')} is not supported (this mobile reads "
                         f"version {GRAPH_VERSION}); recompile the spec", where=path)
    try:
        return Graph.from_json(data)
    except (KeyError, ValueError, TypeError) as e:
        raise GraphError(f"malformed graph: {e!r}", where=path, key="nodes") from None
