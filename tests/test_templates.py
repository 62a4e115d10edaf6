"""Templates: byte-exact published formats, prefix-preserving renders, refusals, golden
tables."""

import json

import pytest
from transformers import AutoTokenizer

from pipeline.data.templates import (
    apply_template_to_tokenizer,
    chat_template_jinja,
    field_template_names,
    get_template,
    load_template_file,
    render,
    resolve_template,
    template_names,
)
from pipeline.errors import UserError
from pipeline.infer.tool_calls import kwargs_arguments
from scripts.make_golden import GOLDEN, official_names, table
from tests.published_formats import EXPECTED, GLM4_TOOLS, QWEN_TOOLS

SYSTEM = {"role": "system", "content": "You are a careful assistant."}
TURNS = [
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": "I am a language model."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 equals 4."},
]
CASES = {
    "conv_sys": ([SYSTEM] + TURNS, False),
    "conv_nosys": (TURNS, False),
    "prompt_sys": ([SYSTEM] + TURNS[:1], True),
    "prompt_nosys": (TURNS[:1], True),
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CHAT = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp": 18}'},
    {"role": "assistant", "content": "It is 18 degrees in Paris."},
]


def test_all_required_templates_exist():
    required = {
        "vicuna",
        "alpaca",
        "chatml",
        "qwen",
        "llama2",
        "llama3",
        "mistral",
        "chatglm3",
        "glm4",
        "baichuan2",
        "yuan2",
        "deepseek",
        "yi",
        "gemma",
        "phi3",
        "internlm2",
    }
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
    assert (
        render("glm4", [{"role": "system", "content": ""}] + TOOL_CHAT, tools=TOOLS) == GLM4_TOOLS
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize(
    "name", [n for n in field_template_names() if not get_template(n).tools_system]
)
def test_a_template_without_tool_definitions_refuses_tools(tokenizer, name):
    """A template of fields that writes no tool definitions refuses a conversation with tools, in a
    run and in the saved tokenizer alike, instead of training calls to tools it never shows."""
    tokenizer.chat_template = get_template(name).chat_template
    for gen in (False, True):
        prompt = TOOL_CHAT[:-1] if gen else TOOL_CHAT
        with pytest.raises(Exception, match="does not write tool definitions"):
            tokenizer.apply_chat_template(
                prompt, tools=TOOLS, tokenize=False, add_generation_prompt=gen
            )
        with pytest.raises(UserError, match="does not write tool definitions"):
            render(name, prompt, add_generation_prompt=gen, tools=TOOLS)


@pytest.mark.parametrize("name", field_template_names())
def test_render_is_prefix_preserving(name):
    """Each answer's prompt starts its conversation, except where the format joins history
    differently (Yuan2): there only the conversation through that answer starts with it (trained one
    answer a sample)."""
    messages = [SYSTEM] + TURNS
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = render(name, messages[:i], add_generation_prompt=True)
            if get_template(name).history_join is None:
                assert render(name, messages).startswith(prompt)
            assert render(name, messages[: i + 1]).startswith(prompt)


def test_yuan2_trains_fastchats_texts(tiny_model):
    """FastChat's Yuan2 prompt joins history with <n> and ends the question with <sep>; its split
    and last-response loss modes train each answer after exactly that prompt."""
    from pipeline.data.masking import IGNORE_INDEX, encode_samples

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    template = resolve_template("yuan2", tokenizer)
    chat = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert render("yuan2", chat[:3], add_generation_prompt=True) == "q1<n>a1<n>q2<sep>"

    def texts(mode):
        out = []
        for s in encode_samples(template, tokenizer, {"messages": chat}, mode):
            trained = [t for t, label in zip(s.input_ids, s.labels) if label != IGNORE_INDEX]
            out.append((tokenizer.decode(s.input_ids), tokenizer.decode(trained)))
        return out

    split = [("q1<sep>a1<eod>", "a1<eod>"), ("q1<n>a1<n>q2<sep>a2<eod>", "a2<eod>")]
    assert texts("split") == split
    assert texts("all") == split  # every answer trained, each after the prompt inference builds
    assert texts("last") == [("q1<n>a1<n>q2<sep>a2<eod>", "a2<eod>")]


@pytest.mark.parametrize("name", template_names() + official_names())
def test_golden_tables_are_current(tiny_model, name):
    """Regenerate with: python scripts/make_golden.py"""
    assert table(name, str(tiny_model)) == (GOLDEN / f"{name}.tsv").read_text(encoding="utf-8")


def test_template_json_literal_survives_unicode():
    jinja = chat_template_jinja("deepseek")
    assert "<｜end▁of▁sentence｜>" not in jinja  # written as escapes, decoded by Jinja
    assert json.loads('"' + jinja.split('"assistant": "')[1].split('"')[0] + '"').endswith(
        "<｜end▁of▁sentence｜>"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "name: x\nsource: y\nuser: '{content}'\nassistant: 'A: {content}'\n"
            "observation: '{content}'\nsytem: S\n",
            "unknown field\\(s\\) sytem",
        ),
        (
            "name: x\nsource: y\nuser: '{content}'\nobservation: '{content}'\nsystem: S\n",
            "required field\\(s\\) assistant",
        ),
        (
            "name: x\nsource: y\nuser: '{content}'\nassistant: 'no slot'\n"
            "observation: '{content}'\nsystem: S\n",
            "field assistant must contain \\{content\\}",
        ),
        ("name: [unclosed\n", "is not valid YAML"),
    ],
)
def test_a_broken_template_file_names_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=f"template file {path}.*{message}"):
        load_template_file(path)


def test_chatglm3_tools_are_native_and_parse_back_with_chatglm3s_response_parser(tokenizer):
    """ChatGLM3's own format: tools in a first system turn as indented JSON (each tool as its
    function dict, the shape ChatGLM3's tool demos give), a call as an assistant turn whose
    metadata is the tool name and whose content is a python fence around tool_call(...); the model's
    response parser (split the metadata line, drop the fence lines, eval with tool_call returning
    its keywords) gives back the name and arguments. The saved Jinja writes the same text."""
    args = {"city": "Paris", "note": 'it\'s "mild"\nok', "days": 3, "metric": True, "extra": None}
    chat = [
        {"role": "system", "content": "Be brief."},
        TOOL_CHAT[0],
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": args}}
            ],
        },
    ] + TOOL_CHAT[2:]
    text = render("chatglm3", chat, tools=TOOLS)
    assert text.startswith(
        "[gMASK]sop<|system|>\n Answer the following questions as best as you can. You have access "
        "to the following tools:\n"
        + json.dumps([t["function"] for t in TOOLS], indent=4, ensure_ascii=False)
        + "<|system|>\n Be brief.<|user|>"
    )
    response = text.split("<|assistant|>")[1].split("<|observation|>")[0]
    metadata, content = response.split("\n", maxsplit=1)
    code = "\n".join(content.split("\n")[1:-1])
    assert metadata == "get_weather" and content.startswith(" ```python\n")
    assert code.startswith("tool_call(") and code.endswith(")")
    assert kwargs_arguments(code[len("tool_call(") : -1]) == args
    tokenizer.chat_template = chat_template_jinja("chatglm3")
    assert tokenizer.apply_chat_template(chat, tools=TOOLS, tokenize=False) == text


def test_chatglm3_sop_is_one_token(tokenizer):
    from pipeline.data.templates import apply_template_to_tokenizer as apply

    apply(tokenizer, get_template("chatglm3"))
    ids = tokenizer("[gMASK]sop<|user|>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3


def test_the_saved_template_of_one_without_calls_refuses_a_call_instead_of_writing_none(tiny_model):
    """A template of fields that writes no tool calls: training refuses a call, and so does its
    saved chat template at inference (a server given tool-call history), instead of rendering the
    missing call as the text None."""
    from jinja2.exceptions import TemplateError

    conv = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
        },
        {"role": "tool", "content": "1"},
        {"role": "assistant", "content": "ok"},
    ]
    names = [
        n
        for n in field_template_names()
        if get_template(n).tool_call is None and get_template(n).tool_call_turn is None
    ]
    assert {"gemma", "phi4"} <= set(names)
    for name in names:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        apply_template_to_tokenizer(tokenizer, get_template(name))
        with pytest.raises(TemplateError, match="does not write tool calls"):
            tokenizer.apply_chat_template(conv, tokenize=False)
