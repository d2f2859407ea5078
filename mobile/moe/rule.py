"""The keep rule: which of a token's routed experts run, decided on the device. The host's plan
(what to fetch) and the op (what to compute) apply the same KeepRule.

A token's router gives its big set, K experts in selection order (mobile.moe.router). The rule keeps
- kind "top": the first n (n = K: the big set; n = little_k: the little set);
- kind "switch": the little set (the first n) when it carries at least tau of the big set's router
  mass, else the whole big set;
- kind "prefix": the fewest first experts, at least n, that carry at least tau of it;
- cached: also every other expert of the big set that the slot map holds. It is on the device
  already, so it costs compute, never a transfer.
rescale: the kept experts carry the big set's total weight (else the router's own weights).
"First" is the router's order: by weight, or by corrected score where the router has a correction
bias (a prefix is then the model's own preference, not the heaviest experts).

The op takes a rule as one value, its text ("prefix n=2 tau=0.85 cached"; KeepRule.parse reads it).

A token's total is its last prefix sum, not torch's sum: the sum adds in an order of its own, and
the rule's CPU kernel (mobile.moe.rule_kernel, which status and pairs call where it runs) gives
these ops' numbers bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mobile.moe import rule_kernel

# KeepRule.status codes, by priority: an expert one token needs and another could take for free is needed
# (status computes them as MISSING - present and present, so the values matter)
UNUSED, FREE, CACHED, MISSING = 0, 1, 2, 3


@dataclass(frozen=True)
class KeepRule:
    kind: Literal["top", "switch", "prefix"]
    n: int  # the first n always run
    tau: float = 0.0  # switch and prefix: the share of the big set's mass to reach
    rescale: bool = False
    cached: bool = False

    @classmethod
    def big(cls, k: int) -> KeepRule:
        return cls("top", k)

    @property
    def text(self) -> str:
        words = [self.kind, f"n={self.n}"] + ([f"tau={self.tau!r}"] if self.kind != "top" else [])
        return " ".join(words + ["rescale"] * self.rescale + ["cached"] * self.cached)

    @staticmethod
    def parse(text: str) -> KeepRule:
        """The rule a text names (the op keeps what it parsed: mobile.moe.op)."""
        kind, *words = text.split()
        fields = dict(w.split("=") for w in words if "=" in w)
        return KeepRule(kind, int(fields["n"]), float(fields.get("tau", 0.0)), "rescale" in words,  # type: ignore[arg-type]
                        "cached" in words)

    def keep(self, weights: torch.Tensor) -> torch.Tensor:
        """weights [T, K] in selection order -> keep [T, K] bool, the cached experts left out."""
        ranks = torch.arange(weights.shape[1], device=weights.device)[None, :]  # [1, K]
        first = ranks < self.n
        if self.kind == "top":
            return first
        prefix = weights.cumsum(-1)
        share = prefix / prefix[:, -1:]  # [T, K]: mass of the top 1..K
        if self.kind == "prefix":  # ranks up to the first reaching tau (one past those short of it)
            return first | (ranks <= (share < self.tau).sum(-1, keepdim=True))
        # switch: all K unless the little set reaches tau (a token with no mass, 0 / 0, falls short)
        return first | ~(share[:, self.n - 1:self.n] >= self.tau)

    def pairs(self, weights: torch.Tensor, ids: torch.Tensor, slot_map: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (token, expert) pairs that run: (weights [T, K], 0 where dropped; slots [T, K], -1
        where dropped). A kept expert that is not in the slot map (-1) adds nothing."""
        if self.kind == "top" and self.n >= weights.shape[1] and not self.cached:
            return weights, slot_map[ids]  # the big set: nothing dropped, nothing to re-weigh
        if rule_kernel.enabled and weights.is_cpu and rule_kernel.takes(weights, ids, slot_map):
            return rule_kernel.pairs(self, weights, ids, slot_map)
        slots = slot_map[ids]  # [T, K]
        keep = self.keep(weights)
        if self.cached:
            keep = keep | (slots >= 0)
        return kept_weights(weights, keep, self.rescale), torch.where(keep, slots, -1)

    def status(self, weights: torch.Tensor, ids: torch.Tensor, slot_map: torch.Tensor) -> torch.Tensor:
        """What a layer's fetch must do, as one small int32 vector for the host to read.

        Entry = code * E + expert, sorted descending, the first min(E, T*K) kept: MISSING (kept,
        not on the device), CACHED (kept, on the device), FREE (not kept, on the device, taken by a
        cached rule), then UNUSED, where the host stops reading (decode_status). An expert no token
        routed to has entry 0."""
        if rule_kernel.enabled and weights.is_cpu and rule_kernel.takes(weights, ids, slot_map):
            return rule_kernel.status(self, weights, ids, slot_map)
        E = slot_map.shape[0]
        present = (slot_map[ids] >= 0).long()  # [T, K]
        # kept: MISSING (3) or CACHED (2), that is 3 - present; else FREE (1) where a cached rule
        # takes it for free, else UNUSED (0)
        code = torch.where(self.keep(weights), MISSING - present, present if self.cached else 0)
        # one entry per expert, its highest code: for one expert the entry grows with the code
        entries = torch.zeros(E, dtype=torch.long, device=ids.device)
        entries.scatter_reduce_(0, ids.flatten(), (code * E + ids).flatten(), "amax")
        return torch.topk(entries, min(E, ids.numel())).values.int()  # what the host reads: no cast there


def kept_weights(weights: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """weights [T, K] with the pairs that `keep` drops zeroed; rescale: the kept ones then carry the
    big set's total weight, else the router's own weights."""
    kept = torch.where(keep, weights, 0.0)
    if rescale:  # totals as keep's: last prefix sums
        kept = kept * (weights.cumsum(-1)[:, -1:] / kept.cumsum(-1)[:, -1:])
    return kept
