"""The kernel of each graph node: dense ones from mobile.models.ops, bound to their weights; the
routed-expert layer's from its MoELayer (mobile.moe.layer); the gates'."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mobile.compiler.ir import Node
from mobile.errors import GraphError
from mobile.models import ops
from mobile.models.deltanet import IN_PROJECTIONS, GatedDeltaNet
from mobile.models.linear_kernels import TORCH, LinearKernels
from mobile.moe.cache import ExpertCache
from mobile.moe.layer import MoELayer
from mobile.moe.op import ExpertKind
from mobile.moe.router import Router
from mobile.runtime.context import Kernel, SyncKernel
from mobile.runtime.kv import KVCache
from mobile.runtime.state import RecurrentState
from mobile.spec.schema import Spec


def fuse_qkv(weights: dict[tuple[str, int | None], torch.Tensor]) -> dict[tuple[str, int | None], torch.Tensor]:
    """q, k and v projections of each GQA layer as one matrix (and one bias): one matmul instead of
    three. Replaces them in `weights`, so nothing is held twice."""
    for (_, layer) in [k for k in weights if k[0] == "k_proj"]:  # MLA layers have none
        # a layer whose v is its k (Gemma 4's global layers) has no v_proj
        parts = [weights.pop((p, layer)) for p in ("q_proj", "k_proj", "v_proj") if (p, layer) in weights]
        weights[("qkv_proj", layer)] = torch.cat(parts)
        biases = [weights.pop((p, layer), None) for p in ("q_bias", "k_bias", "v_bias")]
        if all(b is not None for b in biases):
            weights[("qkv_bias", layer)] = torch.cat(biases)  # type: ignore[arg-type]
    return weights


@dataclass(frozen=True)
class Compute:
    """A compute node's kernel as the segment calls it: fn(*inputs), or fn(ctx, *inputs) with
    needs_ctx; an `inline` expression (a residual add) is written into the segment instead."""

    fn: Kernel | None
    needs_ctx: bool = False
    inline: str | None = None  # "a + b": the node's inputs as a and b


ADD = Compute(None, inline="{0} + {1}")
# an attention layer's weights by name (absent ones None): GQA/MHA (q, k, v fused) and MLA
GQA_WEIGHTS = ("qkv_proj", "qkv_bias", "o_proj", "o_bias", "q_norm", "k_norm", "sinks")
MLA_WEIGHTS = ("q_proj", "q_a_proj", "q_a_norm", "q_b_proj", "kv_a_proj", "kv_a_norm", "kv_b_proj", "o_proj")
LINEAR_WEIGHTS = ("la_conv", "la_dt_bias", "la_a_log", "la_norm", "la_out")  # and the family's IN_PROJECTIONS


class Kernels:
    """Builds the kernel of each node from the model's weights, KV cache and expert cache: dense
    ones from mobile.models.ops, the routed-expert layer's from its MoELayer (mobile.moe.layer)."""

    def __init__(self, spec: Spec, weights: dict[tuple[str, int | None], torch.Tensor], kv: KVCache,
                 experts: ExpertCache, state: RecurrentState | None = None,
                 linear_kernels: LinearKernels = TORCH,
                 count_routes: bool = False):
        """state: the linear-attention layers' recurrent state (a model that has them);
        linear_kernels: the kernels they run (mobile.models.linear_kernels); count_routes:
        each router counts its choices (MoELayer.route_counts: a routing profile)."""
        self.spec, self.w, self.kv, self.experts = spec, fuse_qkv(weights), kv, experts
        self.state, self.linear_kernels, self.count_routes = state, linear_kernels, count_routes
        self.attn_scale = ops.attention_scale(spec)
        self.kind = ExpertKind.of_spec(spec)
        self.layers: dict[int, MoELayer] = {}

    def moe(self, layer: int) -> MoELayer:
        """Layer `layer`'s MoELayer, made once."""
        if layer not in self.layers:
            router = Router.of_layer(self.spec, self.w, layer)
            self.layers[layer] = MoELayer(layer, router, self.experts, self.kind, self.count_routes)
        return self.layers[layer]

    def build(self, node: Node) -> Compute | SyncKernel:
        """The node's kernel: a Compute for a compute node, a SyncKernel for a sync node."""
        builder = getattr(self, f"_{node.op.value}", None)
        if builder is None:
            raise GraphError(f"op {node.op.value!r} is not executable by this runtime yet", key=node.name)
        return builder(node)

    def compute(self, node: Node) -> Compute:
        kernel = self.build(node)
        assert isinstance(kernel, Compute), node.name
        return kernel

    def sync(self, node: Node) -> SyncKernel:
        kernel = self.build(node)
        assert isinstance(kernel, SyncKernel), node.name
        return kernel

    # -- dense --------------------------------------------------------------------------------------
    def _embed(self, node: Node) -> Compute:
        weight = self.w[("embed", None)]
        if self.spec.model.scale_embeddings:  # Gemma: times sqrt(H), rounded to the dtype as transformers does
            scale = torch.tensor(self.spec.model.hidden_size ** 0.5, dtype=weight.dtype, device=weight.device)
            return Compute(lambda ids: F.embedding(ids, weight) * scale)
        return Compute(functools.partial(F.embedding, weight=weight))

    def _norm(self, node: Node) -> Compute:
        weight = self.w[(node.attr("weight"), node.attr("layer"))]
        if self.spec.model.zero_centered_norms:  # Qwen3-Next, Qwen3.5: 1 + weight
            return Compute(functools.partial(ops.rms_norm_scaled, scale=ops.zero_centered_scale(weight),
                                             eps=self.spec.model.norm_eps))
        return Compute(functools.partial(ops.rms_norm, weight=weight, eps=self.spec.model.norm_eps))

    def _add(self, node: Node) -> Compute:
        if node.attr("scale") is not None:  # the layer's learned scalar (Gemma 4)
            return Compute(functools.partial(ops.scaled_add, scale=self.w[(node.attr("scale"), node.attr("layer"))]))
        return ADD

    def _combine(self, node: Node) -> Compute:
        return ADD

    def _mlp(self, node: Node) -> Compute:
        gate, up, down = (self.w[(k, node.attr("layer"))] for k in ("mlp_gate", "mlp_up", "mlp_down"))
        fn = ops.geglu if self.spec.model.hidden_act == "gelu_pytorch_tanh" else ops.swiglu
        return Compute(functools.partial(fn, gate=gate, up=up, down=down))

    def _lm_head(self, node: Node) -> Compute:
        head = self.w[("embed" if self.spec.model.tie_word_embeddings else "lm_head", None)]
        return Compute(ops.LMHead(head, self.spec.model.final_logit_softcap), needs_ctx=True)

    def _attention(self, node: Node) -> Compute:
        layer = node.attr("layer")
        cache = self.kv.layers[layer]
        if node.attr("kind") == "mla":
            w = {k: self.w.get((k, layer)) for k in MLA_WEIGHTS}
            return Compute(ops.LatentAttention(self.spec, w, cache, self.attn_scale), needs_ctx=True)
        w = {k: self.w.get((k, layer)) for k in GQA_WEIGHTS}
        attention = ops.Attention(self.spec, w, cache, self.attn_scale, self.spec.sliding_window(layer), layer)
        return Compute(attention, needs_ctx=True)

    def _linear_attention(self, node: Node) -> Compute:
        layer = node.attr("layer")
        assert self.state is not None, "a graph with linear-attention layers needs a recurrent state"
        w = {k: self.w[(k, layer)] for k in (*LINEAR_WEIGHTS, *IN_PROJECTIONS[self.spec.model.family])}
        return Compute(GatedDeltaNet(self.spec, w, self.state.layers[layer], self.linear_kernels), needs_ctx=True)

    # -- the routed-expert layer (mobile.moe.layer) -------------------------------------------------
    def _router(self, node: Node) -> Compute:
        return Compute(self.moe(node.attr("layer")).route(shuffled=node.attr("order") == "random"))

    def _predict(self, node: Node) -> Compute:
        return Compute(self.moe(node.attr("layer")).predict(node.attr("top_k")))

    def _fetch(self, node: Node) -> SyncKernel:
        return self.moe(node.attr("layer")).fetch_kernel(node)

    def _wait(self, node: Node) -> SyncKernel:
        return self.moe(node.attr("layer")).wait_kernel()

    def _host_join(self, node: Node) -> SyncKernel:
        return self.moe(node.attr("layer")).join_kernel()

    def _host_experts(self, node: Node) -> SyncKernel:
        return self.moe(node.attr("layer")).host_kernel(node)

    def _prefetch(self, node: Node) -> SyncKernel:
        return self.moe(node.attr("layer")).prefetch_kernel(node)

    def _expert(self, node: Node) -> Compute:
        layer = node.attr("layer")
        if node.attr("variant") == "shared":
            gate, up, down = (self.w[(k, layer)] for k in ("shared_gate", "shared_up", "shared_down"))
            sigmoid = self.w[("shared_expert_gate", layer)] if node.attr("gate") == "sigmoid" else None
            return Compute(functools.partial(ops.shared_expert, gate=gate, up=up, down=down, sigmoid_gate=sigmoid))
        return Compute(self.moe(layer).experts_kernel(node))

    # -- the gates ------------------------------------------------------------------------------------
    def _importance_gate(self, node: Node) -> SyncKernel:
        """True: the token is important and falls back to the big pass."""
        signal, tau = node.attr("signal"), float(node.attr("tau"))
        if signal == "router_mass":
            little_k = node.attr("little_k")

            def read(ctx, routed):  # at this layer the little set drops too much of the big set's mass
                weights = routed[0]  # [T, K], in selection order
                share = weights[:, :little_k].sum(-1) / weights.sum(-1).clamp_min(1e-30)
                return [(share < tau).any()]
        else:
            def read(ctx, logits):  # the little pass is not confident about the next token
                # tau 1 sends every token back, even one whose distribution is exactly one-hot
                return [ops.confidence(logits[-1], signal) < tau if tau < 1 else logits.new_ones((), dtype=torch.bool)]

        return SyncKernel(lambda ctx, values, _: bool(values[0][0]), read)
