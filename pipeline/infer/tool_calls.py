"""Tool calls through the chat template, for pipeline/infer/server.py: ChatTools renders a request's
tools and tool history with the model's saved template (as training renders them:
rendering.render for the tokenizer's template, templates.render for --template_name), and knows
how that template writes a call (CallFormat).

The call format is not a table of families: it is read off the template itself once, by rendering an
assistant turn holding one probe call and one holding two (`derive`). Whatever the template writes
around the call's name and its arguments (Qwen's <tool_call> tags, Llama-3.1's
{"name", "parameters"} JSON, Mistral's [TOOL_CALLS] list with 9-character ids, GLM-4's name line,
ChatGLM3's
tool_call(...) keywords, the project templates' JSON fallback) becomes the literal text
`parse_calls` expects around them in the model's answer. A template whose probe render does not show
name and arguments (it writes no calls, or writes arguments as XML) has no CallFormat, and its
answers come back as text. CallStream holds back streamed text that may be the start of a call until
it is known.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers.generation.streamers import BaseStreamer

from pipeline.data import rendering
from pipeline.data.templates import render as render_project
from pipeline.errors import UserError
from pipeline.model.stops import stop_ids_of

ID = "\x00id\x00"  # stands for a call id inside CallFormat's literals
_NAMES, _IDS, _ARGS = (
    ("probe_alpha", "probe_beta"),
    ("a0000000b", "c0000000d"),
    ({"q": "x"}, {"q": "y"}),
)
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": n,
            "description": "d",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
    for n in _NAMES
]
_NAME = re.compile(r"[\w\-.]+")


@dataclass(frozen=True)
class CallFormat:
    """An answer holding calls is head + (prefix NAME mid ARGUMENTS suffix), joined by sep, +
    tail."""

    head: str
    prefix: str
    mid: str
    suffix: str
    sep: str | None  # None: the template writes one call per answer
    tail: str
    kwargs: bool = False  # arguments as Python keywords (ChatGLM3's tool_call(city='Paris'))

    @property
    def name_first(self) -> bool:
        """The answer opens with the call's name (GLM-4, ChatGLM3): a call is known only from its
        first line."""
        return not (self.head + self.prefix).strip()


def _pattern(literal: str) -> str:
    """A literal of the format as a regex: whitespace runs match any whitespace, a call id any
    id."""
    out = []
    for piece in re.split(r"(\s+|\x00id\x00)", literal):
        out.append(
            r"\s*"
            if piece.isspace()
            else r"(?P<id>[\w\-.:]{1,64})"
            if piece == ID
            else re.escape(piece)
        )
    return "".join(out)


def _match(literal: str, text: str, pos: int) -> re.Match | None:
    return re.compile(_pattern(literal)).match(text, pos)


def kwargs_arguments(code: str) -> dict:
    """ChatGLM3's keyword arguments (`city='Paris', days=3`) as a mapping: Python literals, or JSON
    where the template wrote a value as JSON (lists and objects); ValueError when the text is not
    such arguments."""
    try:
        call = ast.parse(f"f({code})", mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"not keyword arguments: {code[:60]!r}") from e
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
        raise ValueError(f"not keyword arguments: {code[:60]!r}")
    out = {}
    for k in call.keywords:
        source = ast.get_source_segment(f"f({code})", k.value)
        try:
            out[k.arg] = ast.literal_eval(k.value)
        except ValueError:
            out[k.arg] = json.loads(source)  # true/false/null inside a JSON value
    return out


def _arguments(text: str, pos: int, fmt: CallFormat) -> tuple[dict, int] | None:
    """The arguments at pos and where they end: a JSON object, or keywords up to the format's
    suffix."""
    if fmt.kwargs:
        end = re.compile(_pattern(fmt.suffix)).search(text, pos)
        try:
            return (kwargs_arguments(text[pos : end.start()]), end.start()) if end else None
        except (ValueError, json.JSONDecodeError):
            return None
    pos += len(text[pos:]) - len(text[pos:].lstrip())
    try:
        value, end = json.JSONDecoder().raw_decode(text, pos)
    except json.JSONDecodeError:
        return None
    return (value, end) if isinstance(value, dict) else None


def _call_at(
    text: str, pos: int, fmt: CallFormat, names: set[str], lead: str
) -> tuple[dict, int] | None:
    """One call (lead + name mid arguments suffix) at pos, of a tool the request offers, and where
    it ends."""
    m = _match(lead, text, pos)
    name = m and _NAME.match(text, m.end())
    if not name or name.group() not in names:
        return None
    after = _match(fmt.mid, text, name.end())
    args = after and _arguments(text, after.end(), fmt)
    close = args and _match(fmt.suffix, text, args[1])
    if not close:
        return None
    ids = [x.group("id") for x in (m, after, close) if "id" in x.re.groupindex and x.group("id")]
    return {"name": name.group(), "arguments": args[0], "id": ids[0] if ids else None}, close.end()


def _openers(fmt: CallFormat) -> list[str]:
    """The literal that opens the calls: head and prefix as rendered, or the prefix alone (a model
    that writes text first: Qwen3's thinking, where the probe rendered an empty thought)."""
    return [x for x in dict.fromkeys((fmt.head + fmt.prefix, fmt.prefix)) if x.strip()]


def parse_calls(text: str, fmt: CallFormat, names: set[str]) -> tuple[str, list[dict]] | None:
    """(the text before the calls, the calls) when the answer is calls as the template writes them,
    of tools the request offers; None when it is an ordinary answer. Each call is
    {"name", "arguments" (a mapping), "id"}."""
    starts = (
        [(0, len(text) - len(text.lstrip()), "")]
        if fmt.name_first
        else [
            (m.start(), m.end(), "")
            for o in _openers(fmt)
            if (m := re.compile(_pattern(o)).search(text))
        ]
    )
    for start, pos, _ in sorted(starts)[:1]:
        calls, lead = [], ""
        while (found := _call_at(text, pos, fmt, names, lead)) is not None:
            calls.append(found[0])
            pos, lead = found[1], (fmt.sep or "") + fmt.prefix
            if fmt.sep is None:
                break
        rest = text[pos:]
        if calls and (not rest.strip() or _match(fmt.tail, rest, 0)):
            return text[:start], calls
    return None


def _common_prefix(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _cut(text: str, k: int, whole: int) -> int:
    """k moved back to a place where a tag, bracket or line ends (never inside a tag such as
    <｜tool▁call▁end｜>), unless it is `whole` (all of the shorter text agreed)."""
    while 0 < k < min(whole, len(text)) and text[k - 1] not in ">}]\n" and not text[k].isspace():
        k -= 1
    return k


def _locate(text: str, name: str, args: dict, kwargs: bool) -> tuple[int, int, int, int] | None:
    """Where the probe's name and its arguments (as JSON, or as keywords) are in a rendered
    answer."""
    start = text.find(name)
    if start < 0:
        return None
    end = start + len(name)
    if kwargs:
        written = ", ".join(f"{k}={v!r}" for k, v in args.items())
        at = text.find(written, end)
        return (start, end, at, at + len(written)) if at >= 0 else None
    for at in (i for i, ch in enumerate(text) if ch == "{" and i >= end):
        try:
            value, stop = json.JSONDecoder().raw_decode(text, at)
        except json.JSONDecodeError:
            continue
        if value == args:
            return start, end, at, stop
    return None


def derive(
    render: Callable[[list[dict], list[dict] | None, bool], str], stops: list[str]
) -> CallFormat | None:
    """How the template writes calls, read off its render of one probe call and of two (see the
    module docstring); None when it does not show a call's name and arguments, or never shows the
    tools."""
    ask = [{"role": "user", "content": "Hi"}]

    def answer(n: int) -> str | None:
        calls = [
            {
                "id": _IDS[k],
                "type": "function",
                "function": {"name": _NAMES[k], "arguments": _ARGS[k]},
            }
            for k in range(n)
        ]
        try:
            prompt, full = (
                render(ask, _PROBE_TOOLS, True),
                render(
                    [*ask, {"role": "assistant", "content": "", "tool_calls": calls}],
                    _PROBE_TOOLS,
                    False,
                ),
            )
        except UserError:
            return None
        k = _common_prefix(
            prompt, full
        )  # where a pre-filled prompt (QwQ's <think>) and the turn part
        text = full[_cut(full, k, len(prompt)) :]
        ends = [text.find(s) for s in stops if s and s in text]
        return text[: min(ends)] if ends else text.rstrip()

    one = answer(1)
    if one is None or render(ask, _PROBE_TOOLS, True) == render(
        ask, None, True
    ):  # tools are never shown (DeepSeek-R1)
        return None
    kwargs = _locate(one, _NAMES[0], _ARGS[0], False) is None
    at = _locate(one, _NAMES[0], _ARGS[0], kwargs)
    if at is None:
        return None
    before, mid, after = one[: at[0]], one[at[1] : at[2]], one[at[3] :]
    two = answer(2)
    first, second = (
        (_locate(two, _NAMES[0], _ARGS[0], kwargs), _locate(two, _NAMES[1], _ARGS[1], kwargs))
        if two
        else (None, None)
    )
    if not (first and second and first[3] <= second[0]):  # one call per answer (Llama-3.1)
        fmt = CallFormat("", before, mid, after, None, "", kwargs)
    else:
        between = two[
            first[3] : second[0]
        ]  # the first call's suffix, sep, the second call's prefix
        n = _cut(between, _common_prefix(after, between), len(after))
        rest = between[n:][::-1]  # the second call's prefix starts at a tag, bracket or line
        m = _common_prefix(before[::-1], rest)
        while (
            0 < m < min(len(before), len(rest))
            and rest[m - 1] not in "<{[\n"
            and not rest[m].isspace()
        ):
            m -= 1
        fmt = CallFormat(
            before[: len(before) - m],
            before[len(before) - m :],
            mid,
            after[:n],
            between[n : len(between) - m],
            after[n:],
            kwargs,
        )
    return CallFormat(
        *(
            x.replace(_IDS[0], ID).replace(_IDS[1], ID) if isinstance(x, str) else x
            for x in (fmt.head, fmt.prefix, fmt.mid, fmt.suffix, fmt.sep, fmt.tail)
        ),
        kwargs,
    )


def openai_calls(calls: list[dict], make_id: Callable[[], str]) -> list[dict]:
    """Parsed calls as OpenAI's message.tool_calls: arguments as JSON text, an id for each."""
    return [
        {
            "id": c["id"] or make_id(),
            "type": "function",
            "function": {
                "name": c["name"],
                "arguments": json.dumps(c["arguments"], ensure_ascii=False),
            },
        }
        for c in calls
    ]


@dataclass
class CallStream:
    """The streamed text split into what can be sent as content now and what must wait: text from
    where a call may begin is held until the answer ends (or it turns out to be no call)."""

    fmt: CallFormat | None
    names: set[str]
    sent: int = 0  # characters of the answer sent as content
    free: bool = False  # the answer can no longer become a call: everything goes out as it comes

    def hold_from(self, text: str) -> int:
        """Where in `text` (the answer so far) a call may begin; len(text) when nowhere."""
        if self.fmt is None or self.free:
            return len(text)
        if self.fmt.name_first:
            body = text.lstrip()
            if any(
                c.startswith(body) or body.startswith(c)
                for c in (n + self.fmt.mid for n in self.names)
            ):
                return 0
            self.free = True
            return len(text)
        holds = [len(text)]
        for opener in _openers(self.fmt):
            found = re.compile(_pattern(opener)).search(text)
            holds.append(found.start() if found else len(text))
            lit = opener.lstrip()
            holds += [
                len(text) - k
                for k in range(min(len(lit), len(text)), 0, -1)
                if lit.startswith(text[len(text) - k :])
            ][:1]
        return min(holds)

    def ready(self, text: str) -> str:
        """The next piece of content that can go out now."""
        upto = self.hold_from(
            text.rstrip("\ufffd")
        )  # a character whose bytes are not all generated yet waits
        piece = text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece


@dataclass
class TokenTap(BaseStreamer):
    """The ids model.generate writes (it hands the prompt first, then each new token), decoded with
    special tokens kept, so the call markers that are special tokens ([TOOL_CALLS]) can be parsed;
    `on_text` gets the answer so far after each token."""

    tokenizer: object
    stop_ids: list[int]
    on_text: Callable[[str], None] | None = None
    ids: list[int] = field(default_factory=list)
    prompt_seen: bool = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids += value.flatten().tolist()
        if self.on_text:
            self.on_text(self.text())

    def end(self) -> None:
        pass

    def text(self) -> str:
        ids = self.ids[:-1] if self.ids and self.ids[-1] in self.stop_ids else self.ids
        return self.tokenizer.decode(ids, skip_special_tokens=False)


class ChatTools:
    """A served model's tool support: rendering requests with tools or tool history as training
    renders them, and its CallFormat (None when the template's calls cannot be read back)."""

    def __init__(self, chat):
        self.tokenizer, self.template_name = chat.tokenizer, chat.template_name
        self.form = None if chat.template_name else rendering.own_template(chat.tokenizer)
        self.stop_ids = stop_ids_of(chat.generation_config)
        self.stops = [self.tokenizer.convert_ids_to_tokens(i) for i in self.stop_ids]
        self.special = sorted(set(self.tokenizer.all_special_tokens), key=len, reverse=True)
        self.format = derive(self.render, self.stops)

    def render(
        self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text; UserError (one sentence) when the template rejects the messages."""
        if self.template_name:
            return render_project(self.template_name, messages, add_generation_prompt, tools)
        try:
            return rendering.render(
                self.tokenizer, messages, tools, add_generation_prompt, form=self.form
            )
        except UserError as e:
            raise UserError(
                f"the model's chat template rejects these messages ({e.__cause__ or e})."
            ) from e

    def writes_tools(self, messages: list[dict], tools: list[dict]) -> bool:
        """Whether the template shows the tools to the model at all (some ignore the tools
        argument)."""
        return self.render(messages, tools) != self.render(messages, None)

    def visible(self, text: str) -> str:
        """Text as the client sees it: without special tokens (as decoding with skip_special_tokens
        gives it)."""
        for token in self.special:
            text = text.replace(token, "")
        return text

    def calls(
        self, text: str, names: set[str], finish_reason: str
    ) -> tuple[str, list[dict]] | None:
        """The answer's calls of the offered tools (see parse_calls); None for text, or an answer
        cut short."""
        if self.format is None or not names or finish_reason != "stop":
            return None
        return parse_calls(text, self.format, names)

    def message(
        self, text: str, names: set[str], finish_reason: str, make_id: Callable[[], str]
    ) -> tuple[dict, str]:
        """OpenAI's assistant message for the answer text (special tokens kept) and its
        finish_reason."""
        found = self.calls(text, names, finish_reason)
        if found is None:
            return {"role": "assistant", "content": self.visible(text)}, finish_reason
        content = self.visible(found[0]).strip()
        return {
            "role": "assistant",
            "content": content or None,
            "tool_calls": openai_calls(found[1], make_id),
        }, "tool_calls"
