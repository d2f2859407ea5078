"""The expert formats a spec can name, and what makes a group size valid: the facts the spec
loader and the command line need, without importing torch (mobile.moe.quant holds the numerics and the
packed layout)."""

from __future__ import annotations

FORMATS = ("native", "int8", "int4")
LAYOUT_VERSION = 1
# groups along the input dimension when the spec gives none. int4: 64, measured on the demo model
# against 32 and 128 (docs/quantized-experts.md); int8: one scale per output column, which held
# int8 within +0.02% perplexity there, so per-group scales would buy nothing
DEFAULT_GROUP = {"int8": 0, "int4": 64}


def default_group(fmt: str, group: int | None) -> int:
    return DEFAULT_GROUP.get(fmt, 0) if group is None else group


def group_error(fmt: str, group: int, dims: dict[str, int]) -> str | None:
    """Why `group` cannot quantize matrices whose input dimensions are `dims` ({name: size}), or None."""
    if fmt == "native":
        return None
    if group < 0 or (group == 0 and fmt == "int4"):
        return f"expected a group size >= {1 if fmt == 'int4' else 0} for {fmt}" + \
            (" (0: one scale per output column, int8 only)" if fmt == "int4" else "") + f", got {group}"
    for name, size in dims.items():
        if fmt == "int4" and size % 2:
            return f"int4 packs two input rows per byte, so {name}={size} must be even"
        if group and size % group:
            return f"group size {group} does not divide {name}={size}"
        if fmt == "int4" and group % 2:
            return f"int4 packs two input rows per byte, so the group size must be even, got {group}"
    return None
