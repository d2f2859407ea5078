"""The tokenizer a run loads without transformers gives transformers' ids and text, and start-up
imports neither transformers nor torch._dynamo (each about a second on this project's machines)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mobile.runtime.tokenizer import FastTokenizer, load_tokenizer, plain_tokenizer_json

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "checkpoint"
TEXTS = ["In the beginning God created the heaven and the earth.", "  two  spaces\tand a tab\n\nnew lines ",
         "def f(x):\n    return x ** 2  # ünïcödé, 日本語, emoji 🙂", "<|endoftext|>after a special token", ""]


@pytest.fixture(params=["demo", "tiny"])
def folder(request, tiny):
    return DEMO if request.param == "demo" else tiny("olmoe").ckpt


def test_the_fast_tokenizer_is_transformers_tokenizer(folder):
    assert plain_tokenizer_json(folder)
    fast, reference = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert isinstance(fast, FastTokenizer)
    texts = [*TEXTS, (ROOT / "demo" / "data" / "heldout_py.txt").read_text()[:3000]]
    for text in texts:
        ids = reference.encode(text)
        assert fast.encode(text) == ids, text
        for skip in (False, True):
            assert fast.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    vocab = len(reference)
    every = list(range(vocab))
    for skip in (False, True):  # every id, alone and in one sequence
        assert fast.decode(every, skip_special_tokens=skip) == reference.decode(every, skip_special_tokens=skip)
        assert [fast.decode([i], skip_special_tokens=skip) for i in every] == \
            [reference.decode([i], skip_special_tokens=skip) for i in every]


@pytest.mark.parametrize("change", [{"add_bos_token": True}, {"add_bos_token": False},
                                    {"clean_up_tokenization_spaces": True}, {"tokenizer_class": "Qwen2Tokenizer"},
                                    {"bos_token": "<not special>"}])
def test_what_tokenizer_json_does_not_say_goes_through_transformers(tmp_path, change):
    shutil.copytree(DEMO, tmp_path / "ckpt", ignore=shutil.ignore_patterns("*.safetensors"))
    path = tmp_path / "ckpt" / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    assert not plain_tokenizer_json(tmp_path / "ckpt")
    assert not isinstance(load_tokenizer(tmp_path / "ckpt"), FastTokenizer)


def test_serve_gets_transformers_tokenizer_for_its_chat_template():
    assert not isinstance(load_tokenizer(DEMO, full=True), FastTokenizer)


def test_a_run_imports_neither_transformers_nor_dynamo(tiny):
    """Structural, not timed: the two imports that made start-up slow stay out of a plain run."""
    graph = tiny("olmoe").graph
    code = ("import sys\nfrom mobile.cli import main\n"
            f"assert main(['run', '--graph', {str(graph)!r}, '--prompt', 'In the', '--max-new-tokens', '4']) == 0\n"
            "heavy = [m for m in ('transformers', 'torch._dynamo') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
