"""The Jinja form of a project template: what the saved tokenizer's `chat_template` holds.

It is the only form a template of fields is rendered in: training renders through it as inference
does (rendering.py), so `apply_chat_template` at inference gives exactly the text training used
(tests/golden holds each template's token/label table). It also reads the seed
documents' own message forms as conversations.py normalizes them for training: tools on a message (GLM-4's
system message), the "observation" and "function" roles as tool results, GLM-4's call written as JSON text
before a result (by the string steps of conversations.text_call), and ChatGLM3's "tool" message (a call with
name and parameters plus its observation). Jinja cannot parse JSON, so a template that writes a call's
arguments as Python keywords (ChatGLM3) refuses arguments given as JSON text instead of writing them wrong.
"""

from __future__ import annotations

import json
from typing import Any

# The template fields the Jinja body reads, written into it as a literal mapping `t`.
FIELDS = (
    "bos",
    "default_system",
    "system",
    "system_in_user",
    "user",
    "assistant",
    "generation_prompt",
    "turn_end",
    "final_turn_end",
    "complete_suffix",
    "strip",
    "observation",
    "observation_open",
    "observation_close",
    "history_join",
    "system_after_tools",
    "tools_system",
    "tool_json",
    "tool_call",
    "tool_call_turn",
)


def jinja_literal(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=True)


_JINJA_BODY = """
{%- set result_roles = ['tool', 'observation', 'function'] -%}
{%- set nt = namespace(given=tools or [], list=[]) -%}
{%- for m in messages if m.tools -%}{%- set nt.given = m.tools -%}{%- endfor -%}
{%- for tool in nt.given -%}
{%- set nt.list = nt.list + [tool if (tool.function is defined or tool.type is defined) else {'type': 'function', 'function': tool}] -%}
{%- endfor -%}
{%- set tool_list = nt.list -%}
{%- set ns = namespace(system=t.default_system, start=0, first_user=true) -%}
{%- if messages and messages[0].role == 'system' -%}{%- set ns.system = messages[0].content or '' -%}{%- set ns.start = 1 -%}{%- endif -%}
{%- if ns.system is not none and t.strip -%}{%- set ns.system = ns.system | trim -%}{%- endif -%}
{%- if tool_list and t.tools_system is none -%}{{- raise_exception('this chat template does not write tool definitions') -}}{%- endif -%}
{%- set own_system = ns.system -%}
{%- if tool_list -%}
{%- set ns2 = namespace(text='', functions=[]) -%}
{%- for tool in tool_list -%}{%- set ns2.functions = ns2.functions + [tool.function if tool.function is mapping else tool] -%}{%- endfor -%}
{%- if t.tool_json == 'chatglm3' -%}{%- set ns2.text = ns2.functions | tojson(indent=4) -%}{%- endif -%}
{%- for tool in tool_list if t.tool_json != 'chatglm3' -%}
{%- if t.tool_json == 'glm4' -%}{%- set f = ns2.functions[loop.index0] -%}
{%- set ns2.text = ns2.text ~ '\\n## ' ~ f.name ~ '\\n\\n' ~ (f | tojson(indent=4)) ~ '\\n在调用上述函数时，请使用 Json 格式表示调用的参数。' -%}
{%- else -%}{%- set ns2.text = ns2.text ~ ('\\n' if not loop.first else '') ~ (tool | tojson) -%}{%- endif -%}
{%- endfor -%}
{%- set ns.system = t.tools_system | replace('{system}', ns.system or '') | replace('{tools}', ns2.text) -%}
{%- endif -%}
{{- t.bos -}}
{%- if ns.system is not none and t.system is not none -%}{{- t.system | replace('{content}', ns.system) -}}
{%- if tool_list and t.system_after_tools is not none and own_system -%}{{- t.system_after_tools | replace('{content}', own_system) -}}{%- endif -%}{%- endif -%}
{%- set nh = namespace(last_user=-1) -%}{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set nh.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages[ns.start:] -%}
{%- set glm3 = m.role == 'tool' and (m.observation is defined or m.parameters is defined) -%}
{%- set nx = loop.nextitem if loop.nextitem is defined else {} -%}
{%- set nc = namespace(calls=m.tool_calls or [], content=m.content or '') -%}
{%- if glm3 -%}
{%- set nc.calls = [{'function': {'name': m.name, 'arguments': m.parameters if m.parameters is defined else {}}}] -%}{%- set nc.content = '' -%}
{%- elif m.role == 'assistant' and not nc.calls and nx.role in result_roles -%}
{%- set s = nc.content | trim -%}{%- set np = namespace(rest=s, ok=s.endswith('}'), name='') -%}
{%- for step in ['{', '"name"', ':', '"', '', ',', '"arguments"', ':'] -%}
{%- if not step -%}{%- set np.name = np.rest.split('"')[0] -%}{%- set np.rest = np.rest[np.name | length + 1:] -%}
{%- else -%}{%- set r = np.rest.lstrip() -%}{%- set st = '"parameters"' if (step == '"arguments"' and r.startswith('"parameters"')) else step -%}
{%- set np.ok = np.ok and r.startswith(st) -%}{%- set np.rest = r[st | length:] -%}{%- endif -%}
{%- endfor -%}
{%- set args = np.rest.lstrip()[:-1].rstrip() -%}
{%- if np.ok and args.startswith('{') -%}{%- set nc.calls = [{'function': {'name': np.name, 'arguments': args}}] -%}{%- set nc.content = '' -%}{%- endif -%}
{%- endif -%}
{%- if t.strip -%}{%- set nc.content = nc.content | trim -%}{%- endif -%}
{%- set content = nc.content -%}{%- set calls = nc.calls -%}
{%- if t.history_join is not none and loop.index0 + ns.start < nh.last_user and (m.role in ['user', 'assistant'] or glm3) -%}
{%- set ns.first_user = false -%}{{- content ~ t.history_join -}}
{%- elif m.role == 'user' -%}
{%- if ns.first_user and ns.system is not none and t.system is none -%}{%- set content = t.system_in_user | replace('{system}', ns.system) | replace('{content}', content) -%}{%- endif -%}
{%- set ns.first_user = false -%}{{- t.user | replace('{content}', content) -}}
{%- elif m.role == 'assistant' or glm3 -%}
{%- if calls and t.tool_call_turn -%}
{%- for c in calls -%}{%- set a = c.function.arguments -%}{%- set args = a if a is string else (a | tojson) -%}
{%- set nk = namespace(text='') -%}{%- if a is mapping -%}{%- for k, v in a.items() -%}
{%- if v is string -%}{%- set q = '"' if ("'" in v and '"' not in v) else "'" -%}
{%- set r = q ~ (v | replace('\\\\', '\\\\\\\\') | replace('\\n', '\\\\n') | replace(q, '\\\\' ~ q)) ~ q -%}
{%- elif v is sameas true -%}{%- set r = 'True' -%}{%- elif v is sameas false -%}{%- set r = 'False' -%}{%- elif v is none -%}{%- set r = 'None' -%}
{%- else -%}{%- set r = v | tojson -%}{%- endif -%}
{%- set nk.text = nk.text ~ (', ' if not loop.first else '') ~ k ~ '=' ~ r -%}{%- endfor -%}
{%- elif '{kwargs}' in t.tool_call_turn and not (a is string and (a.split() | join) in ['', '{}']) -%}
{{- raise_exception('this chat template writes tool-call arguments as keywords: give each call its arguments as a mapping, not as JSON text (the call ' ~ c.function.name ~ ')') -}}
{%- endif -%}
{{- t.tool_call_turn | replace('{name}', c.function.name) | replace('{arguments}', args) | replace('{kwargs}', nk.text) -}}{%- endfor -%}
{%- else -%}
{%- if calls and t.tool_call is none -%}{{- raise_exception('this chat template does not write tool calls, so the model would learn to stop instead of calling; train with --template_name auto or a template with tools (e.g. qwen3 or llama3_1), or drop the calls') -}}{%- endif -%}
{%- set ns3 = namespace(text=content) -%}
{%- for c in calls -%}{%- set args = c.function.arguments if c.function.arguments is string else (c.function.arguments | tojson) -%}
{%- set ns3.text = ns3.text ~ ('\\n' if ns3.text else '') ~ (t.tool_call | replace('{name}', c.function.name) | replace('{arguments}', args)) -%}{%- endfor -%}
{{- t.assistant | replace('{content}', ns3.text) -}}
{%- endif -%}
{%- endif -%}
{%- if m.role in result_roles -%}
{%- set text = m.content or '' -%}{%- if glm3 -%}{%- set text = m.observation if m.observation is string else (m.observation | tojson) -%}{%- endif -%}
{%- if t.strip -%}{%- set text = text | trim -%}{%- endif -%}
{%- set nx_glm3 = nx.role == 'tool' and (nx.observation is defined or nx.parameters is defined) -%}
{%- if glm3 or not (loop.previtem is defined and loop.previtem.role in result_roles) -%}{{- t.observation_open -}}{%- endif -%}
{{- t.observation | replace('{content}', text) -}}
{%- if not (nx.role in result_roles and not nx_glm3) -%}{{- t.observation_close -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- t.generation_prompt -}}{%- else -%}{{- t.complete_suffix -}}{%- endif -%}
"""


def jinja_for(t) -> str:
    """The self-contained Jinja chat_template of the Template `t` (its fields as a literal `t`)."""
    values = ", ".join(f'"{name}": {jinja_literal(getattr(t, name))}' for name in FIELDS)
    return (
        f"{{#- chat template '{t.name}' written by llm-pipeline; format: {t.source} -#}}\n{{%- set t = {{{values}}} -%}}"
        + _JINJA_BODY
    )
