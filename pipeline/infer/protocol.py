"""The OpenAI chat-completions wire format, for pipeline/infer/server.py: ApiError (a refusal, sent
back as OpenAI's error object by error_body), parse_request, which validates a /v1/chat/completions
body into a ChatRequest naming the offending field when it cannot (tools, tool_choice, and tool
calls and tool results in the history included), and usage, a completion's token counts as OpenAI
reports them. Nothing here touches sockets or the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pipeline.data.json_text import JSONLimitError, loads
from pipeline.errors import UserError
from pipeline.infer.chat_model import Completion, Sampling, check_messages

NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")  # a function name, as OpenAI allows them
UNSUPPORTED = {"stop": "the model stops on its own end-of-turn tokens"}


class ApiError(Exception):
    """A request the server refuses, sent back as OpenAI's error object."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class ChatRequest:
    messages: list[dict]
    sampling: Sampling
    stream: bool
    include_usage: bool
    max_tokens_asked: bool = (
        False  # False: the server's default, which may shrink to fit the context
    )
    tools: list[dict] | None = None
    tool_choice: str = "auto"  # or "none": the prompt shows no tools and the answer is text
    tool_history: bool = (
        False  # the messages hold tool calls or tool results with their ids and names
    )

    @property
    def tool_names(self) -> set[str]:
        return (
            {t["function"]["name"] for t in self.tools or []}
            if self.tool_choice == "auto"
            else set()
        )


def _field(body: dict, name: str, types: tuple[type, ...], default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        wanted = " or ".join(
            {int: "an integer", float: "a number", bool: "true or false", dict: "an object"}[t]
            for t in types
        )
        raise ApiError(400, f"{name} must be {wanted}, got {json.dumps(value)}.", name)
    return value


def _float(body: dict, name: str, default: float) -> float:
    value = _field(body, name, (int, float), default)
    try:
        return float(value)
    except OverflowError as e:  # a JSON integer past float's range
        raise ApiError(
            400,
            f"{name} must be a number in its range, got an integer of {len(str(abs(value)))} "
            "digits.",
            name,
        ) from e


def parse_request(
    raw: bytes, served_name: str, defaults: Sampling, max_tokens_cap: int | None = None
) -> ChatRequest:
    """Validate a /v1/chat/completions body; anything wrong is an ApiError naming the field."""
    try:  # JSON in UTF-8, -16 or -32, as json.loads takes bytes, but strict: no surrogate smuggled
        # in as bytes
        body = loads(raw.decode(json.detect_encoding(raw)))
    except (
        JSONLimitError
    ) as e:  # well-formed, but past what can be answered (deep, a huge integer, half a character)
        raise ApiError(
            400, f"the request body holds {e.msg} (line {e.lineno} column {e.colno}); {e.fix}."
        ) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}).") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    if body.get("model") not in (None, served_name):
        raise ApiError(
            404,
            f"model {body['model']!r} does not exist; this server serves {served_name!r}.",
            "model",
            "model_not_found",
        )
    if _field(body, "n", (int,), 1) != 1:
        raise ApiError(400, "n must be 1: one choice per request.", "n")
    for name, why in UNSUPPORTED.items():
        if body.get(name):
            raise ApiError(400, f"{name} is not supported: {why}.", name)
    tools, tool_choice = _tools(body.get("tools")), _tool_choice(body.get("tool_choice"))
    raw = body.get("messages")
    calls = isinstance(raw, list) and any(
        isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in raw
    )
    try:  # an assistant message with tool_calls may have null content, which check_messages would
        # refuse
        messages = check_messages(
            [
                {**m, "content": m.get("content") or ""}
                if isinstance(m, dict) and m.get("tool_calls")
                else m
                for m in raw
            ]
            if calls
            else raw
        )
    except ValueError as e:
        raise ApiError(400, f"{e}.", "messages") from e
    if calls:
        messages = [_tool_fields(i, m, kept) for i, (m, kept) in enumerate(zip(raw, messages))]
    asked = _field(body, "max_completion_tokens", (int,), _field(body, "max_tokens", (int,), None))
    if asked is not None and max_tokens_cap is not None and asked > max_tokens_cap:
        raise ApiError(
            400,
            f"max_tokens is {asked}, more than this server's limit of {max_tokens_cap} tokens per "
            "answer.",
            "max_tokens",
        )
    try:
        sampling = Sampling(
            defaults.max_new_tokens if asked is None else asked,
            _float(body, "temperature", defaults.temperature),
            _float(body, "top_p", defaults.top_p),
        )
    except UserError as e:
        raise ApiError(400, str(e)) from e
    options = _field(body, "stream_options", (dict,), {})
    return ChatRequest(
        messages,
        sampling,
        _field(body, "stream", (bool,), False),
        bool(_field(options, "include_usage", (bool,), False)),
        asked is not None,
        tools,
        tool_choice,
        calls,
    )


def _name(value: Any, where: str) -> str:
    if not (isinstance(value, str) and NAME.fullmatch(value)):
        raise ApiError(
            400,
            f"{where} must be a function name of at most 64 letters, digits, _ or -, got "
            f"{json.dumps(value)[:80]}.",
            where.split(".")[0].split("[")[0],
        )
    return value


def _tools(value: Any) -> list[dict] | None:
    """OpenAI's tools: a list of
    {"type": "function", "function": {"name", "description"?, "parameters"?}}."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise ApiError(400, "tools must be a list of function tools.", "tools")
    for i, tool in enumerate(value):
        f = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(f, dict)):
            raise ApiError(
                400,
                f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}.',
                "tools",
            )
        _name(f.get("name"), f"tools[{i}].function.name")
        if not isinstance(f.get("parameters", {}), dict) or not isinstance(
            f.get("description", ""), str
        ):
            raise ApiError(
                400,
                f"tools[{i}].function needs parameters as a JSON schema object and description as "
                "text.",
                "tools",
            )
    return value


def _tool_choice(value: Any) -> str:
    """ "auto" (the default) and "none" are served; forcing a call needs constrained decoding, which
    this server does not do, so "required" and a named function are refused rather than answered
    with a call not forced."""
    if value in (None, "auto", "none"):
        return value or "auto"
    if value == "required" or isinstance(value, dict):
        raise ApiError(
            400,
            f"tool_choice {json.dumps(value)[:80]} is not supported: this server does not "
            f'constrain decoding, so it cannot force a call; send "auto" or "none".',
            "tool_choice",
        )
    raise ApiError(
        400,
        'tool_choice must be "auto", "none", "required" or a function, got '
        f"{json.dumps(value)[:80]}.",
        "tool_choice",
    )


def _tool_fields(i: int, raw: dict, kept: dict) -> dict:
    """A message as check_messages kept it, plus its tool fields: an assistant's tool_calls
    (arguments as OpenAI sends them, JSON text, or a mapping), a tool result's tool_call_id and
    name."""
    out = dict(kept)
    for key in ("tool_call_id", "name"):
        if kept["role"] == "tool" and raw.get(key) is not None:
            if not isinstance(raw[key], str):
                raise ApiError(400, f"messages[{i}].{key} must be a string.", "messages")
            out[key] = raw[key]
    if kept["role"] != "assistant" or not raw.get("tool_calls"):
        return out
    if not isinstance(raw["tool_calls"], list):
        raise ApiError(400, f"messages[{i}].tool_calls must be a list.", "messages")
    calls = []
    for j, call in enumerate(raw["tool_calls"]):
        where = f"messages[{i}].tool_calls[{j}]"
        f = call.get("function") if isinstance(call, dict) else None
        if not isinstance(f, dict) or call.get("type", "function") != "function":
            raise ApiError(
                400,
                f'{where} must be {{"type": "function", "function": {{"name", "arguments"}}}}.',
                "messages",
            )
        args = f.get("arguments", "{}")
        try:
            parsed = loads(args) if isinstance(args, str) else args
        except (JSONLimitError, json.JSONDecodeError):
            parsed = None
        if not isinstance(parsed, dict):
            raise ApiError(
                400,
                f"{where}.function.arguments must be a JSON object (as text), got "
                f"{json.dumps(args)[:80]}.",
                "messages",
            )
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise ApiError(400, f"{where}.id must be a string.", "messages")
        calls.append(
            {
                **({"id": call["id"]} if call.get("id") else {}),
                "type": "function",
                "function": {
                    "name": _name(f.get("name"), f"{where}.function.name"),
                    "arguments": args,
                },
            }
        )
    out["tool_calls"] = calls
    return out


def usage(c: Completion) -> dict:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    }


def error_body(e: ApiError) -> dict:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    return {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}}
