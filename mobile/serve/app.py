"""The HTTP layer: OpenAI's endpoints over a Scheduler, on FastAPI.

    GET  /health                 200 {"status": "ok"} (no key needed)
    GET  /v1/models              the one model, named after the graph
    POST /v1/completions         prompt -> text, whole or streamed (Server-Sent Events)
    POST /v1/chat/completions    messages -> a reply, whole or streamed
    GET  /v1/stats               the whole server's engine statistics and queue

Everything under /v1 needs `Authorization: Bearer KEY` when the server has a key. Every response
carries mobile's statistics for its request in an extra "mobile" field (a stream: in its last
chunk with choices), which OpenAI's clients ignore.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from mobile.runtime.detokenize import TextStream
from mobile.serve.protocol import (
    APIError,
    GenerationRequest,
    ModelInfo,
    Reply,
    parse_chat,
    parse_completion,
    parse_json,
    sse,
    usage,
)
from mobile.serve.scheduler import Done, Failed, Job, QueueFull, Scheduler, Token, with_hit_rate

CLOSE_TIMEOUT_S = 10.0  # at shutdown, how long to wait for the engine to end its current token


class Run:
    """One request on the event loop: its job's events through its text stream."""

    def __init__(self, request: GenerationRequest, scheduler: Scheduler, tokenizer):
        self.request, self.scheduler = request, scheduler
        self.job = Job(request.prompt_ids, request.max_tokens, request.sampling, request.stop_ids)
        self.text = TextStream(tokenizer, request.stop_strings, request.stop_ids)
        self.first_token_s: float | None = None
        self.finish_reason: str | None = None  # set when the pieces end
        self.stats: dict = {}
        self.over = False  # the job has ended (Done or Failed came): nothing to stop

    async def pieces(self) -> AsyncIterator[str]:
        """The text as it becomes final; raises APIError(500) when the engine fails."""
        while True:
            event = await self.job.events.get()
            if isinstance(event, Token):
                if self.text.done:
                    continue  # made after a stop string had ended the text: not part of it
                if self.first_token_s is None:
                    self.first_token_s = time.monotonic()
                piece = self.text.push(event.id)
                if self.text.done:
                    self.scheduler.stop(self.job, "stop")  # a stop string: the engine ends at its next token
                if piece:
                    yield piece
            elif isinstance(event, Done):
                self.over = True
                if tail := self.text.finish():
                    yield tail
                # the model's stop token or a stop string: "stop"; max_tokens or the context: "length"
                self.finish_reason = "stop" if self.text.done or event.stopped == "stop_token" else "length"
                self.stats = event.stats
                return
            elif isinstance(event, Failed):
                self.over = True
                raise APIError(500, f"the engine failed on this request: {event.message}", code="engine_error")

    def cancel(self) -> None:
        if not self.over:
            self.scheduler.stop(self.job, "cancelled")

    def usage(self) -> dict:
        return usage(len(self.request.prompt_ids), self.text.tokens)

    def mobile(self) -> dict:
        """mobile's statistics for this request: the engine's, and the server's timings."""
        job = self.job
        waited = None if job.started is None else job.started - job.submitted
        first = None if self.first_token_s is None else self.first_token_s - job.submitted
        return {**with_hit_rate(self.stats), "queue_s": waited, "time_to_first_token_s": first}


async def disconnected(request: Request) -> None:
    """Returns when the client goes away (after the body, the server's next message is a disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    pass


async def unless_disconnected(request: Request, work):
    """Await `work`, unless the client leaves first: then cancel it and raise ClientGone."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request is cancelled (a drain that timed out)
        watch.cancel()
        task.cancel()  # a no-op when it is done
    if task not in done:
        raise ClientGone
    return task.result()


class JobStream(StreamingResponse):
    """A stream whose job ends with it, however it ends (finished, failed, the client gone, cut by a
    drain), even when the stream's generator never started."""

    def __init__(self, run: Run, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.cancel()  # a no-op when the job has ended


def create_app(scheduler: Scheduler, model: ModelInfo, api_key: str | None = None) -> FastAPI:
    """api_key: the bearer token every /v1 request must carry (None: no key)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn has drained (or cut) the requests: stop the engine worker
        await asyncio.to_thread(scheduler.close, CLOSE_TIMEOUT_S)

    app = FastAPI(title="mobile", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    refused: dict[int, int] = {}  # answers with an error status, by status

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        refused[e.status] = refused.get(e.status, 0) + 1
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown paths, wrong methods
        return await api_error(request, APIError(e.status_code, str(e.detail), headers=dict(e.headers or {})))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:  # uvicorn logs its traceback too
        return await api_error(request, APIError(500, f"internal error: {type(e).__name__}: {e}"))

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model.name}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])
    card = {"id": model.name, "object": "model", "created": int(time.time()), "owned_by": "mobile"}

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @v1.get("/models/{name}")
    async def one_model(name: str) -> dict:
        if name != model.name:
            raise APIError(404, f"unknown model {name!r}; this server serves {model.name!r}", code="model_not_found")
        return card

    @v1.get("/stats")
    async def stats() -> dict:
        return {"model": model.name, **scheduler.stats(), "refused": {str(k): v for k, v in sorted(refused.items())}}

    async def generate(request: Request, parse) -> Response:
        req = parse(parse_json(await request.body()), model)
        run = Run(req, scheduler, model.tokenizer)
        try:
            scheduler.submit(run.job)
        except QueueFull as e:
            raise APIError(429, f"{e}; retry after {e.retry_after_s} s", code="queue_full",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        reply = Reply(req.kind, model.name)
        pieces = run.pieces()

        async def whole() -> str:
            return "".join([p async for p in pieces])

        try:
            if not req.stream:
                text = await unless_disconnected(request, whole())
                return JSONResponse(reply.body(text, run.finish_reason, run.usage(), run.mobile()))
            # the status goes out with the first piece, so that a failure before it is still a 500
            first = await unless_disconnected(request, anext(pieces, None))
        except ClientGone:
            run.cancel()
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        except BaseException:
            run.cancel()  # a no-op when the job has ended (a failure)
            raise
        return JobStream(run, events(run, reply, pieces, first))

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, parse_completion)

    @v1.post("/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, parse_chat)

    app.include_router(v1)
    return app


async def events(run: Run, reply: Reply, pieces: AsyncIterator[str], first: str | None) -> AsyncIterator[str]:
    """The stream's events: chunks, the last with finish_reason and mobile's stats, then [DONE]. A
    client that leaves ends it at its next await, and its job at the engine's next token (JobStream)."""
    try:
        if reply.kind == "chat":
            yield sse(reply.chunk(None, first=True))
        if first is not None:
            yield sse(reply.chunk(first))
            async for piece in pieces:
                yield sse(reply.chunk(piece))
        yield sse(reply.chunk(None, run.finish_reason, mobile=run.mobile()))
        if run.request.include_usage:
            yield sse(reply.usage_chunk(run.usage()))
    except APIError as e:  # the engine failed after the status went out: say so in the stream
        yield sse(e.body())
    yield sse("[DONE]")
