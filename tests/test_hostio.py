"""HostReader: one counted read for several device values, as one copy of their packed bytes on
CUDA (packed here on the CPU, as CUDA packs them)."""

from __future__ import annotations

import torch

from mobile.runtime.hostio import HostReader, packed, unpacked


def mixed_values() -> list[torch.Tensor]:
    """What a placed fetch reads, and sizes that need padding: a status, ids, weights, hidden rows."""
    g = torch.Generator().manual_seed(0)
    return [torch.tensor([50, 33, 2], dtype=torch.int32), torch.randint(0, 16, (1, 3)),
            torch.rand(1, 3, generator=g), torch.randn(1, 5, generator=g).bfloat16(), torch.tensor([True, False, True]),
            torch.randn(2, 7, generator=g)]


def test_packed_bytes_land_as_the_values_again():
    values = mixed_values()
    parts = packed(values)
    assert all(p.dtype == torch.uint8 and p.numel() % 8 == 0 for p in parts)  # every part lands aligned
    landed = torch.cat(parts)
    got = unpacked(landed, values, parts)
    landed.zero_()  # the landing buffer is reused by the next read: what was returned is a copy
    for g, want in zip(got, values, strict=True):
        assert g.dtype == want.dtype and torch.equal(g, want.reshape(-1))


def test_a_cpu_read_is_one_counted_read_of_copies():
    reader, values = HostReader(torch.device("cpu")), mixed_values()
    got = reader.read(values)
    assert reader.reads == 1
    for g, want in zip(got, values, strict=True):
        assert g.dtype == want.dtype and torch.equal(g, want.reshape(-1)) and g.data_ptr() != want.data_ptr()
    assert reader.read([]) == [] and reader.reads == 1
