"""The keep rule's CPU kernel (kernels/keep_rule.c, mobile.moe.rule_kernel) against the torch ops
that define the rule (mobile.moe.rule), bit for bit; and where each of them runs."""

from __future__ import annotations

import pytest
import torch

from mobile.moe import cbuild, rule_kernel
from mobile.moe.rule import KeepRule

# (asked of the compiler, not of library(): a build at collection would miss the session's cache folder)
pytestmark = pytest.mark.skipif(cbuild.compiler() is None, reason="no C compiler: the kernel cannot be built")


def random_routes(g: torch.Generator, trial: int):
    """Routes as routers make them (softmax, top K), some with ties, shares exactly at a tau, or a
    token with no mass (0 / 0); and a slot map holding about half of the experts."""
    K = (1, 2, 3, 4, 6, 8, 10)[trial % 7]
    E = max(K, (8, 16, 64, 128)[trial % 4])
    T = (1, 1, 2, 5, 33)[trial % 5]
    logits = torch.randn(T, E, generator=g) * (0.1, 1.0, 5.0)[trial % 3]
    weights, ids = torch.topk(logits.softmax(-1), K, dim=-1)
    if trial % 6 == 1:
        weights = (weights * 4).round() / 4  # ties, and shares that land on tau exactly
    if trial % 17 == 3:
        weights[0] = 0.0  # a token with no mass: NaN shares
    slot_map = torch.where(torch.rand(E, generator=g) < 0.5, torch.randperm(E, generator=g), -1)
    return weights, ids, slot_map


def test_the_kernel_gives_the_torch_ops_numbers_bit_for_bit(monkeypatch):
    g = torch.Generator().manual_seed(0)
    rules = [KeepRule(kind, n, tau, rescale, cached) for kind in ("top", "switch", "prefix") for n in (1, 2, 3)
             for tau in (0.3, 0.85, 1.0) for rescale in (False, True) for cached in (False, True)]
    cases = []
    for trial in range(300):
        weights, ids, slot_map = random_routes(g, trial)
        rule = rules[trial % len(rules)]
        if rule.n > weights.shape[1]:
            rule = KeepRule(rule.kind, weights.shape[1], rule.tau, rule.rescale, rule.cached)
        assert rule_kernel.takes(weights, ids, slot_map)
        cases.append((rule, weights, ids, slot_map, rule.status(weights, ids, slot_map),
                      rule.pairs(weights, ids, slot_map)))
    monkeypatch.setattr(rule_kernel, "enabled", False)  # from here on the rule runs as its torch ops
    for rule, weights, ids, slot_map, status, (kept, slots) in cases:
        assert torch.equal(status, rule.status(weights, ids, slot_map)), rule
        want_kept, want_slots = rule.pairs(weights, ids, slot_map)
        assert torch.equal(slots, want_slots), rule
        # bit for bit, NaN (a token with no mass, rescaled) where the ops have NaN
        assert torch.equal(kept.view(torch.int32), want_kept.view(torch.int32)), rule


def test_an_expert_id_out_of_range_is_refused_not_read():
    weights, ids, slot_map = torch.full((1, 2), 0.5), torch.tensor([[1, 16]]), torch.full((16,), -1)
    rule = KeepRule("prefix", 1, 0.85, cached=True)
    with pytest.raises(IndexError, match=r"outside \[0, 16\)"):
        rule.status(weights, ids, slot_map)
    with pytest.raises(IndexError, match=r"outside \[0, 16\)"):
        rule.pairs(weights, ids, slot_map)


def test_the_kernel_runs_eagerly_on_float32_cpu_tensors_only():
    weights, ids, slot_map = torch.full((1, 2), 0.5), torch.tensor([[1, 3]]), torch.full((16,), -1)
    assert rule_kernel.takes(weights, ids, slot_map)
    assert not rule_kernel.takes(weights.bfloat16(), ids, slot_map)  # the torch ops take other dtypes
    assert not rule_kernel.takes(torch.full((1, 4), 0.5)[:, ::2], ids, slot_map)  # not contiguous
    assert not rule_kernel.takes(weights, ids.int(), slot_map)
    assert not rule_kernel.takes(weights[:0], ids[:0], slot_map)  # no tokens
    assert not rule_kernel.takes(weights, ids[:, :1], slot_map)  # shapes that do not match


def test_torch_compile_traces_the_torch_ops_not_the_kernel():
    """Under torch.compile the rule is traced as its torch ops (fused there; on a GPU, in the graph):
    the ctypes call would not trace, and fullgraph refuses a graph break."""
    g = torch.Generator().manual_seed(1)
    weights, ids, slot_map = random_routes(g, 5)
    rule = KeepRule("prefix", 2, 0.85, rescale=True, cached=True)

    def both(w, i, m):
        kept, slots = rule.pairs(w, i, m)
        return rule.status(w, i, m), kept, slots

    compiled = torch.compile(both, fullgraph=True, backend="eager")
    for got, want in zip(compiled(weights, ids, slot_map), both(weights, ids, slot_map), strict=True):
        assert torch.equal(got, want)


def test_a_kernel_that_does_not_build_leaves_the_torch_ops_with_a_warning(monkeypatch, capsys):
    from mobile.errors import MobileError

    weights, ids, slot_map = torch.tensor([[0.6, 0.3, 0.1]]), torch.tensor([[4, 1, 7]]), torch.full((8,), -1)
    rule = KeepRule("prefix", 1, 0.85, cached=True)
    want = rule.status(weights, ids, slot_map)

    def broken(*args, **kwargs):
        raise MobileError("could not compile kernels/keep_rule.c (cc): error: something")

    monkeypatch.setattr(cbuild, "build", broken)
    rule_kernel.library.cache_clear()
    try:
        assert not rule_kernel.takes(weights, ids, slot_map)
        assert torch.equal(rule.status(weights, ids, slot_map), want)
    finally:
        rule_kernel.library.cache_clear()
    assert "could not compile kernels/keep_rule.c" in capsys.readouterr().err
