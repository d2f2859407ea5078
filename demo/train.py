#!/usr/bin/env python3
"""Train the demo MoE (OLMoE architecture, transformers) from scratch on the CPU.

Steps:
 1. train a byte-level BPE tokenizer on demo/data/train.txt (tokenizers library)
 2. build an OlmoeForCausalLM from an OlmoeConfig (fine-grained experts, top-4)
 3. train with AdamW, linear warmup + cosine decay, router aux loss on
 4. every --eval-every steps: held-out loss/ppl (KJV and Python), append to
    training_log.csv, and atomically replace the checkpoint (temp dir + rename),
    so the checkpoint directory is always complete and loadable.

The expert weights are the standard OlmoeExperts parameters; only the way the
experts are *computed* during training can be swapped (--impl) for speed:
  eager      transformers' own per-expert Python loop
  grouped_mm transformers' grouped_mm implementation
  sorted     tokens sorted by expert, one matmul per expert (bf16 under autocast)
  dense      every expert computed for every token as two big GEMMs, combined with
             the sparse top-k router weights (zero for unselected experts): the
             same function and gradients, more FLOPs, but far faster on a CPU
The saved checkpoint is plain OLMoE and loads with OlmoeForCausalLM.from_pretrained.

With --compile (default) the training forward goes through torch.compile (static shapes
with --impl dense), under bf16 autocast with fp32 master weights (--amp).

Reproduce the shipped checkpoint (see demo/README.md):
    python demo/build_corpus.py
    python demo/train.py --steps 3205
"""
import argparse
import csv
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
EOT = "<|endoftext|>"


# --------------------------------------------------------------------------- args
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ap.add_argument
    d("--data-dir", default=os.path.join(HERE, "data"))
    d("--out", default=os.path.join(HERE, "checkpoint"))
    d("--seed", type=int, default=1234)
    d("--threads", type=int, default=1, help="torch intra-op threads")
    # tokenizer
    d("--vocab-size", type=int, default=8192)
    # model
    d("--hidden", type=int, default=256)
    d("--layers", type=int, default=4)
    d("--heads", type=int, default=4)
    d("--experts", type=int, default=16)
    d("--top-k", type=int, default=4)
    d("--moe-intermediate", type=int, default=128)
    d("--ctx", type=int, default=256)
    d("--aux-coef", type=float, default=0.01)
    d("--tie-embeddings", action="store_true")
    # optimisation
    d("--batch", type=int, default=16, help="sequences per step")
    d("--lr", type=float, default=2e-3)
    d("--min-lr-frac", type=float, default=0.05)
    d("--warmup", type=int, default=200)
    d("--wd", type=float, default=0.1)
    d("--clip", type=float, default=1.0)
    d("--steps", type=int, default=0, help="total steps (0: estimate from --minutes)")
    d("--minutes", type=float, default=70.0, help="wall-clock budget used to estimate --steps when it is 0")
    d("--hard-minutes", type=float, default=0.0, help="hard stop (default 1.2 x --minutes)")
    d("--impl", default="dense", choices=["eager", "grouped_mm", "sorted", "dense"])
    d("--amp", default="bf16", choices=["bf16", "none"], help="autocast dtype (master weights fp32)")
    # eval / logging
    d("--eval-every", type=int, default=250)
    d("--eval-windows", type=int, default=0, help="max windows per domain in periodic evals (0=all)")
    d("--log-every", type=int, default=25)
    d("--compile", action=argparse.BooleanOptionalAction, default=True,
      help="torch.compile the training forward (needs a C++ compiler; ~1.45x faster)")
    d("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    d("--bench", type=float, default=0.0, help="only measure tok/s for this many seconds, no saving")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(train_path, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([train_path], trainer)
    from transformers import PreTrainedTokenizerFast
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT,
                                   unk_token=None, pad_token=EOT, model_max_length=None)
    return fast


def encode_file(tok, path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # encode document by document (documents are separated by EOT lines) -> ids stream
    eot = tok.convert_tokens_to_ids(EOT)
    ids = []
    docs = text.split("\n" + EOT + "\n")
    enc = tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    for i, e in enumerate(enc):
        if i:
            ids.append(eot)
        ids.extend(e.ids)
    return np.asarray(ids, dtype=np.int32), len(text.encode())


def eval_windows(ids, ctx):
    """Non-overlapping windows of ctx tokens; each window predicts its tokens 1..ctx-1."""
    n = len(ids) // ctx
    w = [ids[i * ctx:(i + 1) * ctx] for i in range(n)]
    if len(ids) - n * ctx >= 2:
        w.append(ids[n * ctx:])
    return w


# --------------------------------------------------------------------------- experts impls
def dense_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """All experts for all tokens, weighted by the (sparse) top-k router weights."""
    N, d = hidden_states.shape
    E, I2 = self.gate_up_proj.shape[0], self.gate_up_proj.shape[1]
    I = I2 // 2
    W = torch.zeros(N, E, dtype=top_k_weights.dtype, device=hidden_states.device)
    W = W.scatter(1, top_k_index, top_k_weights)                    # [N, E]
    # gate_up_proj: [E, 2I, d] -> x @ [d, E*2I]
    gu = F.linear(hidden_states, self.gate_up_proj.reshape(E * I2, d)).view(N, E, I2)
    gate, up = gu[..., :I], gu[..., I:]
    h = self.act_fn(gate) * up * W.unsqueeze(-1).to(gu.dtype)      # [N, E, I]
    # down_proj: [E, d, I] -> [E*I, d]
    down = self.down_proj.permute(0, 2, 1).reshape(E * I, d)
    return (h.reshape(N, E * I) @ down.to(h.dtype)).to(hidden_states.dtype)


def sorted_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    N, d = hidden_states.shape
    E = self.gate_up_proj.shape[0]
    k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    counts = torch.bincount(flat, minlength=E).tolist()
    x = hidden_states[tok]
    w = top_k_weights.reshape(-1)[order]
    outs, s = [], 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        gate, up = F.linear(x[s:s + c], self.gate_up_proj[e]).chunk(2, dim=-1)
        outs.append(F.linear(self.act_fn(gate) * up, self.down_proj[e]))
        s += c
    y = torch.cat(outs) * w[:, None].to(outs[0].dtype)
    out = torch.zeros(N, d, dtype=y.dtype, device=y.device).index_add_(0, tok, y)
    return out.to(hidden_states.dtype)


def set_impl(model, impl):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    ALL_EXPERTS_FUNCTIONS.register("demo_dense", dense_experts_forward)
    ALL_EXPERTS_FUNCTIONS.register("demo_sorted", sorted_experts_forward)
    name = {"dense": "demo_dense", "sorted": "demo_sorted"}.get(impl, impl)
    model.config._experts_implementation = name
    for m in model.modules():
        if hasattr(m, "config") and m.config is not model.config:
            m.config._experts_implementation = name


# --------------------------------------------------------------------------- model
def build_model(args, tok):
    from transformers import OlmoeConfig, OlmoeForCausalLM
    eot = tok.convert_tokens_to_ids(EOT)
    cfg = OlmoeConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, args.ctx),
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=False,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        tie_word_embeddings=args.tie_embeddings,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        rope_theta=10000.0,
    )
    torch.manual_seed(args.seed)
    model = OlmoeForCausalLM(cfg)
    return model


def count_params(model):
    total = sum(p.numel() for p in model.parameters())
    c = model.config
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    per_expert = expert // (c.num_experts * c.num_hidden_layers)
    active = total - expert + per_expert * c.num_experts_per_tok * c.num_hidden_layers
    return total, expert, active


# --------------------------------------------------------------------------- eval / save
def amp_ctx(args):
    if args.amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    import contextlib
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, windows, args, max_windows=0):
    model.eval()
    if max_windows:
        idx = np.linspace(0, len(windows) - 1, max_windows).round().astype(int)
        windows = [windows[i] for i in sorted(set(idx.tolist()))]
    nll, n = 0.0, 0
    full = [w for w in windows if len(w) == args.ctx]
    rest = [w for w in windows if len(w) != args.ctx]
    bs = 32
    batches = [np.stack(full[i:i + bs]) for i in range(0, len(full), bs)] + [w[None] for w in rest]
    for b in batches:
        x = torch.from_numpy(b.astype(np.int64))
        with amp_ctx(args):
            logits = model(input_ids=x, output_router_logits=False).logits
        lp = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                             x[:, 1:].reshape(-1), reduction="sum")
        nll += lp.item()
        n += x[:, 1:].numel()
    model.train()
    return nll, n


def save_checkpoint(model, tok, args, out_dir, extra):
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, "." + os.path.basename(out_dir) + f".tmp{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    # save a clean copy: standard experts implementation, chosen dtype
    impl = model.config._experts_implementation
    model.config._experts_implementation = "eager"
    sd_dtype = getattr(torch, args.save_dtype)
    state = {k: v.detach().to(sd_dtype) for k, v in model.state_dict().items()}
    model.config.dtype = args.save_dtype
    model.save_pretrained(tmp, state_dict=state)
    model.config._experts_implementation = impl
    tok.save_pretrained(tmp)
    cfg_path = os.path.join(tmp, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["dtype"] = args.save_dtype   # the dtype the weights are stored in
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    for fn in os.listdir(tmp):
        os.chmod(os.path.join(tmp, fn), 0o644)
    # the training curve travels with the checkpoint
    if os.path.exists(os.path.join(out_dir, "training_log.csv")) or extra.get("log_path"):
        shutil.copy(extra["log_path"], os.path.join(tmp, "training_log.csv"))
    with open(os.path.join(tmp, "training_info.json"), "w") as f:
        json.dump(extra["info"], f, indent=1)
        f.write("\n")
    # atomic swap: rename old away, rename new in, delete old
    old = None
    if os.path.exists(out_dir):
        old = os.path.join(parent, "." + os.path.basename(out_dir) + f".old{os.getpid()}")
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(out_dir, old)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old)


# --------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    train_path = os.path.join(args.data_dir, "train.txt")
    tok = train_tokenizer(train_path, args.vocab_size)
    train_ids, train_bytes = encode_file(tok, train_path)
    held = {}
    for dom in ("kjv", "py"):
        ids, nbytes = encode_file(tok, os.path.join(args.data_dir, f"heldout_{dom}.txt"))
        held[dom] = (eval_windows(ids, args.ctx), len(ids), nbytes)
    print(f"tokenizer: vocab {len(tok)}; train {len(train_ids):,} tokens "
          f"({train_bytes / len(train_ids):.2f} bytes/token); held-out kjv {held['kjv'][1]:,} "
          f"py {held['py'][1]:,} tokens  [{time.time() - t_start:.0f}s]", flush=True)

    model = build_model(args, tok)
    set_impl(model, args.impl)
    total, expert, active = count_params(model)
    print(f"model: {total:,} params ({expert:,} in experts), ~{active:,} active per token; "
          f"impl={args.impl} amp={args.amp} threads={args.threads}", flush=True)

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in n and "norm" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    rng = np.random.default_rng(args.seed)
    T, B = args.ctx, args.batch
    max_start = len(train_ids) - T - 1

    def get_batch():
        starts = rng.integers(0, max_start, size=B)
        x = np.stack([train_ids[s:s + T] for s in starts]).astype(np.int64)
        return torch.from_numpy(x)

    total_steps = args.steps
    deadline = t_start + args.minutes * 60
    hard_deadline = t_start + (args.hard_minutes or 1.2 * args.minutes) * 60

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        ts = max(total_steps, args.warmup + 1)
        p = min(1.0, (step - args.warmup) / (ts - args.warmup))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    os.makedirs(args.out, exist_ok=True) if not args.bench else None
    log_path = os.path.join(HERE, ".training_log.tmp.csv") if not args.bench else None
    if log_path:
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(["step", "tokens", "train_loss", "lr", "elapsed_s",
                                    "heldout_loss", "heldout_ppl", "kjv_ppl", "py_ppl"])

    def run_eval(step, tokens, train_loss, lr):
        res = {}
        tn, tc = 0.0, 0
        for dom in ("kjv", "py"):
            nll, n = evaluate(model, held[dom][0], args, args.eval_windows)
            res[dom] = math.exp(nll / n)
            tn += nll
            tc += n
        loss = tn / tc
        row = [step, tokens, f"{train_loss:.4f}", f"{lr:.2e}", f"{time.time() - t_start:.0f}",
               f"{loss:.4f}", f"{math.exp(loss):.2f}", f"{res['kjv']:.2f}", f"{res['py']:.2f}"]
        print(f"EVAL step {step} tokens {tokens:,} heldout loss {loss:.4f} ppl {math.exp(loss):.2f} "
              f"(kjv {res['kjv']:.2f}, py {res['py']:.2f})", flush=True)
        if args.bench:
            return
        with open(log_path, "a", newline="") as f:
            csv.writer(f).writerow(row)
        info = {"args": vars(args), "step": step, "tokens_seen": tokens, "total_steps": total_steps,
                "params_total": total, "params_experts": expert, "params_active": active,
                "train_tokens_in_corpus": int(len(train_ids)),
                "heldout": {"loss": loss, "ppl": math.exp(loss), "kjv_ppl": res["kjv"], "py_ppl": res["py"],
                            "windows_per_domain_cap": args.eval_windows},
                "torch": torch.__version__, "python": sys.version.split()[0]}
        import transformers
        info["transformers"] = transformers.__version__
        t0 = time.time()
        save_checkpoint(model, tok, args, args.out, {"log_path": log_path, "info": info})
        print(f"saved checkpoint to {args.out} ({time.time() - t0:.1f}s)", flush=True)

    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func
    cfg = model.config

    def forward_losses(x):
        # same as OlmoeForCausalLM.forward(labels=x) (loss = ce + coef * aux), but the
        # cross-entropy runs on a contiguous fp32 copy of the shifted logits (much faster on CPU)
        out = model.model(input_ids=x, output_router_logits=True)
        logits = model.lm_head(out.last_hidden_state[:, :-1])
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        aux = load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, None)
        return ce, aux

    loss_fn = forward_losses
    if args.compile:
        loss_fn = torch.compile(forward_losses)

    model.train()
    step, tokens = 0, 0
    ema = None
    t_loop = time.time()
    t_last, tok_last = t_loop, 0
    t10 = t_loop  # set for real at step 10; the step estimate reads it at step 30
    eval_time = 0.0
    while True:
        if total_steps and step >= total_steps:
            break
        now = time.time()
        if now > hard_deadline:
            print("hard wall-clock limit reached; stopping early", flush=True)
            break
        if args.bench and now - t_loop > args.bench:
            break
        if not total_steps and step == 30 and not args.bench:
            # estimate total steps from the measured speed (steps 10..30)
            sps = 20 / (now - t10)
            budget = deadline - now - 60
            est_evals = 1 + budget * sps / args.eval_every
            total_steps = step + int((budget - est_evals * 30) * sps)
            print(f"estimated total steps: {total_steps}", flush=True)
        if step == 10:
            t10 = time.time()
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        x = get_batch()
        with amp_ctx(args):
            ce_t, aux_t = loss_fn(x)
        loss = ce_t + args.aux_coef * aux_t
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        tokens += B * T
        ce = ce_t.item()
        ema = ce if ema is None else 0.95 * ema + 0.05 * ce
        if step % args.log_every == 0:
            t = time.time()
            print(f"step {step}/{total_steps} tokens {tokens:,} loss {ce:.4f} (ema {ema:.4f}) "
                  f"aux {aux_t.item():.3f} lr {lr:.2e} tok/s {(tokens - tok_last) / (t - t_last):.0f} "
                  f"elapsed {(t - t_start) / 60:.1f}m", flush=True)
            t_last, tok_last = t, tokens
        if step % args.eval_every == 0 and step != total_steps and not args.bench:
            te = time.time()
            run_eval(step, tokens, ema, lr)
            eval_time += time.time() - te
            t_last = time.time()
    wall = time.time() - t_loop
    print(f"trained {step} steps, {tokens:,} tokens in {wall / 60:.1f} min "
          f"({tokens / max(wall - eval_time, 1e-9):.0f} tok/s excluding {eval_time:.0f}s eval)", flush=True)
    if args.bench:
        if step:
            nll, n = evaluate(model, held["kjv"][0], args, 16)
            print(f"bench eval kjv(16 windows) ppl {math.exp(nll / n):.2f}")
        return
    # final: full held-out eval + save
    args.eval_windows = 0
    run_eval(step, tokens, ema if ema is not None else float("nan"), lr_at(step))
    os.remove(log_path)
    print(f"done in {(time.time() - t_start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
