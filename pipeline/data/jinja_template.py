"""The Jinja form of a project template: what the saved tokenizer's `chat_template` holds.

The Jinja body mirrors `templates.render_segments` step for step (a test renders every template both
ways), so `apply_chat_template` at inference gives exactly the text training used.
"""

from __future__ import annotations

import json
from typing import Any

# The template fields the Jinja body reads, written into it as a literal mapping `t`.
FIELDS = ("bos", "default_system", "system", "system_in_user", "user", "assistant", "generation_prompt", "turn_end",
          "final_turn_end", "complete_suffix", "strip", "observation", "observation_open", "observation_close", "history_join", "system_after_tools", "tools_system", "tool_json", "tool_call",
          "tool_call_turn")


def jinja_literal(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=True)


_JINJA_BODY = """
{%- set ns = namespace(system=t.default_system, start=0, first_user=true) -%}
{%- if messages and messages[0].role == 'system' -%}{%- set ns.system = messages[0].content or '' -%}{%- set ns.start = 1 -%}{%- endif -%}
{%- if ns.system is not none and t.strip -%}{%- set ns.system = ns.system | trim -%}{%- endif -%}
{%- if tools and t.tools_system is none -%}{{- raise_exception('this chat template does not write tool definitions') -}}{%- endif -%}
{%- set own_system = ns.system -%}
{%- if tools -%}
{%- set ns2 = namespace(text='') -%}
{%- if t.tool_json == 'chatglm3' -%}{%- set ns2.text = tools | tojson(indent=4) -%}{%- endif -%}
{%- for tool in tools if t.tool_json != 'chatglm3' -%}
{%- if t.tool_json == 'glm4' -%}{%- set f = tool.function if tool.function is defined else tool -%}
{%- set ns2.text = ns2.text ~ '\\n## ' ~ f.name ~ '\\n\\n' ~ (f | tojson(indent=4)) ~ '\\n在调用上述函数时，请使用 Json 格式表示调用的参数。' -%}
{%- else -%}{%- set ns2.text = ns2.text ~ ('\\n' if not loop.first else '') ~ (tool | tojson) -%}{%- endif -%}
{%- endfor -%}
{%- set ns.system = t.tools_system | replace('{system}', ns.system or '') | replace('{tools}', ns2.text) -%}
{%- endif -%}
{{- t.bos -}}
{%- if ns.system is not none and t.system is not none -%}{{- t.system | replace('{content}', ns.system) -}}
{%- if tools and t.system_after_tools is not none and own_system -%}{{- t.system_after_tools | replace('{content}', own_system) -}}{%- endif -%}{%- endif -%}
{%- set nh = namespace(last_user=-1) -%}{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set nh.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages[ns.start:] -%}
{%- set content = m.content or '' -%}{%- if t.strip -%}{%- set content = content | trim -%}{%- endif -%}
{%- if t.history_join is not none and loop.index0 + ns.start < nh.last_user and m.role in ['user', 'assistant'] -%}
{%- set ns.first_user = false -%}{{- content ~ t.history_join -}}
{%- elif m.role == 'user' -%}
{%- if ns.first_user and ns.system is not none and t.system is none -%}{%- set content = t.system_in_user | replace('{system}', ns.system) | replace('{content}', content) -%}{%- endif -%}
{%- set ns.first_user = false -%}{{- t.user | replace('{content}', content) -}}
{%- elif m.role == 'tool' -%}{%- if not (loop.previtem is defined and loop.previtem.role == 'tool') -%}{{- t.observation_open -}}{%- endif -%}
{{- t.observation | replace('{content}', content) -}}{%- if not (loop.nextitem is defined and loop.nextitem.role == 'tool') -%}{{- t.observation_close -}}{%- endif -%}
{%- elif m.role == 'assistant' -%}
{%- set calls = m.tool_calls or [] -%}
{%- if calls and t.tool_call_turn -%}
{%- for c in calls -%}{%- set args = c.function.arguments if c.function.arguments is string else (c.function.arguments | tojson) -%}
{%- set nk = namespace(text='') -%}{%- if c.function.arguments is mapping -%}{%- for k, v in c.function.arguments.items() -%}
{%- if v is string -%}{%- set q = '"' if ("'" in v and '"' not in v) else "'" -%}
{%- set r = q ~ (v | replace('\\\\', '\\\\\\\\') | replace('\\n', '\\\\n') | replace(q, '\\\\' ~ q)) ~ q -%}
{%- elif v is sameas true -%}{%- set r = 'True' -%}{%- elif v is sameas false -%}{%- set r = 'False' -%}{%- elif v is none -%}{%- set r = 'None' -%}
{%- else -%}{%- set r = v | tojson -%}{%- endif -%}
{%- set nk.text = nk.text ~ (', ' if not loop.first else '') ~ k ~ '=' ~ r -%}{%- endfor -%}{%- endif -%}
{{- t.tool_call_turn | replace('{name}', c.function.name) | replace('{arguments}', args) | replace('{kwargs}', nk.text) -}}{%- endfor -%}
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


def jinja_for(t) -> str:
    """A self-contained Jinja chat_template equivalent to `render` for the Template `t`."""
    values = ", ".join(f'"{name}": {jinja_literal(getattr(t, name))}' for name in FIELDS)
    return f"{{#- chat template '{t.name}' written by llm-pipeline; format: {t.source} -#}}\n{{%- set t = {{{values}}} -%}}" + _JINJA_BODY
