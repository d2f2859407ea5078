"""The `mobile` command line's parser: each command's flags, with the shared ones from
mobile.cli.options."""

from __future__ import annotations

import argparse

from mobile.cli import commands
from mobile.cli.options import (
    POLICIES,
    Parser,
    add_engine_options,
    add_force,
    add_format_options,
    add_link_options,
    add_policy_options,
    device_name,
    number,
)


def usage() -> str:
    """The command list at the top of mobile.cli's docstring: `mobile --help` prints it."""
    import mobile.cli

    return (mobile.cli.__doc__ or "").split("\n\n")[0]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mobile", description=usage(),
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
    c.set_defaults(fn=commands.cmd_compile)

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
    r.set_defaults(fn=commands.cmd_run)

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
    v.set_defaults(fn=commands.cmd_serve)

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
    b.add_argument("--profile-text", metavar="FILE", help="take a routing profile on this text for the hybrid-static "
                   "rows (their hot sets: each layer's most-used experts); use another text than --text")
    b.add_argument("--profile-tokens", type=number(int, 1), metavar="N", help="profile only the first N tokens of "
                   "--profile-text (default: all)")
    b.add_argument("--seed", type=number(int, 0), default=0, help="prompt seed (default 0)")
    b.add_argument("--repeats", type=number(int, 1), default=1,
                   help="runs per row, round-robin; report medians (default 1)")
    b.add_argument("--json", metavar="FILE", help="also write the rows as JSON to this file")
    add_force(b, "the --json FILE")
    b.add_argument("--compile", action="store_true", help="run compute segments through torch.compile (each "
                   "row's warm-up compiles them)")
    add_link_options(b)
    b.set_defaults(fn=commands.cmd_bench)

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
    e.set_defaults(fn=commands.cmd_eval)

    f = sub.add_parser("profile", help="count how often each layer routes to each expert over a text (a routing "
                       "profile, for hybrid-static)",
                       description="Run a text through the model with every expert resident, in chunks of "
                       "256 positions, each router counting its choices on the device, and write the counts as "
                       "JSON: a routing profile. `--policy hybrid-static --profile FILE` keeps each layer's "
                       "most-used experts of it on the device. Take it on another text than the one you measure "
                       "on, so that the hot sets are not chosen on the test text.")
    f.add_argument("--graph", required=True, help="a folder written by `mobile compile`")
    f.add_argument("--weights", help="checkpoint folder (default: the spec's checkpoint.path)")
    f.add_argument("--device", default="cpu", type=device_name, help="cpu or cuda[:N] (default cpu)")
    f.add_argument("--text", required=True, metavar="FILE", help="the profiling text")
    f.add_argument("--tokens", type=number(int, 1), help="profile only its first N tokens (default: all)")
    f.add_argument("-o", "--out", required=True, metavar="FILE", help="the profile to write (JSON)")
    add_force(f, "FILE")
    f.set_defaults(fn=commands.cmd_profile)

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
    y.set_defaults(fn=commands.cmd_synth)

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
    q.set_defaults(fn=commands.cmd_quantize)

    i = sub.add_parser("import-hf", help="write a spec from a Hugging Face config.json",
                       description="Read DIR/config.json (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, "
                       "DeepSeek-V2) and write a mobile spec whose checkpoint is DIR.")
    i.add_argument("dir", help="a Hugging Face checkpoint folder (or just its config.json)")
    i.add_argument("-o", "--out", metavar="FILE", help="spec file to write (default: print to stdout)")
    add_force(i, "FILE")
    i.add_argument("--name", help="spec name (default: from the config or folder name)")
    i.add_argument("--no-checkpoint", dest="with_checkpoint", action="store_false",
                   help="leave checkpoint.path empty (for specs of models you don't have)")
    i.set_defaults(fn=commands.cmd_import_hf)
    return p
