"""Conversation data: every seed format normalized to OpenAI-style messages, validated per record.

Internal form: {"messages": [{"role": system|user|assistant|tool, "content": str, "tool_calls"?: [...],
"loss"?: bool}], "tools"?: [...]}. Formats, detected per record (or forced with --data_format):

  sharegpt   {"conversations": [{"from": human|gpt|system|function_call|observation, "value"}], "system"?, "tools"?}
  messages   {"messages": [{"role", "content", "tool_calls"?}]}: OpenAI, and GLM-4 (tools on the system
             message, an "observation" role, a JSON {"name", "arguments"} assistant turn before it)
  chatglm3   {"tools"?, "conversations": [{"role", "content"}]} where a "tool" message with
             name/parameters/observation becomes an assistant tool call plus its observation
  alpaca     {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.data.files import ReadReport, find_files, iter_json_records
from pipeline.data.json_text import loads
from pipeline.errors import UserError

FORMATS = ("auto", "sharegpt", "messages", "chatglm3", "alpaca")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "tool_call", "observation": "tool", "tool": "tool", "function": "tool"}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool", "observation": "tool",
                 "function": "tool"}


class InvalidSample(ValueError):
    """A record that cannot become a valid conversation; the message is the reason."""


def detect_format(record: Any) -> str:
    if not isinstance(record, dict):
        raise InvalidSample("a record must be a JSON object")
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        turns = record["conversations"]
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "role" in turns[0]:
            return "chatglm3"
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise InvalidSample('unknown record shape: expected "conversations", "messages" or "instruction"+"output"')


def _tools(value: Any) -> list[dict] | None:
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = loads(value)
        except json.JSONDecodeError as e:
            raise InvalidSample('"tools" is a string that is not JSON') from e
    if not isinstance(value, list):
        raise InvalidSample('"tools" must be a list of tool definitions')
    return [t if "function" in t or "type" in t else {"type": "function", "function": t} for t in value]


def _call(name: str, arguments: Any, call_id: str | None = None) -> dict:
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return call if call_id is None else {**call, "id": call_id}


def _written_call(call: Any) -> dict:
    """An OpenAI tool call as written (id, type and any other field kept); its name and arguments checked."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise InvalidSample('a tool call must be {"type": "function", "function": {"name": ..., "arguments": ...}}')
    function = call["function"]
    if not isinstance(function.get("name"), str) or "arguments" not in function:
        raise InvalidSample("a tool call's function needs a name and arguments")
    return {"type": "function", **call}


def _parse_call(text: str) -> dict | None:
    try:
        obj = loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    if isinstance(obj, dict) and isinstance(obj.get("name"), str) and ("arguments" in obj or "parameters" in obj):
        return _call(obj["name"], obj.get("arguments", obj.get("parameters")))
    return None


def make_message(role: str, content: Any, loss: Any = None) -> dict:
    if content is None and role == "user":  # an empty question would be trained on silently
        raise InvalidSample("a user message has no content (null or missing)")
    if content is not None and not isinstance(content, str):
        raise InvalidSample(f"a {role} message's content must be a string")
    m = {"role": role, "content": content or ""}
    if loss is not None:
        if not isinstance(loss, bool):
            raise InvalidSample('"loss" must be true or false')
        m["loss"] = loss
    return m


def from_sharegpt(record: dict) -> dict:
    messages = [make_message("system", record["system"])] if record.get("system") else []
    for turn in record["conversations"]:
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        if role is None:
            raise InvalidSample(f"unknown role {turn.get('from')!r} in conversations" if isinstance(turn, dict)
                                else "a turn is not an object")
        if role == "tool_call":
            call = _parse_call(turn.get("value"))
            if call is None:
                raise InvalidSample('a function_call turn must hold JSON {"name": ..., "arguments": ...}')
            messages.append({"role": "assistant", "content": "", "tool_calls": [call], **_loss(turn)})
        else:
            messages.append(make_message(role, turn.get("value"), turn.get("loss")))
    return {"messages": messages, "tools": _tools(record.get("tools"))}


def _loss(turn: dict) -> dict:
    return {"loss": turn["loss"]} if isinstance(turn.get("loss"), bool) else {}


def from_messages(record: dict) -> dict:
    tools, messages = _tools(record.get("tools")), []
    raw = record["messages"]
    if not isinstance(raw, list):
        raise InvalidSample('"messages" must be a list')
    for i, m in enumerate(raw):
        role = MESSAGE_ROLES.get(m.get("role")) if isinstance(m, dict) else None
        if role is None:
            raise InvalidSample(f"unknown role {m.get('role') if isinstance(m, dict) else m!r} in messages")
        if m.get("tools"):
            tools = _tools(m["tools"])
        msg = make_message(role, m.get("content"), m.get("loss"))
        # every other field as written: templates read a tool message's name (Kimi-K2), call ids (Mistral),
        # reasoning_content / thinking, tools on the system message (Phi-4-mini)
        msg.update({k: v for k, v in m.items() if k not in ("role", "content", "loss", "tool_calls") and v is not None})
        if role == "assistant" and m.get("content") is None and not m.get("tool_calls"):
            raise InvalidSample("an assistant message has neither content nor tool_calls (null or missing)")
        if role == "assistant":
            if m.get("tool_calls"):
                msg["tool_calls"] = [_written_call(c) for c in m["tool_calls"]]
            nxt = raw[i + 1] if i + 1 < len(raw) else {}
            if not m.get("tool_calls") and MESSAGE_ROLES.get(nxt.get("role")) == "tool":
                call = _parse_call(msg["content"])  # GLM-4: the call is JSON content before an observation
                if call:
                    msg.update(content="", tool_calls=[call])
        messages.append(msg)
    return {"messages": messages, "tools": tools}


def from_chatglm3(record: dict) -> dict:
    messages = []
    for turn in record["conversations"]:
        role = turn.get("role") if isinstance(turn, dict) else None
        if role == "tool":
            if "name" not in turn or "observation" not in turn:
                raise InvalidSample('a "tool" message needs "name", "parameters" and "observation"')
            obs = turn["observation"]
            call = _call(turn["name"], turn.get("parameters", {}))
            messages.append({"role": "assistant", "content": "", "tool_calls": [call], **_loss(turn)})
            messages.append({**make_message("tool", obs if isinstance(obs, str) else json.dumps(obs, ensure_ascii=False)),
                             "name": turn["name"]})
        elif role in ("system", "user", "assistant", "observation"):
            messages.append(make_message(MESSAGE_ROLES[role], turn.get("content"), turn.get("loss")))
        else:
            raise InvalidSample(f"unknown role {role!r} in conversations")
    return {"messages": messages, "tools": _tools(record.get("tools"))}


def from_alpaca(record: dict) -> dict:
    for key in ("instruction", "input"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise InvalidSample(f'"{key}" must be a string, got {type(record[key]).__name__}')
    messages = [make_message("system", record["system"])] if record.get("system") else []
    for pair in record.get("history") or []:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise InvalidSample('"history" must be a list of [question, answer] pairs')
        messages += [make_message("user", pair[0]), make_message("assistant", pair[1])]
    prompt = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
    messages += [make_message("user", prompt), make_message("assistant", record["output"])]
    return {"messages": messages, "tools": None}


CONVERTERS = {"sharegpt": from_sharegpt, "messages": from_messages, "chatglm3": from_chatglm3, "alpaca": from_alpaca}


def validate(conv: dict) -> dict:
    """Check roles and order; raise InvalidSample with the reason."""
    msgs = conv["messages"]
    systems = [i for i, m in enumerate(msgs) if m["role"] == "system"]
    if len(systems) > 1:
        raise InvalidSample("more than one system message")
    if systems and systems[0] != 0:
        raise InvalidSample("the system message must come first")
    prev, last_calls = "system", False
    for m in msgs[1 if systems else 0:]:
        role = m["role"]
        if role == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise InvalidSample("an assistant message is empty")
        allowed = {"user": ("system", "assistant", "tool"), "assistant": ("user", "tool"),
                   "tool": ("assistant", "tool")}[role]
        thought_then_call = role == prev == "assistant" and m.get("tool_calls")  # ChatGLM3: text, then the call
        if (prev not in allowed and not thought_then_call) or (role == "tool" and prev == "assistant" and not last_calls):
            raise InvalidSample(f"{_article(role)} {role} message cannot follow {_article(prev)} {prev} message")
        last_calls = bool(m.get("tool_calls")) if role == "assistant" else (last_calls if role == "tool" else False)
        prev = role
    if not any(m["role"] == "assistant" for m in msgs):
        raise InvalidSample("no assistant message to learn from")
    return conv


def _article(word: str) -> str:
    return "an" if word in ("assistant",) else "a"


def normalize(record: Any, data_format: str = "auto") -> dict:
    fmt = detect_format(record) if data_format == "auto" else data_format
    try:
        return validate(CONVERTERS[fmt](record))
    except (KeyError, TypeError, AttributeError) as e:
        raise InvalidSample(f"not a valid {fmt} record: {field_problem(e)}") from e


def field_problem(error: Exception) -> str:
    """A converter's KeyError/TypeError/AttributeError as words (not `KeyError: 'x'`)."""
    if isinstance(error, KeyError):
        return f"the field {error.args[0]!r} is missing"
    return f"a field holds the wrong kind of value ({error})"


def read_conversations(directory: str, flag: str, data_format: str = "auto",
                       skip_invalid: bool = False) -> tuple[list[dict], ReadReport]:
    """All conversations under a folder; an invalid record is an error (file:line) or, if asked, skipped and counted."""
    files = find_files(directory, flag, (".json", ".jsonl"))
    report = ReadReport(files=len(files))
    out = []
    for path in files:
        n_before = report.read
        for line, record in iter_json_records(path):
            report.read += 1
            try:
                out.append(normalize(record, data_format))
            except InvalidSample as e:
                if not skip_invalid:
                    raise UserError(f"{path}:{line}: {e}; fix the record or pass --skip_invalid_samples True "
                                    "to skip such records.") from e
                report.drop(str(e))
        if report.read == n_before:
            raise UserError(f"{path} is empty (no records); remove it or fill it.")
    return out, report
