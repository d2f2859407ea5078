"""The `mobile` command line.

    mobile compile SPEC.yaml [-o DIR]        spec -> scheduled graph + dumps (needs no weights)
    mobile run --graph DIR --prompt TEXT     generate text with a compiled graph
    mobile serve --graph DIR [--port 8000]   an OpenAI-compatible HTTP server (needs the serve extra)
    mobile import-hf DIR [-o FILE]           write a spec from a Hugging Face config.json
    mobile bench --graph DIR --policies ...  compare policies side by side (tokens/s, bytes, stalls)
    mobile eval --graph DIR --data FILE      quality of a policy on held-out text, next to big experts
    mobile profile --graph DIR --text FILE -o FILE   how often each expert is routed to (hybrid-static's hot sets)
    mobile synth SPEC -o DIR [--layers N]    random weights at a spec's real shapes, for benchmarks
    mobile quantize CKPT -o DIR --format F   a copy of a checkpoint with int8 / int4 routed experts

Errors a user can fix print one line, `mobile: error: FILE: KEY: what was expected`, and exit 2;
a run that cannot go on (non-finite logits, a failed worker thread) prints one line and exits 1;
Ctrl-C exits 130. --debug shows the traceback instead.

    __init__.py   main: parse, run the command, turn its errors into one line and an exit code
    parser.py     each command's flags
    options.py    the flags several commands share, each declared once (the policy's from PolicySpec)
    commands.py   what each command does
"""

from __future__ import annotations

import os
import sys

from mobile.cli.parser import build_parser
from mobile.errors import MobileError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            import torch  # inside the try: Ctrl-C while torch imports ends as cleanly as later

            torch.set_num_threads(args.threads)
        return args.fn(args)
    except MobileError as e:
        if args.debug:
            raise
        hint = " (--debug shows where)" if e.__cause__ is not None and e.exit_code == 1 else ""
        print(f"mobile: error: {e.one_line()}{hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mobile: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`mobile compile ... | head`): stop quietly, as shell tools do;
        # stdout now points nowhere, so the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
