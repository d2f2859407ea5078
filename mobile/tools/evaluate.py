"""`mobile eval`: quality of a policy on held-out text, measured the way decoding really runs.

Teacher-forced, but every position is a decode step of its own: the policy's little pass, its
importance gate, its fallbacks and the KV entries they leave are exactly those of real decoding.
The reference is big-expert decoding of the same text (every routed expert of the top-K).

Reported per policy: perplexity, next-token accuracy, agreement of the greedy token with the big
model's, fallback rate, and two byte counts per token, each against the big row's own:
- used: the experts a token's passes use (each (layer, expert) once per token), every row;
- moved: what crossed the (emulated) link, for rows that ran with the graph's expert cache; the
  big row then also runs through that cache (big experts, the same slots and eviction rule), so
  both sides of the ratio are measured the same way. Rows whose cache evicts by another rule get
  a big row of their own.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from mobile import policy as policies
from mobile.compiler.emit import load_graph
from mobile.errors import MobileError
from mobile.models.weights import checkpoint_format
from mobile.progress import progress
from mobile.runtime.engine import Engine
from mobile.runtime.load import resolve_checkpoint, resolve_policy

KEYS = ("ppl", "accuracy", "agreement", "fallback_rate", "bytes_per_token", "bytes_ratio", "moved_per_token",
        "moved_ratio", "eviction")
FAST_LINK_GBPS = 1e4  # an emulated link fast enough that a cached row's eval time is its compute


def load_ids(engine: Engine, data: str | Path, max_tokens: int | None, what: str = "evaluation") -> torch.Tensor:
    """The text file's token ids (its first max_tokens); what: the text's role, for the errors."""
    path = Path(data)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MobileError(f"cannot read the {what} text: {e}", where=path) from None
    ids = torch.tensor(engine.tokenizer.encode(text), dtype=torch.long)
    if ids.numel() < 2:
        raise MobileError(f"the {what} text has fewer than 2 tokens", where=path)
    return ids[:max_tokens] if max_tokens else ids


def windows(ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    return [ids[i:i + window] for i in range(0, ids.numel() - 1, window) if ids[i:i + window].numel() > 1]


@torch.inference_mode()
def big_reference(engine: Engine, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Greedy tokens of big-expert decoding at every position (a prefill is exact for that)."""
    return [engine.logits(c).argmax(-1) for c in chunks]


@torch.inference_mode()
def evaluate_policy(engine: Engine, chunks: list[torch.Tensor], big_greedy: list[torch.Tensor],
                    desc: str = "eval") -> dict:
    engine.reset_stats()
    nll, correct, agree, n = 0.0, 0, 0, 0
    total = sum(c.numel() - 1 for c in chunks)
    with progress(total, desc, "tok") as bar:
        for chunk, ref in zip(chunks, big_greedy, strict=True):
            for t in range(chunk.numel() - 1):
                logits = engine.reader.tensor(engine._forward(chunk[t:t + 1], t)[-1]).float()
                target = int(chunk[t + 1])
                nll -= float(F.log_softmax(logits, -1)[target])
                guess = int(logits.argmax())
                correct += guess == target
                agree += guess == int(ref[t])
                n += 1
                bar.update(1)
    s = engine.stats
    out = {"ppl": math.exp(nll / n), "accuracy": correct / n, "agreement": agree / n,
           "fallback_rate": s["fallback_tokens"] / n, "tokens": n,
           # counted where every expert is resident; a cache's lookups count what moved instead
           "bytes_per_token": s["expert_bytes_used"] / n if "expert_bytes_used" in s else None}
    if s["link"] != "none":
        out["moved_per_token"] = s["bytes_h2d"] / n  # an expert cache: what crossed the link
        out["eviction"], out["slots"] = s["eviction"], s["cache_slots_per_layer"]
    return out


def run_eval(graph: str, data: str, configs: list[tuple[str, dict]], weights: str | None = None,
             window: int = 256, max_tokens: int | None = None, device: str = "cpu",
             expert_format: str | None = None, expert_group_size: int | None = None,
             cuda_graphs: str | None = None) -> list[dict]:
    """configs: (label, {name: policy, tau: ..., ...}) pairs. The big reference runs first.

    Policies run with every expert on the device, since offloading does not change what they
    compute, except those whose results depend on the cache's contents (cached_complement, on by
    default for mobile and layer-mass): they run with the graph's expert cache over a fast emulated
    link, with no speculative copies unless the config names `prefetch` (also a config with
    offloaded: True, to compare with them). Big decoding then runs through the same cache too
    (the same slots, LRU or LFU as the rows evict), a row for each eviction rule the cached rows
    use, so that their moved bytes have a big row measured the same way; the resident big row is
    there when a config runs resident.

    expert_format, expert_group_size: the configs run at this format (a config's own
    expert_format / expert_group_size keys win); the reference is native big decoding whatever the
    graph's format (a quantized checkpoint has no native experts: its own format is then the
    reference, labelled so). cuda_graphs: every engine's --cuda-graphs (mobile.runtime.graphs)."""
    native_ok = checkpoint_format(Path(weights or resolve_checkpoint(load_graph(graph), Path(graph)))) is None
    fmt = "native" if native_ok else None
    planned = [_plan(graph, label, options, expert_format, expert_group_size) for label, options in configs]
    # one big row per way the rows run: with every expert resident (None), or through the cache with
    # one eviction rule, so that each row's bytes have a big row measured the same way
    modes = list(dict.fromkeys(p["eviction"] if p["offloaded"] else None for p in planned)) or [None]

    def big_engine(eviction: str | None) -> Engine:
        if eviction is None:  # big decoding with every expert on the device
            return Engine.load(graph, weights=weights, device=device, policy=policies.REFERENCE, track_use=True,
                               expert_format=fmt, cuda_graphs=cuda_graphs)
        # lru-prefetch with its prefetches off is LRU over the same slots as the rows it is compared
        # with: its plan keeps their staging share (plain lru's has none, which would give the big row
        # fewer slots than theirs whenever the spec sets slots_per_layer)
        return Engine.load(graph, weights=weights, device=device, policy="lru-prefetch",
                           policy_options={"eviction": eviction, "prefetch": "none"}, link_gbps=FAST_LINK_GBPS,
                           track_use=True, expert_format=fmt, cuda_graphs=cuda_graphs)

    # the greedy reference from a resident engine, so that no cache starts warm from it
    resident = big_engine(None)
    ids = load_ids(resident, data, max_tokens)
    chunks = windows(ids, window)
    greedy = big_reference(resident, chunks)
    label = "big" if native_ok else f"big ({resident.spec.runtime.expert_format} checkpoint)"
    bigs = {}
    for mode in modes:
        name = label if mode is None or len(modes) == 1 else f"{label}, {mode} cache"
        engine = resident if mode is None else big_engine(mode)
        bigs[mode] = {"label": name, **evaluate_policy(engine, chunks, greedy, desc=name)}
    rows = [compare(b, bigs.get(None), b if mode is not None else None) for mode, b in bigs.items()]
    for p in planned:
        engine = Engine.load(graph, weights=weights, device=device, policy=p["name"], policy_options=p["options"],
                             all_resident=not p["offloaded"], track_use=True,
                             link_gbps=FAST_LINK_GBPS if p["offloaded"] else None, cuda_graphs=cuda_graphs,
                             **p["format"])
        row = {"label": p["label"], **evaluate_policy(engine, chunks, greedy, desc=p["label"])}
        rows.append(compare(row, bigs.get(None), bigs[p["eviction"]] if p["offloaded"] else None))
    return rows


def _plan(graph: str, label: str, options: dict, expert_format: str | None, expert_group_size: int | None) -> dict:
    """How one config runs: its policy, options, format, whether through the cache, and its eviction."""
    options = dict(options)
    offloaded, name = bool(options.pop("offloaded", False)), options.pop("name")
    fmt = {"expert_format": options.pop("expert_format", expert_format),
           "expert_group_size": options.pop("expert_group_size", expert_group_size)}
    _, spec = resolve_policy(Path(graph), name, options)
    offloaded |= policies.eval_mode(name, spec.policy.cached_complement) == "cache"
    if offloaded:
        # the fast emulated link would accept every speculative copy, which a real link does
        # not: without them the cache holds what demand loaded, and the run is deterministic
        options.setdefault("prefetch", "none")
    return {"label": label, "name": name, "options": options, "format": fmt, "offloaded": offloaded,
            "eviction": spec.policy.effective_eviction}


def compare(row: dict, big_resident: dict | None, big_cached: dict | None) -> dict:
    """The row's byte ratios against a big row measured the same way: used bytes against resident
    big's (where both were counted), moved bytes against big's through the same cache (big_cached;
    None: the row moved nothing)."""
    used = row["bytes_per_token"]
    if used is not None and big_resident is not None and big_resident["bytes_per_token"]:
        row["bytes_ratio"] = used / big_resident["bytes_per_token"]
    if big_cached is not None and big_cached["moved_per_token"]:
        row["moved_ratio"] = row["moved_per_token"] / big_cached["moved_per_token"]
    return row


def format_rows(rows: list[dict]) -> str:
    """The table: every ratio is against the first big row (moved bytes: against the big row
    through the same cache), as the lines under it say."""
    used = any(r["bytes_per_token"] is not None for r in rows)
    moved = any("moved_per_token" in r for r in rows)
    width = max(28, *(len(r["label"]) for r in rows))
    head = f"{'policy':<{width}} {'ppl':>8} {'vs big':>7} {'accuracy':>9} {'agreement':>10} {'fallback':>9}"
    lines = [head + (f" {'used/tok':>10} {'vs big':>7}" if used else "") + (f" {'moved/tok':>10} {'vs big':>7}"
                                                                              if moved else "")]
    big_ppl = rows[0]["ppl"]
    for r in rows:
        line = (f"{r['label']:<{width}} {r['ppl']:>8.3f} {r['ppl'] / big_ppl - 1:>+7.1%} {r['accuracy']:>9.4f} "
                f"{r['agreement']:>10.4f} {r['fallback_rate']:>9.3f}")
        if used:
            line += f" {_bytes(r['bytes_per_token'])} {_ratio(r.get('bytes_ratio'))}"
        if moved:
            line += f" {_bytes(r.get('moved_per_token'))} {_ratio(r.get('moved_ratio'))}"
        lines.append(line)
    notes = [f"vs big: against the {rows[0]['label']} row"]
    if used:
        notes.append("used: the routed-expert bytes a token's passes use, counted with every expert on the device")
    if moved:
        notes.append("moved: bytes per token over the emulated link with the graph's expert cache, against big "
                     "decoding through the same cache (slots, eviction)")
    if used and moved:
        notes.append("-: not run that way")
    return "\n".join(lines + notes)


def _bytes(n: float | None) -> str:
    return f"{'-':>10}" if n is None else f"{n / 2**10:>8.0f}Ki"


def _ratio(x: float | None) -> str:
    return f"{'-':>7}" if x is None else f"{x:>6.2f}x"


def plot_rows(rows: list[dict], path: str) -> bool:
    """Quality against bytes per token; returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    # one measure on the x axis: moved bytes when the rows ran through the cache, else used bytes
    key, what = ("moved_ratio", "moved") if all(r.get("moved_ratio") is not None for r in rows) \
        else ("bytes_ratio", "used")
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for r in (r for r in rows if r.get(key) is not None):
        for a, y in zip(ax, ("ppl", "agreement"), strict=True):
            a.scatter(r[key], r[y])
            a.annotate(r["label"], (r[key], r[y]), fontsize=7)
    ax[0].set(xlabel=f"expert bytes {what} per token / big", ylabel="perplexity")
    ax[1].set(xlabel=f"expert bytes {what} per token / big", ylabel="greedy agreement with big")
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": "mobile eval"})  # its stamp (mobile.outputs)
    return True
