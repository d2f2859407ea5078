"""Placement `host` (every routed expert computed on the host, llama.cpp's --n-cpu-moe over all
layers): resident's logits and tokens on the demo and on families with shared experts (Qwen2-MoE)
and with biases and a clamped activation (gpt-oss), native and int4; its stats, its bench row and a
failing host worker. Its bad flags are rows of tests/test_bad_input.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import Tiny, run_cli, run_cli_within
from tiny import build_tiny_gpt_oss

import mobile
from mobile.moe import host
from mobile.moe.host import HostExperts

pytestmark = pytest.mark.skipif(host.unavailable() is not None, reason=str(host.unavailable()))
DEMO = Path(__file__).parent.parent / "specs" / "demo.yaml"
PROMPT = torch.randint(3, 97, (12,), generator=torch.Generator().manual_seed(3))


class GptOssTiny(Tiny):
    def build(self, ckpt: Path):
        return build_tiny_gpt_oss(ckpt)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "graph"
    assert run_cli("compile", DEMO, "-o", out, "--policy", "resident") == 0
    return out


def placed_matches(graph: Path, policy: str, tokens: int, fmt: str | None = None, group: int | None = None,
                   **options) -> dict:
    """`policy` with its placement gives resident's logits (1e-4) and greedy tokens; its stats."""
    formats = {"expert_format": fmt, "expert_group_size": group} if fmt else {}
    resident = mobile.Engine.load(graph, **formats)
    engine = mobile.Engine.load(graph, policy=policy, policy_options=options, link_ratio=40.0, **formats)
    try:
        torch.testing.assert_close(engine.logits(PROMPT), resident.logits(PROMPT), atol=1e-4, rtol=1e-4)
        assert engine.generate(PROMPT, tokens, stop_ids=[]) == resident.generate(PROMPT, tokens, stop_ids=[])
        return engine.stats
    finally:
        engine.close()
        resident.close()


@pytest.mark.parametrize("fmt", [None, "int4"])
def test_the_demo_on_the_host_decodes_as_resident(demo, fmt):
    s = placed_matches(demo, "host", 64, fmt)
    moe_layers, top_k = 4, 4  # the demo's
    assert s["link"] == "none" and s["bytes_h2d"] == 0 and s["host"] == "emulated" and s["host_ratio"] == 16
    # every decoded token's every layer ran its top-k on the host (the prompt's pairs on top)
    assert s["experts_on_host"] >= 64 * moe_layers * top_k and s["host_busy_s"] > 0
    assert s["host_syncs_per_token"] == moe_layers + 1  # one read per MoE layer, plus the token: no more


@pytest.mark.parametrize("family", ["qwen2_moe"])
@pytest.mark.parametrize("fmt", [None, "int4"])
def test_shared_experts_on_the_host_decode_as_resident(tiny, family, fmt):
    t = tiny(family)
    placed_matches(t.graph, "host", 64, fmt, group=8)  # a group the tiny widths divide


@pytest.mark.parametrize("fmt", [None, "int4"])
def test_biases_and_clamped_experts_on_the_host_decode_as_resident(tmp_path_factory, fmt):
    t = GptOssTiny(tmp_path_factory.mktemp("gpt_oss"), "gpt_oss")
    placed_matches(t.graph, "host", 64, fmt, group=8)


def test_the_plan_says_where_experts_live(tmp_path, capsys):
    assert run_cli("compile", DEMO, "-o", tmp_path / "g", "--policy", "host") == 0
    out = capsys.readouterr().out
    assert "every routed expert computed on the host, from host memory (none on the device)" in out
    assert "host RAM for experts: 24.0MiB" in out
    schedule = (tmp_path / "g" / "schedule.txt").read_text()
    assert "host_experts" in schedule and "fetch" not in schedule


def test_bench_names_the_emulated_host(demo, capsys):
    assert run_cli("bench", "--graph", demo, "--policies", "lru-prefetch,host", "--tokens", "8", "--link-ratio",
                   "40") == 0
    out = capsys.readouterr().out
    assert "host EMULATED (host_ratio=16" in out and "host busy" in out


def test_bench_rows_share_one_emulated_host(demo, tmp_path, capsys):
    """As every row sees one link, every row and run sees one host: its unit (the device's time for
    one expert) is measured once, by the link's calibration at native, and padded to by all."""
    assert run_cli("bench", "--graph", demo, "--policies", "host,lru-host", "--row", "mobile placement=choose",
                   "--tokens", "4", "--repeats", "2", "--link-ratio", "40", "--json", tmp_path / "b.json") == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert {r["host_pair_us"] for r in data["rows"]} == {data["link"]["expert_compute_us"]}
    assert f"native {data['link']['expert_compute_us']:.2f} us" in capsys.readouterr().out


def test_a_failing_host_worker_ends_the_run_in_one_line(demo, monkeypatch, capsys):
    def fail(self, *args):
        raise ZeroDivisionError("injected")

    monkeypatch.setattr(HostExperts, "__call__", fail)
    code = run_cli_within(30, "run", "--graph", demo, "--policy", "host", "--prompt-ids", "5,6",
                          "--max-new-tokens", "4")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and "Traceback" not in err and len(lines) == 1, err
    assert "internal error in the host worker: ZeroDivisionError: injected" in lines[0]


def test_host_ratio_scales_the_emulated_host(demo):
    """The host's time is padded to host_ratio times the device's for the same expert: ratio 64
    makes it busier than ratio 4 on the same tokens."""
    busy = {}
    for ratio in (4.0, 64.0):
        engine = mobile.Engine.load(demo, policy="host", policy_options={"host_ratio": ratio})
        engine.generate(PROMPT, 8, stop_ids=[])
        busy[ratio] = engine.stats["host_busy_s"]
        engine.close()
    assert busy[64.0] > 4 * busy[4.0] and not math.isnan(busy[4.0])


def test_host_under_cuda_graphs_decodes_as_eager(demo):
    """Each host_experts node is a sync step between graph segments (emulated on the CPU): the
    tokens are eager's, with one replay per segment."""
    eager = mobile.Engine.load(demo, policy="host")
    graphed = mobile.Engine.load(demo, policy="host", cuda_graphs="on")
    try:
        assert graphed.generate(PROMPT, 32, stop_ids=[]) == eager.generate(PROMPT, 32, stop_ids=[])
        assert graphed.stats["graph_replays_per_token"] == 6.0  # 4 MoE layers' segments, the head's and the greedy pick
    finally:
        eager.close()
        graphed.close()


# -- placements: lru-host (every miss on the host, copied in behind) and the placement rule --------
@pytest.mark.parametrize("fmt", [None, "int4"])
def test_lru_host_decodes_as_resident_and_copies_its_misses_behind(demo, fmt):
    s = placed_matches(demo, "lru-host", 64, fmt)
    # a miss whose copy behind has not been waited for yet is moved: the device waits for that copy
    assert s["experts_both"] > s["experts_moved"] and s["host_busy_s"] > 0 and s["host"] == "emulated"
    assert s["bytes_h2d"] > 0  # the copies behind


@pytest.mark.parametrize("policy,options", [("lru-host", {}), ("lru-prefetch", {"placement": "choose"})])
def test_placements_on_families_with_shared_experts_and_biases_decode_as_resident(tiny, tmp_path_factory, policy,
                                                                                  options):
    for t in (tiny("qwen2_moe"), GptOssTiny(tmp_path_factory.mktemp("gpt_oss"), "gpt_oss")):
        cached = t.compile(tmp_path_factory.mktemp(policy), slots_per_layer=6)
        for fmt in (None, "int4"):
            placed_matches(cached, policy, 64, fmt, group=8, **options)


def test_the_placement_rule_changes_where_not_what(demo):
    """mobile with and without the placement rule compute the same pairs (with the cached experts
    out of its keep rule, which would make them depend on what the cache holds): the same tokens."""
    tokens, stats = [], []
    for placement in ("move", "choose"):
        engine = mobile.Engine.load(demo, policy="mobile", link_ratio=40.0,
                                    policy_options={"placement": placement, "cached_complement": False})
        tokens.append(engine.generate(PROMPT, 64, stop_ids=[]))
        stats.append(engine.stats)
        engine.close()
    assert tokens[0] == tokens[1]
    assert "experts_on_host" not in stats[0] and stats[1]["experts_on_host"] + stats[1]["experts_both"] > 0


# -- hybrid-static (a routing profile's hot set on the device, every other expert on the host) ----
TEXT = Path(__file__).parent.parent / "demo" / "data" / "heldout_kjv.txt"


@pytest.fixture(scope="module")
def demo_profile(demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("profile") / "kjv.json"
    assert run_cli("profile", "--graph", demo, "--text", TEXT, "--tokens", "2048", "-o", out) == 0
    return out


@pytest.mark.parametrize("fmt", [None, "int4"])
def test_hybrid_static_decodes_as_resident_and_moves_nothing_after_loading(demo, demo_profile, fmt):
    """Native: the demo's cache holds 8 of each layer's 16 experts; int4 in the same bytes, all 16."""
    s = placed_matches(demo, "hybrid-static", 64, fmt, profile=str(demo_profile))
    assert s.get("experts_moved", 0) == 0 and s.get("experts_both", 0) == 0 and s["decode_bytes_h2d"] == 0
    if fmt is None:
        assert s["static_experts_per_layer"] == 8 and 0.5 < s["static_profile_coverage"] < 1
        assert s["experts_on_host"] > 0 and s["host_busy_s"] > 0
    else:
        assert s["static_experts_per_layer"] == 16 and s["static_profile_coverage"] == 1
        assert "experts_on_host" not in s  # nothing missed, so nothing was placed


def test_hybrid_static_on_families_with_shared_experts_and_biases_decodes_as_resident(tiny, tmp_path_factory):
    for t in (tiny("qwen2_moe"), GptOssTiny(tmp_path_factory.mktemp("gpt_oss"), "gpt_oss")):
        profile = tmp_path_factory.mktemp("profile") / "p.json"
        assert run_cli("profile", "--graph", t.graph, "--text", TEXT, "--tokens", "512", "-o", profile) == 0
        cached = t.compile(tmp_path_factory.mktemp("static"), slots_per_layer=6)
        for fmt in (None, "int4"):
            placed_matches(cached, "hybrid-static", 64, fmt, group=8, profile=str(profile))


def test_the_profile_counts_every_route_and_ranks_the_hot_set(demo, demo_profile):
    from mobile.moe.profile import load_profile
    from mobile.spec.load import load_spec

    data = json.loads(demo_profile.read_text())
    assert data["written_by"] == "mobile profile" and data["tokens"] == 2048 and data["top_k"] == 4
    profile = load_profile(demo_profile, load_spec(DEMO))
    for layer, counts in profile.counts.items():
        assert sum(counts) == 2048 * 4  # each position's top-4, in every MoE layer
        hot = profile.hot(layer, 8)
        assert min(counts[e] for e in hot) >= max(counts[e] for e in range(16) if e not in hot)


def test_hybrid_static_without_a_usable_profile_is_one_line(demo, demo_profile, tmp_path, capsys):
    args = ("run", "--graph", demo, "--policy", "hybrid-static", "--prompt-ids", "5,6", "--max-new-tokens", "2")
    assert run_cli(*args) == 2
    assert "--profile: hybrid-static keeps each layer's most-used experts" in capsys.readouterr().err
    data = json.loads(demo_profile.read_text())
    data["layers"]["2"] = data["layers"]["2"][:15]
    (tmp_path / "short.json").write_text(json.dumps(data))
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    (tmp_path / "words.json").write_text(json.dumps({**data, "tokens": "many"}))
    (tmp_path / "bools.json").write_text(json.dumps({**data, "layers": {**data["layers"], "1": [True] * 16}}))
    for name, key in (("short.json", "layers.2"), ("other.json", "format"), ("missing.json", None),
                      ("words.json", "tokens"), ("bools.json", "layers.1")):
        assert run_cli(*args, "--profile", tmp_path / name) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(tmp_path / name) in err and (key is None or f": {key}:" in err), err
    assert run_cli("bench", "--graph", demo, "--policies", "hybrid-static", "--tokens", "4") == 2
    assert "--profile-text" in capsys.readouterr().err


def test_bench_takes_the_profile_on_its_profile_text(demo, capsys):
    assert run_cli("bench", "--graph", demo, "--policies", "lru-prefetch,hybrid-static", "--tokens", "8",
                   "--link-ratio", "40", "--profile-text", TEXT, "--profile-tokens", "1024") == 0
    out = capsys.readouterr().out
    assert f"routing profile for hybrid-static: 1024 tokens of {TEXT}" in out
    assert "hybrid-static" in out.split("policy")[-1]


@pytest.mark.parametrize("policy", ["host", "lru-host"])
def test_ctrl_c_with_host_work_exits_130_and_leaves_no_thread(demo, policy):
    """SIGINT while the host worker (and, under lru-host, the copy thread) has work: the run ends with
    its stats and 130, and the process exits at once (a worker thread left running would keep it
    alive past the timeout)."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "mobile.cli", "run", "--graph", str(demo), "--policy", policy,
                             "--link-ratio", "40", "--prompt", "In the", "--max-new-tokens", "2000", "--stats"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdout is not None
    made = proc.stdout.read(len("In the") + 10)  # the prompt, then ten characters decoded: mid-run
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived (an unusually fast machine)")
    assert proc.returncode == 130, err
    assert made.startswith("In the") and "stopped: interrupted" in err and "host_busy_s" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("policy", ["lru-host", "hybrid-static"])
def test_the_schedule_shows_the_host_share_beside_the_device(tmp_path, policy):
    """Each layer's host share is planned on a host lane from its fetch's read to its join, beside the
    device's experts: in schedule.txt (the join's note, the step's host time) and the planned trace."""
    assert run_cli("compile", DEMO, "-o", tmp_path / "g", "--policy", policy) == 0
    schedule = (tmp_path / "g" / "schedule.txt").read_text()
    joins = [ln for ln in schedule.splitlines() if " host_join " in ln]
    assert len(joins) == 4 and all("host share" in ln for ln in joins)
    assert "host 104.9 us" in schedule  # 4 layers x top-4 of the demo's 384 KiB experts at the plan's 60 GB/s
    if policy == "hybrid-static":
        assert "copy 0.0 us" in schedule  # nothing moves after loading
    trace = json.loads((tmp_path / "g" / "schedule.trace.json").read_text())["traceEvents"]
    assert {"name": "thread_name", "ph": "M", "pid": 1, "tid": 3, "args": {"name": "host"}} in trace
    assert sum(e["name"].endswith("(host share)") and e["tid"] == 3 for e in trace) == 4


def test_adaptive_placement_turns_the_rule_on_where_the_host_can_win(demo, tmp_path):
    """adaptive weighs the costs measured at load. At native (a move costs R = 40 device pairs, the
    host Hc = 16) the host wins a miss and the rule runs: resident's tokens. At int4 (a move a seventh
    of native's, this CPU's packed op slower) it cannot, and every miss moves: the tokens of moving.
    (At int4 the demo's budget holds all 16 experts, so 6 slots leave misses to place.)"""
    s = placed_matches(demo, "lru-prefetch", 32, placement="adaptive")
    assert s["placement_rule"] == "choose" and s["experts_on_host"] + s["experts_both"] > 0
    text = DEMO.read_text().replace("budget: 12MiB", "slots_per_layer: 6")
    (tmp_path / "demo6.yaml").write_text(text.replace("../demo/", f"{DEMO.parent.parent}/demo/"))
    assert run_cli("compile", tmp_path / "demo6.yaml", "-o", tmp_path / "g") == 0
    tokens, stats = [], []
    for placement in ("move", "adaptive"):
        engine = mobile.Engine.load(tmp_path / "g", policy="lru-prefetch", policy_options={"placement": placement},
                                    link_ratio=40.0, expert_format="int4")
        tokens.append(engine.generate(PROMPT, 32, stop_ids=[]))
        stats.append(engine.stats)
        engine.close()
    assert tokens[0] == tokens[1] and stats[1]["placement_rule"] == "move" and "experts_on_host" not in stats[1]
