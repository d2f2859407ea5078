"""The shipped demo model: what the README's first command runs must be right."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mobile
from mobile.compiler.compile import compile_to_dir

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "demo" / "checkpoint"
TEXT = (ROOT / "demo" / "data" / "heldout_kjv.txt").read_text()[:400]


@pytest.fixture(scope="module")
def demo_graph(tmp_path_factory) -> Path:
    out, _ = compile_to_dir(ROOT / "specs" / "demo.yaml", tmp_path_factory.mktemp("demo") / "g")
    return out


def test_demo_logits_match_transformers(demo_graph):
    from transformers import OlmoeForCausalLM

    engine = mobile.Engine.load(demo_graph, policy="resident")
    ids = torch.tensor(engine.tokenizer.encode(TEXT)[:48])
    ref = OlmoeForCausalLM.from_pretrained(CKPT, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    assert (engine.logits(ids) - want).abs().max() < 1e-4


def test_demo_spec_policy_decodes(demo_graph):
    """The spec's own policy (what `mobile run --graph graphs/demo` uses) runs and reports its stats."""
    engine = mobile.Engine.load(demo_graph)
    ids = torch.tensor(engine.tokenizer.encode(TEXT)[:24])
    out = engine.generate(ids, 16, stop_ids=[])
    stats = engine.stats
    engine.close()
    assert len(out) == 16 and stats["decode_tokens"] == 15
    if engine.spec.policy.name == "mobile":
        assert stats["little_tokens"] + stats["fallback_tokens"] == 15
