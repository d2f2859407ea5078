"""Load on `mobile serve`: time to first token and tokens/s per stream at 1, 4, ... concurrent clients.

    python benchmarks/serve_load.py --graph graphs/demo [--clients 1,4] [--requests 3] [--max-tokens 64]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 ...      # a server already running

With --graph it starts `mobile serve` on a free 127.0.0.1 port and stops it (SIGTERM) at the end.
Each client sends --requests streamed completions one after another (greedy, --max-tokens each,
past the model's end token), prompts taken in turn from PROMPTS; one warm-up request runs first.
Per request: time to first token (from sending to the first text chunk: queueing, prefill and the
first token), tokens/s of the stream after its first token as the client receives it, and the
engine's own decode tokens/s for the request (its "mobile" statistics: the cost of HTTP apart).
The server runs one request at a time, so with 4 clients a request mostly waits: time to first
token grows with the queue and the aggregate tokens/s stays about that of one stream. Asserts
nothing; prints one table.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import threading
import time

import httpx

PROMPTS = ["In the beginning God created", "And the LORD spake unto Moses, saying", "def read_config(path):",
           "Blessed are the", "import os\nimport sys\n\n\ndef main():", "And it came to pass"]


def stream_once(url: str, model: str, prompt: str, max_tokens: int, key: str | None, timeout: float) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    t0 = time.perf_counter()
    first = last = None
    tokens, engine_rate = 0, float("nan")
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if "mobile" in chunk:  # the engine's own decode rate for this request, without HTTP
                engine_rate = chunk["mobile"]["decode_tokens_per_s"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = first or time.perf_counter()
                last = time.perf_counter()
    if first is None or last is None:
        raise RuntimeError(f"the stream for {prompt!r} carried no text")
    return {"ttft_s": first - t0, "tokens": tokens,
            "tokens_per_s": (tokens - 1) / (last - first) if last > first else float("nan"),
            "engine_tokens_per_s": engine_rate}


def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int, key: str | None,
              timeout: float) -> dict:
    results: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        try:
            for r in range(requests):
                out = stream_once(url, model, PROMPTS[(c + r * clients) % len(PROMPTS)], max_tokens, key, timeout)
                with lock:
                    results.append(out)
        except BaseException as e:  # noqa: B036 - reported after the level
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    ttft = [r["ttft_s"] for r in results]
    rates = [r["tokens_per_s"] for r in results]
    return {"clients": clients, "requests": len(results), "ttft_median_s": statistics.median(ttft),
            "ttft_max_s": max(ttft), "stream_tokens_per_s_median": statistics.median(rates),
            "engine_tokens_per_s_median": statistics.median(r["engine_tokens_per_s"] for r in results),
            "aggregate_tokens_per_s": sum(r["tokens"] for r in results) / wall}


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "mobile.cli", *(["--threads", str(args.threads)] if args.threads else []),
           "serve", "--graph", args.graph, "--port", "0", "--max-queue", str(max(args.clients_list) + 1),
           *args.serve_args.split()]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if "serving" in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, line.split(" at ")[1].split("/v1")[0]
    proc.kill()
    raise SystemExit(f"mobile serve did not start: {line.strip()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--graph", help="start `mobile serve --graph DIR` for the run")
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--clients", default="1,4", help="comma-separated concurrency levels (default 1,4)")
    ap.add_argument("--requests", type=int, default=3, help="requests per client per level (default 3)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    ap.add_argument("--threads", type=int, help="with --graph: `mobile --threads N serve` (torch CPU threads)")
    ap.add_argument("--serve-args", default="", help="with --graph: more `mobile serve` options, e.g. '--policy lru'")
    ap.add_argument("--api-key", help="the server's key, if it has one")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    args.clients_list = [int(c) for c in args.clients.split(",")]
    proc, url = start_server(args) if args.graph else (None, args.url.rstrip("/"))
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = httpx.get(f"{url}/v1/models", headers=headers, timeout=args.timeout).json()["data"][0]["id"]
        stream_once(url, model, PROMPTS[0], 8, args.api_key, args.timeout)  # warm-up
        rows = [run_level(url, model, c, args.requests, args.max_tokens, args.api_key, args.timeout)
                for c in args.clients_list]
        engine = httpx.get(f"{url}/v1/stats", headers=headers, timeout=args.timeout).json()["engine"]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print(f"{model}, {args.max_tokens} tokens per request, link {engine['link']}")
    print("| clients | requests | time to first token, median (max) | tokens/s per stream, median | "
          "the engine's decode tokens/s, median | aggregate tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ttft = f"{r['ttft_median_s'] * 1e3:.0f} ms ({r['ttft_max_s'] * 1e3:.0f} ms)"
        print(f"| {r['clients']} | {r['requests']} | {ttft} | {r['stream_tokens_per_s_median']:.1f} "
              f"| {r['engine_tokens_per_s_median']:.1f} | {r['aggregate_tokens_per_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
