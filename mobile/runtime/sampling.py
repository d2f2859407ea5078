"""Next-token choice: greedy, or seeded temperature / top-p (nucleus) sampling.

The choice is made on the logits' device; the host reads one thing per token, the chosen id (it
needs it for stop tokens and for streaming), with whether every logit was finite riding along.
One sample is drawn as torch.multinomial draws it on the CPU, the argmax of the probabilities over
exponential noise, written out here because it needs no host sync on any device (torch.multinomial
may check its input on the host first): on the CPU a seed gives the tokens the host-side sampler
gave before, and on a GPU only the id crosses the link.
"""

from __future__ import annotations

import torch

from mobile.errors import MobileError
from mobile.runtime.hostio import HostReader


class Sampler:
    def __init__(self, greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None):
        if not greedy:
            if temperature <= 0:
                raise MobileError(f"temperature must be > 0, got {temperature}", key="--temperature")
            if not 0 < top_p <= 1:
                raise MobileError(f"top_p must be in (0, 1], got {top_p}", key="--top-p")
        self.greedy, self.temperature, self.top_p = greedy, temperature, top_p
        self.seed = seed if seed is not None else 0
        self.generator = torch.Generator().manual_seed(self.seed)  # the CPU's; a GPU gets its own (generator_for)

    def __call__(self, logits: torch.Tensor, reader: HostReader) -> int | None:
        """logits [V] -> token id, with one read of the device through `reader`; None when a logit
        is NaN or infinite (whether all are finite rides on the same read, so it costs no sync)."""
        (token,), (finite,) = reader.ints([self.choose(logits), torch.isfinite(logits).all()])
        return token if finite else None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] -> the chosen id, on the logits' device (0-dim or [1], int64)."""
        if self.greedy:
            return torch.argmax(logits)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep = (sorted_p.cumsum(0) - sorted_p) < self.top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        noise = torch.empty_like(probs).exponential_(1, generator=self.generator_for(probs.device))
        return torch.argmax(probs / probs.sum() / noise, dim=-1, keepdim=True)

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The seeded generator of `device`: the same seed gives the same tokens on it, run after run."""
        if self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator
