"""The routed-expert layer's compute as one registered op over device state.

    out [T, H] = torch.ops.mobile.moe_experts(x [T, H], weights [T, K], ids [T, K], slot_map [E],
                                              arena [S, row], rule, expert)

T = tokens, H = hidden, K = experts per token (the router's big set, in its selection order), E =
experts, S = cache slots. slot_map gives each expert's slot in the arena, -1 when it is not on the
device. rule: which of a token's experts run (a KeepRule's text, mobile.moe.rule), decided inside
the op from device tensors; expert: what an expert is (ExpertKind's text: its format, group and
MLP). With fmt int8 or int4 the arena is packed, uint8 [S, row_bytes] (mobile.moe.quant), and the
op dequantizes as it computes: the Triton kernels tile by tile in registers, the CPU path only the
experts that can run, into a scratch arena for the call.

Implementations: mobile.moe.native on the CPU (and CUDA without Triton), kernels/experts.py on
CUDA, both tested against mobile.moe.reference. Like vLLM's fused_moe with its expert_map.

The ops are defined through torch.library.Library rather than the custom_op decorator: that one
wraps every call in a lazy torch.compiler.disable, so the first call imports torch._dynamo (about a
second at start-up) even in a run that never compiles. An op with a fake is opaque to torch.compile
all the same; moe_experts itself is composite, so torch.compile traces through to its parts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mobile.moe import quant
from mobile.moe.layout import ExpertMLP
from mobile.moe.native import dequantizing, native
from mobile.moe.rule import KeepRule


@dataclass(frozen=True)
class ExpertKind:
    """What the op needs to know of an expert besides its weights: its row format (native, int8,
    int4, with the group size) and its MLP. One value in the op's signature, as its text."""

    fmt: str
    group: int
    mlp: ExpertMLP

    @classmethod
    def of_spec(cls, spec) -> ExpertKind:
        return cls(spec.runtime.expert_format, spec.expert_group, ExpertMLP.of_spec(spec))

    @property
    def text(self) -> str:
        m = self.mlp
        return (f"{self.fmt} group={self.group} hidden={m.hidden} inter={m.inter} act={m.act} alpha={m.alpha!r} "
                f"limit={m.limit!r}" + " bias" * m.bias)

    @staticmethod
    def parse(text: str) -> ExpertKind:
        fmt, *words = text.split()
        f = dict(w.split("=") for w in words if "=" in w)
        mlp = ExpertMLP(int(f["hidden"]), int(f["inter"]), "bias" in words, f["act"], float(f["alpha"]),
                        float(f["limit"]))
        return ExpertKind(fmt, int(f["group"]), mlp)

    @functools.cached_property
    def layout(self) -> quant.Layout | None:
        if self.fmt == "native":
            return None
        return quant.Layout(self.fmt, self.group, self.mlp.hidden, self.mlp.inter, self.mlp.bias)


# the op's two text arguments, parsed once each: plain dicts, not functools.cache, because
# torch.compile traces the op, and through a cache wrapper it would trace the parsing (with a warning)
RULES: dict[str, KeepRule] = {}
KINDS: dict[str, ExpertKind] = {}


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, slot_map: torch.Tensor,
                arena: torch.Tensor, rule: str, expert: str) -> torch.Tensor:
    """The op's one kernel, for every device (CompositeImplicitAutograd): the keep rule and the native
    path are plain torch ops, which torch.compile traces and fuses; on CUDA the expert MLP is the
    Triton kernel, itself an opaque op with a fake (mobile::triton_experts)."""
    keep = RULES.get(rule) or RULES.setdefault(rule, KeepRule.parse(rule))
    kind = KINDS.get(expert) or KINDS.setdefault(expert, ExpertKind.parse(expert))
    w, slots = keep.pairs(weights, ids, slot_map)
    if x.is_cuda and _triton_kernels() is not None:
        return torch.ops.mobile.triton_experts(x, w, slots, arena, expert)
    if kind.layout is not None:
        return dequantizing(x, w, slots, arena, kind.layout, kind.mlp)
    return native(x, w, slots, arena, kind.mlp)


def triton_experts(x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, arena: torch.Tensor,
                   expert: str) -> torch.Tensor:
    kind = KINDS.get(expert) or KINDS.setdefault(expert, ExpertKind.parse(expert))
    return _triton_kernels().experts(x, weights, slots, arena, layout=kind.layout, mlp=kind.mlp)


_LIB = torch.library.Library("mobile", "FRAGMENT")
_LIB.define("moe_experts(Tensor x, Tensor weights, Tensor ids, Tensor slot_map, Tensor arena, str rule, "
            "str expert) -> Tensor")
_LIB.impl("moe_experts", moe_experts, "CompositeImplicitAutograd")
_LIB.define("triton_experts(Tensor x, Tensor weights, Tensor slots, Tensor arena, str expert) -> Tensor")
_LIB.impl("triton_experts", triton_experts, "CUDA")
torch.library.register_fake("mobile::triton_experts", lambda x, *args, **kwargs: torch.empty_like(x), lib=_LIB)


@functools.cache
def _triton_kernels():
    """kernels/experts.py (mobile.kernels.experts), or None without triton (the native path then
    runs on CUDA too)."""
    try:
        from mobile.kernels import experts as kernels
    except ImportError:
        return None
    return kernels


def warm_up(device: torch.device, dtype: torch.dtype, fmt: str = "native", group: int = 0) -> None:
    """The op's first call pays one-time costs (imports, kernel selection, Triton's compile of the
    format's kernels): engines pay them while loading, not inside the first prefill's timing."""
    n = max(16, group)  # a size the group divides
    kind = ExpertKind(fmt, group, ExpertMLP(n, n))
    x = torch.zeros(1, n, dtype=dtype, device=device)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    slot_map = torch.zeros(1, dtype=torch.long, device=device)
    if kind.layout is None:
        arena = torch.zeros(1, 3 * n * n, dtype=dtype, device=device)
    else:
        arena = torch.zeros(1, kind.layout.row_bytes, dtype=torch.uint8, device=device)
    torch.ops.mobile.moe_experts(x, torch.ones(1, 1, device=device), ids, slot_map, arena, KeepRule.big(1).text,
                                 kind.text)
