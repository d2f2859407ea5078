"""`mobile eval` and `mobile bench` end to end on a tiny checkpoint with a tokenizer."""

from __future__ import annotations

import json

from conftest import run_cli

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form.\n" * 4


def test_eval_json_keys_and_big_reference(tiny, tmp_path, capsys):
    t = tiny("olmoe")
    (tmp_path / "text.txt").write_text(TEXT)
    capsys.readouterr()
    assert run_cli("eval", "--graph", t.graph, "--data", tmp_path / "text.txt", "--policy", "mobile", "--tau", "1.01",
                   "--json", "--window", "64") == 0
    out = json.loads(capsys.readouterr().out)
    assert {"ppl", "accuracy", "agreement", "fallback_rate", "bytes_per_token"} <= set(out)
    # tau above any probability: every token falls back, so it is big decoding exactly
    assert out["fallback_rate"] == 1.0 and out["agreement"] == 1.0


def test_eval_sweep_table(tiny, tmp_path, capsys):
    t = tiny("olmoe")
    (tmp_path / "text.txt").write_text(TEXT)
    capsys.readouterr()
    assert run_cli("eval", "--graph", t.graph, "--data", tmp_path / "text.txt", "--policy", "mobile",
                   "--sweep-tau", "0,1.01", "--window", "64", "--cached-complement", "off",
                   "--out", tmp_path / "rows.json") == 0
    text = capsys.readouterr().out
    assert "mobile tau=0" in text and "mobile tau=1.01" in text and text.splitlines()[1].startswith("big")
    rows = json.loads((tmp_path / "rows.json").read_text())
    never, always = rows[1], rows[2]
    assert never["fallback_rate"] == 0.0 and always["fallback_rate"] == 1.0
    # a fallback token pays for the big set plus whatever its little pass used outside it (past
    # layer 0 the little pass routes from other hidden states, so S_k need not lie inside S_K)
    assert never["bytes_per_token"] < rows[0]["bytes_per_token"] <= always["bytes_per_token"]


def test_bench_table_with_taus(tiny, capsys):
    t = tiny("qwen2_moe")
    capsys.readouterr()
    assert run_cli("bench", "--graph", t.graph, "--policies", "lru-prefetch,little,mobile", "--tau", "0,1.01",
                   "--tokens", "6", "--link-gbps", "20") == 0
    out = capsys.readouterr().out
    assert "link EMULATED" in out and "mobile tau=0" in out and "mobile tau=1.01" in out and "little" in out


def test_bench_rows_with_their_own_options(tiny, tmp_path, capsys):
    t = tiny("olmoe")
    graph = t.compile(tmp_path, slots_per_layer=6)
    capsys.readouterr()
    assert run_cli("bench", "--graph", graph, "--policies", "lru", "--tokens", "6", "--link-gbps", "20",
                   "--row", "mobile tau=1.01 cached_complement=off", "--row", "layer-mass tau=0",
                   "--json", tmp_path / "b.json") == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["lru", "mobile tau=1.01 cached_complement=off", "layer-mass tau=0"]
    assert rows[1]["fallback_rate"] == 1.0  # its own tau, not the spec's
    assert run_cli("bench", "--graph", graph, "--policies", "lru", "--row", "mobile speed=3") == 2
    assert "--row: expected key=value" in capsys.readouterr().err


def test_bench_teacher_forced_text(tiny, tmp_path, capsys):
    t = tiny("olmoe")
    (tmp_path / "text.txt").write_text(TEXT)
    graph = t.compile(tmp_path, slots_per_layer=4)  # the minimum, so every policy keeps moving experts
    capsys.readouterr()
    assert run_cli("bench", "--graph", graph, "--policies", "lru,little", "--tokens", "6",
                   "--prompt-len", "12", "--text", tmp_path / "text.txt", "--link-gbps", "20",
                   "--json", tmp_path / "b.json", "--repeats", "2") == 0
    out = capsys.readouterr().out
    assert f"6 teacher-forced decode tokens from {tmp_path / 'text.txt'}" in out and "bytes vs big-only" in out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    # lru is big-only decoding itself: the estimate of what big-only moves is what it moved
    assert rows[0]["bytes_vs_big_only"] == 1.0 and all(r["runs"] == 2 for r in rows)
    assert all(r["tokens_per_s_min"] <= r["decode_tokens_per_s"] <= r["tokens_per_s_max"] for r in rows)
