"""The host expert kernel against the host's read bandwidth, and against the other ways to compute a
packed expert on the CPU, at batch 1 on experts of real size.

    python benchmarks/host_kernel.py [--hidden 2048 --inter 768 --group 64] [--experts 64] [--repeats 5]

Every option computes one token through one expert at a time, cycling over --experts distinct
experts so that each is read from DRAM rather than from the last-level cache (64 Qwen3-30B-A3B
int4 experts are 170 MB). Rows:
- read: a STREAM-like read of the same rows' bytes (kernels/host_experts.c, mobile_read_bytes);
- host kernel: mobile.moe.host.HostExperts over the packed rows in place (gate_up, activation,
  down, weighted add), at 1 thread and at all threads, built for this CPU (native: AVX-512 where
  it has it) and for AVX2 alone;
- torch float32: the same expert dequantized once to float32, two matmuls (4-8x the bytes);
- torch int8 / int4 weight-only: torch's _weight_int8pack_mm and _weight_int4pack_mm_for_cpu on
  the same matrices in their own layouts;
- compiled dequantize: a torch.compile'd (Inductor C++) unpack-dequantize-GEMV of the packed row.
GB/s is the row's bytes (packed, or the option's own) over the time; "of read" is the kernel's
GB/s over the read row's at the same thread count. Minimum over --repeats passes of each.
"""

from __future__ import annotations

import argparse
import time

import torch

from mobile.moe import quant
from mobile.moe.host import ISAS, HostExperts, default_threads, read_bytes
from mobile.moe.layout import ExpertMLP


def best_of(fn, repeats: int, count: int) -> float:
    """Seconds per item: min over `repeats` passes of fn(i) for i in range(count)."""
    best = float("inf")
    fn(0)  # warm-up (and compile)
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        best = min(best, (time.perf_counter() - start) / count)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--format", default="int4", choices=["int4", "int8"])
    p.add_argument("--experts", type=int, default=64, help="distinct experts cycled, to defeat the caches")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-torch", action="store_true", help="only the read and the host kernel")
    args = p.parse_args()
    H, inter, G, fmt, E = args.hidden, args.inter, args.group, args.format, args.experts
    torch.manual_seed(0)
    mlp, layout = ExpertMLP(H, inter), quant.Layout(fmt, G, H, inter)
    rows = torch.empty(E, layout.row_bytes, dtype=torch.uint8)
    for e in range(E):
        gate_up, down = torch.randn(H, 2 * inter) / H**0.5, torch.randn(inter, H) / inter**0.5
        rows[e] = quant.quantize_matrices(layout, gate_up, down)
    x, nbytes = torch.randn(1, H), layout.row_bytes
    tok, w = torch.zeros(1, dtype=torch.int32), torch.ones(1)
    addr = [torch.tensor([rows[e].data_ptr()]) for e in range(E)]
    all_threads = max(default_threads() + 1, 1)
    results: list[tuple[str, float, float | None]] = []  # name, seconds per expert, bytes read per expert

    for threads in sorted({1, all_threads}):
        t_read = best_of(lambda i, th=threads: read_bytes(rows[i % E], th), args.repeats, E)
        results.append((f"read, {threads} thread(s)", t_read, nbytes))
        for isa in ISAS:
            kernel, out = HostExperts(mlp, torch.float32, layout, threads, isa), torch.zeros(1, H)
            t_kernel = best_of(lambda i, k=kernel, o=out: k(x, o, tok, addr[i % E], w), args.repeats, E)
            results.append((f"host kernel {isa}, {threads} thread(s)", t_kernel, nbytes))
            print(f"{threads} thread(s): host kernel ({isa}) {nbytes / t_kernel / 1e9:.1f} GB/s, read "
                  f"{nbytes / t_read / 1e9:.1f} GB/s: {t_read / t_kernel:.2f} of read", flush=True)

    if not args.skip_torch:
        torch.set_num_threads(all_threads)
        dense = [layout.dequantize_rows(rows[e:e + 1], torch.float32)[0] for e in range(min(E, 16))]
        gu_dn = [(d[:2 * H * inter].view(H, 2 * inter), d[2 * H * inter:].view(inter, H)) for d in dense]

        def f32(i):
            gu, dn = gu_dn[i % len(gu_dn)]
            return mlp.activate(x @ gu) @ dn
        results.append(("torch float32 (dequantized copy)", best_of(f32, args.repeats, E), 12 * H * inter))

        # torch's weight-only ops: [out, in] weights in their own packed layouts
        int8 = [(gu.T.round().to(torch.int8).contiguous(), dn.T.round().to(torch.int8).contiguous())
                for gu, dn in gu_dn]
        s_gu, s_dn = torch.ones(2 * inter), torch.ones(H)

        def i8(i):
            a, b = int8[i % len(int8)]
            return torch._weight_int8pack_mm(mlp.activate(torch._weight_int8pack_mm(x, a, s_gu)), b, s_dn)
        results.append(("torch _weight_int8pack_mm", best_of(i8, args.repeats, E), 3 * H * inter))

        try:
            q4 = []
            for gu, dn in gu_dn:
                mats = []
                for m in (gu.T, dn.T):
                    codes = torch.randint(0, 16, m.shape, dtype=torch.int32)
                    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
                    sz = torch.ones(m.shape[1] // G, m.shape[0], 2)
                    mats.append((packed, sz))
                q4.append(mats)

            def i4(i):
                (a, sa), (b, sb) = q4[i % len(q4)]
                h = torch._weight_int4pack_mm_for_cpu(x, a, G, sa)
                return torch._weight_int4pack_mm_for_cpu(mlp.activate(h), b, G, sb)
            results.append(("torch _weight_int4pack_mm_for_cpu", best_of(i4, args.repeats, E), nbytes))
        except RuntimeError as err:
            print(f"torch int4 weight-only op unavailable: {str(err).splitlines()[0]}")

        if fmt == "int4":
            def dequant_gemv(x, q, scale, zero, cols: int):
                codes = torch.stack((q & 0xF, q >> 4), dim=1).reshape(-1, cols).float()  # [in, out]
                w = (codes.view(-1, G, cols) - zero.float()[:, None]) * scale.float()[:, None]
                return x @ w.view(-1, cols)
            compiled = torch.compile(dequant_gemv, dynamic=False)
            views = [(layout.packed(rows[e:e + 1], "gate_up"), layout.packed(rows[e:e + 1], "down")) for e in range(E)]

            def comp(i):
                g, d = views[i % E]
                h = compiled(x, g.q[0], g.scale[0], g.zero[0], 2 * inter)
                return compiled(mlp.activate(h), d.q[0], d.scale[0], d.zero[0], H)
            try:
                results.append(("torch.compile dequantize-GEMV", best_of(comp, args.repeats, E), nbytes))
            except Exception as err:  # Inductor needs a C++ compiler; report rather than fail
                print(f"torch.compile dequantize-GEMV unavailable: {str(err).splitlines()[0]}")

    print(f"\none token through one {fmt} expert (H {H}, I {inter}, G {G}; row {nbytes / 2**20:.2f} MiB), "
          f"{E} experts cycled; this CPU, {all_threads} thread(s) at most")
    print(f"{'option':40s} {'us/expert':>10s} {'GB/s':>7s} {'vs host kernel':>15s}")
    kernel_best = min(t for n, t, _ in results if n.startswith("host kernel"))
    for name, t, b in results:
        print(f"{name:40s} {t * 1e6:10.1f} {b / t / 1e9:7.1f} {t / kernel_best:14.2f}x")


if __name__ == "__main__":
    main()
