"""The one renderer: every chat template a run trains with is the tokenizer's Jinja template,
rendered by transformers (`--template_name auto`: the tokenizer's own; a project template: its
Jinja, given to the tokenizer first by templates.resolve_template).

Nothing is copied: every conversation is rendered through `apply_chat_template`, and the trained
text of each assistant message is what the template adds between the prompt with the generation
prompt (`messages[:i]`, add_generation_prompt=True) and the conversation through that message
(`messages[:i + 1]`), up to and including its last end-of-turn token. So training sees exactly the
text inference will build, whatever the family. Text the template writes only after the last
message of a finished conversation (Phi-3's `<|endoftext|>`, read off the template once) is left
out of a render that continues; a user, system or tool message marked `"loss": true` owns the text
the template adds for it.

Messages reach the template as written: every field but the project's own `loss` (a tool message's
`name`, `reasoning_content`, `thinking`, call ids, a system message's `tools`), with two forms
chosen by asking the template itself once (`_forms`): tool-call arguments as a mapping, as JSON
text (DeepSeek-V3.1 concatenates them as text), or as given where text is written verbatim (the
project's templates of fields), and tools on the system message where the template
reads them there (Phi-4-mini). `--chat_template_kwargs` reach every render. A named template set
(Command-R7B) renders conversations with tools through its `tool_use` template, as transformers does
at inference.

Pre-filled generation prompts (QwQ and MiniMax-M2 open `<think>\n`, GLM-4.7 `<think>`, Gemma 4 an
empty thought channel): the pre-fill is prompt, and the trained answer is what the model writes
after it.

Refused in one sentence, never trained silently: a turn whose rendering lost its tool calls
(Granite 3.3), its text, or its reasoning; tools the template never writes.

A conversation is *prefix-consistent* when each of those prompts is a prefix of the full render.
Templates that rewrite history (Qwen3 drops earlier thinking, some move the system prompt into the
last user turn) are not; such a conversation is split into one sample per answer, each in the text
inference sees for it (masking.encode_samples does the split and counts it).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.json_text import loads
from pipeline.errors import UserError

logger = logging.getLogger(__name__)
PROJECT_KEYS = ("loss",)  # message fields the project reads itself and templates never see
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


class NotPrefixConsistent(Exception):
    """The template renders an earlier turn differently once later turns follow."""


@dataclass
class Segment:
    """A piece of rendered text: which message it belongs to (-1 = template text) and its kind."""

    text: str
    message: int
    kind: str  # "prompt" (never trained by default), "answer" (assistant text + turn end), "tail"


@dataclass
class TokenizerTemplate:
    """Stands where a project Template stands (masking, datasets, stop tokens), rendering with the
    tokenizer."""

    tokenizer: Any = field(repr=False)
    name: str = "tokenizer's own"
    turn_end: str = (
        "(in the template)"  # truthy: each answer's own text closes its turn (see masking.py)
    )
    final_turn_end: str = ""
    special_tokens: tuple = ()
    stop: list[str] = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)  # --chat_template_kwargs, given to every render
    args_as_text: bool = (
        False  # tool-call arguments reach the template as JSON text, not as a mapping
    )
    args_kept: bool = False  # the template writes text arguments verbatim: they reach it as given
    message_tools: bool = False  # the template reads tools from the system message's "tools" field
    # what the template writes after the last message when no generation prompt is asked for
    # (Phi-3's <|endoftext|>): a render that ends there is read without it (`_closed`)
    complete_suffix: str = ""


def standard_messages(messages: list[dict], form: TokenizerTemplate | None = None) -> list[dict]:
    """The messages as the user wrote them, in the form the template reads: no project-only keys,
    null content as empty text (as servers pass it), call arguments as a mapping or as JSON text
    (`form`), and a system message's `tools` kept only where the template reads them there."""
    out = []
    for m in messages:
        msg = {k: v for k, v in m.items() if k not in PROJECT_KEYS}
        msg["content"] = m.get("content") or ""
        if not (form and form.message_tools):
            msg.pop("tools", None)
        if m.get("tool_calls"):
            msg["tool_calls"] = [
                _call_form(
                    call, form.args_as_text if form else False, bool(form and form.args_kept)
                )
                for call in m["tool_calls"]
            ]
        out.append(msg)
    return out


def _call_form(call: dict, as_text: bool, kept: bool = False) -> dict:
    args = call["function"]["arguments"]
    if as_text and not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    elif not as_text and not kept and isinstance(args, str):
        try:
            args = loads(args)  # arguments that are not JSON (or past its limits) stay text
        except json.JSONDecodeError:
            pass
    return {"type": "function", **call, "function": {**call["function"], "arguments": args}}


def _template_choice(tokenizer, tools) -> str | None:
    """A named template set (Command-R7B: default / tool_use / rag): the tool_use template for a
    conversation with tools, whatever one render passes as tools, as transformers picks it at
    inference."""
    named = tokenizer.chat_template if isinstance(tokenizer.chat_template, dict) else {}
    return "tool_use" if tools and "tool_use" in named else None


def render(
    tokenizer,
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    check_tools: bool = False,
    form: TokenizerTemplate | None = None,
) -> str:
    """The template's text; `check_tools`: refuse a template that drops the tool definitions."""
    kwargs = form.kwargs if form else {}
    choice = _template_choice(tokenizer, tools or any(m.get("tools") for m in messages))
    lifted = bool(form and form.message_tools and any(m.get("tools") for m in messages))

    def text(with_tools, msgs):
        return tokenizer.apply_chat_template(
            msgs,
            tools=None if lifted else with_tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=choice,
            **kwargs,
        )

    try:
        out = text(tools or None, standard_messages(messages, form))
        bare = lambda: [  # noqa: E731
            {k: v for k, v in m.items() if k != "tools"} for m in standard_messages(messages, form)
        ]
        if check_tools and (tools or lifted) and out == text([] if choice else None, bare()):
            where = (
                (
                    'this template writes tools only from the system message\'s "tools" field, so '
                    "give them there"
                )
                if form and form.message_tools
                else "use a template that writes tools (--template_name, e.g. qwen3 or llama3_1), "
                "or drop the samples' tools field and describe the tools in the system message "
                "where the model card says so (DeepSeek-V3.1)"
            )
            raise UserError(
                "the chat template ignores tool definitions (the text is the same without them), "
                f"so the model would learn calls to tools it is never shown; {where}."
            )
        return out
    except UserError:
        raise
    except Exception as e:  # jinja's TemplateError, or the template's own raise_exception(...)
        raise UserError(
            f"the tokenizer's chat template rejects a conversation: {e} (change such records, pick "
            "another template with --template_name, or skip them with --skip_invalid_samples True)"
        ) from e


def _common_prefix(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _answer(
    t: TokenizerTemplate, messages: list[dict], i: int, tools, prompt: str, through: str
) -> tuple[str, bool]:
    """The text the model writes for message i after `prompt`, and whether `through` holds it right
    after the prompt. When not: the generation prompt pre-fills text the rendered turn does not
    repeat (QwQ's `<think>\n`), or the template renders an earlier turn differently once message i
    follows (Qwen3's empty thought on a last answer); the answer is then what the template writes
    after the last turn's header, and its sample is this prompt and answer alone."""
    if through.startswith(prompt):
        return through[len(prompt) :], True
    base = render(t.tokenizer, messages[:i], tools, form=t)
    opening = prompt[len(base) :] if prompt.startswith(base) else ""
    floor = _common_prefix(base, through)  # where the render of earlier turns stops agreeing
    for k in range(len(opening), 0, -1):
        if (
            k < len(opening) and opening[k - 1] not in ">\n "
        ):  # split at a tag or line, never inside one
            continue
        pos = through.rfind(opening[:k])
        if pos >= floor:
            prefill, body = opening[k:], through[pos + k :]
            return (
                _after_prefill(t, messages[i], prefill, body) if prefill.strip() else body
            ), False
    raise NotPrefixConsistent(i)


def _after_prefill(t: TokenizerTemplate, m: dict, prefill: str, body: str) -> str:
    """What follows a pre-filled `<think>\\n`: the reasoning as written (in content before
    `</think>`, or a reasoning field for a `<think>` pre-fill), then the answer the template
    renders, then its turn end."""
    content, reasoning = (
        m.get("content") or "",
        next((m[k] for k in REASONING_KEYS if m.get(k)), None),
    )
    if "</think>" in content and "<think>" in prefill:
        end = _turn_end_of(t, body)
        return content.split(prefill.strip(), 1)[-1].lstrip("\n") + end
    if reasoning and "<think>" in prefill:
        return f"{reasoning.strip()}\n</think>\n\n{content.strip()}" + _turn_end_of(t, body)
    return body


def _turn_end_of(t: TokenizerTemplate, body: str) -> str:
    ends = [s for s in t.stop if s and s in body]
    if not ends:
        return ""
    end = max(ends, key=body.rfind)
    return end


def _trim_to_turn_end(t: TokenizerTemplate, answer: str) -> str:
    """The answer up to and including its last end-of-turn token (a template that always appends the
    next generation prompt, as Command-R7B's tool_use does, leaves it untrained); trailing
    whitespace otherwise."""
    ends = [answer.rfind(s) + len(s) for s in t.stop if s and s in answer]
    return answer[: max(ends)] if ends else answer.rstrip()


def _check_answer(t: TokenizerTemplate, m: dict, i: int, answer: str) -> None:
    """A turn whose rendering lost its tool calls, its text or its reasoning is refused, never
    trained."""
    lost = [
        c["function"]["name"]
        for c in m.get("tool_calls") or []
        if c["function"]["name"] not in answer
    ]
    if lost:
        raise UserError(
            f"the {t.name} chat template does not write the tool call(s) {', '.join(lost)} of "
            f"answer {i} (it renders {answer[:80]!r}), so the model would learn to stop instead of "
            "calling; use a template that writes calls (--template_name, e.g. qwen3 or llama3_1), "
            "or give call ids in the form the template writes (Kimi-K2: functions.NAME:0)."
        )
    text = (m.get("content") or "").split("</think>")[-1].strip()
    reasoning = next(
        (m[k] for k in REASONING_KEYS if isinstance(m.get(k), str) and m[k].strip()), None
    )
    if "</think>" in (m.get("content") or ""):
        reasoning = (
            reasoning or m["content"].split("</think>")[0].replace("<think>", "").strip() or None
        )
    for what, piece in (("text", text[-24:]), ("reasoning", (reasoning or "").strip()[:24])):
        if piece and piece not in answer:
            raise UserError(
                f"the {t.name} chat template drops the {what} of answer {i} (it renders "
                f"{answer[:80]!r}), so it would not be trained; remove it from the data or use a "
                "template that writes it (--template_name)."
            )


def _closed(t: TokenizerTemplate, text: str) -> str:
    """A render without generation prompt as it stands inside a longer conversation: without the
    text the template writes only after the last message (`complete_suffix`)."""
    suffix = t.complete_suffix
    return text[: -len(suffix)] if suffix and text.endswith(suffix) else text


def render_segments(
    t: TokenizerTemplate,
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    last_answer_only: bool = False,
) -> list[Segment]:
    """Segments of the full render: prompts (untrained), each assistant message's answer, and what
    follows it before the next prompt. `last_answer_only`: earlier assistant messages are history,
    part of the prompt. Raises NotPrefixConsistent when an answer's prompt is not a prefix of the
    full render. A user, system or tool message that asks to be trained (`"loss": true`) is its
    own segment (`_asked_spans`)."""
    full = render(t.tokenizer, messages, tools, add_generation_prompt, check_tools=True, form=t)
    if add_generation_prompt:
        return [Segment(full, -1, "prompt")]
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    segments, pos = [], 0
    for i in answers[-1:] if last_answer_only else answers:
        prompt = render(t.tokenizer, messages[:i], tools, add_generation_prompt=True, form=t)
        whole = i + 1 == len(messages)  # the render through the last message is the full one
        through = _closed(
            t, full if whole else render(t.tokenizer, messages[: i + 1], tools, form=t)
        )
        answer, in_place = _answer(t, messages, i, tools, prompt, through)
        body = _trim_to_turn_end(t, answer)
        _check_answer(t, messages[i], i, body)
        if not in_place:  # a pre-fill: the sample is this prompt and answer alone
            if i != answers[-1] or pos:
                raise NotPrefixConsistent(i)
            segments = [
                Segment(prompt, -1, "prompt"),
                Segment(body, i, "answer"),
                Segment(answer[len(body) :], i, "tail"),
            ]
            return _with_asked(t, messages, tools, prompt, segments)
        if len(prompt) < pos or not (full.startswith(prompt) and full.startswith(through)):
            raise NotPrefixConsistent(i)
        segments += [
            Segment(full[pos : len(prompt)], -1, "prompt"),
            Segment(body, i, "answer"),
            Segment(answer[len(body) :], i, "tail"),
        ]
        pos = len(through)
    segments.append(Segment(full[pos:], -1, "tail"))
    return _with_asked(t, messages, tools, full, segments)


def _with_asked(
    t: TokenizerTemplate, messages: list[dict], tools, text: str, segments: list[Segment]
) -> list[Segment]:
    """The segments, with the template text of each message asked to be trained given to it."""
    spans = _asked_spans(t, messages, tools, text)
    out, pos = [], 0
    for seg in segments:
        start, pos = pos, pos + len(seg.text)
        if seg.message != -1:
            out.append(seg)
            continue
        cuts = sorted(
            {start, pos, *(x for a, b in spans.values() for x in (a, b) if start < x < pos)}
        )
        for a, b in zip(cuts, cuts[1:]):
            owner = next((j for j, (c, d) in spans.items() if c <= a and b <= d), -1)
            out.append(Segment(text[a:b], owner, "prompt" if owner >= 0 else seg.kind))
    return [s for s in out if s.text]


def _asked_spans(
    t: TokenizerTemplate, messages: list[dict], tools, text: str
) -> dict[int, tuple[int, int]]:
    """The characters of `text` that each user, system or tool message asking to be trained
    (`"loss": true`) adds: the render through it less the render before it. A message the template
    writes differently once later turns follow has no such span and is refused."""
    asked = [j for j, m in enumerate(messages) if m.get("loss") and m["role"] != "assistant"]
    spans = {}
    for j in asked:
        try:
            before = _closed(t, render(t.tokenizer, messages[:j], tools, form=t))
        except UserError:  # a template that refuses the conversation before message j
            before = None
        if j == 0 and (before is None or not text.startswith(before)):
            before = ""  # the first message owns what precedes it, unless a bare render writes it
        through = _closed(t, render(t.tokenizer, messages[: j + 1], tools, form=t))
        if (
            before is None
            or not (text.startswith(before) and text.startswith(through))
            or len(before) >= len(through)
        ):
            raise UserError(
                f'message {j + 1} ({messages[j]["role"]}) asks to be trained ("loss": true), but '
                f"the {t.name} chat template writes it differently once later turns follow, so its "
                "text cannot be cut out; drop the flag, or use --train_on_inputs True to train "
                "every token."
            )
        spans[j] = (len(before), len(through))
    return spans


_PROBE = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Again"},
    {"role": "assistant", "content": "Bye"},
]
_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "probe_tool",
            "description": "d",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
]
_CALL = [
    {"role": "user", "content": "Hi"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "a0000000b",
                "type": "function",
                "function": {"name": "probe_tool", "arguments": {"q": "x"}},
            }
        ],
    },
    {"role": "tool", "content": "done", "tool_call_id": "a0000000b", "name": "probe_tool"},
    {"role": "assistant", "content": "Done"},
]


def _forms(t: TokenizerTemplate) -> None:
    """Ask the template once how it reads tool-call arguments and tools (see the module
    docstring)."""

    def quiet(messages, tools=None):
        try:
            return render(t.tokenizer, messages, tools, form=t)
        except UserError:
            return None

    as_mapping = quiet(_CALL[:2], _TOOLS)
    t.args_as_text = as_mapping is None or "{'q': 'x'}" in as_mapping
    text = '{"q":"x"}'  # as text, in a layout no serializer writes: kept only where it is verbatim
    t.args_kept = True
    call = {**_CALL[1]["tool_calls"][0], "function": {"name": "probe_tool", "arguments": text}}
    as_text = quiet([_CALL[0], {**_CALL[1], "tool_calls": [call]}], _TOOLS)
    t.args_kept = not t.args_as_text and as_text is not None and text in as_text
    system = {"role": "system", "content": "S"}
    plain = quiet([system, *_PROBE[:2]])
    for value in (json.dumps(_TOOLS), _TOOLS):
        t.message_tools = True
        with_field = quiet([{**system, "tools": value}, *_PROBE[:2]])
        if with_field is not None and plain is not None and with_field != plain:
            return
    t.message_tools = False


def _probe_samples(t: TokenizerTemplate, conv: list[dict], tools) -> list[list[Segment]]:
    try:
        return [render_segments(t, conv, tools)]
    except (NotPrefixConsistent, UserError):
        try:  # a template that rewrites history: each answer alone
            return [
                render_segments(t, conv[: k + 1], tools, last_answer_only=True)
                for k in range(1, len(conv), 2)
            ]
        except (NotPrefixConsistent, UserError):
            return []


def _next_tag(
    t: TokenizerTemplate, conv: list[dict], k: int, tools, special: list[str]
) -> str | None:
    """The special token that opens the turn after answer k (GLM's <|user|> or <|observation|>)."""
    try:
        a, b = (
            render(t.tokenizer, conv[: k + 1], tools, form=t),
            render(t.tokenizer, conv[: k + 2], tools, form=t),
        )
    except UserError:
        return None
    rest = b[_common_prefix(a, b) :]
    found = [(rest.find(x), x) for x in special if x in rest]
    return min(found)[1] if found else None


def _stops(t: TokenizerTemplate, special: list[str]) -> list[str]:
    """Every token that ends an assistant turn in the probe conversations (plain and tool calls:
    gpt-oss ends a call with <|call|>, an answer with <|return|>); where no token ends a plain
    answer (GLM), the role tags that open the turn after an answer end it."""
    t.stop = stops = [t.tokenizer.eos_token] if t.tokenizer.eos_token else []
    probes = {0: _probe_samples(t, _PROBE, None), 1: _probe_samples(t, _CALL, _TOOLS)}
    ending_mode = any(
        seg.kind == "answer" and any(seg.text.endswith(x) for x in special)
        for sample in probes[0]
        for seg in sample
    )
    for n, (conv, tools) in enumerate(((_PROBE, None), (_CALL, _TOOLS))):
        answers = [seg for sample in probes[n] for seg in sample if seg.kind == "answer"]
        for seg in answers:
            tok = (
                next((x for x in special if seg.text.endswith(x)), None)
                if ending_mode
                else (
                    _next_tag(t, conv, seg.message, tools, special)
                    if seg.message + 1 < len(conv)
                    else None
                )
            )
            if tok and tok not in stops:
                stops.append(tok)
    return stops


def own_template(tokenizer, kwargs: dict | None = None) -> TokenizerTemplate:
    """The tokenizer's template, its forms and its stop tokens."""
    t = TokenizerTemplate(tokenizer, kwargs=dict(kwargs or {}))
    _forms(t)
    special = sorted(
        (
            x
            for x in set(tokenizer.all_special_tokens)
            | {str(a) for a in tokenizer.get_added_vocab()}
            if x
        ),
        key=len,
        reverse=True,
    )
    t.complete_suffix = _complete_suffix(t, special)
    t.stop = _stops(t, special)
    probe = _probe_answer(t)
    ending = next((tok for tok in special if probe.endswith(tok)), None)
    if ending:
        t.turn_end = ending
    else:  # turns end where the next role tag begins (GLM): that token is trained, EOS after the
        # last answer
        t.turn_end, t.final_turn_end = "", tokenizer.eos_token or ""
    return t


def _complete_suffix(t: TokenizerTemplate, special: list[str]) -> str:
    """What the template writes after the last message only when no generation prompt is asked for
    (Phi-3 closes a finished conversation with <|endoftext|>): the text a closed render of one
    question has where the render asking for an answer has the generation prompt, cut at a whole
    token. It counts only where the probe chat is prefix-consistent once it is taken off."""

    def quiet(messages, generation=False):
        try:
            return render(t.tokenizer, messages, add_generation_prompt=generation, form=t)
        except UserError:
            return None

    closed, asking = quiet(_PROBE[:1]), quiet(_PROBE[:1], True)
    one, two = quiet(_PROBE[:2]), quiet(_PROBE)
    if None in (closed, asking, one, two):
        return ""
    cut = _common_prefix(closed, asking)
    cut = min(
        (
            m.start()
            for x in special
            for m in re.finditer(re.escape(x), closed)
            if m.start() < cut < m.end()
        ),
        default=cut,
    )
    suffix = closed[cut:]
    if not (suffix and one.endswith(suffix) and two.endswith(suffix)):
        return ""
    return suffix if two.startswith(one[: -len(suffix)]) and not two.startswith(one) else ""


def _probe_answer(t: TokenizerTemplate) -> str:
    try:
        return [s for s in render_segments(t, _PROBE[:2]) if s.kind == "answer"][0].text
    except (
        NotPrefixConsistent,
        IndexError,
        UserError,
    ):  # a template that refuses the probe: no end token known
        return ""
