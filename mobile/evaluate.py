"""`mobile eval`: quality of a policy on held-out text, measured the way decoding really runs.

Teacher-forced, but every position is a decode step of its own: the policy's little pass, its
importance gate, its fallbacks and the KV entries they leave are exactly those of real decoding.
The reference is big-expert decoding of the same text (every routed expert of the top-K).

Reported per policy: perplexity, next-token accuracy, agreement of the greedy token with the big
model's, fallback rate, and expert bytes per token (each (layer, expert) a token's passes use,
counted once per token), also as a ratio to big.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mobile import policy as policies
from mobile.emit import load_graph
from mobile.engine import Engine, resolve_checkpoint, resolve_policy
from mobile.errors import MobileError
from mobile.weights import checkpoint_format

KEYS = ("ppl", "accuracy", "agreement", "fallback_rate", "bytes_per_token")


def load_ids(engine: Engine, data: str | Path, max_tokens: int | None) -> torch.Tensor:
    path = Path(data)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MobileError(f"cannot read the evaluation text: {e}", where=path) from None
    ids = torch.tensor(engine.tokenizer.encode(text), dtype=torch.long)
    if ids.numel() < 2:
        raise MobileError("the evaluation text has fewer than 2 tokens", where=path)
    return ids[:max_tokens] if max_tokens else ids


def windows(ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    return [ids[i:i + window] for i in range(0, ids.numel() - 1, window) if ids[i:i + window].numel() > 1]


@torch.inference_mode()
def big_reference(engine: Engine, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Greedy tokens of big-expert decoding at every position (a prefill is exact for that)."""
    return [engine.logits(c).argmax(-1) for c in chunks]


@torch.inference_mode()
def evaluate_policy(engine: Engine, chunks: list[torch.Tensor], big_greedy: list[torch.Tensor],
                    big_bytes_per_token: float | None = None, desc: str = "eval") -> dict:
    engine.reset_stats()
    nll, correct, agree, n = 0.0, 0, 0, 0
    total = sum(c.numel() - 1 for c in chunks)
    with tqdm(total=total, desc=desc, unit="tok", leave=False, disable=None) as bar:
        for chunk, ref in zip(chunks, big_greedy, strict=True):
            for t in range(chunk.numel() - 1):
                logits = engine.reader.tensor(engine._forward(chunk[t:t + 1], t, mode="decode")[-1]).float()
                target = int(chunk[t + 1])
                nll -= float(F.log_softmax(logits, -1)[target])
                guess = int(logits.argmax())
                correct += guess == target
                agree += guess == int(ref[t])
                n += 1
                bar.update(1)
    s = engine.stats
    out = {"ppl": math.exp(nll / n), "accuracy": correct / n, "agreement": agree / n,
           "fallback_rate": s["fallback_tokens"] / n, "bytes_per_token": s.get("expert_bytes_used", 0) / n,
           "tokens": n}
    if s["link"] != "none":
        # an expert cache: what moved, against big-only decoding on the same routes with the same cache
        # (slots and eviction rule)
        out["bytes_per_token"] = s["bytes_h2d"] / n
        out["bytes_vs_big_only"] = s["bytes_h2d"] / max(1, s.get("big_only_bytes_h2d", 0))
    elif big_bytes_per_token:
        out["bytes_ratio"] = out["bytes_per_token"] / big_bytes_per_token
    return out


def run_eval(graph: str, data: str, configs: list[tuple[str, dict]], weights: str | None = None,
             window: int = 256, max_tokens: int | None = None, device: str = "cpu",
             expert_format: str | None = None, expert_group_size: int | None = None) -> list[dict]:
    """configs: (label, {name: policy, tau: ..., ...}) pairs. The big reference runs first.

    Policies run with every expert on the device, since offloading does not change what they
    compute, except those whose results depend on the cache's contents (cached_complement, on by
    default for mobile and layer-mass): they run with the graph's expert cache over a fast emulated
    link, with no speculative copies unless the config names `prefetch`, and their bytes are what
    moved against big-only decoding with the same cache (also for a config with offloaded: True, to
    compare with them).

    expert_format, expert_group_size: the configs run at this format (a config's own
    expert_format / expert_group_size keys win); the reference is native big decoding whatever the
    graph's format (a quantized checkpoint has no native experts: its own format is then the
    reference, labelled so)."""
    native_ok = checkpoint_format(Path(weights or resolve_checkpoint(load_graph(graph), Path(graph)))) is None
    big = Engine.load(graph, weights=weights, device=device, policy=policies.REFERENCE, track_use=True,
                      expert_format="native" if native_ok else None)
    ids = load_ids(big, data, max_tokens)
    chunks = windows(ids, window)
    greedy = big_reference(big, chunks)
    base = evaluate_policy(big, chunks, greedy, desc="big")
    rows = [{"label": "big" if native_ok else f"big ({big.spec.runtime.expert_format} checkpoint)", **base,
             "bytes_ratio": 1.0}]
    for label, options in configs:
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
        engine = Engine.load(graph, weights=weights, device=device, policy=name, policy_options=options,
                             all_resident=not offloaded, track_use=True, link_gbps=1e4 if offloaded else None, **fmt)
        rows.append({"label": label, **evaluate_policy(engine, chunks, greedy, base["bytes_per_token"], desc=label)})
    return rows


def format_rows(rows: list[dict]) -> str:
    width = max(28, *(len(r["label"]) for r in rows))
    lines = [f"{'policy':<{width}} {'ppl':>8} {'vs big':>7} {'accuracy':>9} {'agreement':>10} {'fallback':>9} "
             f"{'bytes/tok':>10} {'vs big':>7}"]
    big_ppl = rows[0]["ppl"]
    for r in rows:
        lines.append(f"{r['label']:<{width}} {r['ppl']:>8.3f} {r['ppl'] / big_ppl - 1:>+7.1%} {r['accuracy']:>9.4f} "
                     f"{r['agreement']:>10.4f} {r['fallback_rate']:>9.3f} {r['bytes_per_token'] / 2**10:>8.0f}Ki "
                     + (f"{r['bytes_vs_big_only']:>6.2f}x big-only (moved)" if "bytes_vs_big_only" in r
                        else f"{r.get('bytes_ratio', 1.0):>6.2f}x"))
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: str) -> bool:
    """Quality against bytes per token; returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        ax[0].scatter(r.get("bytes_ratio", 1.0), r["ppl"])
        ax[0].annotate(r["label"], (r.get("bytes_ratio", 1.0), r["ppl"]), fontsize=7)
        ax[1].scatter(r.get("bytes_ratio", 1.0), r["agreement"])
        ax[1].annotate(r["label"], (r.get("bytes_ratio", 1.0), r["agreement"]), fontsize=7)
    ax[0].set(xlabel="expert bytes per token / big", ylabel="perplexity")
    ax[1].set(xlabel="expert bytes per token / big", ylabel="greedy agreement with big")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
