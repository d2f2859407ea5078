"""Engine: a compiled graph bound to weights, a device and a policy. The Python API of mobile.

    engine = mobile.Engine.load("graphs/demo")
    logits = engine.logits(torch.tensor([1, 2, 3]))       # [T, vocab], float32
    new_ids = engine.generate(torch.tensor([1, 2, 3]), max_new_tokens=16)
    engine.stats                                          # dict, stable keys
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mobile.emit import load_graph
from mobile.errors import CheckpointError, MobileError, SpecError
from mobile.executor import Executor, Kernels, StepContext
from mobile.experts import ResidentExperts
from mobile.ir import Graph
from mobile.kv import KVCache
from mobile.ops import rope_cos_sin, rope_inv_freq
from mobile.sampling import Sampler
from mobile.spec import Spec, spec_from_dict, with_policy
from mobile.stats import Stats
from mobile.weights import TORCH_DTYPES, WeightStore, check_checkpoint

IMPLEMENTED_POLICIES = ("resident",)


class Engine:
    def __init__(self, graph: Graph, spec: Spec, store: WeightStore, device: str = "cpu",
                 compile: bool = False, progress: bool = False):
        self.graph, self.spec, self.store = graph, spec, store
        self.device = torch.device(device)
        self.dtype = TORCH_DTYPES[spec.dtype]
        self.stats_ = Stats()
        if spec.policy.name not in IMPLEMENTED_POLICIES:
            raise SpecError(f"policy {spec.policy.name!r} is not implemented yet (implemented: "
                            f"{', '.join(IMPLEMENTED_POLICIES)})", where=graph.name, key="policy.name")
        r = spec.model.rope
        if r.type not in ("default", "linear", "yarn"):
            raise SpecError(f"rope type {r.type!r} is not supported by the runtime yet "
                            "(supported: default, linear, yarn)", where=graph.name, key="model.rope.type")
        needs = check_checkpoint(spec, store)
        dense = {(k, layer): t for (k, layer, expert), t in needs.items() if expert is None}
        weights = {}
        with tqdm(total=len(dense) + len(spec.moe_layers), desc="loading weights", unit="tensor",
                  disable=None if progress else True, leave=False) as bar:  # None: only on a TTY
            for key, t in dense.items():
                # routers stay float32: routing decisions must not flip with the compute dtype
                dtype = torch.float32 if t.key == "router" else self.dtype
                weights[key] = store.get(t.name, dtype=dtype, device=self.device)
                bar.update(1)
            self.experts = ResidentExperts(spec, store, self.device, self.dtype, self.stats_, progress=bar)
        self.stats_.link = self.experts.link
        self.kv = KVCache(spec, self.device, self.dtype)
        self.kernels = Kernels(spec, weights, self.kv, self.experts)
        self.executor = Executor(graph, self.kernels, compile=compile)
        a = spec.model.attention
        rope_dim = a.qk_rope_head_dim if a.kind == "mla" else a.head_dim
        inv_freq, self.rope_scale = rope_inv_freq(r, rope_dim, spec.model.max_position_embeddings)
        self.inv_freq = inv_freq.to(self.device)
        self._tokenizer = None
        self.length = 0  # positions [0, length) of the current sequence are in the KV cache

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, graph_dir: str | Path, weights: str | Path | None = None, device: str = "cpu",
             policy: str | None = None, compile: bool = False, progress: bool = False) -> Engine:
        graph_dir = Path(graph_dir)
        graph = load_graph(graph_dir)
        try:
            spec = spec_from_dict(graph.spec, source=str(graph_dir / "graph.json"))
        except SpecError as e:
            raise SpecError(f"the spec embedded in the graph is invalid: {e.message}", where=e.where,
                            key=e.key and f"spec.{e.key}") from None
        if policy is not None and policy != spec.policy.name:
            spec = with_policy(spec, name=policy)
        ckpt = Path(weights) if weights is not None else resolve_checkpoint(graph, graph_dir)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise MobileError(f"device {device!r} requested but CUDA is not available here", key="--device")
        store = WeightStore(ckpt)
        return cls(graph, spec, store, device=device, compile=compile, progress=progress)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.store.dir)
        return self._tokenizer

    @property
    def stats(self) -> dict:
        return self.stats_.as_dict()

    # -- running ------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Run positions [start, start + T) of the current sequence; returns logits [T, V]."""
        T = ids.shape[0]
        if start + T > self.spec.model.max_position_embeddings:
            raise MobileError(f"sequence of {start + T} tokens exceeds max_position_embeddings="
                              f"{self.spec.model.max_position_embeddings}")
        self.kv.ensure(start + T)
        positions = torch.arange(start, start + T, device=self.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_scale)
        kv_len = self.kv.capacity if self.executor.compile else start + T
        ctx = StepContext(positions=positions, cos=cos, sin=sin, kv_len=kv_len)
        logits = self.executor.forward(ctx, ids.to(self.device))
        self.length = start + T
        return logits

    def _check_ids(self, input_ids) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() != 1 or ids.numel() == 0:
            raise MobileError(f"expected a non-empty 1-D sequence of token ids, got shape {list(ids.shape)}")
        vocab = self.spec.model.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise MobileError(f"token ids must lie in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}")
        return ids

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """Prefill forward of one sequence: LongTensor [T] -> FloatTensor [T, vocab]."""
        ids = self._check_ids(input_ids)
        t0 = time.perf_counter()
        out = self._forward(ids, 0)
        self.stats_.prefill_tokens += ids.numel()
        self.stats_.prefill_s += time.perf_counter() - t0
        return out.float().cpu()

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens: int = 32, greedy: bool = True, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, stop_ids=None, on_token=None) -> list[int]:
        """Prefill the prompt, then decode up to max_new_tokens. Returns the new token ids only
        (a stop token that ends generation is included)."""
        ids = self._check_ids(input_ids)
        if max_new_tokens < 0:
            raise MobileError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        sampler = Sampler(greedy=greedy, temperature=temperature, top_p=top_p, seed=seed)
        stops = set(self.default_stop_ids() if stop_ids is None else stop_ids)
        t0 = time.perf_counter()
        logits = self._forward(ids, 0)
        self.stats_.prefill_tokens += ids.numel()
        self.stats_.prefill_s += time.perf_counter() - t0
        new: list[int] = []
        t0 = time.perf_counter()
        while len(new) < max_new_tokens:
            token = sampler(logits[-1])
            new.append(token)
            if on_token is not None:
                on_token(token)
            if token in stops or len(new) == max_new_tokens:
                break
            logits = self._forward(torch.tensor([token]), self.length)
            self.stats_.decode_tokens += 1
        self.stats_.decode_s += time.perf_counter() - t0
        return new

    def default_stop_ids(self) -> list[int]:
        eos = read_eos_ids(self.store.dir)
        return eos

    def reset_stats(self) -> None:
        self.stats_.reset()


def resolve_checkpoint(graph: Graph, graph_dir: Path) -> Path:
    path = graph.spec.get("checkpoint", {}).get("path")
    if not path:
        raise CheckpointError("the graph names no checkpoint; pass --weights DIR",
                              where=graph_dir / "graph.json", key="spec.checkpoint.path")
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else (graph_dir / p)


def read_eos_ids(ckpt_dir: Path) -> list[int]:
    import json

    for name in ("generation_config.json", "config.json"):
        f = ckpt_dir / name
        if f.exists():
            try:
                eos = json.loads(f.read_text()).get("eos_token_id")
            except json.JSONDecodeError:
                continue
            if eos is not None:
                return list(eos) if isinstance(eos, list) else [int(eos)]
    return []


def load_tokenizer(ckpt_dir: Path):
    has_files = any((ckpt_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    if not has_files:
        raise CheckpointError("no tokenizer in the checkpoint folder (expected tokenizer.json or "
                              "tokenizer.model); pass token ids with --prompt-ids instead", where=ckpt_dir)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(ckpt_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types here; all mean "cannot load it"
        raise CheckpointError(f"cannot load the tokenizer: {type(e).__name__}: {e}", where=ckpt_dir) from None
