"""What a kernel sees: the per-forward context, and the two kinds of kernel the executor runs.
Below both the executor and the CUDA-graph runner (mobile.runtime.graphs), which share them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Kernel = Callable[..., Any]  # a compute node's: kernel(ctx, *input values) -> its value


@dataclass
class StepContext:
    """Per-forward values every kernel may read. positions [T]; cos, sin [T, 1, rope_dim] (ops.rope_tables)."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    kv_len: int  # attend over cache rows [0, kv_len)
    last_only: bool = False  # the caller needs only the last position's logits: lm_head skips the rest
    all_visible: bool = False  # one token attending over exactly the rows before it: no mask needed
    # a static context (mobile.runtime.graphs.StaticState): its tensors are persistent buffers, and the
    # forward's compute segments run through the graph runner under this bucket
    key: tuple | None = None
    prologue: Callable[[], None] | None = None  # device work the forward's first segment does first (rope rows)


@dataclass(frozen=True)
class SyncKernel:
    """A node the host runs between compute segments.
    read(ctx, *inputs) -> the device tensors it needs on the host (one copy for its whole step);
    act(ctx, values, *inputs) -> its value, given those tensors' values as lists of ints (raw: as
    host tensors of their own dtypes, flattened: floats too)."""

    act: Callable[..., Any]
    read: Callable[..., list[torch.Tensor]] | None = None
    raw: bool = False


@dataclass(frozen=True)
class Pick:
    """How a forward's next token is chosen on the device (mobile.runtime.sampling), after its last
    pass. fn(ctx, logits [T, V], params) -> (the id chosen from the last row, whether that row's
    logits are all finite): two device tensors, which the host reads in one copy. params: the
    device tensors fn reads besides (a seed, a temperature). key: names fn for the graph runner,
    which captures the pick once per bucket and replays it with each call's params copied in."""

    fn: Callable[[StepContext, torch.Tensor, tuple], tuple[torch.Tensor, torch.Tensor]]
    params: tuple[torch.Tensor, ...]
    key: str
