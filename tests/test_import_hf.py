"""`mobile import-hf` turns config.json files into specs; the published specs stay reproducible."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import run_cli

from mobile.errors import SpecError
from mobile.spec.hf import spec_from_hf_config
from mobile.spec.load import spec_from_dict

PUBLISHED = ["mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "deepseek-v2-lite", "olmoe-1b-7b", "deepseek-v3",
             "kimi-k2-instruct", "glm-4.5-air", "gpt-oss-20b", "gpt-oss-120b", "glm-4.7-flash", "qwen3.6-35b-a3b",
             "qwen3.5-122b-a10b", "qwen3-next-80b-a3b"]


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_spec_is_reproduced(tmp_path, name):
    out = tmp_path / f"{name}.yaml"
    assert run_cli("import-hf", f"specs/hf/{name}", "--no-checkpoint", "--name", name, "-o", out) == 0
    # the model, dtype and checkpoint sections; the shipped specs then choose their own policy and
    # cache, so that they fit a 16 GB card (tests/test_spec.py)
    strip = lambda text: [ln for ln in text.split("\npolicy:")[0].splitlines() if not ln.startswith("#")]  # noqa: E731
    assert strip(out.read_text()) == strip(open(f"specs/{name}.yaml").read())


def test_family_quirks_are_imported():
    mixtral = spec_from_dict(spec_from_hf_config("specs/hf/mixtral-8x7b"))
    assert mixtral.model.moe.norm_topk_prob and (mixtral.model.moe.num_experts, mixtral.model.moe.top_k) == (8, 2)
    qwen = spec_from_dict(spec_from_hf_config("specs/hf/qwen1.5-moe-a2.7b"))
    assert qwen.model.moe.shared_expert.gate == "sigmoid" and qwen.model.attention.qkv_bias
    olmoe = spec_from_dict(spec_from_hf_config("specs/hf/olmoe-1b-7b"))
    assert olmoe.model.attention.qk_norm == "full" and not olmoe.model.moe.norm_topk_prob
    ds = spec_from_dict(spec_from_hf_config("specs/hf/deepseek-v2-lite"))
    assert ds.model.attention.kind == "mla" and ds.model.moe.dense_layers == [0]
    assert ds.model.moe.shared_expert.intermediate_size == 2 * 1408 and ds.model.rope.interleaved
    assert ds.model.rope.type == "yarn" and ds.model.rope.factor == 40
    qwen3 = spec_from_dict(spec_from_hf_config("specs/hf/qwen3-30b-a3b"))
    assert qwen3.model.attention.qk_norm == "per_head" and qwen3.model.attention.head_dim == 128


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SpecError, match="unsupported model_type 'llama'"):
        spec_from_hf_config(tmp_path)


def test_import_writes_a_checkpoint_path_relative_to_the_spec(tmp_path, tiny):
    t = tiny("olmoe")
    out = tmp_path / "specs" / "x.yaml"
    assert run_cli("import-hf", t.ckpt, "-o", out) == 0
    data = yaml.safe_load(out.read_text())
    assert (out.parent / data["checkpoint"]["path"]).resolve() == t.ckpt.resolve()
