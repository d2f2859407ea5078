"""Triton kernels, shipped as `mobile.kernels` (see pyproject.toml for why not a top-level `kernels`).

Each kernel has a plain-torch reference in mobile.ops and is tested against it, on the CPU with
TRITON_INTERPRET=1 and on a GPU when one is available.
"""
