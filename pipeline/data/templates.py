"""Chat templates: load the data files in templates/, render conversations, build a Jinja
chat_template.

A template file declares strings; `{content}` marks where a message's text goes:

  bos                 text written once at the very start
  default_system      system prompt used when the conversation has none
  system              format of the system turn; null = no system turn (see system_in_user)
  system_in_user      with system: null, the first user message becomes this ({system}, {content})
  user, assistant     formats of the user and assistant turns
  generation_prompt   what add_generation_prompt appends; every rendered assistant turn starts with
                      it
  turn_end            the text right after assistant content that ends the turn (trained). "" means
                      the next turn's first token ends it, or final_turn_end after the last turn
  final_turn_end      training-only end of the last assistant turn for templates with turn_end ""
  complete_suffix     appended after the last message when no generation prompt is asked for
  strip               trim message contents (as the official template does)
  observation         format of a tool result (role "tool"); observation_open / observation_close
                      wrap a run of consecutive results (Qwen2.5: one user turn holds them all)
  history_join        if set, turns before the last user turn are written as their content + this
                      (Yuan2/FastChat: q1<n>a1<n>q2<sep>); earlier answers are then trained in
                      their own samples (the history is not a prefix of the
                      next turn's text)
  tools_system        system text when tools are given ({system}, {tools}); tool_json says how each
                      tool is written: compact (one JSON line each) or glm4 (a titled, indented
                      block) or chatglm3 (the list of function dicts as indented JSON);
                      system_after_tools: the turn the conversation's own system prompt takes after
                      the tools' one ({content})
  tool_call           how one tool call is written inside an assistant turn ({name}, {arguments})
  tool_call_turn      or: a whole assistant turn per tool call ({name}, {arguments}, or {kwargs}:
                      the arguments as Python keywords, city='Paris')
  stop                end-of-turn strings inference stops on (generation_config.eos_token_id)
  special_tokens      strings that must be single tokens; missing ones are added to the tokenizer

There is one renderer: the tokenizer. A template of fields compiles to one Jinja chat_template
(jinja_template.py); formats whose turns depend on what follows them (Mistral v0.3 writes the system
prompt and the tools into the last user turn; Qwen3 writes thinking only after the last question)
are written directly as Jinja: such a file holds `chat_template` (the project's Jinja), `stop` and
`special_tokens` instead of the fields above. Either way `resolve_template` gives the Jinja to the
tokenizer and training renders every conversation through it, exactly as the tokenizer's own
template (`auto`) is trained (rendering.py: each answer cut out between its prompt and the
render through it, split into its own sample where history is rewritten). The saved tokenizer
therefore renders at inference the text training saw, by construction.
`apply_template_to_tokenizer` gives the tokenizer its special tokens, chat_template and stop tokens.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path

import yaml

from pipeline.data.jinja_template import jinja_for, jinja_literal
from pipeline.data.json_text import loads
from pipeline.data.rendering import (
    TokenizerTemplate,
    own_template,
    standard_messages,
)
from pipeline.errors import UserError
from pipeline.model.stops import template_stop_ids

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "templates"


@dataclass(frozen=True)
class Template:
    name: str
    source: str
    user: str
    assistant: str
    observation: str
    observation_open: str = ""
    observation_close: str = ""
    history_join: str | None = None
    system_after_tools: str | None = None
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
    def chat_template(self) -> str:
        """The one Jinja chat_template these fields compile to (jinja_template.py)."""
        return jinja_for(self)


@dataclass(frozen=True)
class JinjaTemplate:
    """A project template written as Jinja (see the module docstring); trained through
    rendering.py."""

    name: str
    source: str
    chat_template: str
    stop: tuple[str, ...] = ()
    special_tokens: tuple[str, ...] = ()


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))


def field_template_names() -> list[str]:
    """The templates written as fields (compiled to Jinja by jinja_template.py), not as Jinja."""
    return [name for name in template_names() if isinstance(get_template(name), Template)]


@cache
def get_template(name: str) -> Template | JinjaTemplate:
    path = TEMPLATE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(
            f"--template_name {name} is unknown; "
            f"choose one of: auto, {', '.join(template_names())}."
        )
    return load_template_file(path)


def load_template_file(path: Path) -> Template | JinjaTemplate:
    """A template from its YAML file; any mistake in the file is a UserError naming the file and
    field."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"template file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"template file {path} must hold a mapping of field names to strings.")
    kind = JinjaTemplate if "chat_template" in data else Template
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(
            f"template file {path}: unknown field(s) {', '.join(unknown)}; "
            f"known fields: {', '.join(sorted(known))}."
        )
    required = (
        ("name", "source", "chat_template", "stop")
        if kind is JinjaTemplate
        else ("name", "source", "user", "assistant", "observation")
    )
    missing = [name for name in required if name not in data]
    if missing:
        raise UserError(f"template file {path}: required field(s) {', '.join(missing)} missing.")
    data["stop"] = tuple(data.get("stop") or ())
    data["special_tokens"] = tuple(data.get("special_tokens") or ())
    if kind is JinjaTemplate:
        return _checked_jinja(JinjaTemplate(**data), path)
    template = Template(**data)
    _check(template, path)
    return template


def _check(t: Template, path: Path) -> None:
    for name in ("user", "assistant", "observation", "generation_prompt", "turn_end"):
        if not isinstance(getattr(t, name), str):
            raise UserError(f"template file {path}: field {name} must be a string.")
    before, found, after = t.assistant.partition("{content}")
    if not found or not before.startswith(t.generation_prompt):
        raise UserError(
            f"template file {path}: field assistant must contain {{content}} "
            "and start with generation_prompt."
        )
    if not after.startswith(t.turn_end):
        raise UserError(
            f"template file {path}: field turn_end must directly follow {{content}} in assistant."
        )
    if t.system is None and t.system_in_user is None:
        raise UserError(f"template file {path}: give the field system or system_in_user.")


def _checked_jinja(t: JinjaTemplate, path: Path) -> JinjaTemplate:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(t.chat_template)
    except Exception as e:  # jinja2's TemplateSyntaxError
        raise UserError(f"template file {path}: chat_template is not valid Jinja ({e}).") from e
    return t


def _writes_text_args(t: Template | JinjaTemplate) -> bool:
    """A template of fields writes text arguments as they are given, unless it writes them as
    keywords (ChatGLM3), which needs a mapping: as the training render reads them (rendering.py)."""
    return isinstance(t, Template) and "{kwargs}" not in (t.tool_call_turn or "")


def _render_jinja(
    t: Template | JinjaTemplate,
    messages: list[dict],
    tools: list[dict] | None,
    add_generation_prompt: bool,
) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(
            [standard_messages(messages, TokenizerTemplate(None, args_kept=_writes_text_args(t)))],
            tools=tools or None,
            chat_template=t.chat_template,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as e:  # the template's raise_exception(...) or a jinja error
        raise UserError(f"template '{t.name}' rejects a conversation: {e}") from e
    return rendered[0]


# ---------------------------------------------------------------- rendering


def render(
    template_name: str,
    messages: list[dict],
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
) -> str:
    """The exact text the model sees for OpenAI-style messages (BOS included where the template
    writes it)."""
    return _render_jinja(get_template(template_name), messages, tools, add_generation_prompt)


def chat_template_jinja(template_name: str) -> str:
    """The Jinja chat_template equivalent to `render` for this template (what the saved tokenizer
    holds)."""
    return get_template(template_name).chat_template


# ---------------------------------------------------------------- choosing a template for a run


def resolve_template(name: str, tokenizer, chat_template_kwargs: str | dict | None = None):
    """--template_name NAME: that project template. auto: the tokenizer's own chat template,
    rendered by transformers for every conversation (rendering.py), so training sees exactly what
    inference sees. A project template written as Jinja is given to the tokenizer and then trained
    the same way. `chat_template_kwargs` reach every render of a template that transformers
    renders."""
    kwargs = template_kwargs(chat_template_kwargs)

    if name != "auto":
        template = get_template(name)
        if kwargs and isinstance(template, Template):
            raise UserError(
                f"--chat_template_kwargs needs a Jinja chat template; template '{name}' has no "
                "variables to set (use --template_name auto or a Jinja template such as qwen3)."
            )
        apply_template_to_tokenizer(tokenizer, template)
        own = own_template(tokenizer, kwargs)
        own.name = template.name
        own.stop = list(dict.fromkeys([*template.stop, *own.stop]))
        if not own.turn_end and getattr(template, "final_turn_end", ""):
            own.final_turn_end = template.final_turn_end  # the declared close (GLM-4's EOS)
        return own
    if not tokenizer.chat_template:
        raise UserError(
            "--template_name auto needs a tokenizer with a chat template; this one has none, so "
            f"pass --template_name (one of {', '.join(template_names())})."
        )
    template = own_template(tokenizer, kwargs)
    logger.info(
        "--template_name auto: training with the tokenizer's own chat template "
        "(answers end with %s; stops %s%s)",
        template.turn_end
        or f"the next turn's first token, {template.final_turn_end!r} after the last",
        template.stop,
        f"; variables {kwargs}" if kwargs else "",
    )
    return template


def apply_template_to_tokenizer(tokenizer, template: Template | JinjaTemplate) -> list[int]:
    """Add the template's missing special tokens, set chat_template; return the stop token ids. The
    tokenizer's own template (auto) stays as it is."""
    if not isinstance(template, (Template, JinjaTemplate)):
        if template.kwargs:
            tokenizer.chat_template = with_defaults(tokenizer.chat_template, template.kwargs)
        return template_stop_ids(tokenizer, template.stop)
    missing = [t for t in template.special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
        logger.warning(
            "template '%s' needs tokens the tokenizer lacks; added %s (embeddings will be resized)",
            template.name,
            missing,
        )
    tokenizer.chat_template = template.chat_template
    return template_stop_ids(tokenizer, template.stop)


# ---------------------------------------------------------------- --chat_template_kwargs


def template_kwargs(text: str | dict | None) -> dict:
    """--chat_template_kwargs: a JSON object (or a mapping from a config file) of template
    variables."""
    if text is None or text == "":
        return {}
    value = text
    if isinstance(text, str):
        try:
            value = loads(text)
        except json.JSONDecodeError as e:
            raise UserError(
                f"--chat_template_kwargs {text!r} is not JSON ({e.msg}); give an object such as "
                "'{\"enable_thinking\": false}'."
            ) from e
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k.isidentifier() for k in value
    ):
        raise UserError(
            f"--chat_template_kwargs {text!r} must be a JSON object whose keys are template "
            "variable names."
        )
    return value


DEFAULTS_MARK = "defaults set by --chat_template_kwargs"


def with_defaults(chat_template: str | dict, kwargs: dict) -> str | dict:
    """The chat template with `kwargs` as defaults of its variables (a render may still pass
    others), so a saved model renders as training did wherever it is loaded."""
    if not kwargs or DEFAULTS_MARK in str(chat_template):
        return chat_template
    if isinstance(chat_template, dict):
        return {name: with_defaults(body, kwargs) for name, body in chat_template.items()}
    head = "".join(
        f"{{%- if {k} is not defined %}}{{%- set {k} = {jinja_literal(v)} %}}{{%- endif %}}"
        for k, v in kwargs.items()
    )
    return f"{{#- {DEFAULTS_MARK} #}}{head}\n{chat_template}"
