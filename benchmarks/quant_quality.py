"""Quality of quantized experts on the demo model: lru (big experts) and mobile at its defaults, at
each expert format, against native big decoding, on each text.

    python benchmarks/texts.py /tmp/texts
    python benchmarks/quant_quality.py \
        --texts demo/data/heldout_kjv.txt,demo/data/heldout_py.txt,/tmp/texts/licenses.txt \
        [--formats native,int8,int4] [--group-size 64] [--max-tokens 10000] [--out quality.json]

Every position is a decode step (mobile/tools/evaluate.py). Both policies run with the graph's expert
cache over a fast emulated link and no speculative copies, so "bytes/tok" is what moved: at the
same cache budget, a packed format holds more experts and moves fewer bytes per miss. lru at
native is big decoding itself (agreement 1). Asserts nothing; prints one table per text.
"""

from __future__ import annotations

import argparse
import json

from mobile.tools.evaluate import format_rows, run_eval


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graph", default="graphs/demo")
    p.add_argument("--texts", required=True, help="comma-separated text files")
    p.add_argument("--formats", default="native,int8,int4")
    p.add_argument("--group-size", type=int, help="int4/int8 group size (default: the format's)")
    p.add_argument("--max-tokens", type=int, default=10000)
    p.add_argument("--policies", default="lru,mobile")
    p.add_argument("--options", default="", help="mobile policy fields for the mobile rows, e.g. 'layer_tau=0.85'")
    p.add_argument("--out", help="write every row as JSON here")
    args = p.parse_args()
    mobile_opts = {k: float(v) for k, v in (kv.split("=") for kv in args.options.split(",") if kv)}
    results = {}
    for text in args.texts.split(","):
        configs = [(f"{name} {fmt}", {"name": name, "offloaded": True, "expert_format": fmt,
                                      "expert_group_size": None if fmt == "native" else args.group_size,
                                      **(mobile_opts if name == "mobile" else {})})
                   for fmt in args.formats.split(",") for name in args.policies.split(",")]
        rows = run_eval(args.graph, text, configs, max_tokens=args.max_tokens)
        print(f"\n{text} ({rows[0]['tokens']} tokens; agreement is with native big decoding)")
        print(format_rows(rows))
        results[text] = rows
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
