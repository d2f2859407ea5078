"""What a user must never see: a fresh install whose tests cannot import transformers, a command
that replaces files it did not write, a run that hangs when a worker thread fails, a silent wrong
answer from non-finite logits, or the work of an interrupted run thrown away."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, run_cli_within
from safetensors.torch import load_file, save_file

from mobile.errors import RunError
from mobile.moe.transfer import CopyEngine, LinkModel
from mobile.outputs import MARKER

ROOT = Path(__file__).resolve().parent.parent
EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


# -- a fresh install ------------------------------------------------------------------------------
@pytest.mark.parametrize("cwd", [ROOT, ROOT / "tests"], ids=["root", "tests"])
def test_the_kernels_folder_never_hides_the_installed_package(cwd):
    """python -c / -m puts the current folder first on sys.path: from the repository root, the
    top-level kernels/ folder is visible as `kernels`, the name of a package transformers imports."""
    code = ("import importlib.util, sys\n"
            "from transformers import MixtralForCausalLM, OlmoeForCausalLM\n"
            "import mobile.kernels.experts as ours\n"
            "assert ours.__file__.endswith('kernels/experts.py'), ours.__file__\n"
            "if importlib.util.find_spec('kernels') is not None:\n"
            "    import kernels\n"
            "    assert 'site-packages' in kernels.__file__ or 'dist-packages' in kernels.__file__, kernels.__file__\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# -- outputs --------------------------------------------------------------------------------------
def test_each_command_rewrites_its_own_output_and_only_that(tiny, tmp_path, capsys):
    t = tiny("olmoe")
    out = tmp_path / "g"
    for _ in range(2):  # the second run replaces the first's output: its marker says it may
        assert run_cli("compile", t.spec, "-o", out) == 0
    assert json.loads((out / MARKER).read_text())["written_by"] == "mobile compile"
    (out / "notes.txt").write_text("mine\n")
    assert run_cli("compile", t.spec, "-o", out) == 2  # a user's file in it: refused, kept
    assert (out / "notes.txt").read_text() == "mine\n"
    assert run_cli("compile", t.spec, "-o", out, "--force") == 0  # unless forced
    assert not (out / "notes.txt").exists() and (out / "graph.json").exists()

    legacy = tmp_path / "legacy"  # a graph folder from before markers: its files and nothing else
    shutil.copytree(out, legacy)
    (legacy / MARKER).unlink()
    assert run_cli("compile", t.spec, "-o", legacy) == 0 and (legacy / MARKER).exists()

    for argv in (["quantize", t.ckpt, "-o", tmp_path / "q", "--format", "int8"],
                 ["synth", t.spec, "-o", tmp_path / "s", "--layers", "1"],
                 ["import-hf", t.ckpt, "-o", tmp_path / "spec.yaml"],
                 ["run", "--graph", out, "--prompt-ids", "5,6", "--max-new-tokens", "2", "--trace",
                  tmp_path / "t.json"],
                 ["bench", "--graph", out, "--policies", "lru", "--tokens", "2", "--json", tmp_path / "b.json"]):
        assert run_cli(*argv) == 0 and run_cli(*argv) == 0, argv
    assert sorted(json.loads((tmp_path / "q" / MARKER).read_text())["files"]) == sorted(
        p.name for p in (tmp_path / "q").iterdir() if p.name != MARKER)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "g", "legacy", "q", "s", "spec.yaml", "t.json"]


# -- worker threads ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ondemand(tiny, tmp_path_factory):
    """A graph that copies experts on every use, so that every forward needs the copy worker."""
    return tiny("olmoe").compile(tmp_path_factory.mktemp("ondemand"), "--policy", "ondemand", slots_per_layer=6)


def test_a_failing_copy_worker_ends_the_run_in_seconds_with_one_line(ondemand, monkeypatch, capsys):
    def fail(self, job):
        raise OverflowError("injected: cannot convert float infinity to integer")

    monkeypatch.setattr(CopyEngine, "_copy", fail)
    code = run_cli_within(30, "run", "--graph", ondemand, "--prompt-ids", "5,6", "--max-new-tokens", "4")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("mobile: error: ") and "internal error in the copy worker: OverflowError: injected" \
        in lines[0]


def test_the_copy_worker_fails_every_later_copy_too(monkeypatch):
    """After a failure nothing may block: queued copies, new ones and the engine's close."""
    def fail(self, job):
        raise ValueError("boom")

    monkeypatch.setattr(CopyEngine, "_copy", fail)
    engine = CopyEngine(torch.device("cpu"), LinkModel())
    src, dst = torch.ones(4), torch.zeros(4)
    first = engine.submit(src, dst)
    with pytest.raises(RunError, match="copy worker: ValueError: boom"):
        first.wait()
    with pytest.raises(RunError, match="boom"):
        engine.submit(src, dst)
    assert isinstance(engine.failure, ValueError)
    engine.close()


# -- non-finite logits ------------------------------------------------------------------------------
@pytest.mark.parametrize("tensor,layer,what,position", [
    (EXPERT, 1, "routed expert 3", ""),  # whenever a token first routes to expert 3
    ("model.layers.0.self_attn.q_proj.weight", 0, "qkv_proj", "2"),  # every token: the prompt's already
])
def test_nan_weights_end_the_run_naming_the_layer(tiny, tmp_path, capsys, tensor, layer, what, position):
    t = tiny("olmoe")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(t.ckpt, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    tensors[tensor][0, 0] = float("nan")
    save_file(tensors, ckpt / "model.safetensors")
    capsys.readouterr()
    assert run_cli("run", "--graph", t.graph, "--weights", ckpt, "--prompt-ids", "5,6,7") == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"the logits after position {position}" in lines[0] and "are NaN or infinite" in lines[0]
    assert f"the first weights that are not finite are in layer {layer} ({what}" in lines[0]


# -- Ctrl-C ---------------------------------------------------------------------------------------
def interrupt_at(monkeypatch, call: int) -> None:
    """Ctrl-C during the engine's `call`-th forward (1: the prompt's)."""
    from mobile.runtime.engine import Engine

    real, calls = Engine._run, [0]

    def forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_run", forward)


def test_an_interrupted_json_run_prints_what_it_made(tiny, monkeypatch, capsys):
    t = tiny("olmoe")
    interrupt_at(monkeypatch, 5)  # the prompt, then three decode steps: four tokens made
    capsys.readouterr()
    assert run_cli("run", "--graph", t.graph, "--prompt-ids", "5,6", "--max-new-tokens", "20", "--json") == 130
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["stats"]["stopped"] == "interrupted" and len(out["ids"]) == 4 and out["stats"]["decode_tokens"] == 3
    assert captured.err.strip().endswith("mobile: interrupted")


def test_an_interrupted_plain_run_ends_its_text_and_prints_its_stats(tiny, monkeypatch, capsys):
    t = tiny("olmoe")
    interrupt_at(monkeypatch, 3)
    capsys.readouterr()
    assert run_cli("run", "--graph", t.graph, "--prompt", "In the", "--max-new-tokens", "20", "--stats") == 130
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and captured.out.startswith("In the")
    assert "stopped: interrupted" in captured.err and "decode_tokens_per_s" in captured.err


def test_interrupted_in_the_prompt_nothing_is_made(tiny, monkeypatch, capsys):
    t = tiny("olmoe")
    interrupt_at(monkeypatch, 1)
    assert run_cli("run", "--graph", t.graph, "--prompt-ids", "5,6", "--json") == 130
    out = json.loads(capsys.readouterr().out)
    assert out["ids"] == [] and out["stats"]["stopped"] == "interrupted"
