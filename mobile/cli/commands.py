"""What each command does, once its flags are parsed (mobile.cli.parser): the heavy modules are
imported here, inside the command that needs them, so that `mobile --help` and a bad flag answer
without loading torch."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mobile import policy as policies
from mobile.cli.options import (
    byte_flag,
    engine_options,
    graph_modes,
    names,
    parse_floats,
    parse_row,
    policy_changes,
)
from mobile.errors import MobileError
from mobile.moe import formats
from mobile.outputs import atomic_write_text, check_file

POLICIES = list(policies.NAMES)


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
              cuda_graphs=graph_modes(args.cuda_graphs), profile_text=args.profile_text,
              profile_tokens=args.profile_tokens)
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


def cmd_profile(args: argparse.Namespace) -> int:
    from mobile.tools.profile import take_profile

    check_file(args.out, "profile", args.force)
    profile = take_profile(args.graph, args.text, args.tokens, weights=args.weights, device=args.device)
    profile.save(args.out)
    print(f"routing profile of {profile.tokens} tokens of {args.text} -> {args.out}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from mobile.tools.synth import write_synthetic_checkpoint

    out = write_synthetic_checkpoint(args.spec, args.out, layers=args.layers, seed=args.seed, dtype=args.dtype,
                                     force=args.force)
    print(f"wrote synthetic checkpoint {out} and its spec {out / 'spec.yaml'}", file=sys.stderr)
    return 0


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
