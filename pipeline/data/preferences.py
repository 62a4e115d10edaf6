"""Preference data for RM and DPO: every accepted format normalized to one pair form, validated per
record.

Pair form: {"prompt": [messages ending with a user/tool turn], "chosen": str, "rejected": str,
"tools"?: [...], "margin"?: float}. Unpaired (KTO) form: {"prompt", "completion", "label": bool}.

  seed       {"system"?, "history"?: [[q, a], ...], "question", "response_chosen",
             "response_rejected"}
  prompt     {"prompt", "chosen", "rejected"}: strings, or message lists (explicit prompt, or an
             implicit one: chosen and rejected are whole conversations that share everything but the
             last answer)
  ranking    ShareGPT {"conversations": [...], "chosen": {"from": "gpt", "value"}, "rejected":
             {...}}
  unpaired   {"messages" | "prompt", "completion", "label": true|false}   (KTO)
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.data.conversations import (
    MESSAGE_ROLES,
    SHAREGPT_ROLES,
    InvalidSample,
    field_problem,
    from_sharegpt,
    make_message,
    read_messages,
    read_tools,
    validate,
    with_system,
)
from pipeline.data.files import ReadReport, find_files, iter_json_records
from pipeline.errors import UserError


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except (
        OverflowError
    ):  # an integer past float's range (JSON integers have no limit of their own)
        return False


ANSWER_ROLES = {**SHAREGPT_ROLES, **MESSAGE_ROLES}


def _answer(value: Any, what: str) -> str:
    if isinstance(value, list) and len(value) > 1:
        raise InvalidSample(
            f'"{what}" holds {len(value)} messages; with a "prompt", give only the answer (a '
            "string or one assistant message), or leave the prompt out and give chosen and "
            "rejected as whole conversations that share all but their last message"
        )
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0]
    if isinstance(value, dict):  # {"from": "gpt", "value"} or {"role": "assistant", "content"}
        role = value.get("role", value.get("from"))
        if role is not None and ANSWER_ROLES.get(str(role).lower()) != "assistant":
            raise InvalidSample(f'"{what}" is a {role} message; an answer is the assistant\'s')
        value = value.get("value", value.get("content"))
    if not isinstance(value, str) or not value.strip():
        raise InvalidSample(f'"{what}" must be a non-empty answer string')
    return value


def _check_prompt(messages: list[dict], tools=None) -> list[dict]:
    validate({"messages": messages + [{"role": "assistant", "content": "x"}], "tools": tools})
    return messages


def _prompt_messages(record: dict, prompt: Any) -> tuple[list[dict], list[dict] | None]:
    """A prompt's messages, read as SFT reads a conversation (tool calls and every other field of
    a message kept), with the record's top-level "system", and the tools of the record or of its
    messages."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise InvalidSample('"prompt" must be a string or a list of messages')
    msgs, own_tools = read_messages(prompt, "the prompt")
    return with_system(record, msgs), own_tools or read_tools(record.get("tools"))


def _from_seed(r: dict) -> dict:
    msgs = [make_message("system", r["system"])] if r.get("system") else []
    for pair in r.get("history") or []:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise InvalidSample('"history" must be a list of [question, answer] pairs')
        msgs += [make_message("user", pair[0]), make_message("assistant", pair[1])]
    msgs.append(make_message("user", r["question"]))
    return {
        "prompt": _check_prompt(msgs),
        "chosen": _answer(r["response_chosen"], "response_chosen"),
        "rejected": _answer(r["response_rejected"], "response_rejected"),
    }


def _from_prompt(r: dict) -> dict:
    prompt, chosen, rejected = r["prompt"], r["chosen"], r["rejected"]
    if not prompt and isinstance(chosen, list) and isinstance(rejected, list):  # implicit prompt
        if chosen[:-1] != rejected[:-1]:
            raise InvalidSample(
                "implicit prompt: chosen and rejected must share all but the last message"
            )
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    if not prompt:
        raise InvalidSample(
            'no "prompt": give the question as "prompt" beside "chosen" and "rejected", or give '
            "chosen and rejected as whole conversations (message lists) that share all but "
            "their last message"
        )
    messages, tools = _prompt_messages(r, prompt)
    return {
        "prompt": _check_prompt(messages, tools),
        "tools": tools,
        "chosen": _answer(chosen, "chosen"),
        "rejected": _answer(rejected, "rejected"),
    }


def _from_ranking(r: dict) -> dict:
    conv = from_sharegpt(
        {"conversations": r["conversations"], "system": r.get("system"), "tools": r.get("tools")}
    )
    return {
        "prompt": _check_prompt(conv["messages"], conv["tools"]),
        "tools": conv["tools"],
        "chosen": _answer(r["chosen"], "chosen"),
        "rejected": _answer(r["rejected"], "rejected"),
    }


def _from_unpaired(r: dict) -> dict:
    msgs, tools = _prompt_messages(r, r.get("messages", r.get("prompt")))
    if not isinstance(r.get("label"), bool):
        raise InvalidSample('"label" must be true or false')
    return {
        "prompt": _check_prompt(msgs, tools),
        "tools": tools,
        "completion": _answer(r["completion"], "completion"),
        "label": r["label"],
    }


def normalize_preference(record: Any, unpaired: bool = False) -> dict:
    """One pair; or, with unpaired=True, one unpaired record (a pair is split by
    read_preferences)."""
    if not isinstance(record, dict):
        raise InvalidSample("a record must be a JSON object")
    try:
        if "completion" in record:
            if not unpaired:
                raise InvalidSample(
                    'an unpaired "completion"/"label" record: use it with --loss_type kto'
                )
            return _from_unpaired(record)
        if "question" in record:
            out = _from_seed(record)
        elif "conversations" in record:
            out = _from_ranking(record)
        elif "chosen" in record and "rejected" in record:
            out = _from_prompt({"prompt": record.get("prompt", []), **record})
        else:
            raise InvalidSample(
                'unknown record shape: expected "question"+"response_chosen", '
                '"prompt"/"chosen"/"rejected" or "conversations"+"chosen"'
            )
    except (KeyError, TypeError, AttributeError) as e:
        raise InvalidSample(f"not a valid preference record: {field_problem(e)}") from e
    if "margin" in record:
        margin = record["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not _finite(margin):
            shown = (
                repr(margin)
                if len(repr(margin)) <= 40
                else f"{repr(margin)[:20]}... ({len(repr(margin))} characters)"
            )
            raise InvalidSample(f'"margin" must be a finite number, got {shown}')
        out["margin"] = float(margin)
    return out


def read_preferences(
    directory: str, flag: str, unpaired: bool = False, skip_invalid: bool = False
) -> tuple[list[dict], ReadReport]:
    """All pairs (or unpaired KTO records) under a folder; identical chosen/rejected pairs are
    dropped and counted."""
    files = find_files(directory, flag, (".json", ".jsonl"))
    report, out = ReadReport(files=len(files)), []
    for path in files:
        before = report.read
        for line, record in iter_json_records(path):
            report.read += 1
            try:
                pair = normalize_preference(record, unpaired)
            except InvalidSample as e:
                if not skip_invalid:
                    raise UserError(
                        f"{path}:{line}: {e}; fix the record or pass --skip_invalid_samples True "
                        "to skip such records."
                    ) from e
                report.drop(str(e))
                continue
            if "completion" in pair:
                out.append(pair)
                continue
            if pair["chosen"].strip() == pair["rejected"].strip():
                report.drop("chosen equals rejected")
                continue
            if unpaired:  # KTO on pairs: the chosen answer is desirable, the rejected one is not
                base = {k: v for k, v in pair.items() if k not in ("chosen", "rejected", "margin")}
                out += [
                    {**base, "completion": pair["chosen"], "label": True},
                    {**base, "completion": pair["rejected"], "label": False},
                ]
            else:
                out.append(pair)
        if report.read == before:
            raise UserError(f"{path} is empty (no records); remove it or fill it.")
    return out, report
