"""The code generator: one straight-line Python function per compute segment, and torch.compile's
settings for it."""

from __future__ import annotations

import linecache
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mobile.compiler.ir import Node
from mobile.runtime.kernels import Compute


@dataclass(frozen=True)
class Read:
    """What a sync node will read on the host, computed by the segment before its sync step: on a
    GPU it is then part of the segment's CUDA graph, not device work launched one op at a time
    between two graphs. name: the output it is (the executor's `read_name`); fn(ctx, *inputs) ->
    the tensors (SyncKernel.read); inputs: the node's, every one a compute node's value."""

    name: str
    fn: Callable[..., Any]
    inputs: tuple[str, ...]


def compiled(fn: Callable) -> Callable:
    """torch.compile as mobile uses it: every setting in one place.

    dynamic: the token count and the KV-cache length vary. No duck shapes: a dimension that merely
    happens to equal another today (the KV capacity and a weight's storage, both 256) must not be
    tied to it, or the next growth of the cache recompiles."""
    from torch.fx.experimental import _config as fx_config

    fx_config.use_duck_shape = False
    return torch.compile(fn, dynamic=True)


def segment_fn(nodes: list[Node], kernels: list[Compute], live_out: list[str], executed: list[str] | None,
               trace: list | None, clock: Callable[[], Any], reads: tuple[Read, ...] = ()):
    """Generate one straight-line Python function, segment(ctx, env) -> its live outputs, for a
    compute segment. executed: a list it appends the names of the nodes it ran to (eager runs);
    trace: a list it appends each node's span to, timed by clock. Both None: the graph runner's
    function, without bookkeeping (a replay skips Python). reads: what the sync step after the
    segment will read, computed at its end (Read), each an output of its own.

    Straight-line code (no loop over nodes, no dict shuffling) is what dynamo traces best, and a
    separate code object per segment gives each its own compile cache instead of piling
    recompiles onto one shared function. Each kernel is called as it is (a function of mobile.models.ops
    or mobile.moe, weights bound), a residual add written inline. The source is registered with
    linecache under the segment's file name, so a traceback inside a segment shows its line.
    """
    var = {n.name: f"v{i}" for i, n in enumerate(nodes)}
    args: list[str] = []
    body: list[str] = []

    def refs(names) -> list[str]:  # the variables holding these values; those from outside come as arguments
        for name in names:
            if name not in var:
                var[name] = f"a{len(args)}"
                args.append(name)
        return [var[name] for name in names]

    for i, (node, kernel) in enumerate(zip(nodes, kernels, strict=True)):
        ins = refs(node.inputs)
        if kernel.inline is not None:
            value = kernel.inline.format(*ins)
        else:
            value = f"k{i}({', '.join((['ctx'] if kernel.needs_ctx else []) + ins)})"
        call = f"{var[node.name]} = {value}  # {node.name}"
        if trace is not None:
            body += ["    t0 = clock()", f"    {call}",
                     f"    trace.append(({node.name!r}, {node.op.value!r}, 'compute', t0, clock(), 0))"]
        else:
            body.append(f"    {call}")
    for j, read in enumerate(reads):
        ins = refs(read.inputs)
        var[read.name] = f"r{j}"
        body.append(f"    r{j} = tuple(read{j}({', '.join(['ctx'] + ins)}))  # {read.name}")
    if executed is not None:
        body.append(f"    executed.extend({[n.name for n in nodes]!r})")
    outs = ", ".join(f"{n!r}: {var[n]}" for n in [*live_out, *(r.name for r in reads)])
    unpack = "".join(f"    {var[a]} = env[{a!r}]\n" for a in args)
    src = f"def segment(ctx, env):\n{unpack}" + "\n".join(body) + f"\n    return {{{outs}}}\n"
    scope: dict[str, Any] = {f"k{i}": k.fn for i, k in enumerate(kernels) if k.fn is not None}
    scope.update({f"read{j}": r.fn for j, r in enumerate(reads)})
    scope.update(executed=executed, trace=trace, clock=clock)
    plain = executed is None and trace is None
    filename = f"<mobile segment {nodes[0].name}..{nodes[-1].name}{' (graphs)' if plain else ''}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(keepends=True), filename)
    exec(compile(src, filename, "exec"), scope)
    fn = scope["segment"]
    fn.source = src
    return fn
