"""Chat templates: load the data files in templates/, render conversations, build a Jinja chat_template.

A template file declares strings; `{content}` marks where a message's text goes:

  bos                 text written once at the very start
  default_system      system prompt used when the conversation has none
  system              format of the system turn; null = no system turn (see system_in_user)
  system_in_user      with system: null, the first user message becomes this ({system}, {content})
  user, assistant     formats of the user and assistant turns
  generation_prompt   what add_generation_prompt appends; every rendered assistant turn starts with it
  turn_end            the text right after assistant content that ends the turn (trained). "" means
                      the next turn's first token ends it, or final_turn_end after the last turn
  final_turn_end      training-only end of the last assistant turn for templates with turn_end ""
  complete_suffix     appended after the last message when no generation prompt is asked for
  strip               trim message contents (as the official template does)
  observation         format of a tool result (role "tool")
  tools_system        system text when tools are given ({system}, {tools}); tool_json says how each
                      tool is written: compact (one JSON line each) or glm4 (a titled, indented block)
  tool_call           how one tool call is written inside an assistant turn ({name}, {arguments})
  tool_call_turn      or: a whole assistant turn per tool call ({name}, {arguments})
  stop                end-of-turn strings inference stops on (generation_config.eos_token_id)
  special_tokens      strings that must be single tokens; missing ones are added to the tokenizer

`render` is the Python renderer; `chat_template_jinja` writes the same logic as Jinja so the saved
tokenizer's apply_chat_template gives the same text (a test checks both on every template).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "templates"
FIELDS = ("bos", "default_system", "system", "system_in_user", "user", "assistant", "generation_prompt", "turn_end",
          "final_turn_end", "complete_suffix", "strip", "observation", "tools_system", "tool_json", "tool_call",
          "tool_call_turn")


@dataclass(frozen=True)
class Template:
    name: str
    source: str
    user: str
    assistant: str
    observation: str
    bos: str = ""
    default_system: str | None = None
    system: str | None = None
    system_in_user: str | None = None
    generation_prompt: str = ""
    turn_end: str = ""
    final_turn_end: str = ""
    complete_suffix: str = ""
    strip: bool = False
    tools_system: str | None = None
    tool_json: str = "compact"
    tool_call: str | None = None
    tool_call_turn: str | None = None
    stop: tuple[str, ...] = ()
    special_tokens: tuple[str, ...] = field(default_factory=tuple)

    @property
    def assistant_tail(self) -> str:
        """Untrained text after the turn end, e.g. the newline after <|im_end|>."""
        after = self.assistant.split("{content}", 1)[1]
        return after[len(self.turn_end):]


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))


@lru_cache(maxsize=None)
def get_template(name: str) -> Template:
    path = TEMPLATE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"--template_name {name} is unknown; choose one of: auto, {', '.join(template_names())}.")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["stop"] = tuple(data.get("stop", ()))
    data["special_tokens"] = tuple(data.get("special_tokens", ()))
    template = Template(**data)
    _check(template, path)
    return template


def _check(t: Template, path: Path) -> None:
    before, _, after = t.assistant.partition("{content}")
    if not _ or not before.startswith(t.generation_prompt):
        raise ValueError(f"{path}: assistant must contain {{content}} and start with generation_prompt")
    if not after.startswith(t.turn_end):
        raise ValueError(f"{path}: turn_end must directly follow {{content}} in assistant")
    if t.system is None and t.system_in_user is None:
        raise ValueError(f"{path}: give system or system_in_user")


# ---------------------------------------------------------------- rendering (Python)

def _tools_text(t: Template, tools: list[dict]) -> str:
    if t.tool_json == "glm4":
        return "".join(
            f"\n## {f['name']}\n\n{json.dumps(f, ensure_ascii=False, indent=4)}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
            for f in (tool.get("function", tool) for tool in tools))
    return "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)


def _arguments(call: dict) -> str:
    args = call["function"]["arguments"]
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _fill(fmt: str, **values: str) -> str:
    for key, value in values.items():
        fmt = fmt.replace("{" + key + "}", value)
    return fmt


@dataclass
class Segment:
    """A piece of rendered text: which message it belongs to (-1 = template text) and its kind."""

    text: str
    message: int
    kind: str  # "prompt" (never trained by default), "answer" (assistant text + turn end), "tail"


def render_segments(t: Template, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = False) -> list[Segment]:
    segments = [Segment(t.bos, -1, "prompt")] if t.bos else []
    system, start = t.default_system, 0
    if messages and messages[0]["role"] == "system":
        system, start = messages[0].get("content") or "", 1
    if system is not None and t.strip:
        system = system.strip()
    if tools:
        system = _fill(t.tools_system, system=system or "", tools=_tools_text(t, tools))
    first_user = True
    if system is not None and t.system is not None:
        segments.append(Segment(_fill(t.system, content=system), 0 if start else -1, "prompt"))
    for i in range(start, len(messages)):
        m = messages[i]
        content = m.get("content") or ""
        content = content.strip() if t.strip else content
        if m["role"] == "user":
            if first_user and system is not None and t.system is None:
                content = _fill(t.system_in_user, system=system, content=content)
            first_user = False
            segments.append(Segment(_fill(t.user, content=content), i, "prompt"))
        elif m["role"] == "tool":
            segments.append(Segment(_fill(t.observation, content=content), i, "prompt"))
        elif m["role"] == "assistant":
            segments += _assistant_segments(t, m, content, i)
    if add_generation_prompt:
        segments.append(Segment(t.generation_prompt, -1, "prompt"))
    elif t.complete_suffix:
        segments.append(Segment(t.complete_suffix, -1, "tail"))
    return [s for s in segments if s.text]


def _assistant_segments(t: Template, m: dict, content: str, i: int) -> list[Segment]:
    calls = m.get("tool_calls") or []
    if calls and t.tool_call_turn:
        turns = [_fill(t.tool_call_turn, name=c["function"]["name"], arguments=_arguments(c)) for c in calls]
        tail = ""
    else:
        parts = [content] if content else []
        parts += [_fill(t.tool_call, name=c["function"]["name"], arguments=_arguments(c)) for c in calls]
        turns, tail = [_fill(t.assistant, content="\n".join(parts))], t.assistant_tail
    out = []
    for text in turns:
        gp = t.generation_prompt
        out += [Segment(gp, i, "prompt"), Segment(text[len(gp): len(text) - len(tail)], i, "answer"), Segment(tail, i, "tail")]
    return out


def render(template_name: str, messages: list[dict], add_generation_prompt: bool = False,
           tools: list[dict] | None = None) -> str:
    """The exact text the model sees for OpenAI-style messages (BOS included where the template writes it)."""
    return "".join(s.text for s in render_segments(get_template(template_name), messages, tools, add_generation_prompt))


# ---------------------------------------------------------------- the same logic as Jinja

def _jinja_literal(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=True)


_JINJA_BODY = """
{%- set ns = namespace(system=t.default_system, start=0, first_user=true) -%}
{%- if messages and messages[0].role == 'system' -%}{%- set ns.system = messages[0].content or '' -%}{%- set ns.start = 1 -%}{%- endif -%}
{%- if ns.system is not none and t.strip -%}{%- set ns.system = ns.system | trim -%}{%- endif -%}
{%- if tools -%}
{%- set ns2 = namespace(text='') -%}
{%- for tool in tools -%}
{%- if t.tool_json == 'glm4' -%}{%- set f = tool.function if tool.function is defined else tool -%}
{%- set ns2.text = ns2.text ~ '\\n## ' ~ f.name ~ '\\n\\n' ~ (f | tojson(indent=4)) ~ '\\n在调用上述函数时，请使用 Json 格式表示调用的参数。' -%}
{%- else -%}{%- set ns2.text = ns2.text ~ ('\\n' if not loop.first else '') ~ (tool | tojson) -%}{%- endif -%}
{%- endfor -%}
{%- set ns.system = t.tools_system | replace('{system}', ns.system or '') | replace('{tools}', ns2.text) -%}
{%- endif -%}
{{- t.bos -}}
{%- if ns.system is not none and t.system is not none -%}{{- t.system | replace('{content}', ns.system) -}}{%- endif -%}
{%- for m in messages[ns.start:] -%}
{%- set content = m.content or '' -%}{%- if t.strip -%}{%- set content = content | trim -%}{%- endif -%}
{%- if m.role == 'user' -%}
{%- if ns.first_user and ns.system is not none and t.system is none -%}{%- set content = t.system_in_user | replace('{system}', ns.system) | replace('{content}', content) -%}{%- endif -%}
{%- set ns.first_user = false -%}{{- t.user | replace('{content}', content) -}}
{%- elif m.role == 'tool' -%}{{- t.observation | replace('{content}', content) -}}
{%- elif m.role == 'assistant' -%}
{%- set calls = m.tool_calls or [] -%}
{%- if calls and t.tool_call_turn -%}
{%- for c in calls -%}{%- set args = c.function.arguments if c.function.arguments is string else (c.function.arguments | tojson) -%}
{{- t.tool_call_turn | replace('{name}', c.function.name) | replace('{arguments}', args) -}}{%- endfor -%}
{%- else -%}
{%- set ns3 = namespace(text=content) -%}
{%- for c in calls -%}{%- set args = c.function.arguments if c.function.arguments is string else (c.function.arguments | tojson) -%}
{%- set ns3.text = ns3.text ~ ('\\n' if ns3.text else '') ~ (t.tool_call | replace('{name}', c.function.name) | replace('{arguments}', args)) -%}{%- endfor -%}
{{- t.assistant | replace('{content}', ns3.text) -}}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- t.generation_prompt -}}{%- else -%}{{- t.complete_suffix -}}{%- endif -%}
"""


def chat_template_jinja(template_name: str) -> str:
    """A self-contained Jinja chat_template equivalent to `render` for this template."""
    t = get_template(template_name)
    values = ", ".join(f'"{name}": {_jinja_literal(getattr(t, name))}' for name in FIELDS)
    return f"{{#- chat template '{t.name}' written by llm-pipeline; format: {t.source} -#}}\n{{%- set t = {{{values}}} -%}}" + _JINJA_BODY
