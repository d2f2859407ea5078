"""Next-token choice: greedy, or seeded temperature / top-p (nucleus) sampling.

The choice is made on the logits' device, as a forward's last work (Sampler.pick: the executor
runs it after the forward's last pass); the host reads one thing per token, the chosen id (it
needs it for stop tokens and for streaming), with whether every logit was finite riding along.

A pick keeps no state on the host, so under CUDA graphs it is captured like a compute segment and
replayed: a decode step runs none of this module's Python. Its inputs are device tensors (the
logits, the sequence's positions, the sampler's seed and knobs), so one capture serves every
request of its kind.

A sample is the argmax of the probabilities over exponential noise: a draw from their
distribution, as torch.multinomial's, with no host sync on any device. The noise is not drawn
from a generator, whose state a captured graph would freeze: it is a hash of (seed, position,
token id), computed with integer ops on the device (counter-based, as Philox is). So the noise
depends on the seed and the position alone, and the same seed gives the same tokens with graphs
on or off.
"""

from __future__ import annotations

import torch

from mobile.errors import MobileError
from mobile.runtime.context import Pick, StepContext

M32 = 0xFFFFFFFF


def greedy_pick(ctx: StepContext, logits: torch.Tensor, params: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, V] -> the last row's argmax, and whether that row is all finite (on the device)."""
    last = logits[-1]
    return torch.argmax(last), torch.isfinite(last).all()


def sample_pick(ctx: StepContext, logits: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, V] -> an id sampled from the last row, and whether that row is all finite (on the
    device). params: (the seed's keys [2] int64, knobs: [temperature], or [temperature, top_p] to
    draw from the smallest set of ids whose probability reaches top_p). The knobs' length is a
    shape, which a capture is keyed by, so each kind of request has its own."""
    keys, knobs = params
    last = logits[-1]
    probs = torch.softmax(last.float() / knobs[0], dim=-1)
    if knobs.shape[0] > 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < knobs[1]  # the prefix before it holds less than top_p: at least one
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p * keep)
    noise = -torch.log(uniforms(keys, ctx.positions[-1], probs.shape[0]))  # exponential
    return torch.argmax(probs / noise, dim=-1, keepdim=True), torch.isfinite(last).all()


def uniforms(keys: torch.Tensor, position: torch.Tensor, n: int) -> torch.Tensor:
    """n floats in (0, 1), one per token id, a hash of (keys, position, id): int64 ops on values
    below 2**32, on the keys' device."""
    x = _mix(torch.arange(n, device=keys.device) ^ keys[0])
    x = _mix(x ^ keys[1])
    x = _mix(x ^ (position & M32))
    return ((x >> 8).float() + 0.5) * 2.0 ** -24  # 24 bits: exact in float32, never 0 or 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash round (xorshift-multiply), a bijection of [0, 2**32). Its multipliers
    are odd and below 2**31, so no int64 product overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & M32
    return x ^ (x >> 16)


def seed_keys(seed: int) -> tuple[int, int]:
    """Two 31-bit keys from a seed of up to 64 bits (splitmix64's finalizer, a bijection, on the host)."""
    z = (seed + 0x9E3779B97F4A7C15) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    z ^= z >> 31
    return z & 0x7FFFFFFF, (z >> 33) & 0x7FFFFFFF


class Sampler:
    """One request's way of choosing tokens, checked once: its Pick (what the executor runs)."""

    def __init__(self, greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 device: torch.device | str = "cpu"):
        """device: the logits' (the seed and knobs are put there once)."""
        if greedy:
            self.pick = Pick(greedy_pick, (), "greedy")
            return
        if temperature <= 0:
            raise MobileError(f"temperature must be > 0, got {temperature}", key="--temperature")
        if not 0 < top_p <= 1:
            raise MobileError(f"top_p must be in (0, 1], got {top_p}", key="--top-p")
        nucleus = top_p < 1.0
        knobs = torch.tensor([temperature, top_p] if nucleus else [temperature], device=device)
        self.pick = Pick(sample_pick, (torch.tensor(seed_keys(seed or 0), device=device), knobs),
                         "nucleus" if nucleus else "sample")
