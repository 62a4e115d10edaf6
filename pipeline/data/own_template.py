"""The tokenizer's own chat template as the training template (`--template_name auto`).

Nothing is copied: every conversation is rendered by the tokenizer's Jinja template through
`apply_chat_template` (tools, tool calls and tool results passed the standard transformers way), and the
trained text of each assistant message is what the template adds between the prompt with the generation
prompt (`messages[:i]`, add_generation_prompt=True) and the conversation through that message
(`messages[:i + 1]`), trailing whitespace after its end-of-turn text left untrained. So training sees
exactly the text inference will build, whatever the family.

A conversation is *prefix-consistent* when each of those prompts is a prefix of the full render. Templates
that rewrite history (Qwen3 drops earlier thinking, some move the system prompt into the last user turn)
are not; such a conversation is split into one sample per answer, each in the text inference sees for it
(masking.encode_samples does the split and counts it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.json_text import loads
from pipeline.data.templates import Segment
from pipeline.errors import UserError


class NotPrefixConsistent(Exception):
    """The template renders an earlier turn differently once later turns follow."""


@dataclass
class TokenizerTemplate:
    """Stands where a project Template stands (masking, datasets, stop tokens), rendering with the tokenizer."""

    tokenizer: Any = field(repr=False)
    name: str = "tokenizer's own"
    turn_end: str = "(in the template)"  # truthy: each answer's own text closes its turn (see masking.py)
    final_turn_end: str = ""
    special_tokens: tuple = ()
    stop: list[str] = field(default_factory=list)


def standard_messages(messages: list[dict]) -> list[dict]:
    """The project's internal messages in the form chat templates read: role/content/tool_calls, with call
    arguments as a mapping (templates apply `tojson` themselves), and no project-only keys."""
    out = []
    for m in messages:
        msg = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                args = call["function"]["arguments"]
                if isinstance(args, str):
                    try:
                        args = loads(args)  # arguments that are not JSON (or past its limits) stay text
                    except json.JSONDecodeError:
                        pass
                calls.append({"type": "function", "function": {"name": call["function"]["name"], "arguments": args},
                              **({"id": call["id"]} if call.get("id") is not None else {})})
            msg["tool_calls"] = calls
        for key in ("name", "reasoning_content", "tool_call_id"):
            if m.get(key) is not None:
                msg[key] = m[key]
        out.append(msg)
    return out


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
           check_tools: bool = False) -> str:
    """The template's text; `check_tools`: refuse a template that drops the tool definitions."""
    def text(with_tools):
        return tokenizer.apply_chat_template(standard_messages(messages), tools=with_tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    try:
        out = text(tools or None)
        if check_tools and tools and out == text(None):  # Gemma's templates, for one: the model would never see the tools
            raise UserError("the chat template ignores tool definitions (the text is the same without them), so the "
                            "model would learn calls to tools it is never shown; use a template that writes tools "
                            "(--template_name, e.g. qwen3 or llama3_1) or drop the samples' tools.")
        return out
    except UserError:
        raise
    except Exception as e:  # jinja's TemplateError, or the template's own raise_exception(...)
        raise UserError(f"the tokenizer's chat template rejects a conversation: {e}") from e


def render_segments(t: TokenizerTemplate, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = False, last_answer_only: bool = False) -> list[Segment]:
    """Segments of the full render: prompts (untrained), each assistant message's answer, and what follows
    it before the next prompt (the whitespace after its end-of-turn text). `last_answer_only`: earlier
    assistant messages are history, part of the prompt. Raises NotPrefixConsistent when an answer's prompt is
    not a prefix of the full render."""
    full = render(t.tokenizer, messages, tools, add_generation_prompt, check_tools=True)
    if add_generation_prompt:
        return [Segment(full, -1, "prompt")]
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    segments, pos = [], 0
    for i in answers[-1:] if last_answer_only else answers:
        prompt = render(t.tokenizer, messages[:i], tools, add_generation_prompt=True)
        through = render(t.tokenizer, messages[: i + 1], tools)
        if len(prompt) < pos or not (full.startswith(prompt) and full.startswith(through) and through.startswith(prompt)):
            raise NotPrefixConsistent(i)
        answer = through[len(prompt):]
        body = answer.rstrip()
        segments += [Segment(full[pos:len(prompt)], -1, "prompt"), Segment(body, i, "answer"),
                     Segment(answer[len(body):], i, "tail")]
        pos = len(through)
    segments.append(Segment(full[pos:], -1, "tail"))
    return [s for s in segments if s.text]


def own_template(tokenizer) -> TokenizerTemplate:
    """The tokenizer's template, with its stop tokens: EOS and the special token that ends an answer."""
    t = TokenizerTemplate(tokenizer)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    try:
        answer = [s for s in render_segments(t, probe) if s.kind == "answer"][0].text
    except (NotPrefixConsistent, IndexError, UserError):  # a template that refuses the probe: no end token known
        answer = ""
    special = set(tokenizer.all_special_tokens) | {str(a) for a in tokenizer.get_added_vocab()}
    ending = next((tok for tok in sorted(special, key=len, reverse=True) if tok and answer.endswith(tok)), None)
    if ending and ending not in stops:
        stops.append(ending)
    if ending:
        t.turn_end = ending
    else:  # turns end where the next role tag begins (GLM): that token is trained, EOS after the last answer
        t.turn_end, t.final_turn_end = "", tokenizer.eos_token or ""
    t.stop = stops
    return t
