"""The engine's logits and greedy tokens equal transformers' on tiny checkpoints of each family.

Each family's quirks are in the tiny configs (tests/tiny.py): Mixtral's softmax over the top-k,
Qwen2-MoE's sigmoid-gated shared expert, attention biases and a dense layer, OLMoE's q/k norm and
raw top-k weights, DeepSeek-V2's MLA, first dense layer, shared experts and routed scaling.
"""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES

import mobile

PROMPT = torch.randint(3, 97, (24,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match(tiny, family):
    t = tiny(family)
    engine = mobile.Engine.load(t.graph)
    ours = engine.logits(PROMPT)
    with torch.no_grad():
        ref = t.model(PROMPT[None]).logits[0].float()
    assert ours.shape == (PROMPT.numel(), 97)
    diff = (ours - ref).abs().max().item()
    print(f"{family}: max |logits - transformers| = {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_generate(tiny, family):
    t = tiny(family)
    engine = mobile.Engine.load(t.graph)
    ours = engine.generate(PROMPT, max_new_tokens=16, stop_ids=[])
    with torch.no_grad():
        ref = t.model.generate(PROMPT[None], max_new_tokens=16, min_new_tokens=16, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, PROMPT.numel():].tolist()
    assert ours == ref


def test_decode_equals_prefill(tiny):
    """Token-by-token decode through the KV cache gives the logits of one prefill forward."""
    engine = mobile.Engine.load(tiny("deepseek_v2").graph)
    full = engine.logits(PROMPT)
    engine.logits(PROMPT[:10])
    steps = [engine._forward(PROMPT[i:i + 1], i) for i in range(10, PROMPT.numel())]
    torch.testing.assert_close(torch.cat(steps).float(), full[10:], atol=1e-5, rtol=1e-5)


def test_yarn_rope_matches(tmp_path):
    from conftest import run_cli
    from tiny import build_tiny

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}
    model = build_tiny("deepseek_v2", tmp_path / "ckpt", rope_parameters=rope)
    assert run_cli("import-hf", tmp_path / "ckpt", "-o", tmp_path / "s.yaml") == 0
    assert run_cli("compile", tmp_path / "s.yaml", "-o", tmp_path / "g") == 0
    ids = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    assert (mobile.Engine.load(tmp_path / "g").logits(ids) - ref).abs().max() < 1e-4


def test_bfloat16_checkpoint_converts_to_float32(tmp_path):
    """A bf16 checkpoint runs in the spec's float32: the loader converts dtypes."""
    from conftest import run_cli
    from tiny import build_tiny

    model = build_tiny("olmoe", tmp_path / "ckpt")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    assert run_cli("import-hf", tmp_path / "ckpt", "-o", tmp_path / "s.yaml") == 0
    text = (tmp_path / "s.yaml").read_text().replace("dtype: bfloat16", "dtype: float32")
    (tmp_path / "s.yaml").write_text(text)
    assert run_cli("compile", tmp_path / "s.yaml", "-o", tmp_path / "g") == 0
    engine = mobile.Engine.load(tmp_path / "g")
    assert engine.kernels.w[("embed", None)].dtype == torch.float32
    ids = PROMPT[:8]
    with torch.no_grad():
        ref = model.float()(ids[None]).logits[0]
    assert (engine.logits(ids) - ref).abs().max() < 1e-4


def test_sharded_checkpoint(tmp_path):
    from conftest import run_cli
    from tiny import build_tiny

    model = build_tiny("qwen2_moe", tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = list((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert run_cli("import-hf", tmp_path / "sharded", "-o", tmp_path / "s.yaml") == 0
    assert run_cli("compile", tmp_path / "s.yaml", "-o", tmp_path / "g") == 0
    with torch.no_grad():
        ref = model(PROMPT[None]).logits[0]
    assert (mobile.Engine.load(tmp_path / "g").logits(PROMPT) - ref).abs().max() < 1e-4
