"""The host expert store: every MoE layer's expert rows in one host allocation.

On CUDA that allocation is registered with the driver once (cudaHostRegister), so copies from it
are asynchronous and run at the link's full speed, and exactly the bytes the experts need are
pinned. Pinning each layer through torch's caching host allocator would round every block up to a
power of two: Qwen3-30B-A3B's 54 GiB of experts would pin 96 GiB, Mixtral's 84 GiB 128 GiB.
"""

from __future__ import annotations

import torch

from mobile.errors import MobileError
from mobile.moe.rows import load_expert_rows


class HostStore:
    def __init__(self, layers: int, experts: int, row: int, dtype: torch.dtype, pin: bool):
        """layers x [experts, row] of dtype, each layer's rows contiguous, in one buffer."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self.layer_bytes = experts * row * itemsize
        self.buffer = torch.empty(layers * self.layer_bytes, dtype=torch.uint8)
        self.views = [self.buffer[i * self.layer_bytes:(i + 1) * self.layer_bytes].view(dtype).view(experts, row)
                      for i in range(layers)]
        self.registered = False
        if pin:
            self._register()

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @property
    def pinned_bytes(self) -> int:
        return self.nbytes if self.registered else 0

    def _register(self) -> None:
        err = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.nbytes, 0)
        code = int(getattr(err, "value", err))
        if code != 0:
            raise MobileError(f"could not pin the host expert store ({self.nbytes / 2**30:.1f}GiB): "
                              f"cudaHostRegister returned error {code}; is host RAM or the locked-memory limit "
                              "(ulimit -l) too small?")
        self.registered = True

    def close(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.registered = False


def load_host_store(spec, weights, dtype: torch.dtype, pin: bool, progress=None) -> tuple[HostStore | None,
                                                                                          dict[int, torch.Tensor]]:
    """Every MoE layer's expert rows (mobile.moe.rows) loaded into one HostStore, a layer at a time:
    the store (None without MoE layers) and each layer's view of it [E, row]."""
    store, views = None, {}
    for i, layer in enumerate(spec.moe_layers):
        rows = load_expert_rows(spec, weights, layer, dtype)
        if store is None:
            store = HostStore(len(spec.moe_layers), rows.shape[0], rows.shape[1], rows.dtype, pin)
        views[layer] = store.views[i]
        views[layer].copy_(rows)
        del rows  # only the store's copy stays
        if progress is not None:
            progress.update(1)
    return store, views
