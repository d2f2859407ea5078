"""CUDA-only checks: pinned host store, copy stream and events. Skipped cleanly without a GPU
(run with `pytest -m gpu` on a machine that has one)."""

from __future__ import annotations

import pytest
import torch

import mobile

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT = torch.randint(3, 97, (20,), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("policy", ["resident", "ondemand", "lru", "lru-prefetch", "little", "mobile", "layer-mass"])
def test_cuda_policies_match_cpu(tiny, policy):
    t = tiny("qwen2_moe")
    cpu = mobile.Engine.load(t.graph, policy=policy)
    gpu, again = (mobile.Engine.load(t.graph, device="cuda", policy=policy) for _ in range(2))
    try:
        torch.testing.assert_close(gpu.logits(PROMPT), cpu.logits(PROMPT), atol=1e-4, rtol=1e-4)
        again.logits(PROMPT)  # the same history as gpu's
        # the same tokens on two runs with the same history: the copy streams' timing must not change
        # what is computed (the cache-aware little pass takes only experts a wait has covered)
        first = gpu.generate(PROMPT, 16, stop_ids=[])
        assert again.generate(PROMPT, 16, stop_ids=[]) == first
        if policy in ("resident", "ondemand", "lru", "lru-prefetch"):  # big decoding: the CPU's tokens
            assert first == cpu.generate(PROMPT, 16, stop_ids=[])
        if policy != "resident":
            assert gpu.stats["link"] == "real" and gpu.stats["bytes_h2d"] > 0
            assert all(h.is_pinned() for h in gpu.experts.host.values())
    finally:
        gpu.close()
        again.close()


def offloaded(t, tmp_path, device="cuda", trace=False):
    graph = t.compile(tmp_path, "--policy", "lru", slots_per_layer=4)  # too few slots: copies every step
    return mobile.Engine.load(graph, device=device, trace=trace)


def test_pinned_bytes_equal_needed_bytes(tiny, tmp_path):
    t = tiny("olmoe")
    engine = offloaded(t, tmp_path)
    try:
        s = engine.stats
        needed = sum(h.numel() * h.element_size() for h in engine.experts.host.values())
        assert s["pinned_host_bytes"] == s["host_expert_bytes"] == needed  # one registered allocation
        assert all(h.is_pinned() for h in engine.experts.host.values())
    finally:
        engine.close()


def test_cuda_events_measure_stall_link_and_trace(tiny, tmp_path):
    t = tiny("olmoe")
    engine = offloaded(t, tmp_path, trace=True)
    try:
        engine.generate(PROMPT, 16, stop_ids=[])
        s = engine.stats
        assert s["link"] == "real" and s["bytes_h2d"] > 0
        assert s["link_busy_s"] > 0 and s["stall_s"] > 0
        engine.write_trace(tmp_path / "t.json")
        copies = [e for e in engine.trace if e[2] == "copy"]
        computes = [e for e in engine.trace if e[2] == "compute"]
        assert copies and all(end > start for _, _, _, start, end, _ in copies)
        assert computes and all(isinstance(e[3], float) or e[3].query() for e in computes)
    finally:
        engine.close()


def test_emulated_link_is_refused_on_cuda(tiny, tmp_path, capsys):
    from conftest import run_cli

    t = tiny("olmoe")
    graph = t.compile(tmp_path, "--policy", "lru", slots_per_layer=4)
    assert run_cli("run", "--graph", graph, "--device", "cuda", "--prompt-ids", "5,6", "--link-gbps", "8") == 2
    assert "--link-gbps: an emulated link runs only on the CPU" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_waits_for_its_own_copies(tiny, tmp_path):
    """On cuda:1 while cuda:0 is current: compute must wait on cuda:1's streams, not cuda:0's."""
    t = tiny("olmoe")
    ref = mobile.Engine.load(t.graph).generate(PROMPT, 16, stop_ids=[])
    engine = offloaded(t, tmp_path, device="cuda:1")
    try:
        assert torch.cuda.current_device() == 0
        assert engine.generate(PROMPT, 16, stop_ids=[]) == ref
    finally:
        engine.close()


# -- CUDA graphs (mobile.runtime.graphs): capture and replay, written for a GPU, not yet run on one --------

GRAPH_POLICIES = ["resident", "ondemand", "lru", "lru-prefetch", "little", "mobile", "layer-mass"]


@pytest.mark.parametrize("policy", GRAPH_POLICIES)
def test_graph_replay_equals_eager(tiny, policy):
    t = tiny("qwen2_moe")
    eager, graphed = (mobile.Engine.load(t.graph, device="cuda", policy=policy, cuda_graphs=mode)
                      for mode in ("off", "on"))
    try:
        short = PROMPT[:6]  # through graphs too (GRAPH_MAX_TOKENS)
        torch.testing.assert_close(graphed.logits(short), eager.logits(short), atol=1e-4, rtol=1e-4)
        want = eager.generate(PROMPT, 40, stop_ids=[])
        assert graphed.generate(PROMPT, 40, stop_ids=[]) == want
        s, e = graphed.stats, eager.stats
        assert s["cuda_graphs"] == "on" and s["graph_captures"] > 0 and s["graph_replays"] > 0
        assert all("Rounds" in reason for reason in s["graph_eager_reasons"]), s["graph_eager_reasons"]
        assert s["host_syncs_per_token"] == e["host_syncs_per_token"]  # graphs add no host read
        assert graphed.kv.fixed and graphed.kv.capacity == graphed.max_seq_len
    finally:
        eager.close()
        graphed.close()


def test_resident_decode_token_is_one_graph_its_pick_and_one_read(tiny):
    t = tiny("olmoe")
    engine = mobile.Engine.load(t.graph, device="cuda", policy="resident", cuda_graphs="auto")  # auto: on for CUDA
    engine.generate(PROMPT, 32, stop_ids=[])
    s = engine.stats
    # the forward's graph and the greedy pick's, both captured
    assert s["cuda_graphs"] == "on" and s["graph_replays_per_token"] == 2.0 and s["graph_eager_segments"] == 0
    assert s["host_syncs_per_token"] == 1.0  # the sampled id only


@pytest.mark.parametrize("policy", ["lru", "lru-prefetch", "mobile"])
def test_graph_host_reads_per_token_stay_within_the_device_op_limit(tiny, tmp_path, policy):
    """One read per MoE layer and one for the sampled id, with the segments between them replayed."""
    t = tiny("olmoe")
    graph = t.compile(tmp_path, "--policy", policy, slots_per_layer=4)  # copies every step
    engine = mobile.Engine.load(graph, device="cuda", cuda_graphs="on")
    try:
        engine.generate(PROMPT, 24, stop_ids=[])
        s = engine.stats
        layers = len(engine.spec.moe_layers)
        assert s["host_syncs_per_token"] <= layers + 1 and s["graph_replays_per_token"] >= layers
        assert s["bytes_h2d"] > 0 and s["link"] == "real"
    finally:
        engine.close()


def test_compiled_graphs_replay_without_recompiles(tiny):
    t = tiny("qwen2_moe")
    engine = mobile.Engine.load(t.graph, device="cuda", compile=True, cuda_graphs="on")
    engine.generate(PROMPT, 4, stop_ids=[])
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = engine.generate(PROMPT, 300, stop_ids=[])
    eager = mobile.Engine.load(t.graph, device="cuda", cuda_graphs="off").generate(PROMPT, 300, stop_ids=[])
    assert out[:32] == eager[:32]  # compiled kernels round differently: the first tokens agree
    assert engine.stats["graph_replays_per_token"] == 2.0  # the forward and the greedy pick


def test_a_segment_that_syncs_is_run_eagerly_not_captured():
    from mobile.runtime.context import StepContext
    from mobile.runtime.graphs import GraphRunner, Segment

    runner = GraphRunner(torch.device("cuda"))
    z = torch.zeros(1, device="cuda")
    ctx = StepContext(positions=z, cos=z, sin=z, kv_len=1, key=(1, 1, False))

    def reads(ctx, env):  # .item() waits for the device: no graph may hold it
        return {"y": env["x"] * float(env["x"].sum().item())}

    out = runner.run(Segment(0, "n", reads), ctx, {"x": torch.full((2,), 3.0, device="cuda")}, False)
    assert out["y"].tolist() == [18.0, 18.0]
    assert runner.eager == 1 and runner.replays == 0 and "syncs with the host" in next(iter(runner.reasons))


def test_device_sampling_on_cuda_is_seeded_and_reads_once(tiny):
    t = tiny("olmoe")
    runs = []
    for _ in range(2):
        engine = mobile.Engine.load(t.graph, device="cuda", policy="resident")
        runs.append(engine.generate(PROMPT, 24, greedy=False, temperature=0.8, top_p=0.9, seed=7, stop_ids=[]))
        s = engine.stats
        assert s["host_syncs_per_token"] == 1.0
        # the forward's graph and the sampled pick's, captured: the draw's noise is a hash, not a generator's state
        assert s["graph_replays_per_token"] == 2.0 and s["graph_eager_segments"] == 0
    assert runs[0] == runs[1]
