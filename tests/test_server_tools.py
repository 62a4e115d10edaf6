"""Tools through pipeline.serve: the prompt of a tools request is the tokenizer's own
apply_chat_template with tools; for every template family (official templates and the project's
saved ones) whose call format can be read off its template, the text the template writes for an
assistant's tool calls, tokenized and decoded as the server decodes answers, comes back from the
server's response builder as the same calls; and the real server with the official openai client: a
tools request is a 200 with a valid response, a tool-role history is accepted, tool_choice it cannot
honour is a 400, and a tiny model trained to call a tool answers with tool_calls (finish_reason
"tool_calls"), whole and streamed as delta.tool_calls."""

import json
from types import SimpleNamespace

import openai
import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

from pipeline.data.rendering import own_template, render_segments
from pipeline.data.templates import apply_template_to_tokenizer, get_template, template_names
from pipeline.infer.tool_calls import CallStream, ChatTools, TokenTap
from tests.official_families import all_families, family_tokenizer
from tests.test_serve import serve

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": n,
            "description": "d",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    }
    for n in ("get_weather", "get_time")
]
CALLS = [
    ("get_weather", {"city": "Paris", "days": 3}, "x1y2z3w4v"),
    ("get_time", {"city": "Oslo"}, "k9l8m7n6p"),
]
# families whose calls come back as tool_calls; the rest answer with text (they write no calls,
# write arguments as XML or keys, or never show the tools: DeepSeek-R1 and V3.1 write calls but no
# tool list)
PARSED = {
    "command-r7b",
    "falcon3",
    "gpt-oss",
    "granite-4.0",
    "hermes-3-llama-3.1",
    "llama-3.3-instruct",
    "llama-4",
    "ministral-3-reasoning",
    "mistral-7b-instruct-v0.3",
    "mistral-nemo-2407",
    "mistral-small-3.2",
    "qwen2.5-instruct",
    "qwen3",
    "qwen3-instruct-2507",
    "qwen3-thinking-2507",
    "qwq",
    *(
        f"project:{n}"
        for n in (
            "alpaca",
            "baichuan2",
            "chatglm3",
            "chatml",
            "deepseek",
            "glm4",
            "internlm2",
            "llama2",
            "llama3",
            "llama3_1",
            "mistral",
            "mistral_v0_3",
            "phi3",
            "qwen",
            "qwen3",
            "vicuna",
            "yi",
            "yuan2",
        )
    ),
}
SINGLE = {
    "gpt-oss",
    "llama-3.3-instruct",
    "project:llama3_1",
}  # templates that write one call per answer


def tools_for(tokenizer) -> ChatTools:
    """The server's ChatTools for a tokenizer, stopping where training saves the stops
    (generation_config)."""
    stops = [tokenizer.convert_tokens_to_ids(s) for s in own_template(tokenizer).stop]
    return ChatTools(
        SimpleNamespace(
            tokenizer=tokenizer,
            template_name=None,
            generation_config=GenerationConfig(eos_token_id=stops),
        )
    )


def family(tiny_model, name: str):
    if name.startswith("project:"):
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        apply_template_to_tokenizer(tokenizer, get_template(name.split(":")[1]))
        return tokenizer
    return family_tokenizer(tiny_model, name)


def call_message(n: int) -> dict:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": i, "type": "function", "function": {"name": f, "arguments": a}}
            for f, a, i in CALLS[:n]
        ],
    }


@pytest.mark.parametrize("name", [*all_families(), *(f"project:{n}" for n in template_names())])
def test_the_calls_a_template_writes_parse_back_to_the_same_calls(tiny_model, name):
    tokenizer = family(tiny_model, name)
    tools = tools_for(tokenizer)
    assert (tools.format is not None) == (name in PARSED)
    if (
        tools.format is None or name == "falcon3"
    ):  # Falcon3 writes a call inside the user turn: training refuses it
        return
    ask = [{"role": "user", "content": "Weather in Paris, time in Oslo?"}]
    for n in (1,) if name in SINGLE else (1, 2):
        t = own_template(tokenizer)
        answer = next(
            s.text for s in render_segments(t, [*ask, call_message(n)], TOOLS) if s.kind == "answer"
        )
        tap = TokenTap(tokenizer, tools.stop_ids)  # as the server decodes the answer's ids
        tap.put(tokenizer("prompt", return_tensors="pt").input_ids)
        for token in tokenizer(answer, add_special_tokens=False).input_ids:
            tap.put(torch.tensor([token]))
        message, finish = tools.message(
            tap.text(), {"get_weather", "get_time"}, "stop", lambda: "call_new"
        )
        assert finish == "tool_calls", (tap.text(), tools.format)
        got = [
            (c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in message["tool_calls"]
        ]
        assert got == [(f, a) for f, a, _ in CALLS[:n]]
        # a call of a tool the request does not offer is text, as is an ordinary answer
        assert tools.message(tap.text(), {"other"}, "stop", str)[1] == "stop"
        assert tools.message("Sunny and 21 C.", {"get_weather"}, "stop", str) == (
            {"role": "assistant", "content": "Sunny and 21 C."},
            "stop",
        )


@pytest.mark.parametrize(
    "name", ["qwen2.5-instruct", "mistral-7b-instruct-v0.3", "llama-3.3-instruct", "project:glm4"]
)
def test_a_tools_prompt_is_the_tokenizers_own_render_with_tools(tiny_model, name):
    tokenizer = family(tiny_model, name)
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        call_message(1),
        {"role": "tool", "tool_call_id": CALLS[0][2], "name": "get_weather", "content": "sunny"},
    ]
    for messages in (history[:1], history):
        expected = tokenizer.apply_chat_template(
            messages, tools=TOOLS, add_generation_prompt=True, tokenize=False
        )
        assert tools_for(tokenizer).render(messages, TOOLS) == expected


def test_a_stream_holds_back_only_what_may_be_a_call(tiny_model):
    tools = tools_for(family(tiny_model, "qwen2.5-instruct"))
    stream = CallStream(tools.format, {"get_weather"})
    assert stream.ready("Let me") == "Let me"
    assert stream.ready("Let me check.\n<tool") == " check.\n"
    assert stream.ready('Let me check.\n<tool_call>\n{"name": "get_weather"') == ""
    plain = CallStream(tools.format, {"get_weather"})
    assert plain.ready("a < b") == "a < b" and plain.ready("a < b, so") == ", so"


# --------------------------------------------------------------- the real server, the openai client

WEATHER = {"city": "Paris"}


@pytest.fixture(scope="module")
def caller(tiny_model, tmp_path_factory):
    """The tiny model trained (qwen template) to answer a weather question with a get_weather call,
    and a tool result with a sentence."""
    from stages import sft

    data = tmp_path_factory.mktemp("tool-data")
    rows = []
    for city in ("Paris", "Oslo", "Rome", "Lima"):
        rows.append(
            {
                "tools": TOOLS[:1],
                "messages": [
                    {"role": "user", "content": f"Weather in {city}?"},
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": {"city": city}},
                            }
                        ],
                    },
                    {"role": "tool", "content": "sunny"},
                    {"role": "assistant", "content": f"Sunny in {city}."},
                ],
            }
        )
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows * 8))
    out = tmp_path_factory.mktemp("tool-sft") / "sft"
    sft.main(
        [
            "--model_name_or_path",
            str(tiny_model),
            "--template_name",
            "qwen",
            "--train_file_dir",
            str(data),
            "--validation_split_percentage",
            "0",
            "--output_dir",
            str(out),
            "--use_peft",
            "False",
            "--learning_rate",
            "3e-3",
            "--max_steps",
            "200",
            "--per_device_train_batch_size",
            "8",
            "--model_max_length",
            "512",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--seed",
            "0",
        ]
    )
    return out


@pytest.fixture(scope="module")
def client(caller, tmp_path_factory):
    with serve(caller, tmp_path_factory.mktemp("serve-tools"), "--max_new_tokens", "80") as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def ask(city: str) -> list[dict]:
    return [{"role": "user", "content": f"Weather in {city}?"}]


@pytest.mark.slow  # trains the tool-calling model
def test_a_tools_request_gets_the_call_the_model_writes(client, caller):
    response = client.chat.completions.create(
        model="tiny-sft", messages=ask("Paris"), tools=TOOLS[:1]
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (
        call.type == "function"
        and call.function.name == "get_weather"
        and call.id.startswith("call_")
    )
    assert json.loads(call.function.arguments) == WEATHER
    tokenizer = AutoTokenizer.from_pretrained(caller)
    prompt = tokenizer.apply_chat_template(
        ask("Paris"), tools=TOOLS[:1], add_generation_prompt=True, return_dict=False
    )
    assert response.usage.prompt_tokens == len(
        prompt
    )  # the prompt is the template's own render with tools


@pytest.mark.slow  # trains the tool-calling model
def test_a_streamed_call_comes_as_tool_call_deltas(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny-sft", messages=ask("Paris"), tools=TOOLS[:1], stream=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""  # nothing of the call leaked as text
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", WEATHER)
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.slow  # trains the tool-calling model
def test_a_tool_result_in_the_history_is_answered(client):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps(WEATHER)},
    }
    messages = [
        *ask("Paris"),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    response = client.chat.completions.create(model="tiny-sft", messages=messages, tools=TOOLS[:1])
    choice = response.choices[0]
    assert response.object == "chat.completion" and choice.finish_reason in ("stop", "length")
    assert choice.message.content and not choice.message.tool_calls
    none = client.chat.completions.create(
        model="tiny-sft", messages=ask("Paris"), tools=TOOLS[:1], tool_choice="none"
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in (
        "stop",
        "length",
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "choice, says",
    [
        ("required", "cannot force a call"),
        ({"type": "function", "function": {"name": "get_weather"}}, "cannot force"),
        ("sometimes", 'tool_choice must be "auto"'),
    ],
)
def test_tool_choice_the_server_cannot_honour_is_a_400(client, choice, says):
    with pytest.raises(openai.BadRequestError, match=says) as e:
        client.chat.completions.create(
            model="tiny-sft", messages=ask("Paris"), tools=TOOLS[:1], tool_choice=choice
        )
    assert e.value.body["param"] == "tool_choice"


@pytest.mark.slow  # trains the tool-calling model
def test_malformed_tools_are_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\] must be"):
        client.chat.completions.create(
            model="tiny-sft", messages=ask("Paris"), tools=[{"type": "retrieval"}]
        )
    bad = [
        *ask("Paris"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "not json"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c", "content": "sunny"},
    ]
    with pytest.raises(
        openai.BadRequestError,
        match=r"messages\[1\].tool_calls\[0\].function.arguments must be a JSON",
    ):
        client.chat.completions.create(model="tiny-sft", messages=bad, tools=TOOLS[:1])
