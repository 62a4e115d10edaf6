"""Templates: byte-exact published formats, the saved Jinja equals the Python renderer, golden tables."""

import json

import pytest
from transformers import AutoTokenizer

from pipeline.data.templates import (
    apply_template_to_tokenizer,
    chat_template_jinja,
    get_template,
    load_template_file,
    render,
    resolve_template,
    template_names,
)
from pipeline.errors import UserError
from scripts.make_golden import GOLDEN, table
from tests.published_formats import EXPECTED, GLM4_TOOLS, QWEN_TOOLS

SYSTEM = {"role": "system", "content": "You are a careful assistant."}
TURNS = [{"role": "user", "content": "Hello, who are you?"}, {"role": "assistant", "content": "I am a language model."},
         {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 equals 4."}]
CASES = {"conv_sys": ([SYSTEM] + TURNS, False), "conv_nosys": (TURNS, False),
         "prompt_sys": ([SYSTEM] + TURNS[:1], True), "prompt_nosys": (TURNS[:1], True)}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CHAT = [{"role": "user", "content": "What's the weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": "{\"temp\": 18}"}, {"role": "assistant", "content": "It is 18 degrees in Paris."}]


def test_all_required_templates_exist():
    required = {"vicuna", "alpaca", "chatml", "qwen", "llama2", "llama3", "mistral", "chatglm3", "glm4", "baichuan2",
                "yuan2", "deepseek", "yi", "gemma", "phi3", "internlm2"}
    assert required <= set(template_names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("case", sorted(CASES))
def test_render_equals_published_format(name, case):
    want = EXPECTED[name][case]
    if want is None:
        pytest.skip(f"{name}: the official format does not define {case}")
    messages, generation_prompt = CASES[case]
    assert render(name, messages, add_generation_prompt=generation_prompt) == want


def test_tool_formats_equal_published():
    assert render("qwen", TOOL_CHAT, tools=TOOLS) == QWEN_TOOLS
    assert render("glm4", [{"role": "system", "content": ""}] + TOOL_CHAT, tools=TOOLS) == GLM4_TOOLS


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("name", template_names())
def test_saved_jinja_template_equals_renderer(tokenizer, name):
    tokenizer.chat_template = chat_template_jinja(name)
    conversations = [([SYSTEM] + TURNS, None), (TURNS, None), (TOOL_CHAT, TOOLS), ([SYSTEM] + TOOL_CHAT, TOOLS),
                     ([{"role": "user", "content": "  padded  "}, {"role": "assistant", "content": " x\n"}], None)]
    for messages, tools in conversations:
        for gen in (False, True):
            prompt = messages[:-1] if gen else messages
            got = tokenizer.apply_chat_template(prompt, tools=tools, tokenize=False, add_generation_prompt=gen)
            assert got == render(name, prompt, add_generation_prompt=gen, tools=tools), (name, gen)


@pytest.mark.parametrize("name", template_names())
def test_render_is_prefix_preserving(name):
    messages = [SYSTEM] + TURNS
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = render(name, messages[:i], add_generation_prompt=True)
            assert render(name, messages).startswith(prompt)
            assert render(name, messages[: i + 1]).startswith(prompt)


@pytest.mark.parametrize("name", template_names())
def test_golden_tables_are_current(tiny_model, name):
    """Regenerate with: python scripts/make_golden.py"""
    assert table(name, str(tiny_model)) == (GOLDEN / f"{name}.tsv").read_text(encoding="utf-8")


def test_auto_recognises_a_saved_template(tokenizer):
    apply_template_to_tokenizer(tokenizer, get_template("llama3"))
    assert resolve_template("auto", tokenizer).name == "llama3"


def test_template_json_literal_survives_unicode():
    jinja = chat_template_jinja("deepseek")
    assert "<｜end▁of▁sentence｜>" not in jinja  # written as escapes, decoded by Jinja
    assert json.loads('"' + jinja.split('"assistant": "')[1].split('"')[0] + '"').endswith("<｜end▁of▁sentence｜>")


@pytest.mark.parametrize("text, message", [
    ("name: x\nsource: y\nuser: '{content}'\nassistant: 'A: {content}'\nobservation: '{content}'\nsytem: S\n",
     "unknown field\\(s\\) sytem"),
    ("name: x\nsource: y\nuser: '{content}'\nobservation: '{content}'\nsystem: S\n", "required field\\(s\\) assistant"),
    ("name: x\nsource: y\nuser: '{content}'\nassistant: 'no slot'\nobservation: '{content}'\nsystem: S\n",
     "field assistant must contain \\{content\\}"),
    ("name: [unclosed\n", "is not valid YAML"),
])
def test_a_broken_template_file_names_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=f"template file {path}.*{message}"):
        load_template_file(path)
