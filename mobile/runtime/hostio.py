"""Reads of device values by the host. Every one in the runtime goes through a HostReader, which
counts them.

On a GPU each read is a synchronisation: the host waits until the device has finished everything
queued before it, and no CUDA graph can span it. mobile's decode path needs one read per MoE layer
(mobile.moe.layer's plan: which of the needed experts are missing, with the riders of the same
sync step, such as next-layer predictions) and one for the sampled token: the stats key
`host_syncs_per_token`. On the CPU the same reads cost nothing, but they are counted all the same,
so the count means there what it means on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class HostReader:
    def __init__(self, device: torch.device):
        self.device = device
        self.reads = 0
        self._pinned: torch.Tensor | None = None  # CUDA: the landing buffer, grown as needed

    def ints(self, tensors: Sequence[torch.Tensor]) -> list[list[int]]:
        """One read of several small integer (or bool) tensors, flattened: their values, in order."""
        if not tensors:
            return []
        self.reads += 1
        flat = [t.reshape(-1).to(torch.int32) for t in tensors]
        values = self._land(torch.cat(flat) if len(flat) > 1 else flat[0]).tolist()
        out, start = [], 0
        for t in flat:
            out.append(values[start:start + t.numel()])
            start += t.numel()
        return out

    def read(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One read of several small tensors of any dtypes (on CUDA their bytes in one copy): each, on
        the host, flattened. The results are copies: the landing buffer is reused by the next read."""
        if not tensors:
            return []
        self.reads += 1
        if not tensors[0].is_cuda:  # host memory already: no copy to pack them into
            return [t.reshape(-1).clone() for t in tensors]
        parts = packed(tensors)
        return unpacked(self._land(torch.cat(parts) if len(parts) > 1 else parts[0]), tensors, parts)

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """One read of a whole tensor (the logits a sampler or an evaluation needs)."""
        self.reads += 1
        return self._land(t).clone() if t.is_cuda else t  # the landing buffer is reused by the next read

    def _land(self, t: torch.Tensor) -> torch.Tensor:
        """t on the host. CUDA: one copy into the preallocated pinned buffer (a view of it), then
        wait for it."""
        if not t.is_cuda:
            return t
        n = t.numel() * t.element_size()
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(max(n, 4096), dtype=torch.uint8, pin_memory=True)
        out = self._pinned[:n].view(t.dtype).view(t.shape)
        out.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return out


def packed(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors' bytes, each part padded to 8 bytes, so that each lands 8-byte aligned and each
    view of the landed bytes is valid (uint8 parts, for one cat)."""
    raw = [t.reshape(-1).contiguous().view(torch.uint8) for t in tensors]
    pad = [(-r.numel()) % 8 for r in raw]
    return [torch.cat((r, r.new_zeros(p))) if p else r for r, p in zip(raw, pad, strict=True)]


def unpacked(landed: torch.Tensor, tensors: Sequence[torch.Tensor], parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor again from the landed bytes of its packed parts: flattened copies, in its dtype."""
    out, start = [], 0
    for t, part in zip(tensors, parts, strict=True):
        n = t.numel() * t.element_size()
        out.append(landed[start:start + n].clone().view(t.dtype))
        start += part.numel()
    return out
