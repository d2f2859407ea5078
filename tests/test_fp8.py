"""FP8 block checkpoints (mobile.models.fp8): DeepSeek-V3's, Kimi-K2's, MiniMax-M2's and MiMo's
published format, loaded by dequantizing each weight as it loads.

The test writes its own FP8 checkpoint: a tiny DeepSeek-V3 whose every Linear weight (every
`*_proj.weight`: attention, dense MLP, shared and routed experts; not the router, the embeddings or
lm_head, as in the published checkpoints) is cast to float8_e4m3fn with a float32
`*.weight_scale_inv` per 128 x 128 block, laid out as transformers' finegrained FP8 is. Its sizes
(hidden 136, expert intermediate 200, dense intermediate 300) leave partial blocks on both axes.
The reference is a plain dequantizer written below, and transformers on the reference-dequantized
float32 checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from conftest import Tiny, run_cli, tiny_cache
from safetensors.torch import load_file, save_file
from test_offload import offloading_matches_resident
from test_vs_transformers import test_greedy_matches_generate as greedy_matches_generate
from test_vs_transformers import test_logits_match as logits_match
from tiny import build_tiny_sigmoid

import mobile
from mobile.models.weights import WeightStore

PROMPT = torch.randint(3, 97, (24,), generator=torch.Generator().manual_seed(1))
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
SIZES = dict(hidden_size=136, moe_intermediate_size=200, intermediate_size=300)  # partial 128-blocks


# -- the reference: FP8 written and read back plainly ------------------------------------------


def quantize_fp8(w: torch.Tensor, block: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] -> (float8_e4m3fn [R, C], float32 scale_inv [ceil(R/bo), ceil(C/bi)]): each block's
    scale maps its largest magnitude to 448. None: one scale for the matrix (shape [])."""
    R, C = w.shape
    bo, bi = block or (R, C)
    nr, nc = math.ceil(R / bo), math.ceil(C / bi)
    padded = torch.zeros(nr * bo, nc * bi)
    padded[:R, :C] = w.float()
    amax = padded.reshape(nr, bo, nc, bi).abs().amax(dim=(1, 3))  # [nr, nc]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (padded.reshape(nr, bo, nc, bi) / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(nr * bo, nc * bi)[:R, :C].to(torch.float8_e4m3fn)
    return q, scale if block else scale.reshape(())


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: list[int] | None) -> torch.Tensor:
    """The reference: each value times its block's scale, in float32."""
    R, C = q.shape
    bo, bi = block or (R, C)
    s = scale_inv.float().reshape(math.ceil(R / bo), math.ceil(C / bi))
    return q.float() * s.repeat_interleave(bo, dim=0)[:R].repeat_interleave(bi, dim=1)[:, :C]


def is_linear(name: str) -> bool:
    """DeepSeek-V3's nn.Linear weights that its published checkpoint stores as FP8."""
    return name.endswith("_proj.weight")


def write_fp8_checkpoint(src, fp8_dir, ref_dir=None, block: list[int] | None = (128, 128), skip: tuple = (),
                         **quant) -> dict[str, torch.Tensor]:
    """Copy the checkpoint `src` to fp8_dir with its Linear weights (but those named in skip) as FP8
    blocks and a quantization_config saying so (quant: more of its keys); to ref_dir (if given)
    with those weights dequantized by the reference, in float32. Returns the reference weights."""
    block = None if block is None else list(block)
    tensors = load_file(src / "model.safetensors")
    fp8, ref, refs = {}, dict(tensors), {}
    for name, w in tensors.items():
        if is_linear(name) and not any(s in name for s in skip):
            q, s = quantize_fp8(w, block)
            fp8[name], fp8[f"{name}_scale_inv"] = q, s
            ref[name] = refs[name] = dequantize_fp8(q, s, block)
        else:
            fp8[name] = w
    for folder, weights, config in ((fp8_dir, fp8, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                    "fmt": "e4m3", "weight_block_size": block, **quant}),
                                    (ref_dir, ref, None)):
        if folder is None:
            continue
        shutil.copytree(src, folder)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        if config is not None:
            cfg = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": config}, indent=2))
    return refs


class Fp8Tiny(Tiny):
    """conftest's Tiny whose checkpoint (ckpt/) is FP8 with blocks of `family` ('128x128', '16x32' or
    'matrix'); ref/ holds the reference dequantization, and the model is transformers' on it."""

    def build(self, ckpt):
        import transformers as tf

        block = {"128x128": [128, 128], "16x32": [16, 32], "matrix": None}[self.family]
        sizes = SIZES if self.family == "128x128" else {}
        build_tiny_sigmoid("deepseek_v3", self.root / "src", **sizes)
        self.block, self.ref = block, self.root / "ref"
        self.refs = write_fp8_checkpoint(self.root / "src", ckpt, self.ref, block)
        return tf.DeepseekV3ForCausalLM.from_pretrained(self.ref, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def fp8_tiny(tmp_path_factory):
    return tiny_cache(tmp_path_factory, Fp8Tiny)


# -- exact against the reference ---------------------------------------------------------------


def test_the_checkpoint_has_partial_blocks_on_both_axes(fp8_tiny):
    t = fp8_tiny("128x128")
    shapes = {tuple(w.shape) for w in t.refs.values()}
    assert any(r > 128 and r % 128 for r, _ in shapes) and any(c > 128 and c % 128 for _, c in shapes)
    assert (200, 136) in shapes and (136, 200) in shapes and (300, 136) in shapes
    stored = load_file(t.ckpt / "model.safetensors")
    assert stored["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert stored["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"].shape == (2, 2)
    assert stored["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # the router is not a Linear
    assert stored["lm_head.weight"].dtype == torch.float32


@pytest.mark.parametrize("block", ["128x128", "16x32", "matrix"])
def test_loaded_weights_equal_the_reference_dequantization(fp8_tiny, block):
    """Every FP8 weight, read through the store, in float32 and rounded once to bfloat16; and every
    weight the engine holds, dense and expert rows, equal the reference checkpoint's."""
    t = fp8_tiny(block)
    store = WeightStore(t.ckpt)
    for name, ref in t.refs.items():
        assert torch.equal(store.get(name), ref), name
        assert torch.equal(store.get(name, dtype=torch.bfloat16), ref.bfloat16()), name
    ours, ref_engine = mobile.Engine.load(t.graph), mobile.Engine.load(t.graph, weights=t.ref)
    assert ours.kernels.w.keys() == ref_engine.kernels.w.keys()
    for key, w in ours.kernels.w.items():
        assert w.dtype == ref_engine.kernels.w[key].dtype and torch.equal(w, ref_engine.kernels.w[key]), key
    assert ours.experts.rows.keys() == ref_engine.experts.rows.keys() == {1, 2}
    for layer, rows in ours.experts.rows.items():
        assert torch.equal(rows, ref_engine.experts.rows[layer]), layer


@pytest.mark.parametrize("block", ["128x128", "16x32", "matrix"])
def test_logits_and_greedy_match_transformers_on_the_dequantized_checkpoint(fp8_tiny, block):
    logits_match(fp8_tiny, block)
    greedy_matches_generate(fp8_tiny, block)


@pytest.mark.parametrize("policy", ["lru", "lru-prefetch"])
def test_offloading_loads_fp8(fp8_tiny, policy):
    """Under an offloading policy the host rows are the dequantized experts: the same as resident."""
    t = fp8_tiny("128x128")
    offloading_matches_resident(t, policy)
    engine = mobile.Engine.load(t.graph, policy=policy, link_gbps=50.0)
    resident = mobile.Engine.load(t.graph, weights=t.ref)
    try:
        assert engine.experts.host.keys() == resident.experts.rows.keys()
        for layer, rows in engine.experts.host.items():
            assert torch.equal(rows, resident.experts.rows[layer])
    finally:
        engine.close()


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_int4_and_int8_experts_are_packed_from_the_dequantized_ones(fp8_tiny, fmt):
    """Quantized at load, FP8 experts pack byte for byte as the reference's float32 ones do."""
    t = fp8_tiny("128x128")
    ours = mobile.Engine.load(t.graph, expert_format=fmt, expert_group_size=8)
    ref = mobile.Engine.load(t.graph, weights=t.ref, expert_format=fmt, expert_group_size=8)
    assert ours.spec.runtime.expert_format == fmt
    for layer, rows in ours.experts.rows.items():
        assert rows.dtype == torch.uint8 and torch.equal(rows, ref.experts.rows[layer])
    assert torch.equal(ours.logits(PROMPT), ref.logits(PROMPT))
    off = mobile.Engine.load(t.graph, policy="lru", expert_format=fmt, expert_group_size=8, link_gbps=50.0)
    try:
        assert off.generate(PROMPT, 8, stop_ids=[]) == ref.generate(PROMPT, 8, stop_ids=[])
    finally:
        off.close()


def test_quantize_reads_an_fp8_checkpoint(fp8_tiny, tmp_path):
    """`mobile quantize` on the FP8 checkpoint writes what it writes from the reference: experts
    packed from the same values, every other weight dequantized to the config's dtype, no scales."""
    t = fp8_tiny("128x128")
    for src, out in ((t.ckpt, tmp_path / "q"), (t.ref, tmp_path / "q_ref")):
        assert run_cli("quantize", src, "-o", out, "--format", "int4", "--group-size", "8") == 0
    ours, ref = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "q_ref" / "model.safetensors")
    assert ours.keys() == ref.keys() and not any(n.endswith("_scale_inv") for n in ours)
    for name, w in ours.items():
        assert w.dtype == ref[name].dtype and torch.equal(w, ref[name]), name
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "mobile" and cfg["format"] == "int4"
    engine = mobile.Engine.load(t.graph, weights=tmp_path / "q")
    assert engine.spec.runtime.expert_format == "int4"
    assert torch.equal(engine.logits(PROMPT), mobile.Engine.load(t.graph, weights=tmp_path / "q_ref").logits(PROMPT))


def test_import_hf_says_the_experts_run_native_and_run_works(fp8_tiny, capsys):
    t = fp8_tiny("128x128")
    spec = yaml.safe_load(t.spec.read_text())
    assert spec["runtime"]["expert_format"] == "native" and spec["dtype"] == "float32"
    capsys.readouterr()
    prompt = ",".join(map(str, PROMPT.tolist()))
    assert run_cli("run", "--graph", t.graph, "--prompt-ids", prompt, "--max-new-tokens", "6", "--json") == 0
    ids = json.loads(capsys.readouterr().out)["ids"]
    assert ids == mobile.Engine.load(t.graph, weights=t.ref).generate(PROMPT, 6)


def test_bfloat16_model_rounds_each_weight_once(fp8_tiny, tmp_path):
    """A bfloat16 spec: each dense weight is the reference dequantization rounded once to bfloat16."""
    t = fp8_tiny("128x128")
    text = t.spec.read_text().replace("dtype: float32", "dtype: bfloat16").replace("path: ckpt", f"path: {t.ckpt}")
    (tmp_path / "spec.yaml").write_text(text)
    assert run_cli("compile", tmp_path / "spec.yaml", "-o", tmp_path / "g") == 0
    engine = mobile.Engine.load(tmp_path / "g")
    q_a = engine.kernels.w[("q_a_proj", 0)]
    assert q_a.dtype == torch.bfloat16
    assert torch.equal(q_a, t.refs["model.layers.0.self_attn.q_a_proj.weight"].bfloat16())
    assert torch.isfinite(engine.logits(PROMPT)).all()


# -- scales in other forms, and weights a config leaves unquantized ----------------------------


def one_tensor_checkpoint(folder, tensors, **quant):
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8", **quant}}))
    return WeightStore(folder)


@pytest.mark.parametrize("stored", ["float32", "e8m0", "uint8"])
def test_ue8m0_scales_read_in_every_storage(tmp_path, stored):
    """scale_fmt ue8m0 (DeepSeek-V3.1): power-of-two scales as float32, float8_e8m0fnu or E8M0 bytes."""
    torch.manual_seed(0)
    w = torch.randn(130, 70) * 3
    _, s = quantize_fp8(w, [64, 64])
    s = torch.exp2(torch.ceil(torch.log2(s)))  # powers of two
    q = (w / s.repeat_interleave(64, 0)[:130].repeat_interleave(64, 1)[:, :70]).clamp(-FP8_MAX, FP8_MAX)
    q = q.to(torch.float8_e4m3fn)
    as_stored = {"float32": s, "e8m0": s.to(torch.float8_e8m0fnu),
                 "uint8": (torch.log2(s).round().to(torch.int32) + 127).to(torch.uint8)}[stored]
    store = one_tensor_checkpoint(tmp_path / "c", {"w": q, "w_scale_inv": as_stored}, weight_block_size=[64, 64],
                                  scale_fmt="ue8m0")
    assert torch.equal(store.get("w"), dequantize_fp8(q, s, [64, 64]))


def test_a_linear_left_unquantized_loads_as_it_is(tmp_path):
    """modules_to_not_convert (MiniMax-M2 lists its routers and lm_head): what the checkpoint stores
    in float is read as it is, whatever the list says; its dtype decides."""
    src = tmp_path / "src"
    build_tiny_sigmoid("deepseek_v3", src)
    refs = write_fp8_checkpoint(src, tmp_path / "fp8", tmp_path / "ref", [16, 16], skip=("shared_experts",),
                                modules_to_not_convert=["lm_head", "model.layers.*.mlp.shared_experts"])
    assert refs and not any("shared_experts" in n for n in refs)
    fp8, ref = WeightStore(tmp_path / "fp8"), WeightStore(tmp_path / "ref")
    assert fp8.info("model.layers.1.mlp.shared_experts.up_proj.weight").dtype == torch.float32
    for name in ref.index:
        assert torch.equal(fp8.get(name), ref.get(name)), name


# -- refusals: one line, naming the file and the tensor or key ---------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny FP8 checkpoint with [16, 16] blocks, and its compiled graph."""
    root = tmp_path_factory.mktemp("small")
    build_tiny_sigmoid("deepseek_v3", root / "src")
    write_fp8_checkpoint(root / "src", root / "ckpt", None, [16, 16])
    assert run_cli("import-hf", root / "ckpt", "-o", root / "s.yaml") == 0
    assert run_cli("compile", root / "s.yaml", "-o", root / "g") == 0
    return root


def broken_copy(small, tmp_path, tensors=None, config=None):
    """A copy of the small FP8 checkpoint with its tensors and config.json edited in place."""
    out = tmp_path / "broken"
    shutil.copytree(small / "ckpt", out)
    if tensors is not None:
        t = load_file(out / "model.safetensors")
        tensors(t)
        save_file(t, out / "model.safetensors")
    if config is not None:
        cfg = json.loads((out / "config.json").read_text())
        config(cfg["quantization_config"])
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def one_error_line(capsys, *args) -> str:
    capsys.readouterr()
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("mobile: error: "), err
    return lines[0]


UP = "model.layers.1.mlp.experts.3.up_proj.weight"
Q_A = "model.layers.0.self_attn.q_a_proj.weight"


def nan_scale(t):
    t[f"{UP}_scale_inv"][0, 0] = math.nan


@pytest.mark.parametrize("name, tensors, config, message", [
    ("missing scale", lambda t: t.pop(f"{UP}_scale_inv"), None,
     f"model.safetensors: {UP}_scale_inv: tensor '{UP}_scale_inv' not found: the FP8 weight '{UP}' needs its block "
     "scales"),
    ("short scale", lambda t: t.__setitem__(f"{Q_A}_scale_inv", t[f"{Q_A}_scale_inv"][:, :1].clone()), None,
     f"tensor '{Q_A}_scale_inv' is float32 [1, 1]; the FP8 weight '{Q_A}' [12, 32] with weight_block_size [16, 16] "
     "needs scales of shape [1, 2]"),
    ("integer scale", lambda t: t.__setitem__(f"{Q_A}_scale_inv", t[f"{Q_A}_scale_inv"].to(torch.int32)), None,
     f"tensor '{Q_A}_scale_inv' is int32 [1, 2]; the FP8 weight '{Q_A}' [12, 32] with weight_block_size [16, 16] "
     "needs float32, bfloat16, float16 scales (scale_fmt 'float')"),
    ("nan scale", nan_scale, None, f"{UP}_scale_inv: tensor '{UP}_scale_inv' holds NaN or infinite FP8 scales"),
    ("other block", None, lambda q: q.__setitem__("weight_block_size", [32, 32]),
     f"the FP8 weight '{Q_A}' [12, 32] with weight_block_size [32, 32] needs"),
    ("one-number block", None, lambda q: q.__setitem__("weight_block_size", [128]),
     "config.json: quantization_config.weight_block_size: FP8 blocks must be two positive integers [rows, columns]"),
    ("zero block", None, lambda q: q.__setitem__("weight_block_size", [0, 128]), "got [0, 128]"),
    ("scale format", None, lambda q: q.__setitem__("scale_fmt", "e4m3"),
     "quantization_config.scale_fmt: expected one of 'float', 'ue8m0', got 'e4m3'"),
    ("fp4 experts", None, lambda q: q.__setitem__("expert_dtype", "fp4"),
     "quantization_config.expert_dtype: FP8 checkpoints with 'fp4' experts are not supported"),
])
def test_a_broken_fp8_checkpoint_is_refused_in_one_line(small, tmp_path, capsys, name, tensors, config, message):
    ckpt = broken_copy(small, tmp_path, tensors, config)
    line = one_error_line(capsys, "run", "--graph", small / "g", "--weights", ckpt, "--prompt-ids", "5,6")
    assert message in line, line


def test_float8_tensors_without_an_fp8_config_are_refused(small, tmp_path, capsys):
    ckpt = broken_copy(small, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    line = one_error_line(capsys, "run", "--graph", small / "g", "--weights", ckpt, "--prompt-ids", "5,6")
    assert f"tensor '{Q_A}' is torch.float8_e4m3fn, but config.json has no FP8 quantization_config" in line


NVFP4 = {"quant_method": "modelopt", "quant_algo": "NVFP4", "producer": {"name": "modelopt", "version": "0.29.0"},
         "group_size": 16, "ignore": ["lm_head"]}
INT4_CT = {"quant_method": "compressed-tensors", "format": "pack-quantized",
           "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
                                                                            "strategy": "group", "group_size": 32}}}}
NVFP4_CT = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {}}


@pytest.mark.parametrize("quant, named", [
    (NVFP4, "NVFP4 ('modelopt') weights are not supported"),
    (INT4_CT, "INT4 ('compressed-tensors') weights are not supported"),
    (NVFP4_CT, "NVFP4 ('compressed-tensors') weights are not supported"),
    ({"quant_method": "gptq", "bits": 4}, "4-bit GPTQ ('gptq') weights are not supported"),
    ({"quant_method": "hqq"}, "'hqq' weights are not supported"),
])
def test_formats_mobile_cannot_read_are_refused_by_name(small, tmp_path, capsys, quant, named):
    """At import and at load: one line naming the format, exit 2."""
    ckpt = broken_copy(small, tmp_path, config=lambda q: (q.clear(), q.update(quant)))
    for args in (("import-hf", ckpt, "-o", tmp_path / "s.yaml"),
                 ("run", "--graph", small / "g", "--weights", ckpt, "--prompt-ids", "5,6")):
        line = one_error_line(capsys, *args)
        assert f"config.json: quantization_config.quant_method: {named}" in line, line
