#!/usr/bin/env bash
# One call on a lent GPU machine (no network there): check the CUDA paths, then time the kernels and the policies.
# Usage (from the repo root): bash benchmarks/gpu_check.sh   -- writes logs under $OUT if set.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/mobile-gpu}"; mkdir -p "$OUT"
# run from the checkout without installing: the wheel maps kernels/ to mobile.kernels, a link does it here
[ -e mobile/kernels ] || ln -s ../kernels mobile/kernels
mobile() { python3 -m mobile.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
# 1. correctness on CUDA: the Triton kernels eager, compiled and under CUDA-graph replay against the
#    reference, and over packed int8 / int4 experts (bf16 / fp16 tl.dot tiles, which the CPU
#    interpreter never runs); every policy equals the CPU result (pinned host store, copy stream, events)
python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/pytest-gpu.log"
echo "-- ${SECONDS}s elapsed" | tee -a "$OUT/elapsed.txt"
# 1a. the hybrid families (Qwen3-Next, Qwen3.5-MoE) on CUDA: linear attention with flash-linear-attention's and
#     causal-conv1d's kernels (where installed; the log says which ran) and in torch, against the CPU; captured CUDA graphs
#     over the recurrent state against eager, 300 tokens
python3 -c "import importlib.util as u; print(*(f'{n}: ' + ('installed' if u.find_spec(m) else 'not installed') for n, m in (('flash-linear-attention', 'fla'), ('causal-conv1d', 'causal_conv1d'))), sep='; ')" \
  | tee "$OUT/pytest-gpu-hybrid.log"
python3 -m pytest -q -s -m gpu tests/test_qwen3_next.py 2>&1 | grep -E "kernels:|passed|failed|Error" | tail -15 \
  | tee -a "$OUT/pytest-gpu-hybrid.log"
echo "-- ${SECONDS}s elapsed" | tee -a "$OUT/elapsed.txt"
# 2. the Triton op against the native paths at OLMoE-1B-7B and Qwen3-30B-A3B layer shapes:
#    us per layer at T = 1, 8, 512 and the HBM GB/s reached (decides DECODE_MAX_PAIRS and the prompt path),
#    bf16 rows, then int8 and int4 (group 64) rows with their ratio to bf16
python3 benchmarks/moe_kernels.py --dtype bfloat16 --formats int8,int4 --group 64 2>&1 | tee "$OUT/moe-kernels.txt"
echo "-- ${SECONDS}s elapsed" | tee -a "$OUT/elapsed.txt"
# 2a. the keep rule on the GPU at Qwen3-30B-A3B's router shape (128 experts, top 8): its torch ops launched one by
#     one and replayed from a CUDA graph, and per token over 48 MoE layers (decides whether CUDA needs a fused rule
#     kernel too; on the CPU it is kernels/keep_rule.c)
python3 benchmarks/keep_rule.py --device cuda --experts 128 --top-k 8 --layers 48 --calls 2000 --repeats 3 2>&1 \
  | tee "$OUT/keep-rule.txt"
echo "-- ${SECONDS}s elapsed" | tee -a "$OUT/elapsed.txt"
# 3. the default CPU suite, on this machine's versions (torch 2.11, transformers 5.17)
python3 -m pytest -q -x 2>&1 | tail -5 | tee "$OUT/pytest.log"
echo "-- ${SECONDS}s elapsed" | tee -a "$OUT/elapsed.txt"
# 4. real PCIe: synthetic OLMoE-1B-7B layers in bf16, policies side by side (link: real)
mobile synth specs/olmoe-1b-7b.yaml -o /tmp/synth8 --layers 8 --dtype bfloat16 > /dev/null
mobile compile /tmp/synth8/spec.yaml -o /tmp/synth8/graph > /dev/null
mobile bench --graph /tmp/synth8/graph --device cuda --policies ondemand,lru,lru-prefetch,little,resident \
  --tokens 64 --repeats 3 --json "$OUT/bench-olmoe8.json" 2>&1 | tail -9 | tee "$OUT/bench-olmoe8.txt"
echo "-- ${SECONDS}s elapsed" | tee -a "$OUT/elapsed.txt"
# 4a. the link as mobile uses it: pinned H2D GB/s, link busy %, stall %, host reads per token, pinned/needed bytes
python3 benchmarks/cuda_link.py --graph /tmp/synth8/graph --policies lru,lru-prefetch,mobile 2>&1 | tail -6 \
  | tee "$OUT/cuda-link.txt"
echo "-- ${SECONDS}s elapsed" | tee -a "$OUT/elapsed.txt"
# 4b. the same layers at equal cache bytes (a budget of 12 bf16 experts per layer), bf16 against int8 and int4
python3 -c "import yaml; p='/tmp/synth8/spec.yaml'; d=yaml.safe_load(open(p)); d['runtime']=dict(d.get('runtime') or {}, expert_cache={'budget': '1210MB'}); yaml.safe_dump(d, open(p, 'w'), sort_keys=False)"
mobile compile /tmp/synth8/spec.yaml -o /tmp/synth8/graph-budget > /dev/null
mobile bench --graph /tmp/synth8/graph-budget --device cuda --policies lru-prefetch,mobile --expert-format native,int8,int4 \
  --tokens 64 --repeats 3 --baseline "lru-prefetch native" --json "$OUT/bench-olmoe8-formats.json" 2>&1 | tail -9 \
  | tee "$OUT/bench-olmoe8-formats.txt"
echo "-- ${SECONDS}s elapsed" | tee -a "$OUT/elapsed.txt"
# 5. the demo model as its spec runs it (8 of 16 experts per layer cached, the same memory for every
#    policy): mobile against the LRU baselines on a real link
mobile compile specs/demo.yaml -o graphs/demo-gpu > /dev/null
for text in kjv py; do
  mobile bench --graph graphs/demo-gpu --device cuda --policies lru,lru-prefetch,little,mobile \
    --row "lru-prefetch eviction=lfu" --row "mobile eviction=lru" --row "mobile layer_rule=switch layer_tau=0.7" \
    --row "mobile tau=0.05" --row "mobile cached_complement=false tau=0.1 layer_tau=0.85 layer_rule=switch" \
    --text demo/data/heldout_$text.txt --tokens 128 --prompt-len 32 --repeats 2 --baseline lru-prefetch 2>&1 | tail -12 \
    | tee "$OUT/bench-demo-$text.txt"
done
echo "-- ${SECONDS}s elapsed" | tee -a "$OUT/elapsed.txt"
# 6. CUDA graphs (mobile.runtime.graphs) on the demo: resident decode eager, with graphs, compiled, compiled with graphs
#    (one decode token is one graph there), then per policy tok/s with graphs off and on
mobile bench --graph graphs/demo-gpu --device cuda --policies resident --cuda-graphs off,on --text demo/data/heldout_kjv.txt \
  --tokens 256 --prompt-len 32 --repeats 3 --json "$OUT/bench-demo-resident-graphs.json" 2>&1 | tail -4 \
  | tee "$OUT/bench-demo-resident-graphs.txt"
mobile bench --graph graphs/demo-gpu --device cuda --policies resident --cuda-graphs off,on --compile \
  --text demo/data/heldout_kjv.txt --tokens 256 --prompt-len 32 --json "$OUT/bench-demo-resident-compiled.json" 2>&1 \
  | tail -4 | tee "$OUT/bench-demo-resident-compiled.txt"
mobile bench --graph graphs/demo-gpu --device cuda --policies ondemand,lru,lru-prefetch,little,layer-mass,mobile \
  --cuda-graphs off,on --text demo/data/heldout_kjv.txt --tokens 128 --prompt-len 32 \
  --json "$OUT/bench-demo-policies-graphs.json" 2>&1 | tail -14 | tee "$OUT/bench-demo-policies-graphs.txt"
echo "-- ${SECONDS}s elapsed" | tee -a "$OUT/elapsed.txt"
# 6a. the host placements against the link on the demo (host, lru-host, hybrid-static, mobile with the placement rule): nothing
#     emulated here, the host's threads all of the machine's cores (docs/host-placement.md has the emulated rows)
T=$(nproc)
mobile bench --graph graphs/demo-gpu --device cuda --policies lru-prefetch,mobile --row "host host_threads=$T" \
  --row "lru-host host_threads=$T" --row "hybrid-static host_threads=$T" --row "mobile placement=choose host_threads=$T" \
  --row "mobile placement=adaptive host_threads=$T" \
  --profile-text demo/data/heldout_kjv.txt \
  --text demo/data/heldout_py.txt --tokens 128 --prompt-len 32 --repeats 2 --baseline lru-prefetch \
  --json "$OUT/bench-demo-host.json" 2>&1 | tail -8 | tee "$OUT/bench-demo-host.txt"
echo "-- ${SECONDS}s elapsed" | tee -a "$OUT/elapsed.txt"
# 6b. the host expert kernel on this machine's CPU (more cores than the CPU machines' two): GB/s against a
#     STREAM-like read of the same int4 rows, at 1 thread and at all threads (needs a C compiler)
python3 benchmarks/host_kernel.py --skip-torch --repeats 3 2>&1 | tail -9 | tee "$OUT/host-kernel.txt"
echo "-- ${SECONDS}s elapsed" | tee -a "$OUT/elapsed.txt"
# 7. a peer row: transformers with accelerate's CPU offload on the same random OLMoE-shaped weights, the device
#     capped at 1.5 GiB for both; last of the benches, as the one that may be skipped (skipped in one line when accelerate is not installed)
python3 benchmarks/hf_offload_peer.py --device cuda --layers 4 --gpu-memory 1536MiB --tokens 16 2>&1 | tail -7 \
  | tee "$OUT/hf-offload-peer.txt"
echo "-- ${SECONDS}s elapsed" | tee -a "$OUT/elapsed.txt"
# last: one table of every bench above (decode tok/s, graph replays and host reads per token, stall), also in $OUT
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'bench':<28} {'row':<34} {'tok/s':>9} {'ratio':>7} {'graphs/tok':>10} {'reads/tok':>9} {'stall':>6} {'MiB/tok':>8}")
for f in sorted(out.glob("bench-*.json")):
    for r in json.loads(f.read_text())["rows"]:
        g, h = r.get("graph_replays_per_token"), r.get("host_syncs_per_token")
        print(f"{f.stem[6:]:<28} {r['policy']:<34} {r['decode_tokens_per_s']:>9.1f} {r['ratio']:>6.2f}x "
              f"{'-' if g is None else f'{g:.2f}':>10} {'-' if h is None else f'{h:.2f}':>9} "
              f"{r['stall_fraction']:>6.2f} {r['bytes_per_token'] / 2**20:>8.2f}")
PY
echo "-- ${SECONDS}s in all" | tee -a "$OUT/elapsed.txt"
