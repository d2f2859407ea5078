"""The router: a token's hidden state -> its big set, K experts and their weights, in selection order.

The first little_k of the big set are the little set, so the big-little policies act on the order
the model chooses in. A Router is one layer's router bound to its weights; next-layer prediction
is the next layer's Router applied to this layer's hidden state (its ids only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Router:
    """x [T, H] -> (weights [T, K] float32, ids [T, K]), scored as the model's router scores
    (scoring, correction bias and groups: mobile.spec.schema.MoESpec; bias: gpt-oss's router bias).
    shuffle: a generator that permutes each token's big set (the random-halving baseline).
    gemma: Gemma 4's (input scale [H], per-expert scale [E], eps): see gemma_input."""

    def __init__(self, weight: torch.Tensor, top_k: int, norm_topk_prob: bool = False, scaling: float = 1.0,
                 scoring: str = "softmax", correction: torch.Tensor | None = None, n_group: int = 1,
                 topk_group: int = 1, bias: torch.Tensor | None = None, shuffle: torch.Generator | None = None,
                 gemma: tuple[torch.Tensor, torch.Tensor, float] | None = None):
        self.weight, self.top_k, self.norm, self.scaling = weight, top_k, norm_topk_prob, scaling
        self.scoring, self.correction, self.n_group, self.topk_group = scoring, correction, n_group, topk_group
        self.bias, self.shuffle, self.gemma = bias, shuffle, gemma

    def _route(self, x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gemma is None:
            return route(x, self.weight, top_k, self.norm, self.scaling, self.scoring, self.correction,
                         self.n_group, self.topk_group, self.bias)
        scale, expert_scale, eps = self.gemma
        weights, ids = route(gemma_input(x, scale, eps), self.weight, top_k, self.norm, self.scaling)
        return weights * expert_scale.float()[ids], ids

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = self._route(x, self.top_k)
        if self.shuffle is not None:
            perm = torch.argsort(torch.rand(weights.shape, generator=self.shuffle, device=weights.device), dim=-1)
            return weights.gather(1, perm), ids.gather(1, perm)
        return weights, ids

    @classmethod
    def of_layer(cls, spec, weights: dict, layer: int) -> Router:
        """Layer `layer`'s router as the spec's model scores it, on its weights (keyed (name, layer))."""
        moe = spec.model.moe
        sigmoid = moe.scoring == "sigmoid"
        gemma = None
        if moe.router_norm:
            expert_scale = weights[("per_expert_scale", layer)] if moe.per_expert_scale else \
                torch.ones(moe.num_experts, device=weights[("router", layer)].device)
            gemma = (weights[("router_scale", layer)], expert_scale, spec.model.norm_eps)
        return cls(weights[("router", layer)], moe.top_k, moe.norm_topk_prob, moe.routed_scaling_factor, moe.scoring,
                   weights[("router_correction", layer)] if sigmoid and moe.correction_bias else None,
                   moe.n_group if sigmoid else 1, moe.topk_group if sigmoid else 1, weights.get(("router_bias", layer)),
                   gemma=gemma)

    def shuffled(self, seed: int) -> Router:
        """The same router, each token's big set in a random order (its own generator, seeded)."""
        gen = torch.Generator(device=self.weight.device).manual_seed(seed)
        return Router(self.weight, self.top_k, self.norm, self.scaling, self.scoring, self.correction, self.n_group,
                      self.topk_group, self.bias, shuffle=gen, gemma=self.gemma)

    def with_top_k(self, top_k: int) -> Router:
        """The same router choosing top_k experts (a prediction of fewer than the big set)."""
        return Router(self.weight, top_k, self.norm, self.scaling, self.scoring, self.correction, self.n_group,
                      self.topk_group, self.bias, gemma=self.gemma)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The ids only: next-layer prediction (this layer's choice from the previous layer's state)."""
        return self._route(x, self.top_k)[1]


def gemma_input(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """What Gemma 4's router scores: x [T, H] RMS-normed without a weight (in float32, cast back),
    times its scale [H] and H ** -0.5, in x's dtype, as transformers' Gemma4TextRouter computes it."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return normed * scale * x.shape[-1] ** -0.5


def route(x: torch.Tensor, router_w: torch.Tensor, top_k: int, norm_topk_prob: bool, scaling: float,
          scoring: str = "softmax", correction: torch.Tensor | None = None, n_group: int = 1,
          topk_group: int = 1, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (weights [T, K] float32, expert ids [T, K]), in selection order: by weight,
    descending; with a correction bias (sigmoid scoring), by corrected score, which the weights need
    not follow. The first little_k are the little set, so the big-little policies act on the order
    the model chooses in.

    scoring (mobile.spec.schema.MoESpec): softmax; sigmoid with its correction bias [E] and groups
    (sigmoid_topk); or softmax_topk (route_topk_softmax). bias [E]: the router's own bias, where it
    has one (gpt-oss). Logits and scores run in float32, as DeepSeek does (identical for float32
    models); the renormalization and the routed scaling follow the choice, as in transformers' routers.
    """
    logits = F.linear(x.float(), router_w.float(), None if bias is None else bias.float())  # [T, E]
    if scoring == "softmax_topk":
        weights, ids = route_topk_softmax(logits, top_k)
        return (weights * scaling if scaling != 1 else weights), ids
    if scoring == "sigmoid":
        weights, ids = sigmoid_topk(logits, top_k, correction, n_group, topk_group)
    else:
        weights, ids = torch.topk(logits.softmax(dim=-1), top_k, dim=-1)  # [T, K]
    if norm_topk_prob:
        # + 1e-20 as DeepSeek-V3 writes it: a guard for sigmoid scores that all underflow; below
        # float32's resolution for any softmax top-k (whose sum is at least k / E)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return (weights * scaling if scaling != 1 else weights), ids


def sigmoid_topk(logits: torch.Tensor, top_k: int, correction: torch.Tensor | None, n_group: int,
                 topk_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router choice (noaux_tc; GLM-4.5 too): logits [T, E] -> (sigmoid scores [T, K],
    ids [T, K]), sorted by the corrected score (scores + correction), which chooses; the scores
    returned are the uncorrected ones. With n_group > 1, only the topk_group groups whose top-2
    corrected scores sum highest are chosen from."""
    scores = logits.sigmoid()  # [T, E]
    choice = scores if correction is None else scores + correction.float()
    if n_group > 1:
        T, E = choice.shape
        group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        best = torch.topk(group_scores, topk_group, dim=-1).indices  # [T, topk_group]
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~allowed.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices  # [T, K], best corrected score first
    return scores.gather(1, ids), ids


def route_topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss's router choice: the top-k of the logits (its bias included), then a softmax over
    those k only, so the weights sum to 1. logits [T, E] -> (weights [T, K] float32, ids [T, K])."""
    top, ids = torch.topk(logits, top_k, dim=-1)  # [T, K], sorted descending
    return top.softmax(dim=-1), ids
