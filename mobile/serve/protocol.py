"""OpenAI's wire format: request bodies -> a validated GenerationRequest, and the bodies of
responses, stream chunks and errors.

Validation is written out here, field by field, so that every refusal is a 400 naming the field
and what was expected, in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.
Fields the server cannot honour are refused when set to anything but their default, never
silently ignored; fields it does not know are ignored, as OpenAI's clients send extras.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from mobile.serve.chat import TemplateError, chat_prompt
from mobile.serve.scheduler import Sampling

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs to the context by default
MAX_SEED = 2**63 - 1
# honoured only at their default (None, False, 0, "", [], {} or the value given here)
UNSUPPORTED = {"echo": None, "logprobs": None, "top_logprobs": None, "best_of": 1, "suffix": None,
               "logit_bias": None, "frequency_penalty": None, "presence_penalty": None, "tools": None,
               "functions": None, "response_format": {"type": "text"}}
ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An error answered in OpenAI's shape. type follows the status: 400 invalid_request_error,
    401 authentication_error, 429 rate_limit_error (with Retry-After), 500 server_error."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"{param}: {message}" if param else message, param=param, code=code)


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know of the served model."""
    name: str
    context: int  # model.max_position_embeddings
    vocab: int
    eos_ids: tuple[int, ...]
    tokenizer: Any  # a transformers tokenizer, used on the event loop only (the engine's worker has its own)


@dataclass
class GenerationRequest:
    kind: str  # "completion" or "chat"
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop_strings: list[str] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)  # the model's end tokens (unless ignore_eos) and the request's
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(None, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


# -- one field at a time ------------------------------------------------------------------------
def number(body: dict, name: str, default, lo: float, hi: float | None = None, integer: bool = False,
           lo_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    bounds = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    ok = ok and not isinstance(value, bool) and value == value  # JSON true is not 1, NaN is no number
    ok = ok and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
    if not ok:
        raise bad(name, f"expected {kind} {bounds}, got {json.dumps(value)[:80]}")
    return value


def flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"expected true or false, got {json.dumps(value)[:80]}")
    return value


def token_ids(value, name: str, model: ModelInfo) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < model.vocab for t in value):
        raise bad(name, f"expected token ids in [0, {model.vocab}), got {json.dumps(value)[:80]}")
    return list(value)


def check_unsupported(body: dict) -> None:
    for name, default in UNSUPPORTED.items():
        value = body.get(name)
        if value not in (None, False, 0, "", [], {}, default):
            raise bad(name, f"not supported by mobile serve (got {json.dumps(value)[:80]}); leave it out")


def check_model(body: dict, model: ModelInfo) -> None:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise bad("model", f"expected the model's name, {model.name!r}")
    if name != model.name:
        raise bad("model", f"unknown model {name!r}; this server serves {model.name!r}", code="model_not_found")


def stops(body: dict, model: ModelInfo) -> tuple[list[str], list[int]]:
    """`stop`: a string, or a list of strings and token ids; `stop_token_ids` (vLLM's name): token ids."""
    value = body.get("stop")
    items = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str | int) and not isinstance(s, bool) for s in items):
        raise bad("stop", f"expected a string or a list of strings and token ids, got {json.dumps(value)[:80]}")
    strings = [s for s in items if isinstance(s, str)]
    if "" in strings:
        raise bad("stop", "a stop string must not be empty")
    ids = token_ids([s for s in items if isinstance(s, int)], "stop", model)
    extra = body.get("stop_token_ids")
    if extra is not None:
        if not isinstance(extra, list):
            raise bad("stop_token_ids", f"expected a list of token ids, got {json.dumps(extra)[:80]}")
        ids += token_ids(extra, "stop_token_ids", model)
    return strings, ids


def sampling(body: dict) -> Sampling:
    temperature = number(body, "temperature", 1.0, 0, 2)
    top_p = number(body, "top_p", 1.0, 0, 1, lo_open=True)
    seed = number(body, "seed", None, 0, MAX_SEED, integer=True)
    if temperature == 0:
        return Sampling(greedy=True)
    # no seed: a fresh one, as OpenAI samples differently on each call
    return Sampling(greedy=False, temperature=temperature, top_p=top_p,
                    seed=secrets.randbelow(MAX_SEED) if seed is None else seed)


def common(body: dict, model: ModelInfo, kind: str, prompt_ids: list[int], param: str,
           default_max_tokens: int, max_tokens_names: tuple[str, ...]) -> GenerationRequest:
    """The fields completions and chat share, once the prompt is token ids."""
    check_unsupported(body)
    n = number(body, "n", 1, 1, integer=True)
    if n != 1:
        raise bad("n", f"only n = 1 is supported (one choice per request), got {n}")
    if not prompt_ids:
        raise bad(param, "the prompt is empty")
    if len(prompt_ids) > model.context:
        raise bad(param, f"the prompt has {len(prompt_ids)} tokens, more than the model's context of {model.context}",
                  code="context_length_exceeded")
    max_tokens = default_max_tokens
    for name in max_tokens_names:
        max_tokens = number(body, name, max_tokens, 1, integer=True)
    strings, ids = stops(body, model)
    stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", f"expected an object, got {json.dumps(options)[:80]}")
    include_usage = stream and flag(options or {}, "include_usage")
    end_ids = [] if flag(body, "ignore_eos") else list(model.eos_ids)
    return GenerationRequest(kind, prompt_ids, max_tokens, sampling(body), strings,
                             list(dict.fromkeys(end_ids + ids)), stream, include_usage)


# -- the two endpoints --------------------------------------------------------------------------
def parse_completion(body: dict, model: ModelInfo) -> GenerationRequest:
    """prompt: a string, or token ids (a list of one of either is accepted too: one prompt per request)."""
    check_model(body, model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = model.tokenizer.encode(prompt) if prompt else []
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        ids = token_ids(prompt, "prompt", model)
    else:
        raise bad("prompt", f"expected a string or a list of token ids (one prompt per request), got "
                  f"{json.dumps(prompt)[:80]}")
    return common(body, model, "completion", ids, "prompt", COMPLETION_MAX_TOKENS, ("max_tokens",))


def parse_chat(body: dict, model: ModelInfo) -> GenerationRequest:
    check_model(body, model)
    messages = [message(m, i) for i, m in enumerate(listed(body.get("messages")))]
    try:
        ids, format_stops = chat_prompt(model.tokenizer, messages)
    except TemplateError as e:
        raise bad("messages", str(e)) from None
    room = max(1, model.context - len(ids))  # by default the reply may fill the context
    request = common(body, model, "chat", ids, "messages", room, ("max_tokens", "max_completion_tokens"))
    request.stop_strings += [s for s in format_stops if s not in request.stop_strings]
    return request


def listed(value) -> list:
    if not isinstance(value, list) or not value:
        raise bad("messages", f"expected a non-empty list of messages, got {json.dumps(value)[:80]}")
    return value


def message(m, i: int) -> dict:
    """{"role", "content"} with the content as one string (text parts are joined)."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise bad(where, f"expected an object with a role ({', '.join(ROLES)}), got {json.dumps(m)[:80]}")
    content = m.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad(f"{where}.content", f"expected a string or a list of text parts, got {json.dumps(content)[:80]}")
    return {"role": m["role"], "content": content}


# -- responses ----------------------------------------------------------------------------------
class Reply:
    """The bodies of one request's answer: whole, or as stream chunks."""

    def __init__(self, kind: str, model: str):
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"

    def _head(self, chunk: bool) -> dict:
        kind = self.object + (".chunk" if chunk and self.kind == "chat" else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def body(self, text: str, finish_reason: str | None, usage: dict, mobile: dict) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish_reason)
        return {**self._head(False), "choices": [choice], "usage": usage, "mobile": mobile}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False, **extra) -> dict:
        """One piece of the stream. Chat's first chunk carries the role; its last, an empty delta."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish_reason)
        return {**self._head(True), "choices": [choice], **extra}

    def usage_chunk(self, usage: dict) -> dict:
        """With stream_options.include_usage: the last chunk, no choices, the usage."""
        return {**self._head(True), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> str:
    """One Server-Sent Event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
