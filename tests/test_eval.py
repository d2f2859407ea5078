"""`mobile eval` and `mobile bench` end to end on a tiny checkpoint with a tokenizer."""

from __future__ import annotations

import json

from conftest import run_cli

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form.\n" * 4


def test_eval_json_keys_and_big_reference(tiny, tmp_path, capsys):
    t = tiny("olmoe")
    (tmp_path / "text.txt").write_text(TEXT)
    capsys.readouterr()
    assert run_cli("eval", "--graph", t.graph, "--data", tmp_path / "text.txt", "--policy", "mobile", "--tau", "1",
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
                   "--sweep-tau", "0,1", "--window", "64", "--cached-complement", "off",
                   "--out", tmp_path / "rows.json") == 0
    text = capsys.readouterr().out
    assert "mobile tau=0" in text and "mobile tau=1" in text and text.splitlines()[1].startswith("big")
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    never, always = rows[1], rows[2]
    assert never["fallback_rate"] == 0.0 and always["fallback_rate"] == 1.0
    # a fallback token pays for the big set plus whatever its little pass used outside it (past
    # layer 0 the little pass routes from other hidden states, so S_k need not lie inside S_K)
    assert never["bytes_per_token"] < rows[0]["bytes_per_token"] <= always["bytes_per_token"]


def test_bench_table_with_taus(tiny, capsys):
    t = tiny("qwen2_moe")
    capsys.readouterr()
    assert run_cli("bench", "--graph", t.graph, "--policies", "lru-prefetch,little,mobile", "--tau", "0,1",
                   "--tokens", "6", "--link-gbps", "20") == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "link EMULATED" in out and "mobile tau=0" in out and "mobile tau=1" in out and "little" in out
    assert "mobile: warning: 6 decode tokens per run (under 128) and one run per row (--repeats 1): too short" \
        in captured.err


def test_bench_rows_with_their_own_options(tiny, tmp_path, capsys):
    t = tiny("olmoe")
    graph = t.compile(tmp_path, slots_per_layer=6)
    capsys.readouterr()
    assert run_cli("bench", "--graph", graph, "--policies", "lru", "--tokens", "6", "--link-gbps", "20",
                   "--row", "mobile tau=1 cached_complement=off", "--row", "layer-mass tau=0",
                   "--json", tmp_path / "b.json") == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["lru", "mobile tau=1 cached_complement=off", "layer-mass tau=0"]
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


def test_eval_table_has_one_baseline_per_measure(tiny, tmp_path, capsys):
    """Moved bytes are compared with big decoding through the same cache, measured as a row of its
    own (one per eviction rule); used bytes with big's used; the table names the row."""
    from mobile.tools.evaluate import format_rows, run_eval

    t = tiny("olmoe")
    (tmp_path / "text.txt").write_text(TEXT)
    graph = t.compile(tmp_path, slots_per_layer=4)  # too few for every expert: each row keeps moving some
    rows = run_eval(str(graph), str(tmp_path / "text.txt"), [
        ("mobile", {"name": "mobile"}),  # cache-aware: runs through the cache, LFU by default
        ("mobile lru", {"name": "mobile", "eviction": "lru"}),
        ("little", {"name": "little"}),  # with every expert resident: used bytes
    ], window=64)
    assert [r["label"] for r in rows] == ["big, lfu cache", "big, lru cache", "big", "mobile", "mobile lru", "little"]
    lfu, lru, big, mob, mob_lru, little = rows
    assert lfu["moved_ratio"] == lru["moved_ratio"] == 1.0
    assert (lfu["eviction"], lru["eviction"], mob["eviction"], mob_lru["eviction"]) == ("lfu", "lru", "lfu", "lru")
    # the same memory: 4 slots per layer plus the staging one the plan adds for a prefetching policy
    assert lfu["slots"] == lru["slots"] == mob["slots"] == mob_lru["slots"] == 5
    assert mob["moved_ratio"] == mob["moved_per_token"] / lfu["moved_per_token"]
    assert mob_lru["moved_ratio"] == mob_lru["moved_per_token"] / lru["moved_per_token"]
    assert mob["moved_ratio"] < 1.0  # its little pass moves less than big through the same cache
    # every big row is the big model: the same quality
    assert lfu["ppl"] == lru["ppl"] == big["ppl"] and lfu["agreement"] == big["agreement"] == 1.0
    # little ran resident: used bytes, against the resident big row's
    assert "moved_ratio" not in little and little["bytes_ratio"] == 0.5 and big["bytes_ratio"] == 1.0
    table = format_rows(rows)
    assert "vs big: against the big, lfu cache row" in table and "through the same cache" in table


def test_eval_used_bytes_against_resident_big(tiny, tmp_path, capsys):
    from mobile.tools.evaluate import run_eval

    t = tiny("olmoe")
    (tmp_path / "text.txt").write_text(TEXT)
    rows = run_eval(t.graph, str(tmp_path / "text.txt"), [("little", {"name": "little"})], window=64)
    big, little = rows
    assert big["label"] == "big" and big["bytes_ratio"] == 1.0 and "moved_per_token" not in big
    assert little["bytes_ratio"] == little["bytes_per_token"] / big["bytes_per_token"] == 0.5


def test_progress_off_a_terminal_is_a_line_every_few_seconds(capsys, monkeypatch):
    from mobile import progress

    monkeypatch.setattr(progress.time, "monotonic", iter([0.0, 1.0, 6.0, 7.0, 12.5]).__next__)
    with progress.progress(100, "eval", "tok") as bar:  # stderr is captured: not a terminal
        for _ in range(4):
            bar.update(10)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["eval: 20/100 tok (20%, 3.3 tok/s, about 24 s left)",
                     "eval: 40/100 tok (40%, 3.2 tok/s, about 19 s left)"]
