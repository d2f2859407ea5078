"""Cache state on the device: one host read per MoE layer, free experts that never depend on timing,
and policy decided in one place."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mobile
from mobile.compiler.compile import compile_to_dir

PROMPT = torch.tensor([5, 81, 300, 17, 2048, 9, 660, 41])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The bundled demo model, compiled (mobile; 8 of its 16 experts per layer cached)."""
    out, _ = compile_to_dir("specs/demo.yaml", tmp_path_factory.mktemp("demo") / "graph")
    return out


@pytest.mark.parametrize("policy,limit", [("resident", 1), ("lru", 5), ("lru-prefetch", 5), ("mobile", 5)])
def test_host_reads_per_decoded_token(demo, policy, limit):
    """At most one read per MoE layer (4 in the demo) plus the sampled token; resident only the token."""
    engine = mobile.Engine.load(demo, policy=policy, link_gbps=50.0)
    engine.generate(PROMPT, 12, stop_ids=[])
    s = engine.stats
    assert s["decode_tokens"] == 11
    if policy == "resident":
        assert s["host_syncs_per_token"] == 1
    else:
        assert 4 < s["host_syncs_per_token"] <= limit
    engine.close()


def test_a_gate_that_can_fire_costs_one_more_read(demo):
    engine = mobile.Engine.load(demo, policy_options={"tau": 0.05}, link_gbps=50.0)
    engine.generate(PROMPT, 12, stop_ids=[])
    s = engine.stats
    # the gate's read, and a fallback's big pass reads its own four layers
    expected = 6 + 4 * s["fallback_tokens"] / s["decode_tokens"]
    assert s["host_syncs_per_token"] == pytest.approx(expected)
    engine.close()


@pytest.mark.parametrize("policy", ["mobile", "layer-mass"])
def test_free_experts_do_not_depend_on_timing(demo, policy):
    """A cache-aware little pass takes the dropped experts the cache holds. Which ones count comes
    from the cache manager's own record (covered by a wait), not from whether a speculative copy
    happened to land: with speculative prefetch on, a slow and a fast link give the same tokens."""
    options = {"prefetch": "both", "tau": 0.7} if policy == "layer-mass" else {"prefetch": "both"}
    runs = []
    for gbps in (0.05, 50.0, 0.05):
        engine = mobile.Engine.load(demo, policy=policy, policy_options=options, link_gbps=gbps)
        runs.append(engine.generate(PROMPT, 16, stop_ids=[]))
        stats = engine.stats
        engine.close()
        assert stats["prefetch_issued"] > 0 and stats["free_complement_experts"] > 0
    assert runs[0] == runs[1] == runs[2]


def test_policy_names_are_matched_in_the_registry_only():
    """Lowering, the cache, the planner, eval, bench and the CLI ask mobile.policy."""
    names = ("resident", "ondemand", "lru-prefetch", "layer-mass")  # the names no other word shares
    pattern = re.compile(r"""["'](""" + "|".join(names) + r""")["']""")
    offenders = [f"{p.name}:{i}" for p in sorted(Path("mobile").glob("*.py")) if p.name != "policy.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
