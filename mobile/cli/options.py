"""The options that several commands share, each declared once: the engine's (graph, weights,
device, CUDA graphs), the policy's (every knob of mobile.spec.schema.PolicySpec, as it declares
it), the expert format's, the link's and --force; and the parsers of their values. Validating a
flag here, before anything heavy loads, is what makes a typo cost nothing."""

from __future__ import annotations

import argparse
import re
import sys
import typing
from collections.abc import Sequence

from mobile import policy as policies
from mobile.errors import MobileError
from mobile.moe import formats

POLICIES = list(policies.NAMES)
GRAPH_MODES = ["auto", "on", "off"]
# knobs that bench takes as comma-separated lists (one row per value), and where they land
LIST_KNOBS = {"tau": "taus", "kv_refresh": "kv_refreshes"}


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as mobile's one line (the usage is one `--help` away)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"mobile: error: {message}", file=sys.stderr)
        sys.exit(2)


def number(kind: type, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """An argparse type: an int or a finite float in [lo, hi] ((lo, hi] with lo_open), the range in the message."""
    name = "an integer" if kind is int else "a number"
    bounds = [f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else "", f"<= {hi:g}" if hi is not None else ""]
    expected = f"expected {name} {' and '.join(b for b in bounds if b)}".rstrip()

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
        bad = value != value or value in (float("inf"), float("-inf"))  # nan, inf
        bad |= lo is not None and (value <= lo if lo_open else value < lo)
        bad |= hi is not None and value > hi
        if bad:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    return parse


def device_name(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def parse_floats(text: str, flag: str, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    """A comma-separated list of numbers in [lo, hi], at least one."""
    expected = f"expected comma-separated numbers in [{lo:g}, {hi:g}], got {text!r}"
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise MobileError(expected, key=flag) from None
    if not values or not all(lo <= v <= hi for v in values):  # nan fails both
        raise MobileError(expected, key=flag)
    return values


def byte_flag(text: str | None, flag: str) -> int | None:
    from mobile.spec.validate import parse_bytes

    if text is None:
        return None
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise MobileError(str(e), key=flag) from None


def names(text: str, choices: Sequence[str], what: str, flag: str) -> list[str]:
    """A comma-separated list of at least one name, each one of `choices` (empty items are skipped)."""
    out = [t.strip() for t in text.split(",") if t.strip()]
    if not out:
        raise MobileError(f"expected at least one {what}, comma-separated ({', '.join(choices)}), got {text!r}",
                          key=flag)
    for name in out:
        if name not in choices:
            raise MobileError(f"unknown {what} {name!r} (choose from {', '.join(choices)})", key=flag)
    return out


def graph_modes(text: str | None) -> list[str] | None:
    return None if text is None else names(text, GRAPH_MODES, "CUDA-graphs mode", "--cuda-graphs")


def parse_row(text: str) -> tuple[str, str, dict]:
    """'mobile tau=0.1 layer_tau=0.7' -> (label, policy, {field: value}), values read as YAML."""
    import dataclasses

    import yaml

    from mobile.spec.schema import PolicySpec

    words = text.split()
    if not words or words[0] not in POLICIES:
        raise MobileError(f"expected a policy ({', '.join(POLICIES)}) then key=value pairs, got {text!r}", key="--row")
    fields = {f.name for f in dataclasses.fields(PolicySpec)} - {"name"}
    options = {}
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if not eq or key not in fields:
            raise MobileError(f"expected key=value with a policy field as key ({', '.join(sorted(fields))}), "
                              f"got {word!r}", key="--row")
        options[key] = yaml.safe_load(value)
    return text, words[0], options


def policy_changes(args: argparse.Namespace) -> dict:
    """The policy knobs given on the command line (bench's lists of taus and kv refreshes are
    `args.taus` and `args.kv_refreshes`, not here)."""
    from mobile.spec.schema import PolicySpec

    changes = {f.name: getattr(args, f.name, None) for f in PolicySpec.knobs()}
    return {k: (v == "on" if isinstance(v, str) and v in ("on", "off") else v) for k, v in changes.items()
            if v is not None}


def add_policy_options(p: argparse.ArgumentParser, tau_list: bool = False) -> None:
    """A flag per policy knob, as PolicySpec declares it: --little-k for little_k, its help, its
    range, its choices (on|off for a switch). tau_list: LIST_KNOBS take comma-separated lists, one
    bench row per value."""
    from mobile.spec.schema import PolicySpec

    types = typing.get_type_hints(PolicySpec)
    for f in PolicySpec.knobs():
        flag, help, lo, hi = "--" + f.name.replace("_", "-"), f.metadata["help"], f.metadata["lo"], f.metadata["hi"]
        if tau_list and f.name in LIST_KNOBS:
            p.add_argument(flag, dest=LIST_KNOBS[f.name], metavar=f"{f.name.upper()},...",
                           help=f"{help}; comma-separated: one row per value")
            continue
        tp = types[f.name]
        base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)  # X of X | None
        if typing.get_origin(tp) is typing.Literal:
            p.add_argument(flag, choices=list(typing.get_args(tp)), help=help)
        elif base is bool:
            p.add_argument(flag, choices=["on", "off"], help=help)
        elif base is str:
            p.add_argument(flag, metavar="FILE", help=help)
        else:
            p.add_argument(flag, type=number(base, lo, hi), metavar=f.name.upper(), help=help)


def add_engine_options(p: argparse.ArgumentParser, many_graph_modes: bool = False) -> None:
    """What every command that loads an engine takes: the graph, its weights, the device, CUDA graphs."""
    p.add_argument("--graph", required=True, help="a folder written by `mobile compile`")
    p.add_argument("--weights", help="checkpoint folder (default: the spec's checkpoint.path)")
    p.add_argument("--device", default="cpu", type=device_name, help="cpu or cuda[:N] (default cpu)")
    graphs = ("capture each decode compute segment (between two host reads) as a CUDA graph once per token "
              "count and KV length, and replay it: auto (default: the spec's runtime.cuda_graphs, itself auto) is "
              "on for CUDA and off for the CPU; on, on the CPU, runs the same static buffers without capture "
              "(stats: cuda_graphs emulated); the KV cache is then preallocated to runtime.max_seq_len")
    if many_graph_modes:
        p.add_argument("--cuda-graphs", metavar="MODE,...", help=graphs + "; comma-separated: every row once per "
                       "mode")
    else:
        p.add_argument("--cuda-graphs", choices=GRAPH_MODES, help=graphs)


def engine_options(args: argparse.Namespace) -> dict:
    """Engine.load's arguments from the options run and serve share (add_engine_options and the rest)."""
    return dict(graph_dir=args.graph, weights=args.weights, device=args.device, policy=args.policy,
                policy_options=policy_changes(args), expert_format=args.expert_format,
                expert_group_size=args.expert_group_size, compile=args.compile, link_gbps=args.link_gbps,
                link_ratio=args.link_ratio, cuda_graphs=args.cuda_graphs)


def add_format_options(p: argparse.ArgumentParser, many: bool = False) -> None:
    fmt = ("how routed experts are stored, moved and cached: native (the spec's dtype), int8 (symmetric, one scale "
           "per output column by default) or int4 (groups along the input, a scale and zero each); default: the "
           "spec's runtime.expert_format, or the format a quantized checkpoint was written in")
    if many:
        p.add_argument("--expert-format", dest="expert_formats", metavar="FMT,...",
                       help=fmt + "; comma-separated: every row once per format, at the same cache bytes")
    else:
        p.add_argument("--expert-format", choices=list(formats.FORMATS), help=fmt)
    p.add_argument("--expert-group-size", type=number(int, 0), metavar="G", help="input rows per scale for int8/int4 "
                   "(default: 64 for int4; 0, one scale per output column, for int8)")


def add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what} even when mobile did not write it (by "
                   "default mobile writes only where nothing is, or over its own earlier output of this command)")


def add_link_options(p: argparse.ArgumentParser) -> None:
    from mobile.spec.schema import LINK_GBPS, LINK_RATIO  # what a link can physically be

    link = p.add_mutually_exclusive_group()
    link.add_argument("--link-gbps", type=number(float, *LINK_GBPS),
                      help="emulated host-to-device link bandwidth in GB/s (CPU runs)")
    link.add_argument("--link-ratio", type=number(float, *LINK_RATIO), metavar="R",
                      help="calibrated emulated link: moving one expert takes R times as long as computing it "
                      "for one token on this machine (about 40 for an RTX 4090 on PCIe 4.0, 87 for an H200)")
