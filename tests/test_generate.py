"""Generation: KV cache, greedy and seeded sampling, stop tokens, tokenizer from the checkpoint."""

from __future__ import annotations

import pytest
import torch

import mobile
from mobile.errors import MobileError
from mobile.runtime.hostio import HostReader
from mobile.runtime.sampling import Sampler

PROMPT = torch.arange(5, 17)


def test_seeded_sampling_is_reproducible(tiny):
    engine = mobile.Engine.load(tiny("olmoe").graph)
    a = engine.generate(PROMPT, 12, greedy=False, temperature=1.5, top_p=0.9, seed=7, stop_ids=[])
    b = engine.generate(PROMPT, 12, greedy=False, temperature=1.5, top_p=0.9, seed=7, stop_ids=[])
    c = engine.generate(PROMPT, 12, greedy=False, temperature=1.5, top_p=0.9, seed=8, stop_ids=[])
    assert a == b and a != c


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    sampler, reader = Sampler(greedy=False, top_p=0.7, seed=0), HostReader(torch.device("cpu"))
    assert {sampler(logits, reader) for _ in range(200)} == {0, 1}
    assert Sampler(greedy=True)(logits, reader) == 0
    assert reader.reads == 201  # each choice is one read of the device
    with pytest.raises(MobileError, match="temperature must be > 0"):
        Sampler(greedy=False, temperature=0)


def test_stop_tokens(tiny):
    engine = mobile.Engine.load(tiny("olmoe").graph)
    free = engine.generate(PROMPT, 10, stop_ids=[])
    stop = free[3]
    out = engine.generate(PROMPT, 10, stop_ids=[stop])
    assert out == free[: free.index(stop) + 1]
    assert engine.default_stop_ids() == [2]  # eos from the checkpoint's config


def test_tokenizer_comes_from_the_checkpoint(tiny):
    engine = mobile.Engine.load(tiny("olmoe").graph)
    ids = engine.tokenizer.encode("In the beginning")
    assert engine.tokenizer.decode(ids) == "In the beginning"


def test_bad_token_ids(tiny):
    engine = mobile.Engine.load(tiny("olmoe").graph)
    with pytest.raises(MobileError, match=r"token ids must lie in \[0, 97\)"):
        engine.logits(torch.tensor([1, 200]))
    with pytest.raises(MobileError, match="non-empty 1-D"):
        engine.logits(torch.tensor([[1, 2]]))


def test_long_generation_grows_the_kv_cache(tiny):
    engine = mobile.Engine.load(tiny("qwen3_moe").graph)
    ref = tiny("qwen3_moe").model
    prompt = torch.arange(240) % 94 + 3  # 240 + 30 new > one 256-position block
    out = engine.generate(prompt, 30, stop_ids=[])
    assert engine.kv.capacity == 512
    with torch.no_grad():
        expected = ref.generate(prompt[None], max_new_tokens=30, min_new_tokens=30, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, 240:].tolist()
    assert out == expected
