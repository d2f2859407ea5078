"""Long runs hold steady. Slow: run with `pytest -m slow`."""

from __future__ import annotations

import resource

import pytest
import torch
from conftest import run_cli
from tiny import build_tiny

import mobile


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.slow
def test_2000_tokens_under_lru_prefetch_hold_flat_memory(tmp_path):
    # 16 experts, top-4, a pool of 4 + 1 slots per layer (the minimum): most experts are out of the cache
    build_tiny("olmoe", tmp_path / "ckpt", max_position_embeddings=4096, num_experts=16)
    assert run_cli("import-hf", tmp_path / "ckpt", "-o", tmp_path / "s.yaml") == 0
    text = (tmp_path / "s.yaml").read_text()
    (tmp_path / "s.yaml").write_text(text.replace("runtime:\n", "runtime:\n  expert_cache:\n    slots_per_layer: 4\n"))
    assert run_cli("compile", tmp_path / "s.yaml", "-o", tmp_path / "g", "--policy", "lru-prefetch") == 0
    engine = mobile.Engine.load(tmp_path / "g", link_gbps=50.0)
    samples: dict[int, int] = {}

    def on_token(_: int) -> None:
        n = len(samples_tokens)
        samples_tokens.append(n)
        if n in (500, 1000, 1500, 1999):
            samples[n] = rss_bytes()

    samples_tokens: list[int] = []
    out = engine.generate(torch.arange(3, 11), 2000, stop_ids=[], on_token=on_token)
    engine.close()
    assert len(out) == 2000
    growth = samples[1999] - samples[500]
    print(f"RSS after 500 tokens {samples[500] / 2**20:.1f} MiB, after 2000 {samples[1999] / 2**20:.1f} MiB "
          f"(+{growth / 2**20:.2f} MiB); misses {engine.stats['expert_misses']}, "
          f"prefetch used {engine.stats['prefetch_used']}/{engine.stats['prefetch_issued']}")
    # the KV cache grows by design (3 layers x 2 x 2 heads x 8 dims x 4 B = 384 B per position: 0.6 MiB);
    # anything beyond a few MiB would be a leak in the cache, the copy engine or the executor
    assert growth < 4 * 2**20


def _store_error(path) -> str:
    from mobile.errors import CheckpointError
    from mobile.models.weights import WeightStore

    with pytest.raises(CheckpointError) as e:
        WeightStore(path)
    return str(e.value)


def test_weight_store_reads_lazily_and_converts(tmp_path):
    import json
    import struct

    from safetensors.torch import save_file

    from mobile.errors import CheckpointError
    from mobile.models.weights import WeightStore

    # a 4 GiB sparse tensor: opening the store and viewing it must not read it
    n = 1 << 30
    header = {"big": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]},
              "small": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [4 * n, 4 * n + 8]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + 4 * n + 8)
    before = rss_bytes()
    store = WeightStore(tmp_path)
    info = store.info("big")
    assert (info.file, info.dtype, info.shape) == (tmp_path / "model.safetensors", torch.float32, (n,))
    assert "big" in store and set(store.index) == {"big", "small"} and list(store.files) == ["model.safetensors"]
    assert store.get("big").shape == (n,) and store.get("small", torch.float32).dtype == torch.float32
    assert rss_bytes() - before < 256 * 2**20
    (tmp_path / "model.safetensors").unlink()
    save_file({"w": torch.arange(6, dtype=torch.float16).view(2, 3), "e": torch.zeros(0, 3)},
              tmp_path / "model.safetensors")
    store = WeightStore(tmp_path)
    assert torch.equal(store.get("w", torch.float32, "cpu"), torch.arange(6.0).view(2, 3))
    assert store.get("e").shape == (0, 3)
    with pytest.raises(CheckpointError, match=f"^{tmp_path}: nope: tensor 'nope' not found$"):
        store.get("nope")


def test_weight_store_names_the_file_and_tensor_of_a_bad_checkpoint(tmp_path):
    import json
    import struct

    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    assert "no *.safetensors files" in _store_error(tmp_path)
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    assert f"{path}: b: truncated safetensors file: tensor data ends at byte {len(data)}, the file has " \
           f"{len(data) - 100}" == _store_error(tmp_path)
    path.write_bytes(data[:5])
    assert f"{path}: truncated safetensors file: 5 bytes, no header" == _store_error(tmp_path)
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    assert "header of 1000000000 bytes, file has 10" in _store_error(tmp_path)
    path.write_bytes(struct.pack("<Q", 8) + b"{oops!} ")
    assert f"{path}: cannot read safetensors header" in _store_error(tmp_path)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["a"]["shape"] = [4, 5]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    assert f"{path}: a: corrupt header entry" in _store_error(tmp_path) and "need 80 bytes" in _store_error(tmp_path)
    path.write_bytes(data)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{not json")
    assert f"{index}: weight_map: malformed shard index" in _store_error(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "model.safetensors", "c": "model-2.safetensors"}}))
    assert f"{tmp_path / 'model-2.safetensors'}: shard named in model.safetensors.index.json is missing" == \
        _store_error(tmp_path)
