"""Spec loading is strict, and every error names the file, the key path and what was expected."""

from __future__ import annotations

import pytest
import yaml

from mobile.errors import SpecError
from mobile.spec.load import load_spec
from mobile.spec.validate import parse_bytes

BASE = "specs/olmoe-1b-7b.yaml"


def write_variant(tmp_path, edit):
    data = yaml.safe_load(open(BASE))
    edit(data)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value


def test_published_specs_load():
    spec = load_spec(BASE)
    assert (spec.model.moe.num_experts, spec.model.moe.top_k, spec.little_k) == (64, 8, 4)
    assert spec.moe_layers == list(range(16))


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: [unclosed\n")
    e = error_of(path)
    assert str(path) in e.one_line() and "malformed YAML: line" in e.one_line()


def test_unknown_key(tmp_path):
    e = error_of(write_variant(tmp_path, lambda d: d["model"]["moe"].update(topk=3)))
    assert e.key == "model.moe.topk" and "unknown key (expected one of: num_experts, top_k" in e.message


def test_moved_key_says_where_it_went(tmp_path):
    e = error_of(write_variant(tmp_path, lambda d: d.setdefault("runtime", {}).setdefault("expert_cache", {})
                               .update(eviction="lru")))
    assert e.key == "runtime.expert_cache.eviction" and "moved to policy.eviction" in e.message


def test_wrong_type(tmp_path):
    e = error_of(write_variant(tmp_path, lambda d: d["model"]["moe"].update(top_k="four")))
    assert e.key == "model.moe.top_k" and e.message == "expected an integer, got a string 'four'"
    e = error_of(write_variant(tmp_path, lambda d: d["model"]["attention"].update(kind="flash")))
    assert e.key == "model.attention.kind" and "expected one of 'gqa', 'mla'" in e.message
    e = error_of(write_variant(tmp_path, lambda d: d["model"].update(tie_word_embeddings="yes")))
    assert e.key == "model.tie_word_embeddings" and "expected true or false" in e.message


def test_missing_required_key(tmp_path):
    e = error_of(write_variant(tmp_path, lambda d: d.pop("model")))
    assert e.key == "model" and e.message == "required key is missing"


@pytest.mark.parametrize("edit, key, expected", [
    (lambda d: d["model"]["moe"].update(top_k=65), "model.moe.top_k", "top_k <= num_experts=64"),
    (lambda d: d["model"]["attention"].update(num_kv_heads=5), "model.attention.num_kv_heads", "divisor"),
    (lambda d: d["model"]["attention"].update(head_dim=7), "model.attention.head_dim", "even integer"),
    (lambda d: d["model"]["moe"].update(dense_layers=[16]), "model.moe.dense_layers[0]", "[0, 16)"),
    (lambda d: d["model"]["moe"].update(dense_layers=[0]), "model.intermediate_size", "dense MLP"),
    (lambda d: d["runtime"].update(expert_cache={"budget": "lots"}), "runtime.expert_cache.budget", "6GiB"),
    (lambda d: d.update(name="has space"), "name", "graph folder"),
])
def test_inconsistent_shapes(tmp_path, edit, key, expected):
    e = error_of(write_variant(tmp_path, edit))
    assert e.key == key and expected in e.message


def test_missing_file(tmp_path):
    assert "no such file" in error_of(tmp_path / "nope.yaml").one_line()


def test_parse_bytes():
    assert parse_bytes("6GiB") == 6 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5 KiB") == 1536
    with pytest.raises(ValueError):
        parse_bytes("6 gigs")


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "deepseek-v2-lite",
                                  "olmoe-1b-7b", "qwen3.6-35b-a3b", "qwen3.5-122b-a10b", "qwen3-next-80b-a3b"])
def test_published_specs_fit_a_16gb_card_as_shipped(tmp_path, capsys, name):
    """Models larger than a consumer card ship with an offloading policy and a budget that fits 16 GB."""
    from conftest import run_cli

    assert run_cli("compile", f"specs/{name}.yaml", "-o", tmp_path / "g", "--device-memory", "16GiB", "--strict") == 0
    assert "warning" not in capsys.readouterr().err
