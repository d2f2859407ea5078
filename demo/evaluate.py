#!/usr/bin/env python3
"""Evaluate the demo checkpoint with plain transformers (no training code involved).

 * loads demo/checkpoint with AutoTokenizer + OlmoeForCausalLM.from_pretrained
 * held-out perplexity, teacher-forced, non-overlapping windows of --ctx tokens
   (each window predicts its tokens 1..ctx-1; same windows as demo/train.py),
   for demo/data/heldout_kjv.txt, heldout_py.txt and both together
 * greedy and sampled generations for a KJV and a Python prompt

    python demo/evaluate.py [--checkpoint demo/checkpoint] [--dtype float32] [--json out.json]
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
EOT = "<|endoftext|>"


def windows_of(tok, path, ctx):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    eot = tok.convert_tokens_to_ids(EOT)
    ids = []
    for i, doc in enumerate(text.split("\n" + EOT + "\n")):
        if i:
            ids.append(eot)
        ids.extend(tok(doc, add_special_tokens=False)["input_ids"])
    n = len(ids) // ctx
    w = [ids[i * ctx:(i + 1) * ctx] for i in range(n)]
    if len(ids) - n * ctx >= 2:
        w.append(ids[n * ctx:])
    return w, len(ids), len(text.encode())


@torch.no_grad()
def nll_of(model, windows, bs=16):
    nll, n, correct, maxp, conf = 0.0, 0, 0, 0.0, 0
    for i in range(0, len(windows), bs):
        group = windows[i:i + bs]
        same = [w for w in group if len(w) == len(group[0])]
        for batch in ([same] if len(same) == len(group) else [[w] for w in group]):
            x = torch.tensor(batch)
            logits = model(input_ids=x).logits.float()
            lg, tgt = logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
            nll += F.cross_entropy(lg, tgt, reduction="sum").item()
            n += tgt.numel()
            p = lg.softmax(-1).max(-1)
            correct += (p.indices == tgt).sum().item()
            maxp += p.values.sum().item()
            conf += (p.values > 0.5).sum().item()
    return nll, n, {"top1_acc": correct / n, "mean_max_prob": maxp / n, "frac_max_prob_gt_0.5": conf / n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=os.path.join(HERE, "checkpoint"))
    ap.add_argument("--data-dir", default=os.path.join(HERE, "data"))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--no-samples", action="store_true")
    ap.add_argument("--json", default="")
    ap.add_argument("--train-sample", action="store_true",
                    help="also report loss on the first 160 KB of each training domain (generalization gap)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer, OlmoeForCausalLM
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    model = OlmoeForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype))
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {args.checkpoint}: {n_params:,} params, dtype {args.dtype}, "
          f"experts impl {model.config._experts_implementation}")

    res = {"params": n_params, "dtype": args.dtype, "ctx": args.ctx}
    tn, tc = 0.0, 0
    for dom in ("kjv", "py"):
        t0 = time.time()
        w, ntok, nbytes = windows_of(tok, os.path.join(args.data_dir, f"heldout_{dom}.txt"), args.ctx)
        nll, n, st = nll_of(model, w)
        tn, tc = tn + nll, tc + n
        res[dom] = {"tokens": ntok, "bytes": nbytes, "predicted": n, "loss": nll / n,
                    "ppl": math.exp(nll / n), "bits_per_byte": nll / math.log(2) / nbytes, **st}
        print(f"held-out {dom}: {ntok:,} tokens, loss {nll / n:.4f}, ppl {math.exp(nll / n):.2f}, "
              f"{res[dom]['bits_per_byte']:.3f} bits/byte, top-1 acc {st['top1_acc']:.3f}, "
              f"mean max-prob {st['mean_max_prob']:.3f}, max-prob>0.5 on {st['frac_max_prob_gt_0.5']:.3f} "
              f"({time.time() - t0:.0f}s)")
    res["overall"] = {"loss": tn / tc, "ppl": math.exp(tn / tc)}
    print(f"held-out overall: loss {tn / tc:.4f}, ppl {math.exp(tn / tc):.2f}")

    if args.train_sample:
        import tempfile
        with open(os.path.join(args.data_dir, "train.txt"), encoding="utf-8") as f:
            train = f.read()
        first_py = train.index("\n" + EOT + "\n", train.index("Phmn1:25"))
        for dom, text in (("train_kjv", train[:160_000]), ("train_py", train[first_py + 15:first_py + 15 + 160_000])):
            with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
                f.write(text)
            w, ntok, nbytes = windows_of(tok, f.name, args.ctx)
            os.unlink(f.name)
            nll, n, st = nll_of(model, w)
            res[dom] = {"tokens": ntok, "loss": nll / n, "ppl": math.exp(nll / n), **st}
            print(f"{dom} (first 160 KB, trained on): ppl {math.exp(nll / n):.2f}, top-1 acc {st['top1_acc']:.3f}")

    if not args.no_samples:
        res["samples"] = []
        for prompt in ("In the beginning", "def "):
            # Documents in the corpus start right after <|endoftext|>, so prompts do too.
            # A trailing space is left for the model to generate: byte-level BPE merges the
            # space into the next word (" name"), so a lone trailing " " token is unnatural.
            p = prompt.rstrip(" ")
            x = tok(EOT + p, return_tensors="pt", add_special_tokens=False)
            for mode, kw in (("greedy", dict(do_sample=False)),
                             ("greedy, repetition_penalty=1.3", dict(do_sample=False, repetition_penalty=1.3)),
                             ("sampled, T=0.8, top_p=0.95, seed 0",
                              dict(do_sample=True, temperature=0.8, top_p=0.95))):
                torch.manual_seed(0)
                out = model.generate(**x, max_new_tokens=args.max_new_tokens, pad_token_id=tok.eos_token_id, **kw)
                text = tok.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=False)
                res["samples"].append({"prompt": prompt, "mode": mode, "text": p + text})
                print(f"\n--- prompt {prompt!r}, {mode}:\n{p}{text}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
