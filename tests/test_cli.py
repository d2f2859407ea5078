"""The command line: what it prints, in plain and --json mode (bad input: tests/test_bad_input.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import run_cli


def copy_tiny(tiny, tmp_path, family="olmoe"):
    t = tiny(family)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(t.ckpt, ckpt)
    return t, ckpt


def test_token_ids_need_no_tokenizer(tiny, tmp_path):
    """A checkpoint without a tokenizer still runs from token ids (a --prompt then is an error, in
    tests/test_bad_input.py)."""
    t, ckpt = copy_tiny(tiny, tmp_path)
    for f in ckpt.glob("tokenizer*"):
        f.unlink()
    assert run_cli("run", "--graph", t.graph, "--weights", ckpt, "--prompt-ids", "5,6", "--max-new-tokens", "2") == 0


def test_debug_shows_traceback(tmp_path):
    (tmp_path / "s.yaml").write_text("name: [oops\n")
    plain = subprocess.run([sys.executable, "-m", "mobile.cli", "compile", str(tmp_path / "s.yaml")],
                           capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run([sys.executable, "-m", "mobile.cli", "--debug", "compile", str(tmp_path / "s.yaml")],
                           capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "SpecError" in debug.stderr


def test_run_json(tiny, capsys):
    t = tiny("mixtral")
    capsys.readouterr()
    assert run_cli("run", "--graph", t.graph, "--prompt", "In the beginning", "--max-new-tokens", "5", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"prompt_ids", "ids", "text", "new_text", "stats"} and len(out["ids"]) <= 5
    # text is what plain mode prints: the prompt, then what the model made of it
    assert out["text"].startswith("In the beginning") and out["text"].endswith(out["new_text"])
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "bytes_h2d", "expert_hits", "expert_misses",
                "stall_s", "little_tokens", "fallback_tokens", "link", "host_syncs_per_token"):
        assert key in out["stats"]
    # resident: every expert on the device, so nothing is looked up, moved or missed
    s = out["stats"]
    assert s["link"] == "none" and s["expert_hits"] == s["expert_misses"] == s["bytes_h2d"] == 0


def test_run_text_and_stats(tiny, capsys):
    t = tiny("qwen2_moe")
    capsys.readouterr()
    assert run_cli("run", "--graph", t.graph, "--prompt", "God said", "--max-new-tokens", "4", "--stats") == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("God said") and "decode_tokens_per_s" in captured.err


def test_help_explains_commands(capsys):
    with pytest.raises(SystemExit):
        run_cli("--help")
    out = capsys.readouterr().out
    assert "compile" in out and "run" in out and "import-hf" in out


def test_run_sampling_flags_are_seeded(tiny, capsys):
    t = tiny("olmoe")

    def ids(*extra):
        capsys.readouterr()
        assert run_cli("run", "--graph", t.graph, "--prompt-ids", "5,6,7", "--max-new-tokens", "12", "--json",
                       *extra) == 0
        return json.loads(capsys.readouterr().out)["ids"]

    sampled = ids("--temperature", "1.5", "--top-p", "0.95", "--seed", "3")
    assert sampled == ids("--temperature", "1.5", "--top-p", "0.95", "--seed", "3")
    assert sampled != ids("--greedy") or sampled != ids("--temperature", "1.5", "--seed", "4")


def test_synth_writes_a_runnable_checkpoint_that_keeps_policy_defaults_open(tmp_path, capsys):
    """`mobile synth` writes random weights at a spec's shapes and a spec for them. The spec keeps
    only the policy and runtime settings its source changed, so later defaults still apply."""
    import yaml

    src = tmp_path / "src.yaml"
    spec = yaml.safe_load(open("specs/olmoe-1b-7b.yaml"))
    spec["model"].update(hidden_size=32, vocab_size=64, intermediate_size=32)
    spec["model"]["moe"].update(intermediate_size=16)
    spec["model"]["attention"].update(num_heads=2, num_kv_heads=2, head_dim=16)
    spec["policy"] = {"name": "lru", "tau": 0.3}
    src.write_text(yaml.safe_dump(spec))
    assert run_cli("synth", src, "-o", tmp_path / "synth", "--layers", "2") == 0
    written = yaml.safe_load((tmp_path / "synth" / "spec.yaml").read_text())
    assert written["policy"] == {"name": "lru", "tau": 0.3} and written["model"]["num_layers"] == 2
    assert run_cli("compile", tmp_path / "synth" / "spec.yaml", "-o", tmp_path / "graph") == 0
    assert run_cli("run", "--graph", tmp_path / "graph", "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
                   "--json") == 0


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`mobile compile ... | head -1` stops without a traceback, as shell tools do."""
    import subprocess
    import sys

    cmd = f"{sys.executable} -m mobile.cli compile specs/demo.yaml -o {tmp_path / 'g'} | head -1"
    out = subprocess.run(["bash", "-c", "set -o pipefail; " + cmd], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("compiled demo:") and "Traceback" not in out.stderr
    assert out.returncode in (0, 141), out.stderr
