"""The OpenAI chat-completions wire format, for pipeline/infer/server.py: ApiError (a refusal, sent back as
OpenAI's error object by error_body), parse_request, which validates a /v1/chat/completions body into a
ChatRequest naming the offending field when it cannot, and usage, a completion's token counts as OpenAI
reports them. Nothing here touches sockets or the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.data.json_text import JSONLimitError, loads
from pipeline.errors import UserError
from pipeline.infer.chat_model import Completion, Sampling, check_messages

UNSUPPORTED = {"tools": "tool calls are not served", "stop": "the model stops on its own end-of-turn tokens"}


class ApiError(Exception):
    """A request the server refuses, sent back as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class ChatRequest:
    messages: list[dict]
    sampling: Sampling
    stream: bool
    include_usage: bool
    max_tokens_asked: bool = False  # False: the server's default, which may shrink to fit the context


def _field(body: dict, name: str, types: tuple[type, ...], default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        wanted = " or ".join({int: "an integer", float: "a number", bool: "true or false", dict: "an object"}[t] for t in types)
        raise ApiError(400, f"{name} must be {wanted}, got {json.dumps(value)}.", name)
    return value


def _float(body: dict, name: str, default: float) -> float:
    value = _field(body, name, (int, float), default)
    try:
        return float(value)
    except OverflowError as e:  # a JSON integer past float's range
        raise ApiError(400, f"{name} must be a number in its range, got an integer of {len(str(abs(value)))} digits.",
                       name) from e


def parse_request(raw: bytes, served_name: str, defaults: Sampling, max_tokens_cap: int | None = None) -> ChatRequest:
    """Validate a /v1/chat/completions body; anything wrong is an ApiError naming the field."""
    try:  # JSON in UTF-8, -16 or -32, as json.loads takes bytes, but strict: no surrogate smuggled in as bytes
        body = loads(raw.decode(json.detect_encoding(raw)))
    except JSONLimitError as e:  # well-formed, but past what can be answered (deep, a huge integer, half a character)
        raise ApiError(400, f"the request body holds {e.msg} (line {e.lineno} column {e.colno}); {e.fix}.") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}).") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    if body.get("model") not in (None, served_name):
        raise ApiError(404, f"model {body['model']!r} does not exist; this server serves {served_name!r}.", "model",
                       "model_not_found")
    if _field(body, "n", (int,), 1) != 1:
        raise ApiError(400, "n must be 1: one choice per request.", "n")
    for name, why in UNSUPPORTED.items():
        if body.get(name):
            raise ApiError(400, f"{name} is not supported: {why}.", name)
    try:
        messages = check_messages(body.get("messages"))
    except ValueError as e:
        raise ApiError(400, f"{e}.", "messages") from e
    asked = _field(body, "max_completion_tokens", (int,), _field(body, "max_tokens", (int,), None))
    if asked is not None and max_tokens_cap is not None and asked > max_tokens_cap:
        raise ApiError(400, f"max_tokens is {asked}, more than this server's limit of {max_tokens_cap} tokens per answer.",
                       "max_tokens")
    try:
        sampling = Sampling(defaults.max_new_tokens if asked is None else asked,
                            _float(body, "temperature", defaults.temperature), _float(body, "top_p", defaults.top_p))
    except UserError as e:
        raise ApiError(400, str(e)) from e
    options = _field(body, "stream_options", (dict,), {})
    return ChatRequest(messages, sampling, _field(body, "stream", (bool,), False),
                       bool(_field(options, "include_usage", (bool,), False)), asked is not None)


def usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def error_body(e: ApiError) -> dict:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    return {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}}
