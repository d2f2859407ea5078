"""The keep rule's CPU kernel (kernels/keep_rule.c): KeepRule.status and KeepRule.pairs in one C
call each, where the rule runs eagerly on a CPU device; everywhere else (a GPU, torch.compile,
another dtype) the rule's torch ops run, and they are the definition the kernel is tested against.

Why: run eagerly, the rule is about twenty small torch ops, each with its fixed cost, twice per MoE
layer and token. On a CPU device that was the largest cost after the model's own math. On a GPU the
same ops run inside the segment's CUDA graph, or fused by torch.compile.

Without a C compiler, or where the kernel does not compile (a warning says why), the torch ops run:
the kernel changes no number, only the time.
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache
from typing import TYPE_CHECKING

import torch

from mobile.errors import MobileError
from mobile.moe import cbuild

if TYPE_CHECKING:
    from mobile.moe.rule import KeepRule

KINDS = {"top": 0, "switch": 1, "prefix": 2}
# False: the torch ops run on the CPU too, as on a GPU (the tests and benchmarks that count or compare them)
enabled = True
# no fused multiply-add: each rounding stays the one the torch ops make
CFLAGS = ["-O2", "-fPIC", "-shared", "-ffp-contract=off"]


class RuleStruct(ctypes.Structure):  # rule_t in kernels/keep_rule.c
    _fields_ = [("kind", ctypes.c_int32), ("n", ctypes.c_int32), ("cached", ctypes.c_int32),
                ("rescale", ctypes.c_int32), ("tau", ctypes.c_float)]


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where there is none (the torch ops then run)."""
    if cbuild.compiler() is None:
        return None
    try:
        lib = cbuild.build("keep_rule.c", CFLAGS)
    except (MobileError, OSError) as e:  # the torch ops give the same numbers: a slower run, not a failed one
        print(f"mobile: warning: {e}; the keep rule runs as torch ops", file=sys.stderr)
        return None
    pointer, i32 = ctypes.c_void_p, ctypes.c_int
    lib.mobile_keep_status.restype = i32
    lib.mobile_keep_status.argtypes = [pointer, pointer, pointer, pointer, i32, i32, i32, pointer]
    lib.mobile_keep_pairs.restype = i32
    lib.mobile_keep_pairs.argtypes = [pointer, pointer, pointer, pointer, i32, i32, i32, pointer, pointer]
    return lib


def built() -> ctypes.CDLL:
    """The kernel, where `takes` said it runs."""
    lib = library()
    assert lib is not None
    return lib


@cache
def packed(rule: KeepRule) -> RuleStruct:
    return RuleStruct(KINDS[rule.kind], rule.n, int(rule.cached), int(rule.rescale), rule.tau)


def takes(weights: torch.Tensor, ids: torch.Tensor, slot_map: torch.Tensor) -> bool:
    """Whether the kernel can run this call: eager, on the CPU, float32 weights and int64 ids [T, K]
    (T, K > 0), an int64 slot map, all contiguous, with a kernel built. (KeepRule asks only when
    `enabled` and the weights are on the CPU: a GPU's rule makes no call here.)"""
    return (weights.device.type == "cpu" and weights.dtype == torch.float32 and ids.dtype == slot_map.dtype
            == torch.int64 and weights.dim() == 2 and weights.shape == ids.shape and weights.numel() > 0
            and weights.is_contiguous() and ids.is_contiguous() and slot_map.is_contiguous()
            and not torch.compiler.is_compiling() and library() is not None)


def status(rule: KeepRule, weights: torch.Tensor, ids: torch.Tensor, slot_map: torch.Tensor) -> torch.Tensor:
    """KeepRule.status, in one call."""
    T, K = weights.shape
    E = slot_map.shape[0]
    out = torch.empty(min(E, T * K), dtype=torch.int32)
    if built().mobile_keep_status(ctypes.byref(packed(rule)), weights.data_ptr(), ids.data_ptr(),
                                  slot_map.data_ptr(), T, K, E, out.data_ptr()) < 0:
        raise IndexError(f"an expert id outside [0, {E}) in the router's ids")
    return out


def pairs(rule: KeepRule, weights: torch.Tensor, ids: torch.Tensor, slot_map: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """KeepRule.pairs, in one call."""
    T, K = weights.shape
    E = slot_map.shape[0]
    kept, slots = torch.empty_like(weights), torch.empty_like(ids)
    if built().mobile_keep_pairs(ctypes.byref(packed(rule)), weights.data_ptr(), ids.data_ptr(),
                                 slot_map.data_ptr(), T, K, E, kept.data_ptr(), slots.data_ptr()) < 0:
        raise IndexError(f"an expert id outside [0, {E}) in the router's ids")
    return kept, slots
