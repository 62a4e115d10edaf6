"""Conversation data: every seed format normalized to OpenAI-style messages, validated per record.

Internal form: {"messages": [{"role": system|user|assistant|tool, "content": str,
"tool_calls"?: [...], "loss"?: bool}], "tools"?: [...]}. Formats, detected per record (or forced
with --data_format):

  sharegpt   {"conversations": [{"from": human|gpt|system|function_call|observation, "value"}],
             "system"?, "tools"?}
  messages   {"messages": [{"role", "content", "tool_calls"?}]}: OpenAI, and GLM-4 (tools on the
             system message, an "observation" role, a JSON {"name", "arguments"} assistant turn
             before it)
  chatglm3   {"tools"?, "conversations": [{"role", "content"}]}: the same messages, where a "tool"
             message with name/parameters/observation becomes an assistant tool call plus its
             observation (in either form; a "tool" message with only content is an OpenAI tool
             result)
  alpaca     {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
  columns    one question and its answer in two text fields: {"content", "summary"} (AdvertiseGen,
             the ChatGLM demos' data) by default, any other two with
             --prompt_column/--response_column

The project templates' saved chat template (jinja_template.py) reads these seed forms the same way
at inference, so the rules it mirrors are written as plain string steps here: `text_call` and
`is_chatglm3_tool`.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.data.files import ReadReport, find_files, iter_json_records
from pipeline.data.json_text import loads
from pipeline.errors import UserError

FORMATS = ("auto", "sharegpt", "messages", "chatglm3", "alpaca", "columns")
COLUMNS = ("content", "summary")  # the question and answer fields of AdvertiseGen records
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "tool_call",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
MESSAGE_ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
}


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
    if all(key in record for key in COLUMNS):
        return "columns"
    raise InvalidSample(
        'unknown record shape: expected "conversations", "messages", "instruction"+"output" or '
        '"content"+"summary" (other question/answer fields: --prompt_column and --response_column)'
    )


def column_format(data_format: str, prompt_column: str | None, response_column: str | None) -> str:
    """--prompt_column/--response_column as the data format "columns:PROMPT:RESPONSE" (both or
    neither)."""
    if prompt_column is None and response_column is None:
        return data_format
    if not (prompt_column and response_column):
        given, missing = (
            ("--prompt_column", "--response_column")
            if prompt_column
            else ("--response_column", "--prompt_column")
        )
        raise UserError(
            f"{given} needs {missing} too: together they name each record's question and answer "
            "fields."
        )
    if data_format not in ("auto", "columns"):
        raise UserError(
            f"--prompt_column and --response_column read two-field records, not --data_format "
            f"{data_format}; leave --data_format out."
        )
    return f"columns:{prompt_column}:{response_column}"


def from_columns(
    record: dict, prompt_column: str = COLUMNS[0], response_column: str = COLUMNS[1]
) -> dict:
    for key in (prompt_column, response_column):
        if key not in record:
            raise InvalidSample(
                f'the field "{key}" is missing (the record has {", ".join(map(repr, record))})'
            )
        if not isinstance(record[key], str):
            raise InvalidSample(f'"{key}" must be a string, got {type(record[key]).__name__}')
    return {
        "messages": [
            make_message("user", record[prompt_column]),
            make_message("assistant", record[response_column]),
        ],
        "tools": None,
    }


def read_tools(value: Any) -> list[dict] | None:
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = loads(value)
        except json.JSONDecodeError as e:
            raise InvalidSample('"tools" is a string that is not JSON') from e
    if not isinstance(value, list):
        raise InvalidSample('"tools" must be a list of tool definitions')
    return [
        t if "function" in t or "type" in t else {"type": "function", "function": t} for t in value
    ]


def _call(name: str, arguments: Any, call_id: str | None = None) -> dict:
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return call if call_id is None else {**call, "id": call_id}


def _written_call(call: Any) -> dict:
    """An OpenAI tool call as written (id, type and any other field kept); its name and arguments
    checked."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise InvalidSample(
            'a tool call must be {"type": "function", "function": {"name": ..., "arguments": ...}}'
        )
    function = call["function"]
    if not isinstance(function.get("name"), str) or "arguments" not in function:
        raise InvalidSample("a tool call's function needs a name and arguments")
    if isinstance(function["arguments"], str):
        try:  # the template writes a string as it is: broken JSON would be trained verbatim
            loads(function["arguments"])
        except json.JSONDecodeError as e:
            raise InvalidSample(
                f"the arguments of the tool call {function['name']!r} are a string that is not "
                f"JSON ({e.msg} at column {e.colno}); write them as a JSON object or its text"
            ) from e
    return {"type": "function", **call}


# GLM-4's call written as JSON text, {"name": "...", "arguments": {...}}, read by string steps that
# the saved chat template repeats in Jinja (which cannot parse JSON): each step skips whitespace,
# then expects its text; "" is the name (up to its closing quote). "parameters" may stand for
# "arguments".
CALL_STEPS = ("{", '"name"', ":", '"', "", ",", '"arguments"', ":")
UNREADABLE_CALL = (
    "an assistant message before a tool result holds a call as JSON that the saved chat template "
    'cannot read back at inference; write it as {"name": "...", "arguments": {...}} (name first, '
    "arguments an object) or as tool_calls"
)


def _call_text_parts(text: str) -> tuple[str, str, str] | None:
    """(name, arguments text, arguments key) by CALL_STEPS, or None: the shape only, not yet checked
    as JSON."""
    s = text.strip()
    rest, ok, name, key = s, s.endswith("}"), "", "arguments"
    for step in CALL_STEPS:
        if not step:
            name = rest.split('"')[0]
            rest = rest[len(name) + 1 :]
            continue
        rest = rest.lstrip()
        if step == '"arguments"' and rest.startswith('"parameters"'):
            step, key = '"parameters"', "parameters"
        ok = ok and rest.startswith(step)
        rest = rest[len(step) :]
    arguments = rest.lstrip()[:-1].rstrip()
    return (name, arguments, key) if ok and arguments.startswith("{") else None


def text_call(text: str) -> dict | None:
    """GLM-4's call written as assistant text: a tool call whose arguments are the JSON text as
    written (what the saved chat template cuts out of the same text; a mapping where the renderers
    write it back the same), or None when the text is not a call."""
    parts = _call_text_parts(text)
    if parts is None:
        if (
            _parse_call(text) is not None
        ):  # a call in another layout: training would differ from inference
            raise InvalidSample(UNREADABLE_CALL)
        return None
    name, arguments, key = parts
    try:
        obj, args = loads(text), loads(arguments)
    except json.JSONDecodeError as e:
        raise InvalidSample(UNREADABLE_CALL) from e
    if not (
        isinstance(obj, dict)
        and list(obj) == ["name", key]
        and obj["name"] == name
        and obj[key] == args
    ):
        raise InvalidSample(UNREADABLE_CALL)
    return _call(name, args if json.dumps(args, ensure_ascii=False) == arguments else arguments)


def is_chatglm3_tool(message: dict) -> bool:
    """ChatGLM3's "tool" message: a call (name, parameters) and its result (observation) in one
    message."""
    return message.get("role") == "tool" and ("observation" in message or "parameters" in message)


def _chatglm3_tool(turn: dict) -> list[dict]:
    if "name" not in turn or "observation" not in turn:
        raise InvalidSample('a "tool" message needs "name", "parameters" and "observation"')
    obs = turn["observation"]
    call = _call(turn["name"], turn.get("parameters", {}))
    return [
        {"role": "assistant", "content": "", "tool_calls": [call], **_loss(turn)},
        {
            **make_message(
                "tool", obs if isinstance(obs, str) else json.dumps(obs, ensure_ascii=False)
            ),
            "name": turn["name"],
        },
    ]


def _parse_call(text: str) -> dict | None:
    try:
        obj = loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    if (
        isinstance(obj, dict)
        and isinstance(obj.get("name"), str)
        and ("arguments" in obj or "parameters" in obj)
    ):
        return _call(obj["name"], obj.get("arguments", obj.get("parameters")))
    return None


def make_message(role: str, content: Any, loss: Any = None) -> dict:
    if content is None and role == "user":  # an empty question would be trained on silently
        raise InvalidSample("a user message has no content (null or missing)")
    if content is not None and not isinstance(content, str):
        raise InvalidSample(f"a {role} message's content must be a string")
    if role == "user" and not content.strip():
        raise InvalidSample("a user message is empty (nothing but whitespace)")
    m = {"role": role, "content": content or ""}
    if loss is not None:
        if not isinstance(loss, bool):
            raise InvalidSample('"loss" must be true or false')
        m["loss"] = loss
    return m


def from_sharegpt(record: dict) -> dict:
    messages = [make_message("system", record["system"])] if record.get("system") else []
    for turn in record["conversations"]:
        role = (
            SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            if isinstance(turn, dict)
            else None
        )
        if role is None:
            raise InvalidSample(
                f"unknown role {turn.get('from')!r} in conversations"
                if isinstance(turn, dict)
                else "a turn is not an object"
            )
        if role == "tool_call":
            call = _parse_call(turn.get("value"))
            if call is None:
                raise InvalidSample(
                    'a function_call turn must hold JSON {"name": ..., "arguments": ...}'
                )
            messages.append(
                {"role": "assistant", "content": "", "tool_calls": [call], **_loss(turn)}
            )
        else:
            messages.append(make_message(role, turn.get("value"), turn.get("loss")))
    return {"messages": messages, "tools": read_tools(record.get("tools"))}


def _loss(turn: dict) -> dict:
    return {"loss": turn["loss"]} if isinstance(turn.get("loss"), bool) else {}


def from_messages(record: dict) -> dict:
    tools = read_tools(record.get("tools"))
    messages, own_tools = read_messages(record["messages"], "messages")
    return {"messages": with_system(record, messages), "tools": own_tools or tools}


def from_chatglm3(record: dict) -> dict:
    tools = read_tools(record.get("tools"))
    messages, own_tools = read_messages(record["conversations"], "conversations")
    return {"messages": with_system(record, messages), "tools": own_tools or tools}


def with_system(record: dict, messages: list[dict]) -> list[dict]:
    """The messages with a record's top-level "system" put first (as ShareGPT and alpaca records
    give it); one that disagrees with a system message of the list is refused, not chosen."""
    if record.get("system") in (None, ""):
        return messages
    system = make_message("system", record["system"])
    first = messages[0] if messages else {}
    if first.get("role") == "system":
        if first["content"] != system["content"]:
            raise InvalidSample(
                'a top-level "system" and a different system message in the list; keep one'
            )
        return messages
    return [system, *messages]


def read_messages(raw: Any, where: str) -> tuple[list[dict], list[dict] | None]:
    """Role/content messages (OpenAI, GLM-4, ChatGLM3) as internal messages, and the tools a message
    carries."""
    if not isinstance(raw, list):
        raise InvalidSample(f'"{where}" must be a list')
    tools, messages = None, []
    for i, m in enumerate(raw):
        role = MESSAGE_ROLES.get(m.get("role")) if isinstance(m, dict) else None
        if role is None:
            raise InvalidSample(
                f"unknown role {m.get('role') if isinstance(m, dict) else m!r} in {where}"
            )
        if m.get("tools"):
            tools = read_tools(m["tools"])
        if is_chatglm3_tool(m):
            messages += _chatglm3_tool(m)
            continue
        msg = make_message(role, m.get("content"), m.get("loss"))
        # every other field as written: templates read a tool message's name (Kimi-K2), call ids
        # (Mistral), reasoning_content / thinking, tools on the system message (Phi-4-mini)
        msg.update(
            {
                k: v
                for k, v in m.items()
                if k not in ("role", "content", "loss", "tool_calls") and v is not None
            }
        )
        if role == "assistant" and m.get("content") is None and not m.get("tool_calls"):
            raise InvalidSample(
                "an assistant message has neither content nor tool_calls (null or missing)"
            )
        if role == "assistant":
            if m.get("tool_calls"):
                msg["tool_calls"] = [_written_call(c) for c in m["tool_calls"]]
            nxt = raw[i + 1] if i + 1 < len(raw) and isinstance(raw[i + 1], dict) else {}
            if not m.get("tool_calls") and MESSAGE_ROLES.get(nxt.get("role")) == "tool":
                call = text_call(
                    msg["content"]
                )  # GLM-4: the call is JSON content before an observation
                if call:
                    msg.update(content="", tool_calls=[call])
        messages.append(msg)
    return messages, tools


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


CONVERTERS = {
    "sharegpt": from_sharegpt,
    "messages": from_messages,
    "chatglm3": from_chatglm3,
    "alpaca": from_alpaca,
}


def validate(conv: dict, require_answer: bool = True) -> dict:
    """Check roles and order; raise InvalidSample with the reason. RL prompts may end without an
    answer (require_answer=False)."""
    msgs = conv["messages"]
    systems = [i for i, m in enumerate(msgs) if m["role"] == "system"]
    if len(systems) > 1:
        raise InvalidSample("more than one system message")
    if systems and systems[0] != 0:
        raise InvalidSample("the system message must come first")
    prev, last_calls = ("system" if systems else None), False
    for m in msgs[1 if systems else 0 :]:
        role = m["role"]
        if role == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise InvalidSample("an assistant message is empty")
        allowed = {
            "user": (None, "system", "assistant", "tool"),
            "assistant": ("user", "tool"),
            "tool": ("assistant", "tool"),
        }[role]
        thought_then_call = role == prev == "assistant" and m.get(
            "tool_calls"
        )  # ChatGLM3: text, then the call
        if prev is None and role != "user":
            raise InvalidSample(
                f"the conversation starts with {_article(role)} {role} message; the first turn "
                "(after any system message) must be the user's"
            )
        if (prev not in allowed and not thought_then_call) or (
            role == "tool" and prev == "assistant" and not last_calls
        ):
            raise InvalidSample(
                f"{_article(role)} {role} message cannot follow {_article(prev)} {prev} message"
            )
        last_calls = (
            bool(m.get("tool_calls"))
            if role == "assistant"
            else (last_calls if role == "tool" else False)
        )
        prev = role
    if require_answer and not any(m["role"] == "assistant" for m in msgs):
        raise InvalidSample("no assistant message to learn from")
    if not require_answer and not any(m["role"] == "user" for m in msgs):
        raise InvalidSample("no user message to answer")
    return conv


def _article(word: str) -> str:
    return "an" if word in ("assistant",) else "a"


def normalize(record: Any, data_format: str = "auto", require_answer: bool = True) -> dict:
    fmt = detect_format(record) if data_format == "auto" else data_format
    try:
        if fmt.startswith("columns"):
            if not isinstance(record, dict):
                raise InvalidSample("a record must be a JSON object")
            return validate(from_columns(record, *fmt.split(":")[1:]), require_answer)
        return validate(CONVERTERS[fmt](record), require_answer)
    except (KeyError, TypeError, AttributeError) as e:
        raise InvalidSample(f"not a valid {fmt} record: {field_problem(e)}") from e


def field_problem(error: Exception) -> str:
    """A converter's KeyError/TypeError/AttributeError as words (not `KeyError: 'x'`)."""
    if isinstance(error, KeyError):
        return f"the field {error.args[0]!r} is missing"
    return f"a field holds the wrong kind of value ({error})"


def read_conversations(
    directory: str | list[str],
    flag: str,
    data_format: str = "auto",
    skip_invalid: bool = False,
    require_answer: bool = True,
) -> tuple[list[dict], ReadReport]:
    """All conversations under a folder; an invalid record is an error (file:line) or, if asked,
    skipped and counted. RL prompts pass require_answer=False: a conversation may end with the
    user."""
    files = find_files(directory, flag, (".json", ".jsonl"))
    report = ReadReport(files=len(files))
    out = []
    for path in files:
        n_before = report.read
        for line, record in iter_json_records(path):
            report.read += 1
            try:
                out.append(normalize(record, data_format, require_answer))
            except InvalidSample as e:
                if not skip_invalid:
                    raise UserError(
                        f"{path}:{line}: {e}; fix the record or pass --skip_invalid_samples True "
                        "to skip such records."
                    ) from e
                report.drop(str(e))
        if report.read == n_before:
            raise UserError(f"{path} is empty (no records); remove it or fill it.")
    return out, report
