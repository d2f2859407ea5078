"""Counting the torch ops that the executor's sync steps run themselves (a TorchDispatchMode around
Executor._sync; views and ops on host tensors included). On a GPU, device work there is launched op
by op between two CUDA graphs, where work in a segment is inside its graph. Used by the tests and
by benchmarks/call_trace.py."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

from mobile.runtime.executor import Executor


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.names: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def ops_in_sync_steps(fn: Callable[[], Any]) -> collections.Counter[str]:
    """Run fn(); the torch ops, by name, that ran inside the executor's sync steps."""
    ops, sync = OpCounter(), Executor._sync

    def counted(self, *args):
        with ops:
            return sync(self, *args)

    Executor._sync = counted  # type: ignore[method-assign]
    try:
        fn()
    finally:
        Executor._sync = sync  # type: ignore[method-assign]
    return ops.names
