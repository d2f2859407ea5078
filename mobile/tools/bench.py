"""`mobile bench`: the same prompt decoded under each policy, one after another in one process.

With --text, the prompt and the decode steps come from a text file, teacher-forced: every policy
decodes exactly the same tokens, real text rather than a small model's repetitive greedy output.

Ratios are to --baseline (default: the first policy). On a CPU the host-to-device link is emulated; its bandwidth is
fixed once, before the rows (with --link-ratio: calibrated), then shared by every policy, so all rows see one link.
An emulated host (host placement) is likewise timed once per expert format (at native by the link's calibration,
else by the first row with a host in that format), and every later row and run pads to that same unit.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

from mobile import policy as registry
from mobile.errors import MobileError
from mobile.models.weights import TORCH_DTYPES
from mobile.moe.transfer import calibrated_gbps
from mobile.outputs import atomic_write_text
from mobile.runtime.engine import Engine
from mobile.runtime.load import resolve_policy
from mobile.tools.evaluate import load_ids
from mobile.tools.profile import take_profile


def measure(engine: Engine, label: str, tokens: int, prompt_len: int, text: str | None, seed: int) -> dict:
    """One run of one row: a warm-up, then the timed decode; returns the row's numbers."""
    forced = None
    if text:
        ids = load_ids(engine, text, prompt_len + tokens)
        if ids.numel() < prompt_len + tokens:
            raise MobileError(f"the text has {ids.numel()} tokens, fewer than --prompt-len + --tokens = "
                              f"{prompt_len + tokens}", where=text)
        prompt, forced = ids[:prompt_len], ids[prompt_len:].tolist()
    else:
        vocab = engine.spec.model.vocab_size
        prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(seed))
    engine.generate(prompt, 4, stop_ids=[], forced=forced)  # warm-up: first-touch costs stay out of the numbers
    engine.reset_stats()
    engine.generate(prompt, tokens, stop_ids=[], forced=forced)
    s = engine.stats
    looked_up = s["expert_hits"] + s["expert_misses"]
    run_s = s["decode_s"] + (s["prefill_tokens"] / s["prefill_tokens_per_s"] if s["prefill_tokens_per_s"] else 0.0)
    print(f"  {label}: {s['decode_tokens_per_s']:.2f} tok/s", file=sys.stderr)
    return {
        "policy": label, "link": s["link"], "fallback_rate": s["fallback_rate"],
        "expert_format": engine.spec.runtime.expert_format, "expert_bytes": s.get("expert_bytes"),
        "cache_slots_per_layer": s.get("cache_slots_per_layer"),
        "eviction": s.get("eviction", "-"),  # offloading runs only
        "decode_tokens_per_s": s["decode_tokens_per_s"],
        "bytes_per_token": s.get("decode_bytes_h2d", 0) / max(1, s["decode_tokens"]),
        "bytes_vs_big_only": s.get("decode_bytes_vs_big_only"),
        "stall_fraction": s.get("decode_stall_s", 0.0) / max(1e-9, s.get("decode_s", 0.0)),
        "hit_rate": s["expert_hits"] / looked_up if looked_up else None,  # None: no cache to look up
        # what share of the run (its prompt too) the link and the host spent on experts
        "link_busy": s.get("link_busy_s", 0.0) / max(1e-9, run_s),
        "host_busy": s["host_busy_s"] / max(1e-9, run_s) if "host_busy_s" in s else None,
        "host": s.get("host", "none"), "host_ratio": s.get("host_ratio"), "host_pair_us": s.get("host_pair_us"),
        "prefetch_accuracy": (s["prefetch_used"] / s["prefetch_issued"]) if s.get("prefetch_issued") else None,
        "host_syncs_per_token": s.get("host_syncs_per_token"),
        "cuda_graphs": s["cuda_graphs"], "graph_replays_per_token": s.get("graph_replays_per_token"),
        "graph_eager_segments": s["graph_eager_segments"],
    }


def median_row(runs: list[dict]) -> dict:
    """Each numeric field's median over the runs (the lower middle one for an even count)."""
    row = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = sorted(r[key] for r in runs if r[key] is not None)
            row[key] = values[(len(values) - 1) // 2]
    tps = [r["decode_tokens_per_s"] for r in runs]
    row["runs"], row["tokens_per_s_min"], row["tokens_per_s_max"] = len(runs), min(tps), max(tps)
    return row


# under this many decode tokens per run, or with one run per row, warm-up and noise swamp the ratios
MIN_TOKENS = 128


def with_profile(graph: str, runs: list[tuple[str, str, dict]], text: str | None, tokens: int | None,
                 weights: str | None, device: str, out
                 ) -> tuple[list[tuple[str, str, dict]], tempfile.TemporaryDirectory | None]:
    """The runs, each hybrid-static one given the routing profile taken on `text` unless it names
    its own; and the temporary folder the profile is in, for this bench only (removed when the
    caller lets go of it)."""
    static = [i for i, (_, policy, options) in enumerate(runs)
              if policy == "hybrid-static" and not options.get("profile")]
    if not static:
        return runs, None
    if text is None:
        raise MobileError("a hybrid-static row needs a routing profile: --profile-text FILE takes one (on another "
                          "text than --text), or give the row profile=FILE", key="--profile-text")
    profile = take_profile(graph, text, tokens, weights=weights, device=device)
    scratch = tempfile.TemporaryDirectory(prefix="mobile-profile-")
    path = Path(scratch.name) / "profile.json"
    profile.save(path)
    print(f"routing profile for hybrid-static: {profile.tokens} tokens of {text}", file=out or sys.stdout)
    return [(label, policy, {**options, "profile": str(path)}) if i in static else (label, policy, options)
            for i, (label, policy, options) in enumerate(runs)], scratch


def calibrated_link(graph: str, ratio: float | None) -> dict:
    """The emulated link, fixed once for every row: link_gbps; calibrated from --link-ratio (else
    the spec's runtime.link), also link_ratio and its unit, expert_compute_us, the time this machine
    takes to compute one native expert for one token (mobile.moe.transfer.calibrated_gbps)."""
    _, spec = resolve_policy(Path(graph))
    gbps, calibration = calibrated_gbps(spec, torch.device("cpu"), TORCH_DTYPES[spec.dtype], None, ratio)
    return {"link_gbps": round(gbps, 4), **calibration}


def run_bench(graph: str, policies: list[str], weights: str | None = None, device: str = "cpu", tokens: int = 32,
              prompt_len: int = 8, link_gbps: float | None = None, link_ratio: float | None = None, seed: int = 0,
              json_out: str | None = None, taus: list[float] | None = None, baseline: str | None = None,
              text: str | None = None, policy_options: dict | None = None, repeats: int = 1,
              kv_refreshes: list[int] | None = None, extra_rows: list[tuple[str, str, dict]] | None = None,
              compile: bool = False, expert_formats: list[str] | None = None, expert_group_size: int | None = None,
              cuda_graphs: list[str] | None = None, profile_text: str | None = None,
              profile_tokens: int | None = None, out=None) -> list[dict]:
    """policy_options: policy fields for every row (little_k, layer_tau, ...); taus: one row per tau;
    kv_refreshes: one mobile row per value (per tau); extra_rows: (label, policy, policy options), more
    rows after the others, with only their own options. expert_formats: every row once per format
    (labelled with it), at the same cache bytes; default: the graph's format only. cuda_graphs:
    every row once per mode (auto, on, off; labelled graphs=MODE when more than one); default: the
    spec's runtime.cuda_graphs.
    repeats: runs per row, round-robin over the rows (so slow drift hits every row alike); each
    number reported is the median over the runs. profile_text: a routing profile is taken on this
    text (its first profile_tokens tokens) for the hybrid-static rows that name none."""
    out = out or sys.stdout  # looked up per call: the stream may be swapped (tests, redirection)
    link: dict = {"link_gbps": link_gbps}
    runs: list[tuple[str, str, dict]] = []  # (label, policy, policy options)
    for p in policies:
        variants: list[tuple[str, dict]] = [("", {})]
        if registry.get(p).can_tune_tau and taus:
            variants = [(f" tau={t:g}", {"tau": t}) for t in taus]
        if registry.get(p).fallback and kv_refreshes:
            variants = [(f"{label} kv={r}", {**v, "kv_refresh": r}) for label, v in variants for r in kv_refreshes]
        runs += [(p + label, p, {**(policy_options or {}), **v}) for label, v in variants]
    runs += extra_rows or []
    runs, _profile_dir = with_profile(graph, runs, profile_text, profile_tokens, weights, device, out)
    formats: list[str | None] = list(expert_formats) if expert_formats else [None]
    modes: list[str | None] = list(cuda_graphs) if cuda_graphs else [None]
    rowed = [(label + ("" if fmt is None else f" {fmt}") + (f" graphs={mode}" if len(modes) > 1 else ""),
              policy, options, fmt, mode)
             for label, policy, options in runs for fmt in formats for mode in modes]
    samples: dict[str, list[dict]] = {label: [] for label, *_ in rowed}
    if baseline is not None and baseline not in samples:  # checked before an hour of runs, not after
        raise MobileError(f"no row is labelled {baseline!r} (the rows: {', '.join(samples)})", key="--baseline")
    short = [f"{tokens} decode tokens per run (under {MIN_TOKENS})"] if tokens < MIN_TOKENS else []
    short += ["one run per row (--repeats 1)"] if repeats == 1 else []
    if short:
        print(f"mobile: warning: {' and '.join(short)}: too short for the ratios to mean much; use --tokens "
              f"{MIN_TOKENS} or more and --repeats 3", file=sys.stderr)
    host_units: dict[str, float] = {}  # an emulated host's unit (us), per expert format
    if device == "cpu" and link_gbps is None:
        # one measurement, before every row: the link's unit, and the emulated host's at native
        link = calibrated_link(graph, link_ratio)
        if "expert_compute_us" in link:
            host_units["native"] = link["expert_compute_us"]
    for _ in range(repeats):
        for label, policy, options, fmt, mode in rowed:
            engine = Engine.load(graph, weights=weights, device=device, policy=policy, progress=True,
                                 policy_options=options, compile=compile, link_gbps=link["link_gbps"],
                                 link_ratio=None if link["link_gbps"] else link_ratio, expert_format=fmt,
                                 expert_group_size=expert_group_size if fmt not in (None, "native") else None,
                                 cuda_graphs=mode, host_units=host_units)
            if engine.stats.get("host") == "emulated":  # the host's unit: measured once per format
                host_units.setdefault(engine.spec.runtime.expert_format, engine.stats["host_pair_us"])
            samples[label].append(measure(engine, label, tokens, prompt_len, text, seed))
            engine.close()
            del engine
            gc.collect()
    rows = [median_row(samples[label]) for label, *_ in rowed]
    base_row = next(r for r in rows if r["policy"] == baseline) if baseline is not None else rows[0]
    base = base_row["decode_tokens_per_s"] or 1.0
    for r in rows:
        r["ratio"] = r["decode_tokens_per_s"] / base
    emulated = any(r["link"] == "emulated" for r in rows)
    desc = ", ".join(f"{k}={v}" for k, v in link.items() if v is not None)
    what = (f"{prompt_len}-token prompt and {tokens} teacher-forced decode tokens from {text}" if text
            else f"{prompt_len}-token random prompt and {tokens} greedy decode tokens")
    what += f"; median of {repeats} runs per row, round-robin" if repeats > 1 else ""
    what += "; compute segments compiled (torch.compile)" if compile else ""
    if any(r["cuda_graphs"] == "emulated" for r in rows):
        what += "; CUDA graphs EMULATED where on (static buffers, nothing captured on a CPU)"
    host_ratios = sorted({r["host_ratio"] for r in rows if r["host"] == "emulated"})
    formats_run = {r["expert_format"] for r in rows if r["host"] == "emulated"}
    print(f"\nbench {graph}: {what}, device {device}"
          + (f"; link EMULATED ({desc})" if emulated else "")
          + (f"; host EMULATED (host_ratio={', '.join(f'{h:g}' for h in host_ratios)}: the host expert kernel runs, "
             "its time padded to that many times the device's for the same expert, measured once: "
             + ", ".join(f"{name} {us:.2f} us" for name, us in host_units.items() if name in formats_run) + ")"
             if host_ratios else ""), file=out)
    width = max(20, *(len(r["policy"]) for r in rows))
    graphed = any(r["cuda_graphs"] != "off" for r in rows)  # then: graph replays per decoded token, eager segments
    print(f"{'policy':<{width}} {'evict':>5} {'tok/s':>9} {'vs ' + base_row['policy']:>16} {'MiB/token':>10} "
          f"{'stall':>7} {'link busy':>9} {'host busy':>9} {'hit rate':>9} {'prefetch acc':>13} {'fallback':>9} "
          f"{'bytes vs big-only':>18}"
          + (f" {'graphs/tok':>10} {'eager segs':>10}" if graphed else ""), file=out)
    for r in rows:
        acc = "-" if r["prefetch_accuracy"] is None else f"{r['prefetch_accuracy']:.2f}"
        vs_big = "-" if r["bytes_vs_big_only"] is None else f"{r['bytes_vs_big_only']:.2f}x"
        per_token = "-" if r["graph_replays_per_token"] is None else f"{r['graph_replays_per_token']:.2f}"
        hits = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        host = "-" if r["host_busy"] is None else f"{r['host_busy']:.2f}"
        print(f"{r['policy']:<{width}} {r['eviction']:>5} {r['decode_tokens_per_s']:>9.2f} {r['ratio']:>15.2f}x "
              f"{r['bytes_per_token'] / 2**20:>10.2f} {r['stall_fraction']:>7.2f} {r['link_busy']:>9.2f} {host:>9} "
              f"{hits:>9} {acc:>13} "
              f"{r['fallback_rate']:>9.3f} {vs_big:>18}"
              + (f" {per_token:>10} {r['graph_eager_segments']:>10}" if graphed else ""), file=out)
    if any(r["bytes_vs_big_only"] is not None for r in rows):
        print("bytes vs big-only: decode bytes moved / what big-only demand decoding with the same slots and eviction "
              "would have moved on the same routes in the same run (an estimate: mobile.moe.shadow)",
              file=out)
    if json_out:
        atomic_write_text(json_out, json.dumps({"written_by": "mobile bench", "link": link, "rows": rows}, indent=1))
    return rows
