"""The `mobile` command line.

    mobile compile SPEC.yaml [-o DIR]        spec -> scheduled graph + dumps (needs no weights)
    mobile run --graph DIR --prompt TEXT     generate text with a compiled graph
    mobile serve --graph DIR [--port 8000]   an OpenAI-compatible HTTP server (needs the serve extra)
    mobile import-hf DIR [-o FILE]           write a spec from a Hugging Face config.json
    mobile bench --graph DIR --policies ...  compare policies side by side (tokens/s, bytes, stalls)
    mobile eval --graph DIR --data FILE      quality of a policy on held-out text, next to big experts
    mobile synth SPEC -o DIR [--layers N]    random weights at a spec's real shapes, for benchmarks
    mobile quantize CKPT -o DIR --format F   a copy of a checkpoint with int8 / int4 routed experts

Errors a user can fix print one line, `mobile: error: FILE: KEY: what was expected`, and exit 2;
a run that cannot go on (non-finite logits, a failed worker thread) prints one line and exits 1;
Ctrl-C exits 130. --debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from mobile import policy as policies
from mobile.errors import MobileError
from mobile.moe import formats
from mobile.outputs import atomic_write_text, check_file

POLICIES = list(policies.NAMES)
GRAPH_MODES = ["auto", "on", "off"]


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


def cmd_compile(args: argparse.Namespace) -> int:
    from mobile.compiler.compile import compile_to_dir, memory_lines, memory_problems
    from mobile.compiler.ir import Op
    from mobile.compiler.passes import spec_of
    from mobile.spec.load import format_changes

    runtime = format_changes(args.expert_format, args.expert_group_size)
    device_memory, host_ram = byte_flag(args.device_memory, "--device-memory"), byte_flag(args.host_ram, "--host-ram")

    def check(spec) -> None:  # before anything is written
        if args.strict and (found := memory_problems(spec, device_memory, host_ram)):
            raise MobileError(f"the memory plan does not fit: {'; '.join(found)} (without --strict this is a warning)",
                              key="--strict")

    out, g = compile_to_dir(args.spec, args.out, policy=args.policy, policy_options=policy_changes(args),
                            runtime=runtime, check=check, force=args.force)
    spec = spec_of(g)
    problems = memory_problems(spec, device_memory, host_ram)
    from mobile.compiler.emit import summarize

    s = summarize(g)
    segments = len({n.attr("seg") for n in g.nodes if n.attr("seg") is not None})
    print(f"compiled {g.name}: {len(g.nodes)} nodes, {segments} compute segments -> {out}/")
    plan = g.spec["runtime"]["plan"]
    print(f"  planned decode step on {plan['device']}: {s['step_us']:.1f} us (compute {s['compute_us']:.1f}, copy "
          f"{s['copy_us']:.1f}, stall {s['stall_us']:.1f})")
    print(f"    a cost model of the card the spec plans for (runtime.plan.device), not of this machine: "
          f"{plan['compute_tflops']:g} TFLOP/s, {plan['hbm_gbps']:g} GB/s memory, {plan['link_gbps']:g} GB/s host link")
    if policies.get(spec.policy.name).fallback and not any(n.op is Op.IMPORTANCE_GATE for n in g.nodes):
        print("  no importance gate can fire (tau 0): removed; the big pass runs for prompts only")
    for line in memory_lines(spec):
        print(f"  {line}")
    for problem in problems:
        print(f"mobile: warning: {problem}", file=sys.stderr)
    return 0


def byte_flag(text: str | None, flag: str) -> int | None:
    from mobile.spec.validate import parse_bytes

    if text is None:
        return None
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise MobileError(str(e), key=flag) from None


def engine_options(args: argparse.Namespace) -> dict:
    """Engine.load's arguments from the options run and serve share (add_engine_options and the rest)."""
    return dict(graph_dir=args.graph, weights=args.weights, device=args.device, policy=args.policy,
                policy_options=policy_changes(args), expert_format=args.expert_format,
                expert_group_size=args.expert_group_size, compile=args.compile, link_gbps=args.link_gbps,
                link_ratio=args.link_ratio, cuda_graphs=args.cuda_graphs)


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from mobile.runtime.detokenize import TextStream
    from mobile.runtime.engine import Engine, GenerationInterrupted

    if args.prompt is None and args.prompt_ids is None:
        raise MobileError("give a prompt: --prompt TEXT or --prompt-ids 1,2,3", key="--prompt")
    sampling = [f for f, v in (("--temperature", args.temperature), ("--top-p", args.top_p), ("--seed", args.seed))
                if v is not None]
    if args.greedy and sampling:
        raise MobileError(f"--greedy decodes without sampling, so {', '.join(sampling)} would be ignored; drop "
                          "one or the other", key="--greedy")
    if args.trace is not None:
        check_file(args.trace, "run", args.force, key="--trace")  # before the work, not after it
    if args.prompt_ids is not None:  # before anything heavy loads
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise MobileError(f"expected comma-separated integers, got {args.prompt_ids!r}",
                              key="--prompt-ids") from None
    engine = Engine.load(**engine_options(args), progress=not args.json, trace=args.trace is not None)
    if args.prompt_ids is None:
        ids = engine.tokenizer.encode(args.prompt)
    engine.check_ids(ids, key="--prompt-ids")  # before any of them is decoded back to text
    tok = None
    if args.prompt is not None or not args.json:
        try:
            tok = engine.tokenizer
        except MobileError:
            tok = None  # token ids in, token ids out
    stream = not args.json and tok is not None
    # incremental: on_token runs inside the timed decode loop, so it must not re-decode every token so far
    pieces = TextStream(tok) if stream else None

    def on_token(t: int) -> None:
        if pieces is not None and (piece := pieces.push(t)):
            sys.stdout.write(piece)
            sys.stdout.flush()

    if args.compile:
        print("mobile: compiling the prompt and decode steps with torch.compile (the first run of each takes a "
              "while; decode tokens/s leaves the compiling step out)", file=sys.stderr)
    if stream and tok is not None:
        sys.stdout.write(tok.decode(ids, skip_special_tokens=True))
    # --temperature / --top-p / --seed imply sampling unless --greedy is given
    sample = not args.greedy and (args.sample or args.temperature is not None or args.top_p is not None
                                  or args.seed is not None)
    try:
        out = engine.generate(torch.tensor(ids), max_new_tokens=args.max_new_tokens, greedy=not sample,
                              temperature=1.0 if args.temperature is None else args.temperature,
                              top_p=1.0 if args.top_p is None else args.top_p,
                              seed=0 if args.seed is None else args.seed, on_token=on_token)
        code = 0
    except GenerationInterrupted as e:  # Ctrl-C: what was made is printed as usual (stopped: interrupted)
        out, code = e.new_ids, 130
    if pieces is not None:
        sys.stdout.write(pieces.finish())
    text = tok.decode(out, skip_special_tokens=True) if tok is not None else None
    stats = engine.stats
    engine.close()
    if stats.get("stopped") == "context":
        limit = ("the model's context" if engine.max_seq_len == engine.spec.model.max_position_embeddings
                 else "runtime.max_seq_len")
        print(f"mobile: note: generation stopped at {limit} of {engine.max_seq_len} "
              f"tokens ({len(ids)} prompt + {len(out)} new)", file=sys.stderr)
    if args.trace is not None:
        engine.write_trace(args.trace)
    if args.json:
        # "text" is what plain mode prints, the prompt and its continuation; "new_text" the continuation
        prompt_text = tok.decode(ids, skip_special_tokens=True) if tok is not None else None
        print(json.dumps({"prompt_ids": list(ids), "ids": out, "text": None if text is None else prompt_text + text,
                          "new_text": text, "stats": stats}))
    else:
        print("" if stream else " ".join(str(t) for t in out))  # the streamed text ends with a newline
        if args.stats:
            print_stats(stats)
    if args.trace is not None:
        print(f"wrote measured trace {args.trace}", file=sys.stderr)
    if code == 130:
        print("mobile: interrupted", file=sys.stderr)
    return code


def print_stats(stats: dict) -> None:
    """--stats in plain mode: one key a line on stderr, bytes in KiB/MiB/GiB (--json keeps the counts)."""
    from mobile.compiler.emit import human_bytes

    for k, v in stats.items():
        if "bytes" in k and isinstance(v, int):
            v = human_bytes(v) if v else "0"
        print(f"{k:>26}: {v:.2f}" if isinstance(v, float) else f"{k:>26}: {v}", file=sys.stderr)
    if stats["link"] == "emulated":
        print("(link: emulated on this machine; transfer times are modeled, not a real PCIe link)", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    from functools import partial

    try:
        from mobile.serve.server import Service
    except ImportError as e:
        if e.name not in ("fastapi", "starlette", "uvicorn"):
            raise
        raise MobileError(f"{e.name} is not installed: mobile serve needs the serve extra, pip install "
                          "'mobile-moe[serve]'") from None
    from mobile.runtime.engine import Engine

    load = partial(Engine.load, **engine_options(args), progress=True)
    api_key = args.api_key if args.api_key is not None else os.environ.get("MOBILE_API_KEY")
    service = Service(load, host=args.host, port=args.port, api_key=api_key or None, max_queue=args.max_queue,
                      drain_timeout_s=args.drain_timeout)
    spec = service.engine.spec
    print(f"mobile: serving {service.model.name} at {service.url}/v1 (policy {spec.policy.name}, link "
          f"{service.engine.stats_.link}, up to {args.max_queue} requests queued); Ctrl-C drains and stops",
          file=sys.stderr, flush=True)
    service.run()
    print("mobile: stopped", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mobile.tools.bench import run_bench

    if args.json is not None:
        check_file(args.json, "bench", args.force, key="--json")
    policies = names(args.policies, POLICIES, "policy", "--policies")
    rows = [parse_row(text) for text in args.row or []]
    taus = parse_floats(args.taus, "--tau") if args.taus is not None else None
    refreshes = parse_floats(args.kv_refreshes, "--kv-refresh", 0, 2**31) if args.kv_refreshes is not None else None
    if refreshes and any(r < 0 or r != int(r) for r in refreshes):
        raise MobileError(f"expected comma-separated integers >= 0, got {args.kv_refreshes!r}", key="--kv-refresh")
    expert_formats = (None if args.expert_formats is None
                      else names(args.expert_formats, formats.FORMATS, "expert format", "--expert-format"))
    run_bench(args.graph, policies, weights=args.weights, device=args.device, tokens=args.tokens,
              prompt_len=args.prompt_len, link_gbps=args.link_gbps, link_ratio=args.link_ratio,
              seed=args.seed, json_out=args.json, taus=taus, baseline=args.baseline, text=args.text,
              kv_refreshes=[int(r) for r in refreshes] if refreshes else None, extra_rows=rows,
              policy_options=policy_changes(args), repeats=args.repeats, compile=args.compile,
              expert_formats=expert_formats, expert_group_size=args.expert_group_size,
              cuda_graphs=graph_modes(args.cuda_graphs))
    return 0


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


def cmd_synth(args: argparse.Namespace) -> int:
    from mobile.tools.synth import write_synthetic_checkpoint

    out = write_synthetic_checkpoint(args.spec, args.out, layers=args.layers, seed=args.seed, dtype=args.dtype,
                                     force=args.force)
    print(f"wrote synthetic checkpoint {out} and its spec {out / 'spec.yaml'}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mobile.compiler.emit import load_graph
    from mobile.tools.evaluate import KEYS, format_rows, plot_rows, run_eval

    for path, flag in ((args.out, "--out"), (args.plot, "--plot")):
        if path is not None:
            check_file(path, "eval", args.force, key=flag)
    policy = args.policy or load_graph(args.graph).spec.get("policy", {}).get("name", policies.REFERENCE)
    base = {"name": policy, **policy_changes(args)}
    if args.sweep_tau:
        if not policies.get(policy).can_tune_tau:
            tuned = ", ".join(n for n, p in policies.POLICIES.items() if p.can_tune_tau)
            raise MobileError(f"policy {policy} has no tau to sweep (one of {tuned} has)", key="--sweep-tau")
        taus = parse_floats(args.sweep_tau, "--sweep-tau")
        configs = [(f"{policy} tau={t:g}", {**base, "tau": t}) for t in taus]
    else:
        # a policy that decodes exactly as big experts do is the reference row itself, at native precision
        fmt = args.expert_format
        exact = policies.eval_mode(policy, True) == "reference" and fmt in (None, "native")
        configs = [] if exact else [(policy if fmt is None else f"{policy} {fmt}", base)]
    rows = run_eval(args.graph, args.data, configs, weights=args.weights, window=args.window,
                    max_tokens=args.max_tokens, device=args.device, expert_format=args.expert_format,
                    expert_group_size=args.expert_group_size, cuda_graphs=args.cuda_graphs)
    if args.json:
        picked = rows if args.sweep_tau else [rows[-1]]
        objs = [{k: r[k] for k in KEYS if k in r} | {"label": r["label"]} for r in picked]
        print(json.dumps(objs if args.sweep_tau else objs[0]))
        return 0
    print(format_rows(rows))
    if args.sweep_tau and args.plot:
        if plot_rows(rows, args.plot):
            print(f"wrote {args.plot}", file=sys.stderr)
        else:
            print("matplotlib is not installed (pip install 'mobile-moe[plot]'); no plot written", file=sys.stderr)
    if args.out:
        atomic_write_text(args.out, json.dumps({"written_by": "mobile eval", "rows": rows}, indent=1))
    return 0


POLICY_FIELDS = ("tau", "little_k", "layer_tau", "mass_tau", "signal", "little_weights", "little_select", "prefetch",
                 "kv_refresh", "cached_complement", "eviction", "layer_rule")


def policy_changes(args: argparse.Namespace) -> dict:
    """The policy fields given on the command line (bench's lists of taus and kv refreshes are
    `args.taus` and `args.kv_refreshes`, not here)."""
    changes = {k: getattr(args, k, None) for k in POLICY_FIELDS}
    if changes["cached_complement"] is not None:
        changes["cached_complement"] = changes["cached_complement"] == "on"
    return {k: v for k, v in changes.items() if v is not None}


def add_policy_options(p: argparse.ArgumentParser, tau_list: bool = False) -> None:
    if tau_list:
        p.add_argument("--tau", dest="taus", metavar="TAU,...", help="comma-separated taus in [0, 1]: one mobile / "
                       "layer-mass row each")
    else:
        p.add_argument("--tau", type=number(float, 0, 1), help="importance threshold in [0, 1] (mobile: a token "
                       "falls back below this confidence, --signal; default 0: never, the per-layer rule decides; 1: "
                       "always) or little-mass share (layer-mass)")
    p.add_argument("--little-k", type=number(int, 1), help="experts in the little set (default ceil(top_k / 2))")
    p.add_argument("--layer-tau", type=number(float, 0, 1), help="mobile: a layer uses more than the little set in the "
                   "little pass when the little set carries less than this share of the big set's router mass "
                   "(default 0.85; 0 turns the rule off)")
    p.add_argument("--layer-rule", choices=["auto", "switch", "prefix"], help="how the per-layer rule picks a "
                   "token's experts: switch, the little set or the whole big set; prefix, the fewest top experts (at "
                   "least little_k) that carry layer_tau of the big set's mass; auto (default): prefix for mobile, "
                   "switch for layer-mass")
    p.add_argument("--mass-tau", type=number(float, 0, 1), help="mobile: a token also falls back when, at any "
                   "layer, its little set carries less than this share of the big set's router mass (default: off)")
    refresh = ("mobile: a fallback's big pass also recomputes up to N accepted little tokens before it, so their "
               "KV entries become big ones (default 0: off)")
    if tau_list:
        p.add_argument("--kv-refresh", dest="kv_refreshes", metavar="N,...",
                       help=refresh + "; comma-separated: one mobile row per value (and per tau)")
    else:
        p.add_argument("--kv-refresh", type=number(int, 0), metavar="N", help=refresh)
    p.add_argument("--cached-complement", choices=["on", "off"], help="mobile and layer-mass: the little pass "
                   "also uses a token's dropped experts that are already in the device cache (no transfer; default "
                   "on)")
    p.add_argument("--eviction", choices=["auto", "lru", "lfu"], help="which cached expert a miss evicts: lru, or "
                   "lfu (fewest recent uses, decayed); auto (default): lru for ondemand, lru and lru-prefetch, lfu for "
                   "the big-little policies")
    p.add_argument("--signal", choices=["max_prob", "entropy", "margin"], help="mobile: the confidence the gate "
                   "reads, each in [0, 1]: the top probability, its margin over the second, or one minus the "
                   "normalized entropy (default max_prob); a token below --tau falls back")
    p.add_argument("--prefetch", choices=["auto", "both", "predicted", "complement", "none"], help="speculative "
                   "copies, each on the link once the demand copies issued with it have landed: next-layer "
                   "prediction, mobile's complement sets, both, or none; auto (default): none where the little pass "
                   "takes what the cache holds, else both")
    p.add_argument("--little-weights", choices=["rescale", "raw"], help="little-set weights")
    p.add_argument("--little-select", choices=["top", "random"], help="random: a random half (a baseline)")


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


def cmd_quantize(args: argparse.Namespace) -> int:
    from mobile.tools.quantize import quantize_checkpoint

    out = quantize_checkpoint(args.ckpt, args.out, args.format, group=args.group_size, spec_path=args.spec,
                              force=args.force)
    print(f"wrote {args.format} checkpoint {out}", file=sys.stderr)
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    import yaml

    from mobile.spec.hf import spec_from_hf_config
    from mobile.spec.load import spec_from_dict

    src = Path(args.dir)
    if args.out:
        check_file(args.out, "import-hf", args.force)
        ckpt = os.path.relpath(src.resolve(), Path(args.out).resolve().parent)
    else:
        ckpt = str(src.resolve())
    data = spec_from_hf_config(src, name=args.name, checkpoint_path=ckpt if args.with_checkpoint else None)
    spec_from_dict(data, source=str(src / "config.json"))  # the result must itself validate
    text = f"# written by `mobile import-hf` from {src / 'config.json'}\n" + yaml.safe_dump(
        data, sort_keys=False, width=100)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mobile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run `mobile COMMAND --help` for each command's options.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    p.add_argument("--threads", type=number(int, 1), help="CPU threads for torch (default: torch's choice). Use 1 when "
                   "another process keeps a core busy: spinning OpenMP threads then cost far more than they gain")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="lower a YAML spec to a scheduled graph and its dumps",
                       description="Lower SPEC to a dataflow graph, run the pass pipeline (streams, "
                       "scheduling, segments, planned timeline) and write DIR/graph.json, schedule.txt, "
                       "schedule.trace.json and graph.dot. Needs no weights.")
    c.add_argument("spec", help="the model spec (YAML), e.g. specs/demo.yaml")
    c.add_argument("-o", "--out", metavar="DIR", help="output folder (default: graphs/<spec name>/)")
    c.add_argument("--policy", choices=POLICIES, help="override the spec's policy.name")
    add_policy_options(c)
    add_format_options(c)
    c.add_argument("--device-memory", metavar="BYTES", help="device memory to fit the plan in, e.g. 8GiB (default: "
                   "the plan device's, runtime.plan.device, when mobile knows it)")
    c.add_argument("--host-ram", metavar="BYTES", help="host RAM the expert store must fit in, e.g. 32GiB")
    c.add_argument("--strict", action="store_true", help="refuse (exit 2) when the memory plan does not fit, "
                   "instead of warning")
    add_force(c, "DIR")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("run", help="generate text with a compiled graph",
                       description="Load a compiled graph and its weights, and generate from a prompt.",
                       epilog="--stats keys are described in docs/stats.md; generation stops at the model's context "
                       "and keeps what it made (stats: stopped: context). Ctrl-C stops it too and prints what it "
                       "made, --stats and --json included (stopped: interrupted; exit 130). Non-finite logits end "
                       "the run naming the first layer whose weights are not finite (exit 1).")
    add_engine_options(r)
    src = r.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs a tokenizer in the checkpoint folder)")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    r.add_argument("--max-new-tokens", type=number(int, 0), default=64, help="tokens to generate (default 64)")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    mode.add_argument("--sample", action="store_true", help="sample (also implied by --temperature, --top-p, --seed)")
    r.add_argument("--temperature", type=number(float, 0, lo_open=True), help="sampling temperature (default 1.0)")
    r.add_argument("--top-p", type=number(float, 0, 1, lo_open=True), help="nucleus sampling mass (default 1.0: off)")
    r.add_argument("--seed", type=number(int, 0), help="sampling seed (default 0); same seed, same text")
    r.add_argument("--policy", choices=POLICIES, help="override the graph's policy")
    add_policy_options(r)
    add_format_options(r)
    r.add_argument("--compile", action="store_true", help="run compute segments through torch.compile")
    r.add_argument("--stats", action="store_true", help="print run statistics to stderr")
    r.add_argument("--json", action="store_true", help='print one JSON object: "prompt_ids", "ids" (the new '
                   'tokens), "text" (the prompt and what follows it, as plain mode prints it), "new_text", "stats"')
    r.add_argument("--trace", metavar="FILE", help="write the measured timeline (Chrome trace, like "
                   "schedule.trace.json) to FILE")
    add_force(r, "the --trace FILE")
    add_link_options(r)
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("serve", help="serve a compiled graph over an OpenAI-compatible HTTP API",
                       description="Load a compiled graph and serve it at /v1/completions, /v1/chat/completions, "
                       "/v1/models, /v1/stats and /health, streamed or not, to any OpenAI client. Requests queue for "
                       "the one engine and run one at a time. SIGINT or SIGTERM drains: requests in flight finish "
                       "(or are cut after --drain-timeout), then the server exits 0. Needs the serve extra: "
                       "pip install 'mobile-moe[serve]'.",
                       epilog="docs/serving.md describes the request fields, the chat fallback for checkpoints "
                       "without a chat template, and the \"mobile\" statistics in every response.")
    add_engine_options(v)
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=number(int, 0, 65535), default=8000, help="port (default 8000; 0: any free one, "
                   "printed at start)")
    v.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 (default: $MOBILE_API_KEY, else none)")
    v.add_argument("--max-queue", type=number(int, 1), default=8, help="requests that may wait while one runs; "
                   "past it the server answers 429 with Retry-After (default 8)")
    v.add_argument("--drain-timeout", type=number(float, 0), default=30.0, metavar="S", help="on SIGINT / SIGTERM, "
                   "seconds to let requests in flight finish before cutting them (default 30)")
    v.add_argument("--policy", choices=POLICIES, help="override the graph's policy")
    add_policy_options(v)
    add_format_options(v)
    v.add_argument("--compile", action="store_true", help="run compute segments through torch.compile")
    add_link_options(v)
    v.set_defaults(fn=cmd_serve)

    b = sub.add_parser("bench", help="compare policies side by side on one model, in one run",
                       description="Decode the same prompt under each policy, one after another in one "
                       "process, and print one table: decode tokens/s and its ratio to the baseline, bytes "
                       "moved per token, stall fraction, cache hit rate, prefetch accuracy, fallback rate, and "
                       "bytes against big-only decoding on the same routes with the same cache (slots and "
                       "eviction). Policy options (--little-k, --prefetch, ...) apply to every row; --tau gives "
                       "mobile and layer-mass one row per value, and "
                       "--kv-refresh gives mobile one row per value (times the taus). Every policy compiled from one "
                       "spec gets the same expert-cache memory.")
    add_engine_options(b, many_graph_modes=True)
    b.add_argument("--policies", default="ondemand,lru,lru-prefetch,mobile,resident",
                   help="comma-separated policies; ratios are to the first (default: %(default)s)")
    add_policy_options(b, tau_list=True)
    b.add_argument("--row", action="append", metavar="'POLICY KEY=VALUE ...'", help="one more row: a policy and "
                   "policy fields, e.g. 'mobile tau=0.1 layer_tau=0.7 cached_complement=false' (repeatable; the "
                   "text is the row's label)")
    add_format_options(b, many=True)
    b.add_argument("--baseline", help="the row ratios are taken against, by its label (default: the first)")
    b.add_argument("--tokens", type=number(int, 1), default=32, help="decode tokens per policy (default 32)")
    b.add_argument("--prompt-len", type=number(int, 1), default=8, help="prompt length in tokens (default 8)")
    b.add_argument("--text", metavar="FILE", help="take the prompt and the decode tokens from the start of this "
                   "text file, teacher-forced, so every policy decodes the same real text (needs the checkpoint's "
                   "tokenizer); default: a random prompt, then greedy decoding")
    b.add_argument("--seed", type=number(int, 0), default=0, help="prompt seed (default 0)")
    b.add_argument("--repeats", type=number(int, 1), default=1,
                   help="runs per row, round-robin; report medians (default 1)")
    b.add_argument("--json", metavar="FILE", help="also write the rows as JSON to this file")
    add_force(b, "the --json FILE")
    b.add_argument("--compile", action="store_true", help="run compute segments through torch.compile (each "
                   "row's warm-up compiles them)")
    add_link_options(b)
    b.set_defaults(fn=cmd_bench)

    e = sub.add_parser("eval", help="quality of a policy on held-out text (every position a decode step)",
                       description="Teacher-forced evaluation in which every position is a decode step, so "
                       "importance decisions, fallbacks and KV contents are those of real decoding. Prints "
                       "perplexity, next-token accuracy, greedy agreement with big experts, fallback rate "
                       "and expert bytes per token, next to big-expert decoding of the same text. A policy whose "
                       "little pass uses the experts already cached (cached_complement, the default for mobile and "
                       "layer-mass) runs with the graph's expert cache and no speculative copies; its bytes are "
                       "what moved, against big-only decoding on the same routes with the same cache.")
    add_engine_options(e)
    e.add_argument("--data", required=True, help="a text file, e.g. demo/data/heldout.txt")
    e.add_argument("--policy", choices=POLICIES, help="policy to evaluate (default: the graph's)")
    add_policy_options(e)
    add_format_options(e)
    e.add_argument("--sweep-tau", metavar="TAU,...", help="comma-separated taus in [0, 1]: one row each (a Pareto "
                   "table)")
    e.add_argument("--plot", help="with --sweep-tau: write a PNG of quality against bytes (needs matplotlib)")
    e.add_argument("--window", type=number(int, 2), default=256, help="tokens per window; the KV cache restarts "
                   "at each (default 256)")
    e.add_argument("--max-tokens", type=number(int, 2), help="evaluate only the first N tokens of the text")
    e.add_argument("--json", action="store_true", help="print JSON: {ppl, accuracy, agreement, fallback_rate, "
                   "bytes_per_token} (a list with --sweep-tau)")
    e.add_argument("--out", metavar="FILE", help="also write every row as JSON to this file")
    add_force(e, "the --out and --plot files")
    e.set_defaults(fn=cmd_eval)

    y = sub.add_parser("synth", help="write a random checkpoint at a spec's real shapes (for benchmarks)",
                       description="Write random weights in Hugging Face layout with the spec's shapes, "
                       "optionally with fewer layers, plus a spec pointing at them.")
    y.add_argument("spec", help="the model spec (YAML)")
    y.add_argument("-o", "--out", required=True, metavar="DIR", help="checkpoint folder to write")
    add_force(y, "DIR")
    y.add_argument("--layers", type=number(int, 1), help="keep only this many layers (default: all)")
    y.add_argument("--seed", type=number(int, 0), default=0)
    y.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the written spec (default: the spec's; CPUs without native bf16 "
                   "run bfloat16 matmuls ~15x slower than float32)")
    y.set_defaults(fn=cmd_synth)

    q = sub.add_parser("quantize", help="write a copy of a checkpoint with int8 or int4 routed experts",
                       description="Pack every routed expert of CKPT (a Hugging Face folder) as int8 or int4 "
                       "(mobile.moe.quant's layout: weights, scales and zeros per expert projection) and write the "
                       "result to DIR: safetensors, a config.json that records the format, the tokenizer files "
                       "copied. Other weights keep their dtype. Streams one layer at a time and writes atomically. "
                       "run, eval, bench, compile and import-hf take DIR as it is.")
    q.add_argument("ckpt", help="the native checkpoint folder")
    q.add_argument("-o", "--out", required=True, metavar="DIR", help="the folder to write")
    add_force(q, "DIR")
    q.add_argument("--format", required=True, choices=["int8", "int4"], help="the expert format")
    q.add_argument("--group-size", type=number(int, 0), metavar="G", help="input rows per scale (default: 64 for "
                   "int4; 0, one scale per output column, for int8)")
    q.add_argument("--spec", help="take tensor names and shapes from this spec instead of CKPT/config.json")
    q.set_defaults(fn=cmd_quantize)

    i = sub.add_parser("import-hf", help="write a spec from a Hugging Face config.json",
                       description="Read DIR/config.json (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, "
                       "DeepSeek-V2) and write a mobile spec whose checkpoint is DIR.")
    i.add_argument("dir", help="a Hugging Face checkpoint folder (or just its config.json)")
    i.add_argument("-o", "--out", metavar="FILE", help="spec file to write (default: print to stdout)")
    add_force(i, "FILE")
    i.add_argument("--name", help="spec name (default: from the config or folder name)")
    i.add_argument("--no-checkpoint", dest="with_checkpoint", action="store_false",
                   help="leave checkpoint.path empty (for specs of models you don't have)")
    i.set_defaults(fn=cmd_import_hf)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            import torch  # inside the try: Ctrl-C while torch imports ends as cleanly as later

            torch.set_num_threads(args.threads)
        return args.fn(args)
    except MobileError as e:
        if args.debug:
            raise
        hint = " (--debug shows where)" if e.__cause__ is not None and e.exit_code == 1 else ""
        print(f"mobile: error: {e.one_line()}{hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mobile: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`mobile compile ... | head`): stop quietly, as shell tools do;
        # stdout now points nowhere, so the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
