"""The `mobile` policy: little pass, importance gate, fallback with KV overwrite, complement prefetch.

Exactness, on tiny checkpoints of two families (Qwen2-MoE has shared experts):
- tau such that every token falls back == big-expert decoding (lru-prefetch);
- tau such that none does == the `little` policy;
- after fallbacks, decoding == a reference that ran big exactly at the fallen-back positions and
  little elsewhere (so the fallback's KV overwrite is what later tokens see).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

import mobile
from mobile.compiler import passes
from mobile.compiler.compile import compile_to_dir
from mobile.compiler.ir import Op, Pass
from mobile.compiler.lower import lower
from mobile.errors import GraphError
from mobile.models.ops import confidence
from mobile.spec.load import load_spec, with_policy
from mobile.spec.schema import PolicySpec

PROMPT = torch.randint(3, 97, (12,), generator=torch.Generator().manual_seed(5))
FAMILIES = ["qwen2_moe", "olmoe"]


def engine_for(t, tmp_path, policy: str, tau: float = 0.5, **extra) -> mobile.Engine:
    """A resident engine: with no cache limit, cached_complement would make every little pass big,
    so it is off here unless asked for (its tests are in test_little.py)."""
    path = tmp_path / f"{policy}-{tau}-{len(extra)}.yaml"
    extra = {"cached_complement": "false", **extra}
    lines = [f"policy:\n  name: {policy}\n  tau: {tau}"] + [f"  {k}: {v}" for k, v in extra.items()]
    text = t.spec.read_text().replace("policy:\n  name: resident", "\n".join(lines))
    path.write_text(text.replace("path: ckpt", f"path: {t.ckpt}"))
    out, _ = compile_to_dir(path, tmp_path / path.stem)
    return mobile.Engine.load(out, weights=t.ckpt, link_gbps=50.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_always_falling_back_equals_big_decoding(tiny, tmp_path, family):
    t = tiny(family)
    mob = engine_for(t, tmp_path, "mobile", tau=1)  # tau 1: every token is important
    big = mobile.Engine.load(t.graph, policy="lru-prefetch", link_gbps=50.0)
    assert mob.generate(PROMPT, 16, stop_ids=[]) == big.generate(PROMPT, 16, stop_ids=[])
    s = mob.stats
    assert s["fallback_tokens"] == s["decode_tokens"] == 15 and s["little_tokens"] == 0
    assert s["fallback_rate"] == 1.0
    mob.close()
    big.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_never_falling_back_equals_little(tiny, tmp_path, family):
    t = tiny(family)
    # every token is confident enough; prefill little too, as the little policy does
    mob = engine_for(t, tmp_path, "mobile", tau=0.0, prefill="little")
    little = engine_for(t, tmp_path, "little")
    assert mob.generate(PROMPT, 16, stop_ids=[]) == little.generate(PROMPT, 16, stop_ids=[])
    assert mob.stats["fallback_tokens"] == 0 and mob.stats["little_tokens"] == PROMPT.numel() + 15
    mob.close()
    little.close()


def median_tau(t, tmp_path) -> float:
    """A tau at the median of the little pass's confidence on greedy decoding from PROMPT: about
    half the tokens fall back."""
    probe = engine_for(t, tmp_path, "mobile", tau=0.0)
    logits = probe._forward(PROMPT, 0)
    conf, tok = [], int(logits[-1].argmax())
    for _ in range(16):
        logits = probe._forward(torch.tensor([tok]), probe.length)
        conf.append(float(torch.softmax(logits[-1], -1).max()))
        tok = int(logits[-1].argmax())
    return sorted(conf)[len(conf) // 2]


@pytest.mark.parametrize("family", FAMILIES)
def test_fallback_overwrites_kv(tiny, tmp_path, family):
    t = tiny(family)
    tau = median_tau(t, tmp_path)
    mob = engine_for(t, tmp_path, "mobile", tau=tau)
    out, decisions = [], []
    logits = mob._forward(PROMPT, 0)
    for _ in range(16):
        tok = int(logits[-1].argmax())
        out.append(tok)
        before = mob.stats_.fallback_tokens
        logits = mob._forward(torch.tensor([tok]), mob.length)
        decisions.append(mob.stats_.fallback_tokens > before)
    assert 0 < sum(decisions) < len(decisions)  # a real mix of fallbacks and accepted little tokens
    ref = engine_for(t, tmp_path, "mobile", tau=tau)
    ref_out = []
    logits = ref._forward(PROMPT, 0, only=Pass.BIG)
    for fell_back in decisions:
        tok = int(logits[-1].argmax())
        ref_out.append(tok)
        # big exactly where mobile fell back (no little pass, so no KV to overwrite), little elsewhere
        logits = ref._forward(torch.tensor([tok]), ref.length, only=Pass.BIG if fell_back else Pass.LITTLE)
    assert out == ref_out


def test_layer_rule_and_layer_mass(tiny, tmp_path):
    t = tiny("olmoe")
    big = mobile.Engine.load(t.graph)
    ref = big.logits(PROMPT)
    # layer-mass with tau 1: a little set never carries all of the mass, so every layer goes big
    all_big = engine_for(t, tmp_path, "layer-mass", tau=1)
    torch.testing.assert_close(all_big.logits(PROMPT), ref, atol=1e-5, rtol=1e-5)
    # tau 0: always little == the little policy
    all_little = engine_for(t, tmp_path, "layer-mass", tau=0.0)
    little = engine_for(t, tmp_path, "little")
    torch.testing.assert_close(all_little.logits(PROMPT), little.logits(PROMPT), atol=1e-5, rtol=1e-5)
    # in between, some layer-token pairs go big and some stay little: the result equals neither
    mids = [engine_for(t, tmp_path, "layer-mass", tau=tau).logits(PROMPT) for tau in (0.7, 0.8, 0.9)]
    assert any((out - ref).abs().max() > 1e-4 and (out - little.logits(PROMPT)).abs().max() > 1e-4
               for out in mids)


def test_prefix_rule_keeps_the_fewest_top_experts_that_reach_the_mass():
    from mobile.moe.rule import KeepRule

    weights = torch.tensor([[0.4, 0.15, 0.15, 0.1],   # shares of the total: 0.5, 0.69, 0.88, 1
                            [0.7, 0.05, 0.03, 0.02],  # 0.875 after one: at least little_k = 2 anyway
                            [0.3, 0.3, 0.3, 0.1]])    # 0.3, 0.6, 0.9, 1
    ids, slot_map = torch.arange(4).expand(3, 4), torch.arange(4)  # every expert on the device
    keep = KeepRule("prefix", 2, 0.7).keep(weights)
    assert keep.tolist() == [[True, True, True, False], [True, True, False, False], [True, True, True, False]]
    w, _ = KeepRule("prefix", 2, 0.7).pairs(weights, ids, slot_map)
    assert torch.equal(w, weights * keep)
    keep = KeepRule("switch", 2, 0.7).keep(weights)  # little set or all four
    assert keep.tolist() == [[True] * 4, [True, True, False, False], [True] * 4]
    w, _ = KeepRule("prefix", 2, 0.7, rescale=True).pairs(weights, ids, slot_map)
    torch.testing.assert_close(w.sum(-1), weights.sum(-1))  # the kept experts carry the big set's total
    keep = KeepRule("prefix", 2, 1.0).keep(weights)
    assert keep.all()  # a share that never quite reaches 1.0 in float32 still stops at K


def _kept_count(kind: str, n: int, tau: float, share: list[float]) -> int:
    """How many first experts a rule keeps for one token, in the rule's own words (its docstring)."""
    K = len(share)
    if kind == "top":
        return n
    if kind == "switch":
        return n if share[n - 1] >= tau else K
    return max(n, next((j + 1 for j, s in enumerate(share) if s >= tau), K))  # prefix


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("kind", ["top", "switch", "prefix"])
def test_the_rule_keeps_what_its_words_say_on_random_routes(kind, path, monkeypatch):
    """keep, pairs and the host's status against a per-token Python reading of the rule, over random
    routes with ties and shares exactly at tau, every n, and cached or not; computed by the CPU
    kernel (kernels/keep_rule.c) and by the torch ops that define the rule."""
    from mobile.moe import rule_kernel
    from mobile.moe.cache import decode_status
    from mobile.moe.rule import CACHED, FREE, MISSING, UNUSED, KeepRule

    if path == "torch":
        monkeypatch.setattr(rule_kernel, "enabled", False)
    elif rule_kernel.library() is None:
        pytest.skip("no C compiler: the rule's CPU kernel cannot be built here")

    g, E = torch.Generator().manual_seed(3), 16
    for trial in range(150):
        T, K = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        weights = torch.rand(T, K, generator=g) + 0.05
        if trial % 2:
            weights = (weights * 4).round() / 4 + 0.25  # ties, and shares that land on tau exactly
        weights = weights.sort(descending=True).values
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        slot_map = torch.where(torch.rand(E, generator=g) < 0.5, torch.arange(E), -1)
        tau = (0.25, 0.5, 0.75, 0.85, 1.0)[trial % 5]
        prefix = weights.cumsum(-1)
        shares = (prefix / prefix[:, -1:]).tolist()
        for n in range(1, K + 1):
            for cached in (False, True):
                rule = KeepRule(kind, n, tau, cached=cached)
                kept = [[j < _kept_count(kind, n, tau, share) for j in range(K)] for share in shares]
                assert rule.keep(weights).expand(T, K).tolist() == kept
                present = (slot_map[ids] >= 0).tolist()
                runs = [[k or (cached and p) for k, p in zip(kr, pr, strict=True)]
                        for kr, pr in zip(kept, present, strict=True)]
                w, slots = rule.pairs(weights, ids, slot_map)
                assert (w > 0).tolist() == runs
                assert slots.tolist() == [[int(slot_map[e]) if r else -1 for e, r in zip(er, rr, strict=True)]
                                          for er, rr in zip(ids.tolist(), runs, strict=True)]
                code: dict[int, int] = {}
                for er, kr, pr in zip(ids.tolist(), kept, present, strict=True):
                    for e, k, p in zip(er, kr, pr, strict=True):
                        c = (CACHED if p else MISSING) if k else (FREE if cached and p else UNUSED)
                        code[e] = max(code.get(e, UNUSED), c)
                got = decode_status(rule.status(weights, ids, slot_map).tolist(), E)
                want_cached = sorted(e for e, c in code.items() if c in (CACHED, FREE))
                want_missing = sorted(e for e, c in code.items() if c == MISSING)
                assert (sorted(got[0]), sorted(got[1]), got[2]) == \
                    (want_cached, want_missing, sum(c == FREE for c in code.values()))


def test_prefix_rule_extremes_and_bytes(tiny, tmp_path):
    """layer_rule prefix: tau above 1 == big, tau 0 == little; in between it never uses more
    experts than the switch rule at the same tau, and somewhere fewer."""
    t = tiny("olmoe")
    ref = mobile.Engine.load(t.graph).logits(PROMPT)
    all_big = engine_for(t, tmp_path, "layer-mass", tau=1, layer_rule="prefix")
    torch.testing.assert_close(all_big.logits(PROMPT), ref, atol=1e-5, rtol=1e-5)
    little = engine_for(t, tmp_path, "little").logits(PROMPT)
    all_little = engine_for(t, tmp_path, "layer-mass", tau=0.0, layer_rule="prefix")
    torch.testing.assert_close(all_little.logits(PROMPT), little, atol=1e-5, rtol=1e-5)

    def bytes_used(rule, tau):
        e = mobile.Engine.load(t.graph, policy="layer-mass", all_resident=True,
                               policy_options={"tau": tau, "layer_rule": rule, "cached_complement": False})
        for i in range(PROMPT.numel()):
            e._forward(PROMPT[i:i + 1], i)
        return e.stats["expert_bytes_used"]

    pairs = [(bytes_used("prefix", tau), bytes_used("switch", tau)) for tau in (0.6, 0.75, 0.9)]
    assert all(p <= s for p, s in pairs) and any(p < s for p, s in pairs)


def test_graph_has_gate_fallback_and_complement_prefetch(tmp_path):
    # complement prefetches are off by default with cached_complement (auto): ask for them; and a
    # gate that can fire (tau 0, the default, never does: see the next test)
    out, g = compile_to_dir("specs/olmoe-1b-7b.yaml", tmp_path / "g", policy="mobile",
                            policy_options={"prefetch": "both", "tau": 0.05})
    gates = g.by_op(Op.IMPORTANCE_GATE)
    assert len(gates) == 1 and gates[0].attr("pass") == "little" and gates[0].attr("region") == "pass"
    complements = [n for n in g.by_op(Op.PREFETCH) if n.attr("set") == "complement"]
    assert len(complements) == 16 and all(n.attr("stream") == "copy" and n.attr("pass") == "little"
                                          for n in complements)
    experts = [n for n in g.by_op(Op.EXPERT) if n.attr("variant") != "shared"]
    # the default per-layer rule may send a layer big inside the little pass: k is the upper bound;
    # the big pass runs the same nodes with the whole big set
    assert {(n.attr("rule"), n.attr("k"), n.attr("big_rule"), n.attr("big_k")) for n in experts} == \
        {(f"prefix n=4 tau={PolicySpec().layer_tau!r} cached", 8, "top n=8", 8)}
    assert not any(n.name.startswith("B.") for n in g.nodes)  # one copy of the model
    # the first layer up to its router is computed once, before the region a fallback runs again
    shared = [n for n in g.nodes if n.attr("layer") == 0 and n.attr("region") is None]
    assert {n.name for n in shared} == {"L0.attn_norm", "L0.attn", "L0.attn_res", "L0.ffn_norm", "L0.router"}
    names = [n.name for n in g.nodes]
    assert all(n.attr("region") == "pass" for n in g.nodes[names.index("L0.fetch"):])
    text = (out / "schedule.txt").read_text()
    assert "importance_gate" in text and "L3.complement" in text and "little pass only" in text
    assert "a gate that fires ends it, and the big pass runs again from step" in text


@pytest.mark.parametrize("signal", ["max_prob", "entropy", "margin"])
def test_a_gate_that_cannot_fire_is_folded_away(tmp_path, signal):
    """tau 0 (the default): every signal is a confidence in [0, 1] and none is below 0, so the
    fold_dead_gates pass removes the gate, and with it the region a fallback would run again. The
    big pass stays, over the same nodes, for prompts."""
    out, g = compile_to_dir("specs/demo.yaml", tmp_path / "g", policy_options={"signal": signal})
    assert not g.by_op(Op.IMPORTANCE_GATE) and not any(n.attr("region") for n in g.nodes)
    assert "no gate can fire, so no fallback); prompts run the big pass" in (out / "schedule.txt").read_text()
    live = passes.compile_spec(with_policy(load_spec("specs/demo.yaml"), signal=signal, tau=0.05))
    assert len(live.by_op(Op.IMPORTANCE_GATE)) == 1 and any(n.attr("region") for n in live.nodes)
    assert len(live.nodes) == len(g.nodes) + 1  # the gate


def test_confidence_signals_lie_in_zero_one():
    """Before, --signal entropy compared the raw entropy with tau, so tau 0 fell back on every token."""
    peaked, flat = torch.tensor([30.0, 0.0, 0.0, 0.0]), torch.zeros(4)
    for signal in ("max_prob", "entropy", "margin"):
        hi, lo = float(confidence(peaked, signal)), float(confidence(flat, signal))
        assert 0 <= lo < hi <= 1 and hi > 0.99
    assert float(confidence(flat, "entropy")) == pytest.approx(0.0, abs=1e-6)


def test_entropy_signal_at_the_default_tau_never_falls_back(tiny, tmp_path):
    t = tiny("olmoe")
    mob = engine_for(t, tmp_path, "mobile", tau=0.0, signal="entropy")
    mob.generate(PROMPT, 8, stop_ids=[])
    assert mob.stats["fallback_tokens"] == 0 and mob.stats["little_tokens"] == 7
    mob.close()


def test_verifier_rejects_a_fallback_without_the_big_set(tiny, tmp_path):
    import json
    import shutil

    t = tiny("olmoe")
    mob = engine_for(t, tmp_path, "mobile", tau=0.5)
    src = mob.graph
    shutil.copytree(tmp_path / "mobile-0.5-0", tmp_path / "edited")
    data = json.loads((tmp_path / "edited" / "graph.json").read_text())
    for n in data["nodes"]:
        if n["name"] in ("L1.fetch", "L1.experts"):
            n["attrs"]["big_rule"] = "top n=2"
    (tmp_path / "edited" / "graph.json").write_text(json.dumps(data))
    with pytest.raises(GraphError, match="L1.fetch: the big pass must keep the whole top-4, not 'top n=2'"):
        mobile.Engine.load(tmp_path / "edited", weights=t.ckpt)
    assert src is not None


def test_layer_rule_fetches_only_what_it_uses(tiny):
    """A layer that stays little fetches only the little set (bytes per token below big's)."""
    t = tiny("olmoe")

    def bytes_used(policy, **options):
        options = {"cached_complement": False, **options}
        e = mobile.Engine.load(t.graph, policy=policy, policy_options=options, all_resident=True)
        for i in range(PROMPT.numel()):
            e._forward(PROMPT[i:i + 1], i)
        return e.stats["expert_bytes_used"]

    big, little = bytes_used("lru-prefetch"), bytes_used("little")
    mids = [bytes_used("layer-mass", tau=tau) for tau in (0.6, 0.75, 0.9)]
    assert little == big // 2 and all(little <= m <= big for m in mids)
    assert any(little < m < big for m in mids)  # some layers little, some big


@pytest.mark.parametrize("family", FAMILIES)
def test_mass_gate_extremes(tiny, tmp_path, family):
    """mass_tau 1.0: every layer's little set drops some mass, so layer 0's gate sends every token
    straight to the big pass (== big decoding, and the rest of the little pass never runs);
    mass_tau 0.0: the gates never fire (== mobile without them)."""
    t = tiny(family)
    always = engine_for(t, tmp_path, "mobile", tau=0.0, mass_tau=1.0)
    big = mobile.Engine.load(t.graph, policy="lru-prefetch", link_gbps=50.0)
    assert always.generate(PROMPT, 12, stop_ids=[]) == big.generate(PROMPT, 12, stop_ids=[])
    assert always.stats["fallback_rate"] == 1.0
    ran = always.executor.executed  # the last forward's: layer 0's gate fired, then the big pass ran alone
    assert ran.count("L0.mass_gate") == 1 and ran.count("L1.attn") == 1 and ran.count("L0.experts") == 1
    assert ran.index("L0.mass_gate") < ran.index("L0.experts")
    never = engine_for(t, tmp_path, "mobile", tau=0.3, mass_tau=0.0)
    plain = engine_for(t, tmp_path, "mobile", tau=0.3)
    # a mass gate at 0 can never fire: lowered, then folded away, so both run the same graph
    assert any(n.name.endswith("mass_gate") for n in lower(never.spec).nodes)
    assert not any(n.name.endswith("mass_gate") for n in never.graph.nodes)
    assert never.generate(PROMPT, 12, stop_ids=[]) == plain.generate(PROMPT, 12, stop_ids=[])
    assert never.stats["fallback_tokens"] == plain.stats["fallback_tokens"]
    for e in (always, big, never, plain):
        e.close()


def test_mobile_options_on_compile_and_run(tiny, tmp_path, capsys):
    t = tiny("olmoe")
    assert run_cli("compile", t.spec, "-o", tmp_path / "g", "--policy", "mobile", "--tau", "0.25",
                   "--little-k", "1", "--mass-tau", "0.5", "--layer-tau", "0") == 0
    policy = json.loads((tmp_path / "g" / "graph.json").read_text())["spec"]["policy"]
    assert (policy["name"], policy["tau"], policy["little_k"], policy["mass_tau"], policy["layer_tau"]) == \
        ("mobile", 0.25, 1, 0.5, 0.0)
    assert "mass_gate" in (tmp_path / "g" / "schedule.txt").read_text()
    capsys.readouterr()
    assert run_cli("run", "--graph", t.graph, "--prompt-ids", "3,4,5", "--max-new-tokens", "4", "--json",
                   "--policy", "mobile", "--tau", "1") == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["fallback_rate"] == 1.0  # --tau reached the engine


def test_verifier_rejects_work_that_runs_once_after_the_region(tmp_path):
    """A fallback runs the region again from its first node: what runs once must come before it."""
    from mobile.compiler.verify import verify

    _, g = compile_to_dir("specs/demo.yaml", tmp_path / "g", policy="mobile", policy_options={"tau": 0.05})
    nodes = list(g.nodes)
    moved = nodes.pop(next(i for i, n in enumerate(nodes) if n.name == "L0.attn_norm"))
    nodes.insert(next(i for i, n in enumerate(nodes) if n.name == "L1.attn_norm"), moved)
    errors = verify(g.with_nodes(nodes, "test"))
    assert any("L0.attn_norm: runs once, yet comes after the region a fallback runs again" in e for e in errors)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_refresh_makes_a_fallback_exact(tiny, tmp_path, family):
    """With kv_refresh covering every accepted little token, a fallback recomputes them with big
    experts, so at each fallen-back position the whole KV cache is big: its logits equal big
    decoding's. Without the refresh they do not (little KV entries before it)."""
    t = tiny(family)
    tau = median_tau(t, tmp_path)
    ids = torch.cat((PROMPT, torch.randint(3, 97, (24,), generator=torch.Generator().manual_seed(6))))
    big = mobile.Engine.load(t.graph).logits(ids)
    gaps = {}
    for refresh in (0, 64):
        mob = engine_for(t, tmp_path, "mobile", tau=tau, kv_refresh=refresh)
        mob._forward(ids[:PROMPT.numel()], 0)
        gap, fell_back = [], []
        for pos in range(PROMPT.numel(), ids.numel()):
            before = mob.stats_.fallback_tokens
            logits = mob._forward(ids[pos:pos + 1], pos)
            fell_back.append(mob.stats_.fallback_tokens > before)
            if fell_back[-1]:
                gap.append(float((logits[-1] - big[pos]).abs().max()))
        assert 0 < sum(fell_back) < len(fell_back)
        gaps[refresh] = max(gap)
        s = mob.stats
        assert s["fallback_tokens"] == sum(fell_back)
        # every accepted little token is refreshed by the next fallback, if one comes
        assert s.get("refreshed_tokens", 0) == (s["little_tokens"] - trailing_little(fell_back) if refresh else 0)
        mob.close()
    # float32 round-off against little KV entries' effect (small in a random tiny model)
    assert gaps[64] < 1e-6 < gaps[0] / 10


def trailing_little(fell_back: list[bool]) -> int:
    """Accepted little tokens after the last fallback: no fallback refreshed them."""
    n = 0
    for f in reversed(fell_back):
        if f:
            break
        n += 1
    return n
