"""Debug switches, read once from the environment, in one typed place.

MOBILE_DEBUG=1   write a text dump of the graph after every pass (to MOBILE_DEBUG_DIR)
MOBILE_DEBUG_DIR where those dumps go (default: ./mobile-debug)
MOBILE_LINEAR_KERNELS=torch  run linear attention in torch on CUDA too, not with
                 flash-linear-attention's and causal-conv1d's kernels (auto, the default: those where installed)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mobile.compiler.ir import Graph


@dataclass(frozen=True)
class DebugFlags:
    dump_passes: bool
    dump_dir: Path
    linear_kernels: str  # auto or torch (mobile.models.linear_kernels.choose)


def flags() -> DebugFlags:
    return DebugFlags(dump_passes=os.environ.get("MOBILE_DEBUG", "0") not in ("", "0"),
                      dump_dir=Path(os.environ.get("MOBILE_DEBUG_DIR", "mobile-debug")),
                     linear_kernels=os.environ.get("MOBILE_LINEAR_KERNELS", "auto"))


def dump_after_pass(graph: Graph, pass_name: str) -> None:
    f = flags()
    if not f.dump_passes:
        return
    from mobile.compiler.emit import render_schedule

    f.dump_dir.mkdir(parents=True, exist_ok=True)
    index = len(graph.passes)
    (f.dump_dir / f"{graph.name}.{index:02d}.{pass_name}.txt").write_text(render_schedule(graph))
