"""CUDA graphs' static decode state and the static-buffer runner (mobile.runtime.graphs), on the CPU.

`--cuda-graphs on` on a CPU runs the runner without capture: inputs into persistent buffers,
the segment, its outputs into persistent buffers. So these tests check, against `off`, what a GPU's
replays rely on: the same tokens, the KV cache's storage never moving, the rope rows gathered on
the device, the bookkeeping a replay skips kept by the executor. The capture itself is GPU-only
(tests/test_gpu.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli

import mobile
from mobile.compiler.compile import compile_to_dir
from mobile.compiler.ir import Node, Op
from mobile.errors import MobileError, SpecError
from mobile.models.ops import rope_tables
from mobile.runtime.context import StepContext
from mobile.runtime.graphs import GraphRunner, Segment, kv_bucket, refusal
from mobile.runtime.kv import KV_BUDGET_BYTES, bytes_per_position, max_seq_len
from mobile.spec.load import load_spec

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "demo" / "data" / "heldout_kjv.txt").read_text()[:2000]
DECODE = 300  # decode tokens: past the first KV block of 256 (off grows there) and its graph bucket


@pytest.fixture(scope="module")
def demo_graph(tmp_path_factory) -> Path:
    out, _ = compile_to_dir(ROOT / "specs" / "demo.yaml", tmp_path_factory.mktemp("demo") / "g")
    return out


@pytest.fixture(scope="module")
def prompts(demo_graph) -> list[torch.Tensor]:
    """Two 8-token prompts from real text: short enough to run through graphs (GRAPH_MAX_TOKENS)."""
    ids = mobile.Engine.load(demo_graph, policy="resident").tokenizer.encode(TEXT)
    return [torch.tensor(ids[:8]), torch.tensor(ids[100:108])]


def kv_pointers(engine) -> list[int]:
    return [t.data_ptr() for layer in engine.kv.layers for t in (layer.k, layer.v)]


def decode_both(graph, prompts, policy, options=None, **kw):
    """The same two generations with graphs off and on: (tokens, stats, engine) per mode."""
    runs = {}
    for mode in ("off", "on"):
        engine = mobile.Engine.load(graph, policy=policy, policy_options=options, cuda_graphs=mode, **kw)
        before = kv_pointers(engine)
        tokens = [engine.generate(prompts[0], DECODE, stop_ids=[]), engine.generate(prompts[1], 40, stop_ids=[])]
        stats = engine.stats
        engine.close()
        runs[mode] = tokens, stats, engine, before
    return runs


def check_same_decoding(runs) -> None:
    (off, off_stats, off_engine, _), (on, on_stats, on_engine, before) = runs["off"], runs["on"]
    assert on == off and len(on[0]) == DECODE
    # off grew its cache past its first block; on preallocated it and never moved it
    assert off_engine.kv.capacity > 256 and not off_engine.kv.fixed
    assert on_engine.kv.fixed and on_engine.kv.capacity == on_engine.max_seq_len == 2048
    assert kv_pointers(on_engine) == before
    assert on_stats["cuda_graphs"] == "emulated" and off_stats["cuda_graphs"] == "off"
    assert on_stats["graph_replays"] > 0 and on_stats["graph_captures"] > 0 and off_stats["graph_replays"] == 0
    # graphs change no host read: one per MoE layer and the sampled token, as off
    assert on_stats["host_syncs_per_token"] == off_stats["host_syncs_per_token"]
    # the only segments refused here are a prompt's expert rounds (more experts than the cache holds)
    assert all("Rounds" in reason for reason in on_stats["graph_eager_reasons"])


# resident: one segment; lru-prefetch: one segment per MoE layer, with next-layer predictions;
# mobile with a gate that fires and a KV refresh: the big pass's segments, the select that passes
# its input through, forwards of 2 to 4 tokens (the refresh) in their own buckets
DEFAULT = [("resident", None), ("lru-prefetch", None), ("mobile", {"tau": 0.3, "kv_refresh": 3})]
SLOW = [("ondemand", None), ("lru", None), ("little", None), ("layer-mass", None), ("mobile", None)]


@pytest.mark.parametrize("policy,options", DEFAULT)
def test_graphs_on_decode_the_tokens_of_off(demo_graph, prompts, policy, options):
    runs = decode_both(demo_graph, prompts, policy, options)
    check_same_decoding(runs)
    stats = runs["on"][1]
    if policy == "resident":
        assert stats["graph_replays_per_token"] == 2.0  # a decoded token is one graph, and its greedy pick one more
    if options:
        assert stats["fallback_tokens"] > 0 and stats["refreshed_tokens"] > 0  # the paths this row is for


@pytest.mark.slow
@pytest.mark.parametrize("policy,options", SLOW)
def test_graphs_on_decode_the_tokens_of_off_every_policy(demo_graph, prompts, policy, options):
    check_same_decoding(decode_both(demo_graph, prompts, policy, options))


def test_compiled_graphs_never_recompile_and_decode_the_tokens_of_eager(tiny):
    """--compile with graphs on: once the prompt (T > 8, eager) and decode (T = 1) segments exist,
    300 decode tokens (across a KV bucket), a second prompt short enough for graphs (T = 5) and its
    decoding compile nothing new."""
    t = tiny("qwen2_moe")
    prompt = torch.arange(3, 23)
    engine = mobile.Engine.load(t.graph, compile=True, cuda_graphs="on")
    engine.generate(prompt, 4, stop_ids=[])
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = engine.generate(prompt, DECODE, stop_ids=[])
        short = engine.generate(prompt[:5], 4, stop_ids=[])
    eager = mobile.Engine.load(t.graph)
    assert out == eager.generate(prompt, DECODE, stop_ids=[]) and short == eager.generate(prompt[:5], 4, stop_ids=[])
    assert engine.stats["graph_replays"] > DECODE


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["resident", "ondemand", "lru", "lru-prefetch", "little", "layer-mass", "mobile"])
def test_compiled_graphs_never_recompile_on_the_demo(demo_graph, prompts, policy):
    """Decoding through graphs compiles nothing once the decode step has run. (A prompt may: where
    one prompt's layer fits the cache and another's runs in rounds, the segment's wait input
    changes type, graphs or not; the warm-up runs both prompts.)"""
    engine = mobile.Engine.load(demo_graph, policy=policy, compile=True, cuda_graphs="on")
    for prompt in prompts:
        engine.generate(prompt, 4, stop_ids=[])
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = engine.generate(prompts[0], DECODE, stop_ids=[])
        engine.generate(prompts[1], 4, stop_ids=[])
    assert len(out) == DECODE and engine.stats["graph_replays"] > 0
    eager = mobile.Engine.load(demo_graph, policy=policy)
    for prompt in prompts:  # the same history as the compiled engine's
        eager.generate(prompt, 4, stop_ids=[])
    assert out == eager.generate(prompts[0], DECODE, stop_ids=[])


# -- the static decode state -----------------------------------------------------------------------

def test_static_state_gathers_the_rope_rows_on_the_device(demo_graph, prompts):
    engine = mobile.Engine.load(demo_graph, policy="resident", cuda_graphs="on")
    out = engine.generate(prompts[0], 20, stop_ids=[])
    _, cos, sin = engine.tables
    assert cos.shape[0] == engine.max_seq_len  # precomputed for every position, once
    positions = engine.static.positions[1]
    assert int(positions) == engine.length - 1  # the last decoded token's
    want_cos, want_sin = rope_tables(positions, engine.inv_freq, engine.rope_scale, engine.rope_interleaved)
    got_cos, got_sin = engine.static.rope[1]
    torch.testing.assert_close(got_cos, want_cos)
    torch.testing.assert_close(got_sin, want_sin)
    assert int(engine.static.tokens[1]) == out[-2]  # what the last forward was fed


def test_kv_buckets_double_up_to_the_capacity():
    assert [kv_bucket(n, 2048) for n in (1, 256, 257, 1000, 1025, 2048)] == [256, 256, 512, 1024, 2048, 2048]
    assert kv_bucket(300, 300) == 300


def test_max_seq_len_defaults_to_the_context_capped_by_the_kv_budget():
    spec = load_spec(ROOT / "specs" / "qwen3-30b-a3b.yaml")
    assert bytes_per_position(spec) == 48 * 2 * 4 * 128 * 2  # layers, k and v, kv heads, head dim, bf16
    assert max_seq_len(spec, preallocated=False) == spec.model.max_position_embeddings == 40960
    capped = max_seq_len(spec, preallocated=True)
    assert capped == 10752 and capped * bytes_per_position(spec) <= KV_BUDGET_BYTES
    demo = load_spec(ROOT / "specs" / "demo.yaml")
    assert max_seq_len(demo, preallocated=True) == 2048  # the whole context fits


def small_context(tmp_path: Path, max_len) -> Path:
    text = (ROOT / "specs" / "demo.yaml").read_text()
    text = text.replace("path: ../demo/checkpoint", f"path: {ROOT / 'demo' / 'checkpoint'}")
    spec = tmp_path / "demo.yaml"
    spec.write_text(text.replace("runtime:\n", f"runtime:\n  max_seq_len: {max_len}\n"))
    return spec


def test_runtime_max_seq_len_bounds_the_sequence(tmp_path, prompts):
    graph, _ = compile_to_dir(small_context(tmp_path, 40), tmp_path / "g")
    for mode in ("off", "on"):
        engine = mobile.Engine.load(graph, policy="resident", cuda_graphs=mode)
        out = engine.generate(prompts[0], 100, stop_ids=[])
        assert len(out) == 40 - 8 + 1 and engine.stats["stopped"] == "context"
        assert engine.kv.capacity <= (40 if mode == "on" else 256)
        with pytest.raises(MobileError, match="more than runtime.max_seq_len=40"):
            engine.generate(torch.arange(41), 1)
    with pytest.raises(MobileError, match="preallocated KV cache of 40"):
        engine.kv.ensure(41)


@pytest.mark.parametrize("value,message", [(0, "expected 1 <= max_seq_len"), (4096, "max_position_embeddings=2048"),
                                           ("'long'", "expected an integer")])
def test_bad_max_seq_len_is_one_line(tmp_path, capsys, value, message):
    assert run_cli("compile", small_context(tmp_path, value), "-o", tmp_path / "g") == 2
    err = capsys.readouterr().err
    assert "runtime.max_seq_len" in err and message in err and "Traceback" not in err


# -- sampling under graphs ---------------------------------------------------------------------------

@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampled_generation_is_the_same_with_graphs(demo_graph, prompts, top_p):
    """The draw's noise is a hash of the seed and the position, not a generator's state: a captured
    pick replays with each token's position and the request's seed, and draws off's tokens."""
    engines = [mobile.Engine.load(demo_graph, policy="resident", cuda_graphs=mode) for mode in ("off", "on")]
    outs = [e.generate(prompts[0], 60, greedy=False, temperature=0.8, top_p=top_p, seed=3, stop_ids=[])
            for e in engines]
    assert outs[0] == outs[1] and len(set(outs[0])) > 10  # it samples, not argmaxes
    assert engines[1].stats["graph_replays_per_token"] == 2.0 and engines[1].stats["graph_eager_segments"] == 0
    other = engines[1].generate(prompts[0], 60, greedy=False, temperature=0.8, top_p=top_p, seed=4, stop_ids=[])
    assert other != outs[0]  # another request's seed is copied into the same captured pick


# -- the runner's contract ---------------------------------------------------------------------------

def ctx() -> StepContext:
    z = torch.zeros(1)
    return StepContext(positions=z, cos=z, sin=z, kv_len=1, key=(1, 1, False))


def segment(fn, key=0) -> Segment:
    return Segment(key, "n", fn)


def test_runner_copies_inputs_and_overwrites_its_persistent_outputs():
    runner, c = GraphRunner(torch.device("cpu")), ctx()
    double = lambda ctx, env: {"y": env["x"] * 2}  # noqa: E731
    first = runner.run(segment(double), c, {"x": torch.tensor([1.0])}, first=True)["y"]
    second = runner.run(segment(double), c, {"x": torch.tensor([5.0])}, first=True)["y"]
    assert second is first and float(first) == 10.0  # one buffer, overwritten by the next run (as a replay)
    assert (runner.captures, runner.replays, runner.eager) == (1, 2, 0)


def test_runner_reads_registered_tensors_in_place_and_keys_on_them():
    runner, c = GraphRunner(torch.device("cpu")), ctx()
    a, b = torch.tensor([1.0]), torch.tensor([2.0])
    runner.register([a, b])
    plus = lambda ctx, env: {"y": env["x"] + 1}  # noqa: E731
    runner.run(segment(plus), c, {"x": a}, first=False)
    a.fill_(7.0)  # changed in place, as the slot map is: the next run reads it
    assert float(runner.run(segment(plus), c, {"x": a}, first=False)["y"]) == 8.0
    # another persistent tensor in the same place: an entry of its own, never a stale read of `a`
    assert float(runner.run(segment(plus), c, {"x": b}, first=False)["y"]) == 3.0
    assert len(runner.entries) == 2


def test_runner_keys_python_values():
    """A Python value a segment reads is part of its entry's key: a replay repeats what the capture did with it."""
    runner, c = GraphRunner(torch.device("cpu")), ctx()
    x = torch.tensor([3.0])
    runner.register([x])
    pick = lambda ctx, env: {"y": env["x"] + 1 if env["flag"] else env["x"] * 0}  # noqa: E731
    assert float(runner.run(segment(pick), c, {"x": x, "flag": True}, first=False)["y"]) == 4.0
    assert float(runner.run(segment(pick), c, {"x": x, "flag": False}, first=False)["y"]) == 0.0
    assert float(runner.run(segment(pick), c, {"x": x, "flag": True}, first=False)["y"]) == 4.0
    assert len(runner.entries) == 2 and runner.captures == 2 and runner.replays == 3


def test_runner_refuses_what_a_capture_cannot_hold():
    runner, c = GraphRunner(torch.device("cpu")), ctx()
    seg = lambda ctx, env: {"y": sum(env["rounds"])}  # noqa: E731
    out = runner.run(segment(seg), c, {"rounds": [torch.ones(1), torch.ones(1)]}, first=False)
    assert float(out["y"]) == 2.0 and runner.eager == 1 and "input is a list" in next(iter(runner.reasons))
    shuffled = [Node.make("L0.router", Op.ROUTER, ("x",), order="random")]
    same = Segment(1, "L0.router", lambda ctx, env: {"y": env["x"]}, refusal(shuffled))
    runner.run(same, c, {"x": torch.ones(1)}, first=False)
    assert runner.eager == 2 and any("random expert order" in r for r in runner.reasons)
    assert runner.replays == 0


# -- the command line --------------------------------------------------------------------------------

def test_cli_flag_on_run_bench_and_eval(demo_graph, tmp_path, capsys):
    import json

    assert run_cli("run", "--graph", demo_graph, "--prompt-ids", "5,6,7", "--max-new-tokens", "8", "--json",
                   "--cuda-graphs", "on") == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["cuda_graphs"] == "emulated" and stats["graph_replays"] > 0 and stats["graph_captures"] > 0
    out = tmp_path / "bench.json"
    assert run_cli("bench", "--graph", demo_graph, "--policies", "resident", "--cuda-graphs", "off,on",
                   "--tokens", "8", "--json", out) == 0
    table = capsys.readouterr().out
    assert "resident graphs=off" in table and "resident graphs=on" in table and "EMULATED" in table
    rows = json.loads(out.read_text())["rows"]
    assert [r["cuda_graphs"] for r in rows] == ["off", "emulated"] and rows[1]["graph_replays_per_token"] == 2.0
    data = tmp_path / "text.txt"
    data.write_text(TEXT[:300])
    evals = []
    for mode in ("off", "on"):
        assert run_cli("eval", "--graph", demo_graph, "--data", data, "--policy", "lru", "--max-tokens", "40",
                       "--json", "--cuda-graphs", mode) == 0
        evals.append(json.loads(capsys.readouterr().out))
    # the same choices; perplexity to float rounding (attention over a masked bucket of the cache)
    assert evals[1]["ppl"] == pytest.approx(evals[0]["ppl"], rel=1e-5)
    assert {k: v for k, v in evals[1].items() if k != "ppl"} == {k: v for k, v in evals[0].items() if k != "ppl"}


def test_auto_is_off_on_the_cpu_and_the_spec_key_or_flag_decides(demo_graph, tmp_path):
    from mobile.cli import build_parser

    assert mobile.Engine.load(demo_graph, policy="resident").stats["cuda_graphs"] == "off"  # auto, on a CPU
    text = small_context(tmp_path, 64).read_text().replace("max_seq_len: 64", "cuda_graphs: on")  # YAML's boolean
    (tmp_path / "on.yaml").write_text(text)
    graph, _ = compile_to_dir(tmp_path / "on.yaml", tmp_path / "g")
    assert mobile.Engine.load(graph, policy="resident").stats["cuda_graphs"] == "emulated"
    assert mobile.Engine.load(graph, policy="resident", cuda_graphs="off").stats["cuda_graphs"] == "off"
    for command in ("run", "eval", "serve", "bench"):  # every command that loads an engine takes the flag
        argv = [command, "--graph", "g", "--cuda-graphs", "on"] + (["--data", "x"] if command == "eval" else [])
        assert build_parser().parse_args(argv).cuda_graphs == "on"


@pytest.mark.parametrize("argv,message", [
    (["run", "--prompt-ids", "5", "--cuda-graphs", "maybe"], "--cuda-graphs: invalid choice: 'maybe'"),
    (["bench", "--cuda-graphs", "on,maybe"], "--cuda-graphs: unknown CUDA-graphs mode 'maybe'"),
])
def test_bad_cuda_graphs_flag_is_one_line(demo_graph, capsys, argv, message):
    try:
        code = run_cli(argv[0], "--graph", demo_graph, *argv[1:])
    except SystemExit as e:  # argparse's own refusals exit from inside the parser
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_cuda_graphs_spec_key_is_one_line(tmp_path, capsys):
    text = small_context(tmp_path, 64).read_text().replace("max_seq_len: 64", "cuda_graphs: always")
    (tmp_path / "bad.yaml").write_text(text)
    assert run_cli("compile", tmp_path / "bad.yaml", "-o", tmp_path / "g") == 2
    assert "runtime.cuda_graphs: expected one of 'auto', 'on', 'off', got 'always'" in capsys.readouterr().err
    with pytest.raises(SpecError):
        load_spec(tmp_path / "bad.yaml")
