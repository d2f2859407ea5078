"""Every Triton kernel of kernels/experts.py compiles for the GPUs mobile targets, with no GPU here.

Triton's CPU interpreter (tests/test_kernels.py) runs the kernels' arithmetic but never compiles
them; triton.compile with a GPUTarget runs the real compiler, down to ptxas and a cubin, for
Ampere (sm_80), Hopper (sm_90) and Blackwell consumer cards (sm_120). The default suite compiles each
kernel for each target in its most involved variant (int4, bf16, biases, the clamped SwiGLU);
`pytest -m slow` compiles every variant: format, dtype, bias and activation.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from mobile.kernels import experts as kernels
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGETS = (80, 90, 120)
KERNELS = ("_decode_up", "_decode_down", "_grouped_up", "_grouped_down")
FORMATS = (kernels.NATIVE, kernels.INT8, kernels.INT4)
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# arguments by what they point at or hold; the rest are int32 sizes, strides and offsets
FLOAT32 = {"act_ptr", "y_ptr"}  # the kernels' float32 scratch
INT32 = {"slots_ptr", "pairs_ptr", "block_slot_ptr"}
SCALARS = {"alpha": "fp32", "limit": "fp32"}


def signature(fn, dtype: torch.dtype, fmt: int, constexprs: dict) -> dict[str, str]:
    """Triton's type of each argument of `fn`, as `experts()` passes them ("constexpr" for those)."""
    x = "*" + DTYPES[dtype]
    arena = x if fmt == kernels.NATIVE else "*u8"  # packed rows are bytes
    types = {"x_ptr": x, "out_ptr": x, "weights_ptr": x, "arena_ptr": arena}
    return {name: "constexpr" if name in constexprs else types.get(name) or (
        "*fp32" if name in FLOAT32 else "*i32" if name in INT32 else SCALARS.get(name, "i32"))
        for name in fn.arg_names}


def compile_kernel(name: str, cc: int, dtype: torch.dtype, fmt: int, bias: bool, act: int):
    fn = getattr(kernels, name)
    constexprs = {"FMT": fmt, "GROUP": 64 if fmt == kernels.INT4 else 0, "BIAS": bias, "ACT": act}
    if name.startswith("_decode"):
        constexprs.update(BLOCK_H=64, BLOCK_I=64)
    else:  # the tiles' dtype: the weights' (native) or the activations' (packed): the same here
        constexprs.update(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, DOT=kernels.TL_DTYPE[dtype],
                          PRECISION="ieee" if dtype == torch.float32 else "tf32")
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    source = ASTSource(fn, signature(fn, dtype, fmt, constexprs), constexprs)
    return triton.compile(source, target=GPUTarget("cuda", cc, 32))


def compile_in_fresh_process(variants: list[tuple]) -> None:
    """Compile these (kernel, cc, dtype name, fmt, bias, act) in a process without TRITON_INTERPRET
    (which the test session sets, and under which triton.jit makes functions only the interpreter
    can run); fails with the compiler's message for each variant that did not compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, json.dumps(variants)], env=env, capture_output=True, text=True,
                          timeout=1800, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-3000:]
    failed = json.loads(done.stdout.splitlines()[-1])
    assert not failed, "\n".join(failed)


def test_each_kernel_compiles_for_each_target():
    """Each kernel at int4 bf16 with biases and the clamped SwiGLU; the up kernels with every other
    activation too (the activation lives there)."""
    acts = sorted(set(kernels.ACT.values()) - {1})
    compile_in_fresh_process([(name, cc, "bf16", kernels.INT4, True, 1) for name in KERNELS for cc in TARGETS] +
                             [(name, cc, "bf16", kernels.INT4, False, act) for name in KERNELS if name.endswith("_up")
                              for cc in TARGETS for act in acts])


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_every_target():
    variants = [(name, cc, dtype, fmt, bias, act)
                for name, cc, dtype, fmt, bias, act in itertools.product(KERNELS, TARGETS, DTYPES.values(), FORMATS,
                                                                        (False, True), sorted(kernels.ACT.values()))
                if act == 0 or name.endswith("_up")]  # the activation lives in the up kernels
    compile_in_fresh_process(variants)


def main(variants: list[list]) -> list[str]:
    """What failed to compile, one line each, with the compiler's last words."""
    by_name = {name: dtype for dtype, name in DTYPES.items()}
    failed = []
    for name, cc, dtype, fmt, bias, act in variants:
        try:
            compiled = compile_kernel(name, cc, by_name[dtype], fmt, bias, act)
            assert f".target sm_{cc}" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 0, "no sm_{cc} cubin"
        except Exception as e:  # every compiler error, reported per variant
            failed.append(f"{name} sm_{cc} {dtype} fmt {fmt} bias {bias} act {act}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
    return failed


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
