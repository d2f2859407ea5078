"""Next-token choice: greedy, or seeded temperature / top-p (nucleus) sampling."""

from __future__ import annotations

import torch

from mobile.errors import MobileError
from mobile.hostio import HostReader


class Sampler:
    def __init__(self, greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None):
        if not greedy:
            if temperature <= 0:
                raise MobileError(f"temperature must be > 0, got {temperature}", key="--temperature")
            if not 0 < top_p <= 1:
                raise MobileError(f"top_p must be in (0, 1], got {top_p}", key="--top-p")
        self.greedy, self.temperature, self.top_p = greedy, temperature, top_p
        self.generator = torch.Generator().manual_seed(seed if seed is not None else 0)

    def __call__(self, logits: torch.Tensor, reader: HostReader) -> int:
        """logits [V] -> token id, with one read of the device through `reader`."""
        if self.greedy:
            return reader.ints([torch.argmax(logits)])[0][0]
        probs = torch.softmax(reader.tensor(logits).float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep = (sorted_p.cumsum(0) - sorted_p) < self.top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self.generator))
