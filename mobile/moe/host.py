"""The host expert kernel (kernels/host_experts.c): a layer's host-placed (token, expert) pairs,
computed on the CPU from the host store's rows in one call, on `threads` OpenMP threads.

The C source is compiled on first use (mobile.moe.cbuild), for the machine's own instruction set
(AVX2 at least; AVX-512 where the CPU has it). `unavailable()` says why this machine cannot run
it, if it cannot.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

import torch

from mobile.errors import MobileError
from mobile.moe import cbuild, quant
from mobile.moe.layout import ExpertMLP

FORMATS = {torch.float32: 0, torch.bfloat16: 1, "int8": 2, "int4": 3}
ACTIVATIONS = {"swiglu": 0, "clamped_swiglu": 1, "geglu": 2}
CFLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared"]
# the instruction sets to compile for: this CPU's own (AVX-512 where it has it), or AVX2 alone
# (which the tests also build on an AVX-512 machine, so that both paths are checked)
ISAS = {"native": ["-march=native"], "avx2": ["-mavx2", "-mfma", "-mf16c"]}
SECTIONS = ("gate_up.q", "gate_up.scale", "gate_up.zero", "down.q", "down.scale", "down.zero", "gate_up.bias",
            "down.bias")


class LayoutStruct(ctypes.Structure):  # layout_t in kernels/host_experts.c
    _fields_ = [("fmt", ctypes.c_int32), ("hidden", ctypes.c_int32), ("inter", ctypes.c_int32),
                ("group", ctypes.c_int32), ("bias", ctypes.c_int32), ("act", ctypes.c_int32),
                ("alpha", ctypes.c_float), ("limit", ctypes.c_float), ("offset", ctypes.c_int64 * len(SECTIONS))]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@cache
def unavailable() -> str | None:
    """Why this machine cannot run the host kernel, or None when it can."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the host kernel is written for x86-64 with AVX2; this machine is {platform.machine()}"
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        return f"the host kernel needs AVX2, FMA and F16C; this CPU lacks {', '.join(sorted(missing))}"
    if cbuild.compiler() is None:
        return "the host kernel is compiled on first use, and no C compiler (gcc or cc) is on PATH"
    return None


@cache
def library(isa: str = "native") -> ctypes.CDLL:
    """The compiled kernel for `isa` (ISAS)."""
    why = unavailable()
    if why:
        raise MobileError(why)
    lib = cbuild.build("host_experts.c", [*CFLAGS, *ISAS[isa]], tag=isa)
    lib.mobile_host_experts.restype = ctypes.c_int
    lib.mobile_host_experts.argtypes = [ctypes.POINTER(LayoutStruct), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_int]
    lib.mobile_host_scratch.restype = ctypes.c_int64
    lib.mobile_host_scratch.argtypes = [ctypes.POINTER(LayoutStruct), ctypes.c_int, ctypes.c_int]
    lib.mobile_read_bytes.restype = ctypes.c_int64
    lib.mobile_read_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return lib


def default_threads() -> int:
    """The physical cores less one (the device's feeder thread keeps one), at least one."""
    logical = os.cpu_count() or 1
    try:
        siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text()
        per_core = len(siblings.replace("-", ",").split(","))
    except OSError:
        per_core = 1
    return max(1, logical // max(per_core, 1) - 1)


class HostExperts:
    """Runs a layer's host pairs over rows of one expert format: native rows in `dtype` (float32 or
    bfloat16), or packed ones (`layout`). Rows are addressed in place: the host store's memory."""

    def __init__(self, mlp: ExpertMLP, dtype: torch.dtype, layout: quant.Layout | None, threads: int,
                 isa: str = "native"):
        key = layout.fmt if layout is not None else dtype
        if key not in FORMATS:
            raise MobileError(f"the host kernel reads float32, bfloat16, int8 or int4 experts, not {key}")
        if mlp.act not in ACTIVATIONS:
            raise MobileError(f"the host kernel has no {mlp.act!r} activation")
        self.mlp, self.threads, self.lib = mlp, threads, library(isa)
        offsets = [0] * len(SECTIONS)
        if layout is not None:
            offsets = [layout.sections[s].offset if s in layout.sections else 0 for s in SECTIONS]
        else:
            size = dtype.itemsize
            H, inter = mlp.hidden, mlp.inter
            gu_bias, d_bias = quant.native_bias_offsets(H, inter)
            offsets[SECTIONS.index("down.q")] = 2 * H * inter * size
            offsets[SECTIONS.index("gate_up.bias")] = gu_bias * size
            offsets[SECTIONS.index("down.bias")] = d_bias * size
        group = layout.group if layout is not None else 0
        self.layout = LayoutStruct(FORMATS[key], mlp.hidden, mlp.inter, group, int(mlp.bias), ACTIVATIONS[mlp.act],
                                   mlp.alpha, mlp.limit, (ctypes.c_int64 * len(SECTIONS))(*offsets))

    def __call__(self, x: torch.Tensor, out: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """out[tokens[p]] += weights[p] * expert_p(x[tokens[p]]) for each pair p, in p's order.

        x, out [T, H] float32 (CPU, contiguous); tokens [P] int32; rows [P] int64: the address of
        each pair's expert row (tensor.data_ptr() of a host-store row); weights [P] float32."""
        P = tokens.numel()
        if P == 0:
            return out
        assert x.dtype == out.dtype == weights.dtype == torch.float32 and x.is_contiguous() and out.is_contiguous()
        scratch = torch.empty(self.lib.mobile_host_scratch(ctypes.byref(self.layout), P, self.threads),
                              dtype=torch.float32)
        tokens, rows = tokens.to(torch.int32).contiguous(), rows.to(torch.int64).contiguous()
        weights = weights.contiguous()
        self.lib.mobile_host_experts(ctypes.byref(self.layout), x.data_ptr(), out.data_ptr(), x.shape[0], P,
                                     tokens.data_ptr(), rows.data_ptr(), weights.data_ptr(), scratch.data_ptr(),
                                     self.threads)
        return out


def read_bytes(buffer: torch.Tensor, threads: int) -> int:
    """Read every byte of `buffer` (uint8, contiguous, a multiple of 128 bytes) once: the host's
    read bandwidth on those bytes, for the kernel's benchmark."""
    return library().mobile_read_bytes(buffer.data_ptr(), buffer.numel(), threads)
