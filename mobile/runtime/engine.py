"""Engine: a compiled graph bound to weights, a device and a policy. The Python API of mobile.

    engine = mobile.Engine.load("graphs/demo")
    logits = engine.logits(torch.tensor([1, 2, 3]))       # [T, vocab], float32
    new_ids = engine.generate(torch.tensor([1, 2, 3]), max_new_tokens=16)
    engine.stats                                          # dict, stable keys
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mobile import debug
from mobile.compiler.budget import cache_plan
from mobile.compiler.costs import expert_bytes
from mobile.compiler.emit import trace_events
from mobile.compiler.ir import Graph, Pass
from mobile.errors import MobileError, RunError, SpecError
from mobile.models import linear_kernels as linear
from mobile.models.ops import rope_inv_freq, rope_tables
from mobile.models.weights import TORCH_DTYPES, WeightStore, check_checkpoint
from mobile.moe.op import warm_up
from mobile.outputs import atomic_write_text
from mobile.runtime.context import Pick, StepContext
from mobile.runtime.devclock import clock_for
from mobile.runtime.diagnose import first_nonfinite_weight
from mobile.runtime.executor import Executor, Forward, Outcome
from mobile.runtime.graphs import GRAPH_MAX_TOKENS, GraphRunner, StaticState, kv_bucket
from mobile.runtime.hostio import HostReader
from mobile.runtime.kernels import Kernels
from mobile.runtime.kv import KVCache, max_seq_len
from mobile.runtime.load import (
    checkpoint_experts,
    expert_cache,
    graphs_enabled,
    load_dense,
    read_eos_ids,
    refuse_emulated_link,
    resolve_checkpoint,
    resolve_policy,
)
from mobile.runtime.sampling import Sampler
from mobile.runtime.state import RecurrentState
from mobile.runtime.stats import Stats
from mobile.runtime.tokenizer import load_tokenizer
from mobile.spec.load import format_changes
from mobile.spec.schema import Spec


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C ended Engine.generate: `new_ids` are the tokens it made, and the engine's stats are
    complete (stopped: interrupted)."""

    def __init__(self, new_ids: list[int]):
        super().__init__()
        self.new_ids = new_ids


class Engine:
    def __init__(self, graph: Graph, spec: Spec, store: WeightStore, device: str = "cpu",
                 compile: bool = False, progress: bool = False, link_gbps: float | None = None,
                 link_ratio: float | None = None, trace: bool = False, all_resident: bool = False,
                 track_use: bool = False, cuda_graphs: str | None = None, count_routes: bool = False,
                 host_units: dict[str, float] | None = None):
        self.graph, self.spec, self.store = graph, spec, store
        self.device = torch.device(device)
        self.graphs_on = graphs_enabled(cuda_graphs, spec, self.device)
        self.dtype = TORCH_DTYPES[spec.dtype]
        self.stats_ = Stats()
        r = spec.model.rope
        if r.type not in ("default", "linear", "yarn"):
            raise SpecError(f"rope type {r.type!r} is not supported by the runtime yet "
                            "(supported: default, linear, yarn)", where=graph.name, key="model.rope.type")
        if self.device.type == "cuda":
            refuse_emulated_link(self.device, spec, link_gbps, link_ratio)
        self.trace: list | None = [] if trace else None
        self.reader = HostReader(self.device)  # every read of a device value goes through it, counted
        self.t0 = time.perf_counter()
        plan = None if all_resident else cache_plan(spec)
        needs = check_checkpoint(spec, store)
        dense = sum(expert is None for _, _, expert in needs)
        with tqdm(total=dense + len(spec.moe_layers), desc="loading weights", unit="tensor",
                  disable=None if progress else True, leave=False) as bar:  # None: only on a TTY
            weights = load_dense(spec, store, needs, self.device, self.dtype, bar)
            self.experts = expert_cache(spec, store, self.device, self.dtype, self.stats_, self.reader, plan, bar,
                                        track_use=track_use or all_resident, trace=self.trace, compile=compile,
                                        link_gbps=link_gbps, link_ratio=link_ratio, host_units=host_units)
        self.stats_.link = self.experts.link
        # what one expert is and how many the cache holds: equal budgets hold more packed experts
        slots = None if plan is None else plan.main + plan.staging
        self.stats_.extra.update(expert_format=spec.runtime.expert_format, expert_bytes=expert_bytes(spec),
                                 cache_slots_per_layer=slots)
        # the longest sequence held: with graphs the KV cache is preallocated to it (storage a
        # captured graph may keep reading), else it grows as the sequence does
        self.max_seq_len = max_seq_len(spec, preallocated=self.graphs_on)
        self.kv = KVCache(spec, self.device, self.dtype, limit=self.max_seq_len, fixed=self.graphs_on,
                          compiled=compile)
        # the linear-attention layers' recurrent state (and the copies a fallback restores), allocated once
        self.state = RecurrentState(spec, self.device, self.dtype) if spec.linear_layers else None
        linear_kernels = linear.choose(self.device, self.dtype, debug.flags().linear_kernels)
        if self.state is not None:
            self.stats_.extra.update(linear_attention_kernels=str(linear_kernels),
                                     recurrent_state_bytes=self.state.nbytes)
        self.kernels = Kernels(spec, weights, self.kv, self.experts, self.state, linear_kernels, count_routes)
        self.graphs = GraphRunner(self.device) if self.graphs_on else None
        self.executor = Executor(graph, self.kernels, self.reader, compile=compile, trace=self.trace,
                                 graphs=self.graphs, state=self.state)
        if compile and self.device.type == "cpu" and spec.runtime.expert_format != "native":
            # measured on the demo: resident int4 decoded 81 tokens/s compiled, 203 eager
            print(f"mobile: note: --compile with {spec.runtime.expert_format} experts on the CPU runs slower than "
                  "eager (Inductor's dynamic-shape loops for the unpacking); leave it off here", file=sys.stderr)
        warm_up(self.device, self.dtype, spec.runtime.expert_format, spec.expert_group)
        a = spec.model.attention
        rope_dim = a.qk_rope_head_dim if a.kind == "mla" else a.head_dim
        self.rope_interleaved = a.kind == "mla" or r.interleaved  # DeepSeek's MLA rotates adjacent pairs
        inv_freq, self.rope_scale = rope_inv_freq(r, rope_dim, spec.model.max_position_embeddings)
        self.inv_freq = inv_freq.to(self.device)
        self.tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # positions, cos, sin
        self.static: StaticState | None = None  # with graphs: the decode state captured segments read
        if self.graphs is not None:
            _, cos, sin = self._tables()  # every position of the preallocated cache, once
            self.static = StaticState(self.device, cos, sin, self.graphs.register)
            # the slot maps change by copy into these tensors (mobile.moe.cache): read in place
            self.graphs.register(self.experts.slot_map(layer) for layer in spec.moe_layers)
            if self.state is not None:  # advanced in place by its layers' segments
                self.graphs.register_advanced(self.state.tensors())
        self._tokenizer = None
        self.length = 0  # positions [0, length) of the current sequence are in the KV cache
        self.ids = torch.zeros(0, dtype=torch.long)  # their token ids, kept only for the KV refresh
        self.little_from: int | None = None  # see _forward
        self.decode_compiled = False  # with compile: the first decode step (which compiles) is timed apart

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, graph_dir: str | Path, weights: str | Path | None = None, device: str = "cpu",
             policy: str | None = None, compile: bool = False, progress: bool = False,
             policy_options: dict | None = None, expert_format: str | None = None,
             expert_group_size: int | None = None, **options) -> Engine:
        """policy_options: other policy fields to override (tau, little_k, layer_tau, ...).
        expert_format, expert_group_size: override the spec's (mobile.moe.quant); a quantized checkpoint
        brings its own, which a different expert_format contradicts.
        options: link_gbps, link_ratio (emulated link), trace (record a measured timeline),
        all_resident (keep every expert on the device whatever the policy: for quality evals),
        track_use (count the experts each forward uses, also with every expert resident: for evals),
        count_routes (each router counts its choices, for a routing profile: mobile.tools.profile),
        cuda_graphs (auto, on or off; default the spec's runtime.cuda_graphs: mobile.runtime.graphs),
        host_units (an emulated host's unit per expert format, in us: the device's time for one expert
        of that format and one token, given instead of measured at load; a bench's rows share them)."""
        graph_dir = Path(graph_dir)
        runtime = format_changes(expert_format, expert_group_size)
        graph, spec = resolve_policy(graph_dir, policy, policy_options, runtime)
        ckpt = Path(weights) if weights is not None else resolve_checkpoint(graph, graph_dir)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise MobileError(f"device {device!r} requested but CUDA is not available here", key="--device")
        store = WeightStore(ckpt)
        graph, spec = checkpoint_experts(graph, spec, store, expert_format)
        return cls(graph, spec, store, device=device, compile=compile, progress=progress, **options)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.store.dir)
        return self._tokenizer

    @property
    def stats(self) -> dict:
        self.experts.collect_stats()
        g = self.graphs
        if g is not None:  # counts since the last reset_stats, which a server sums over its requests
            self.stats_.extra.update(graph_captures=g.captures, graph_replays=g.replays, graph_eager_segments=g.eager)
        out = self.stats_.as_dict()
        for key in ("graph_captures", "graph_replays", "graph_eager_segments"):  # always there, after the rest
            out.setdefault(key, 0)
        # what describes the run rather than counts it, kept out of stats_ (a sum of it would mean nothing)
        out.update(max_seq_len=self.max_seq_len, cuda_graphs="off" if g is None else g.mode)
        if g is not None:
            decoded = self.stats_.decode_tokens  # replays (CPU: static-buffer runs) per decoded token
            out["graph_replays_per_token"] = out.get("decode_graph_replays", 0) / decoded if decoded else None
            out["graph_eager_reasons"] = dict(g.reasons)
        return out

    def write_trace(self, path: str | Path) -> None:
        """The measured timeline as a Chrome trace, in the planned trace's format."""
        if self.trace is None:
            raise MobileError("this engine was loaded without trace=True")
        self.experts.settle()  # CUDA: the copies' spans are read from their events
        clock = clock_for(self.device)
        spans = []
        for name, cat, stream, start, end, nbytes, *detail in list(self.trace):
            start, end = clock.seconds(start), clock.seconds(end)  # CUDA compute spans are events
            args = {"bytes": nbytes} if nbytes else {}
            args.update(*detail)  # a copy's: its layer, expert and slot
            spans.append({"name": name, "cat": cat, "stream": stream, "ts_us": (start - self.t0) * 1e6,
                          "dur_us": (end - start) * 1e6, "args": args})
        atomic_write_text(path, json.dumps(trace_events(spans, f"{self.graph.name} (measured, link "
                                                               f"{self.stats_.link})", "run")))

    def close(self) -> None:
        self.experts.close()

    # -- running ------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, start: int, only: Pass | None = None, last_only: bool = False
                 ) -> torch.Tensor:
        """Run positions [start, start + T) of the current sequence; returns logits [T, V] ([1, V]
        with last_only). only: run this pass alone, whatever the gates say (studies of one pass)."""
        return self._run(ids, start, only, last_only).logits

    def _next_token(self, ids: torch.Tensor, start: int, sampler: Sampler, last_only: bool = False) -> int:
        """Run positions [start, start + T) (Engine._forward) and pick the next token on the device
        (Sampler.pick, run by the executor after the forward's last pass); returns it, read in one
        copy. A RunError when the last position's logits are not all finite."""
        picked = self._run(ids, start, last_only=last_only, pick=sampler.pick).picked
        assert picked is not None
        (token,), (finite,) = self.reader.ints(picked)
        if not finite:
            raise self._nonfinite(start + ids.shape[0] - 1)
        return token

    def _run(self, ids: torch.Tensor, start: int, only: Pass | None = None, last_only: bool = False,
             pick: Pick | None = None) -> Outcome:
        """Engine._forward's forward, with the executor's whole Outcome; pick: the next token's choice.

        Which passes run is the executor's to decide (Executor.run), from what this asks for: a
        prompt runs the prompt pass (`prefill`: big by default), a decoded token the policy's decode
        pass, whose gates may send it to the big pass. With policy.kv_refresh, a decoded token that
        falls back is recomputed together with the accepted little tokens since the last big pass
        (at most kv_refresh of them), in one batched big pass whose experts load once for the whole
        block. With a bounded expert cache, a layer whose experts for these T tokens exceed the
        cache runs them in rounds (mobile.moe.cache.Rounds): each is still loaded once per layer.
        """
        T = ids.shape[0]
        if start + T > self.max_seq_len:
            raise MobileError(f"sequence of {start + T} tokens exceeds {self._limit_name()}={self.max_seq_len}")
        passes = self.executor.passes
        kv_refresh = self.spec.policy.kv_refresh
        if kv_refresh:  # the refresh recomputes earlier positions, so it needs their token ids
            self.ids = torch.cat((self.ids[:start], ids.cpu()))
        if self.state is not None and start == 0:  # a new sequence: nothing folded into the state yet
            self.state.reset()
        gated, refresh = False, None
        if only is not None:
            first = only
        elif T > 1:  # a prompt
            first = Pass(self.spec.policy.prefill) if len(passes) > 1 else passes[0]
        else:
            first, gated = passes[0], len(passes) > 1
            if kv_refresh and self.little_from is not None and self.little_from < start:
                refresh = self._refresh(ids, start, kv_refresh)
        forward = Forward(first, gated, refresh, start, pick)
        self.experts.begin_forward()
        ctx, tokens = self._context(ids, start, last_only)
        outcome = self.executor.run(ctx, tokens, forward)
        self.experts.end_forward(refreshed=outcome.refreshed)
        if outcome.fell_back:
            self.stats_.fallback_tokens += T
            self.stats_.extra["refreshed_tokens"] = self.stats_.extra.get("refreshed_tokens", 0) + outcome.refreshed
        elif outcome.passes[0] is Pass.LITTLE:
            self.stats_.little_tokens += T
        # the first position whose KV entries a little pass wrote since the last big pass (only the
        # refresh reads it; a forward asked to run the little pass alone does not count)
        if not (kv_refresh and outcome.passes == (Pass.LITTLE,) and only is None):
            self.little_from = None
        elif self.little_from is None or self.little_from >= start:
            # a model with a recurrent state can recompute only positions whose state was kept,
            # a decoded token's (Executor.run): a little prompt's positions stay little
            self.little_from = start if self.state is None or T == 1 else start + T
        self.length = start + T
        return outcome

    def _refresh(self, ids: torch.Tensor, start: int, limit: int):
        """A KV refresh's input, made if the token falls back: it and the accepted little tokens
        before it, at most `limit` of them, for one big pass that overwrites their KV entries."""
        def refresh() -> tuple[StepContext, torch.Tensor, int]:
            assert self.little_from is not None
            first = max(self.little_from, start - limit)
            ctx, tokens = self._context(self.ids[first:start + ids.shape[0]].to(self.device), first, last_only=True)
            return ctx, tokens, start - first

        return refresh

    def _context(self, ids: torch.Tensor, start: int, last_only: bool = False) -> tuple[StepContext, torch.Tensor]:
        """The context and token tensor of a forward over positions [start, start + len(ids)).
        last_only: logits of the last position only."""
        T = ids.shape[0]
        if start + T > self.kv.capacity:
            self.kv.ensure(start + T)
        if self.static is not None:
            kv_len = kv_bucket(start + T, self.kv.capacity)  # a power of two (mobile.runtime.graphs)
            if T > GRAPH_MAX_TOKENS:  # a prompt: eagerly
                return self.static.gathered(ids, start, kv_len if self.executor.compile else start + T, last_only)
            # through the graph runner: the ids and positions written into the static state, and its
            # context for this bucket
            return self.static.load(ids, start, kv_len, last_only)
        positions, cos, sin = (t[start:start + T] for t in self._tables())
        kv_len = self.kv.capacity if self.executor.compile else start + T
        ctx = StepContext(positions=positions, cos=cos, sin=sin, kv_len=kv_len, last_only=last_only,
                          # compiled code always masks: one graph for every position
                          all_visible=T == 1 and kv_len == start + 1 and not self.executor.compile)
        return ctx, ids.to(self.device)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions and their rope tables (cos, sin) for the whole KV capacity, made once per
        capacity (once, for a preallocated cache): a forward slices them, a static one indexes them
        on the device."""
        if self.tables is None or self.tables[0].numel() < self.kv.capacity:
            with torch.inference_mode(False):  # ordinary tensors, as the KV cache's (see mobile.runtime.kv)
                every = torch.arange(self.kv.capacity, device=self.device)
                self.tables = (every, *rope_tables(every, self.inv_freq, self.rope_scale, self.rope_interleaved))
                # they grow with the KV cache: compiled code must not specialize on their length
                for t in self.tables if self.executor.compile else ():
                    torch._dynamo.maybe_mark_dynamic(t, 0)
        return self.tables

    def _limit_name(self) -> str:
        """What bounds a sequence: the model's context, or a shorter runtime.max_seq_len."""
        return "max_position_embeddings" if self.max_seq_len == self.spec.model.max_position_embeddings \
            else "runtime.max_seq_len"

    def check_ids(self, input_ids, key: str | None = None) -> torch.Tensor:
        """A prompt as a LongTensor [T], or a MobileError (naming `key`, the flag it came from):
        non-empty, 1-D, every id in the vocabulary, and no longer than the model's context."""
        try:
            ids = torch.as_tensor(input_ids, dtype=torch.long)
        except (OverflowError, RuntimeError, TypeError, ValueError) as e:
            raise MobileError(f"expected token ids, got {input_ids!r:.80}: {e}", key=key) from None
        if ids.dim() != 1 or ids.numel() == 0:
            raise MobileError(f"expected a non-empty 1-D sequence of token ids, got shape {list(ids.shape)}", key=key)
        vocab, context = self.spec.model.vocab_size, self.max_seq_len
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise MobileError(f"token ids must lie in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}", key=key)
        if ids.numel() > context:
            limit = f"the model's context of {context} (model.max_position_embeddings)" \
                if self._limit_name() == "max_position_embeddings" else f"runtime.max_seq_len={context}"
            raise MobileError(f"the prompt has {ids.numel()} tokens, more than {limit}", key=key)
        return ids

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """Prefill forward of one sequence: LongTensor [T] -> FloatTensor [T, vocab]."""
        ids = self.check_ids(input_ids)
        t0 = time.perf_counter()
        out = self._forward(ids, 0)
        self.stats_.prefill_tokens += ids.numel()
        self.stats_.prefill_s += time.perf_counter() - t0
        logits = self.reader.tensor(out).float()
        # a graph's output buffer is overwritten by its next run: the caller gets its own copy
        return logits.clone() if self.graphs is not None and logits.data_ptr() == out.data_ptr() else logits

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens: int = 32, greedy: bool = True, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, stop_ids=None, on_token=None,
                 forced=None) -> list[int]:
        """Prefill the prompt, then decode up to max_new_tokens. Returns the new token ids only
        (a stop token that ends generation is included). on_token(token) sees each new token as it
        is made; when it returns True, generation ends there (stats: stopped: callback), with the
        run's statistics complete and the engine ready for the next call (a server's stop strings
        and cancelled requests). forced: teacher-forced decoding, for benchmarks: step i feeds
        forced[i] instead of a sampled token, so every policy runs the same tokens.

        Ctrl-C (KeyboardInterrupt) ends generation with its statistics complete (stopped:
        interrupted) and raises GenerationInterrupted, which carries the tokens made so far.
        Non-finite logits raise a RunError naming the first layer whose weights are not finite."""
        ids = self.check_ids(input_ids)
        if max_new_tokens < 0:
            raise MobileError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if forced is not None and len(forced) < max_new_tokens:
            raise MobileError(f"teacher-forced decoding of {max_new_tokens} tokens needs as many forced tokens, "
                              f"got {len(forced)}")
        sampler = Sampler(greedy=greedy, temperature=temperature, top_p=top_p, seed=seed, device=self.device)
        stops = set(self.default_stop_ids() if stop_ids is None else stop_ids)

        def next_token(fed: torch.Tensor, start: int, i: int, last_only: bool = False) -> int:
            """Run the fed tokens; the i-th new token: sampled, or the i-th forced one."""
            if forced is None:
                return self._next_token(fed, start, sampler, last_only)
            self._forward(fed, start, last_only=last_only)
            return int(forced[i])

        new: list[int] = []
        before: dict[str, float] | None = None  # the counters when decoding began
        context = self.max_seq_len  # the model's context, or a shorter runtime.max_seq_len
        stopped = "max_new_tokens"
        t0 = time.perf_counter()
        try:
            token = next_token(ids, 0, 0, last_only=True)  # the prompt's next token
            self.stats_.prefill_tokens += ids.numel()
            self.stats_.prefill_s += time.perf_counter() - t0
            self.experts.settle()  # the prompt's statistics are complete before decoding is counted
            before = self._decode_counters()
            t0 = time.perf_counter()
            while max_new_tokens:
                new.append(token)
                if on_token is not None and on_token(token):
                    stopped = "callback"
                    break
                if token in stops:
                    stopped = "stop_token"
                    break
                if len(new) >= max_new_tokens:
                    break
                if self.length >= context:  # the next token would need position `context`: keep what was made
                    stopped = "context"
                    break
                step, reads = time.perf_counter(), self.reader.reads
                replays = self.graphs.replays if self.graphs is not None else 0
                token = next_token(torch.tensor([token]), self.length, len(new))
                if self.executor.compile and not self.decode_compiled:
                    # torch.compile traces and compiles the decode step on its first call (tens of seconds):
                    # that step (its time, its token, its host reads) is reported apart, not as decoding
                    self.decode_compiled = True
                    self.stats_.extra["compile_step_s"] = time.perf_counter() - step
                    t0 += time.perf_counter() - step
                    before["decode_host_syncs"] += self.reader.reads - reads
                    if self.graphs is not None:
                        before["decode_graph_replays"] += self.graphs.replays - replays
                    continue
                self.stats_.decode_tokens += 1
        except KeyboardInterrupt:
            stopped = "interrupted"  # what was made so far, with its statistics, is the caller's
        if before is not None:
            self.stats_.decode_s += time.perf_counter() - t0
        self.experts.settle()  # bookkeeping that decoding left for later (outside the timed loop)
        extra = self.stats_.extra
        extra["stopped"] = stopped  # stop_token, max_new_tokens, context, callback or interrupted
        if before is not None:
            for key, value in self._decode_counters().items():
                extra[key] = extra.get(key, 0) + value - before.get(key, 0)
        extra["decode_s"] = self.stats_.decode_s
        # host reads of device values per decoded token: one per MoE layer and the sampled token,
        # more when a gate can fire or a prompt-sized step runs in rounds (mobile.runtime.hostio)
        decoded = self.stats_.decode_tokens
        extra["host_syncs_per_token"] = extra.get("decode_host_syncs", 0) / decoded if decoded else None
        if stopped == "interrupted":
            raise GenerationInterrupted(new)
        return new

    def _nonfinite(self, position: int) -> RunError:
        """The error that ends a run whose logits are not finite, with where the weights first are not."""
        where = first_nonfinite_weight(self.spec, self.kernels.w, self.experts)
        cause = (f"the first weights that are not finite are in {where}" if where is not None else
                 f"every weight is finite, so an activation left {self.spec.dtype}'s range")
        return RunError(f"the logits after position {position} are NaN or infinite: {cause}", where=self.store.dir)

    def _decode_counters(self) -> dict[str, float]:
        """Running totals whose decode-phase share is reported apart, under these keys (prefill
        traffic is a different regime)."""
        s = self.stats_
        counters = {"decode_bytes_h2d": s.bytes_h2d, "decode_stall_s": s.stall_s,
                    "decode_host_syncs": self.reader.reads}
        if self.graphs is not None:
            counters["decode_graph_replays"] = self.graphs.replays
        if "big_only_bytes_h2d" in s.extra:  # kept by offloading expert sets only
            counters["decode_big_only_bytes_h2d"] = s.extra["big_only_bytes_h2d"]
        return counters

    def default_stop_ids(self) -> list[int]:
        return read_eos_ids(self.store.dir)

    def reset_stats(self) -> None:
        self.stats_.reset()
        self.experts.reset_counters()
        if self.graphs is not None:
            self.graphs.reset_counters()
