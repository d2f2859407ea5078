"""The command line: bad input gives one line naming the file and key, exit code 2, no traceback."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest
from conftest import run_cli


def one_line_error(capsys, *args) -> str:
    capsys.readouterr()  # drop what fixtures printed
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mobile: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_malformed_yaml(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("name: [oops\n")
    err = one_line_error(capsys, "compile", tmp_path / "s.yaml")
    assert f"{tmp_path / 's.yaml'}: malformed YAML: line" in err


def test_unknown_key_and_wrong_type(tmp_path, capsys):
    text = open("specs/olmoe-1b-7b.yaml").read()
    (tmp_path / "a.yaml").write_text(text.replace("    top_k: 8", "    top_k: 8\n    topk: 8"))
    assert "a.yaml: model.moe.topk: unknown key" in one_line_error(capsys, "compile", tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text(text.replace("    top_k: 8", "    top_k: eight"))
    err = one_line_error(capsys, "compile", tmp_path / "b.yaml")
    assert "b.yaml: model.moe.top_k: expected an integer, got a string 'eight'" in err


def copy_tiny(tiny, tmp_path, family="olmoe"):
    t = tiny(family)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(t.ckpt, ckpt)
    return t, ckpt


def test_missing_tensor(tiny, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    t, ckpt = copy_tiny(tiny, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    err = one_line_error(capsys, "run", "--graph", t.graph, "--weights", ckpt, "--prompt-ids", "1,2")
    assert f"{ckpt}: model.layers.1.mlp.experts.3.up_proj.weight: tensor" in err and "not found" in err


def test_shape_mismatch(tiny, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    t, ckpt = copy_tiny(tiny, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name][:, :16].contiguous()
    save_file(tensors, ckpt / "model.safetensors")
    err = one_line_error(capsys, "run", "--graph", t.graph, "--weights", ckpt, "--prompt-ids", "1,2")
    assert "model.safetensors: model.layers.0.self_attn.q_proj.weight: tensor" in err
    assert "has shape [32, 16], the spec implies [32, 32]" in err


def test_truncated_safetensors(tiny, tmp_path, capsys):
    t, ckpt = copy_tiny(tiny, tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) - 1000])
    err = one_line_error(capsys, "run", "--graph", t.graph, "--weights", ckpt, "--prompt-ids", "1,2")
    assert "model.safetensors" in err and "truncated safetensors file" in err
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    assert "header of 1000000000 bytes" in one_line_error(
        capsys, "run", "--graph", t.graph, "--weights", ckpt, "--prompt-ids", "1,2")


def test_missing_tokenizer(tiny, tmp_path, capsys):
    t, ckpt = copy_tiny(tiny, tmp_path)
    for f in ckpt.glob("tokenizer*"):
        f.unlink()
    err = one_line_error(capsys, "run", "--graph", t.graph, "--weights", ckpt, "--prompt", "hello")
    assert f"{ckpt}: no tokenizer in the checkpoint folder" in err
    # token ids still work without one
    assert run_cli("run", "--graph", t.graph, "--weights", ckpt, "--prompt-ids", "5,6", "--max-new-tokens", "2") == 0


def test_missing_graph(tmp_path, capsys):
    err = one_line_error(capsys, "run", "--graph", tmp_path / "none", "--prompt-ids", "1")
    assert "graph.json: no compiled graph here" in err


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
