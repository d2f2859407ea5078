"""`mobile serve`: an OpenAI-compatible HTTP server over one engine.

The layers, from the socket inward:

    server.py     binds the socket, runs uvicorn, drains on SIGINT / SIGTERM
    app.py        the HTTP layer (FastAPI): endpoints, auth, Server-Sent Events, OpenAI-style errors
    protocol.py   request bodies -> validated GenerationRequest; response and chunk bodies
    chat.py       chat messages -> a prompt (the tokenizer's chat template, or a plain fallback)
    scheduler.py  the engine worker: a bounded queue and one thread that owns the Engine

Token ids become text deltas, cut at stop strings, in mobile.runtime.detokenize (on the event loop;
`mobile run` streams through it too). The HTTP layer talks to the scheduler only through `Job`
(token ids in; Token, Done and Failed events out, delivered on the event loop) and
`Scheduler.submit` / `Job.stop`. The scheduler knows nothing of text or HTTP, so a batching
scheduler can replace the serial queue behind the same interface.

Needs the `serve` extra: pip install -e '.[serve]'.
"""
