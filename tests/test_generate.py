"""Generation: KV cache, greedy and seeded sampling, stop tokens, tokenizer from the checkpoint."""

from __future__ import annotations

import pytest
import torch

import mobile
from mobile.errors import MobileError
from mobile.runtime.context import StepContext
from mobile.runtime.hostio import HostReader
from mobile.runtime.sampling import Sampler

PROMPT = torch.arange(5, 17)


def test_seeded_sampling_is_reproducible(tiny):
    engine = mobile.Engine.load(tiny("olmoe").graph)
    a = engine.generate(PROMPT, 12, greedy=False, temperature=1.5, top_p=0.9, seed=7, stop_ids=[])
    b = engine.generate(PROMPT, 12, greedy=False, temperature=1.5, top_p=0.9, seed=7, stop_ids=[])
    c = engine.generate(PROMPT, 12, greedy=False, temperature=1.5, top_p=0.9, seed=8, stop_ids=[])
    assert a == b and a != c


def chosen(sampler: Sampler, logits: torch.Tensor, reader: HostReader, position: int = 0) -> int:
    """The token a sampler picks from logits [V] at `position`, read as the engine reads it
    (Engine._next_token)."""
    z = torch.zeros(1)
    ctx = StepContext(positions=torch.tensor([position]), cos=z, sin=z, kv_len=position + 1)
    (token,), (finite,) = reader.ints(sampler.pick.fn(ctx, logits[None], sampler.pick.params))
    assert finite
    return token


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    sampler, reader = Sampler(greedy=False, top_p=0.7, seed=0), HostReader(torch.device("cpu"))
    assert {chosen(sampler, logits, reader, position) for position in range(200)} == {0, 1}
    assert chosen(Sampler(greedy=True), logits, reader) == 0
    assert reader.reads == 201  # each choice is one read of the device
    with pytest.raises(MobileError, match="temperature must be > 0"):
        Sampler(greedy=False, temperature=0)


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """What a sampler draws from, written out: softmax at the temperature, cut to the top-p nucleus."""
    probs = torch.softmax(logits / temperature, dim=-1).double()
    order = torch.argsort(probs, descending=True)
    before = torch.cumsum(probs[order], 0) - probs[order]
    kept = torch.zeros_like(probs)
    kept[order[before < top_p]] = probs[order[before < top_p]]
    return kept / kept.sum()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_draws_follow_the_distribution_one_read_each(temperature, top_p):
    """Over positions, a seed's draws have the nucleus's frequencies (to 4.5 standard errors)."""
    logits = torch.randn(12, generator=torch.Generator().manual_seed(1)) * 2
    sampler, reader, n = Sampler(greedy=False, temperature=temperature, top_p=top_p, seed=5), \
        HostReader(torch.device("cpu")), 6000
    counts = torch.bincount(torch.tensor([chosen(sampler, logits, reader, p) for p in range(n)]), minlength=12)
    p = nucleus(logits, temperature, top_p)
    assert ((counts / n - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt() + 1e-9).all(), (counts / n, p)
    assert reader.reads == n  # one read per token: the id


def test_draws_at_neighbouring_positions_are_independent():
    """The noise is a hash of (seed, position, id): a token's draw says nothing of the next one's."""
    logits = torch.zeros(4)  # four equally likely ids: each pair of neighbours 1/16
    sampler, reader, n = Sampler(greedy=False, seed=11), HostReader(torch.device("cpu")), 8000
    draws = torch.tensor([chosen(sampler, logits, reader, p) for p in range(n + 1)])
    pairs = torch.bincount(draws[:-1] * 4 + draws[1:], minlength=16) / n
    assert ((pairs - 1 / 16).abs() <= 4.5 * (1 / 16 * 15 / 16 / n) ** 0.5).all(), pairs


def test_seeds_draw_apart():
    logits = torch.zeros(1000)
    runs = [[chosen(Sampler(greedy=False, seed=seed), logits, HostReader(torch.device("cpu")), p) for p in range(8)]
            for seed in (0, 1, 2**40, 2**40 + 1, 2**63 - 1)]
    assert len({tuple(r) for r in runs}) == len(runs)


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
