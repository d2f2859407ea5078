"""Random weights at a spec's real shapes, in Hugging Face layout: for benchmarks of the offloading
runtime at real expert sizes, on machines that cannot hold (or download) the real model.
Random routers route differently from trained ones: results from these weights say so.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from tqdm import tqdm

from mobile.errors import SpecError
from mobile.models.weights import required_tensors
from mobile.outputs import check_folder, new_folder
from mobile.spec.load import load_spec, spec_from_dict


def changed_fields(obj) -> dict:
    """A spec dataclass's fields that differ from its defaults, nested sections likewise."""
    default, plain = type(obj)(), dataclasses.asdict(obj)  # plain: YAML types (lists, not tuples)
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            if sub := changed_fields(value):
                out[f.name] = sub
        elif value != getattr(default, f.name):
            out[f.name] = plain[f.name]
    return out


def write_synthetic_checkpoint(spec_path: str | Path, out: str | Path, layers: int | None = None,
                               seed: int = 0, std: float = 0.02, dtype: str | None = None, force: bool = False) -> Path:
    """Write `out` (atomically; over an earlier synth's output only, unless force)."""
    spec = load_spec(spec_path)
    if dtype is not None:
        spec = dataclasses.replace(spec, dtype=dtype)  # type: ignore[arg-type]
    m = spec.model
    if layers is not None:
        if not 1 <= layers <= m.num_layers:
            raise SpecError(f"expected 1 <= --layers <= {m.num_layers}, got {layers}", key="--layers")
        dense = [i for i in m.moe.dense_layers if i < layers]
        # the first `layers` layers, their kinds with them (a hybrid model's linear-attention layers)
        model = dataclasses.replace(m, num_layers=layers, moe=dataclasses.replace(m.moe, dense_layers=dense),
                                    layer_types=m.layer_types[:layers])
        spec = dataclasses.replace(spec, model=model)
    out = Path(out)
    check_folder(out, "synth", force)
    gen = torch.Generator().manual_seed(seed)
    needs = required_tensors(spec)
    shards: dict[str, list] = {}
    for t in needs:  # one shard per layer keeps each write small
        shards.setdefault("other" if t.layer is None else f"layer{t.layer:03d}", []).append(t)
    spec_data = spec.to_dict()
    spec_data["name"] = f"{spec.name}-synth{'' if layers is None else f'-{layers}l'}"
    spec_data["checkpoint"]["path"] = "."
    # only what the source spec changed: a written-out default would pin today's defaults forever
    spec_data["policy"], spec_data["runtime"] = changed_fields(spec.policy), changed_fields(spec.runtime)
    spec_from_dict(spec_data)  # still valid
    with new_folder(out, "synth") as tmp:
        weight_map = {}
        for i, (_, tensors) in enumerate(tqdm(sorted(shards.items()), desc="writing shards", unit="shard")):
            data = {}
            for t in tensors:
                if "norm" in t.key or t.key in ("router_scale", "per_expert_scale", "layer_scalar"):  # Gemma 4's
                    data[t.name] = torch.ones(t.shape, dtype=torch.bfloat16)
                else:
                    w = torch.randn(t.shape, generator=gen) * (0.5 if t.key == "router" else std)
                    data[t.name] = w.to(torch.bfloat16)
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(data, tmp / fname)
            weight_map.update({n: fname for n in data})
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (tmp / "spec.yaml").write_text("# random weights at real shapes, written by `mobile synth`\n"
                                       + yaml.safe_dump(spec_data, sort_keys=False, width=100))
    return out
