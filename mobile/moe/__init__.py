"""The routed-expert layer, end to end.

    layer.py      MoELayer: one MoE layer's protocol, route -> plan (the one host read) -> fetch ->
                  wait -> experts; the kernels of its graph nodes. Start here.
    router.py     the router: hidden state -> the big set, in the model's selection order
    rule.py       KeepRule: which of a token's experts run (the host's plan and the op share it)
    rule_kernel.py  the rule's CPU kernel (kernels/keep_rule.c): status and pairs in one C call each,
                  where the rule runs eagerly on a CPU
    cache.py      ExpertCache: ResidentCache, or OffloadedCache (slot cache, fetch, wait, prefetch)
    slots.py      one layer's slot bookkeeping (LRU / decayed LFU, staging, pinning)
    transfer.py   the copy engine (a worker thread and an emulated link, or CUDA copy streams) and
                  the link's calibration
    hoststore.py  the pinned host store every layer's expert rows live in
    rows.py       checkpoint -> expert rows (native, packed, MXFP4-decoded)
    layout.py     an expert row's layout and what an expert computes (ExpertMLP)
    quant.py      the packed formats, int8 and int4
    op.py         torch.ops.mobile.moe_experts: the layer's compute as one registered op
    native.py     the op on the CPU (plain torch); kernels/experts.py is it on CUDA (Triton)
    reference.py  the plain-torch reference both are tested against
    shadow.py     the big-only estimate (what big-only decoding would have moved)
    host.py       the host expert kernel (kernels/host_experts.c): a layer's pairs computed on the
                  CPU from the host store's rows; built on first use (host placement builds on it)
    placement.py  where a missed expert runs: moved, on the host, or both (the rule OffloadedCache applies)
    hostcache.py  HostCache: every routed expert on the host, computed there (policy host)
    hostwork.py   the host worker: host jobs on a thread of their own, the host's speed emulated on a
                  CPU-only machine as the link's is
    profile.py    a routing profile (each expert's uses over a text) and hybrid-static's hot sets
    cbuild.py     the C kernels of kernels/, compiled on first use and loaded with ctypes

Nothing outside this package knows slots, arenas or keep rules: the executor asks a MoELayer for
its nodes' kernels, and the engine builds the ExpertCache.
"""
