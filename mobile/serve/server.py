"""The server process: a bound socket, the engine worker, the app, and uvicorn around them.

SIGINT or SIGTERM drains: uvicorn stops accepting connections, lets the requests in flight
finish for up to drain_timeout_s, then cuts the rest (their jobs end at the engine's next
token), stops the engine worker, and `run` returns.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
import threading

import uvicorn

from mobile.errors import MobileError
from mobile.runtime.tokenizer import load_tokenizer
from mobile.serve.app import create_app
from mobile.serve.protocol import ModelInfo
from mobile.serve.scheduler import EngineWorker


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_timeout_s: float | None):
        super().__init__(config)
        self.drain_timeout_s = drain_timeout_s

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            limit = "" if self.drain_timeout_s is None else f", or are cut after {self.drain_timeout_s:g} s"
            print(f"mobile: {signal.Signals(sig).name}: draining (requests in flight finish{limit}; Ctrl-C again "
                  "to force)", file=sys.stderr, flush=True)
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the engine loads: a taken port fails fast, in one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise MobileError(f"cannot resolve {host!r}: {e.strerror}", key="--host") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise MobileError(f"cannot listen on {host}:{port}: {e.strerror}", key="--port") from None
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Service:
    """load_engine: makes the Engine (called in the engine's worker thread). max_queue: requests that
    may wait while one runs; past it, 429. drain_timeout_s: None waits for every request in flight."""

    def __init__(self, load_engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 max_queue: int = 8, drain_timeout_s: float | None = 30.0):
        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.worker = EngineWorker(load_engine, max_queue)
        try:
            engine = self.worker.start()
            self.model = model_info(engine)
        except BaseException:
            self.worker.close(1.0)
            self.sock.close()
            raise
        app = create_app(self.worker, self.model, api_key=api_key)
        # uvicorn types the drain timeout as an int; it only reaches asyncio.wait_for, which takes a float
        config = uvicorn.Config(app, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=drain_timeout_s)  # type: ignore[arg-type]
        self.server = DrainingServer(config, drain_timeout_s)
        if not is_loopback(host) and api_key is None:
            print(f"mobile: warning: listening on {host} without --api-key: whoever reaches this port can use it",
                  file=sys.stderr)

    @property
    def engine(self):
        """For tests and reports only: the worker thread owns it (and replaces it if it breaks)."""
        return self.worker.engine

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until SIGINT / SIGTERM (or `stop()`), drain, return."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            # uvicorn takes these signals while it serves; once it has drained it restores the
            # handlers it found and raises the signal again through them. The ones found are these,
            # which only ask for an exit, so that a drained server returns (exit 0) instead of being
            # killed by SIGTERM or raising KeyboardInterrupt on SIGINT.
            previous = {sig: signal.signal(sig, lambda *_: self.stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.server.run(sockets=[self.sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.sock.close()

    def stop(self) -> None:
        """What a signal does, from any thread."""
        self.server.should_exit = True


def model_info(engine) -> ModelInfo:
    try:
        # the event loop's own (the worker's engine has another), with what chat templates need
        tokenizer = load_tokenizer(engine.store.dir, full=True)
    except MobileError:
        raise MobileError("mobile serve needs a tokenizer in the checkpoint folder (tokenizer.json or "
                          "tokenizer.model)", where=engine.store.dir) from None
    m = engine.spec.model
    # the longest sequence the engine holds: the model's context, or a shorter runtime.max_seq_len
    return ModelInfo(name=engine.graph.name, context=engine.max_seq_len, vocab=m.vocab_size,
                     eos_ids=tuple(engine.default_stop_ids()), tokenizer=tokenizer)
